"""What each reversal claimed, so that no later reversal claims the same coins again.

A reversal's `coins_already_spent` is the part of the user's debt that is new: the debt less
what earlier reversals claimed and purchases kept have not repaid since (wallet domain
`reversal_spent`). Each reversed purchase now records what it claimed. Nullable and not
backfilled: reversals from before this revision are read from the ledger (the balance their
entry left), as the event of that time computed them.

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    op.add_column("purchases", sa.Column("coins_claimed", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("purchases") as batch:
        batch.drop_column("coins_claimed")
