"""What the wallet last said holds a creator's approved withdrawals, for Withdrawal.hold.

The dispatcher asks the wallet whether a creator may still withdraw before it claims an APPROVED
withdrawal, and holds it when not (blocked, under age, the wallet unavailable); that answer was
kept only in the dispatcher's memory, so GetWithdrawal and ListWithdrawals could not say why the
withdrawal waits. `wallet_hold` is that answer's reason ('' when none), written by the dispatcher
only when it changes. A new column with a default: the previous release, still running during
the rollout, neither reads nor writes it.

Revision ID: 0014
Revises: 0013
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    # IF NOT EXISTS on PostgreSQL: a rollback to a release before the migrate runner that leaves a
    # later release's revision alone sets alembic_version back past this one (docs/sre.md "Rolling
    # back"), and the next upgrade runs it again on the column it left.
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE creators ADD COLUMN IF NOT EXISTS wallet_hold VARCHAR(32) DEFAULT '' NOT NULL")
    else:
        op.add_column("creators", sa.Column("wallet_hold", sa.String(32), nullable=False, server_default=""))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("creators") as batch:
        batch.drop_column("wallet_hold")
