"""The time of the reversal each clawback entry is for, so that an older reversal applied after a
newer one can stand in for it.

A reversal takes only earnings of gifts recorded before it. The payout consumer may apply a newer
reversal of a sender before an older one (an event nak'ed with a delay, or parked and replayed):
the newer one can take the only earnings the older one may have, and the gifts that arrive later
are out of the older one's reach, so its shortfall stayed open for good. With each entry's
reversal time the older one may take later earnings as far as newer ones took earlier ones for it
(`Payout._stand_in_takes`). Nullable, not backfilled: an entry without it (written before, or by
the previous release during the rollout) frees nothing for an older reversal, which errs on
taking less. The index serves the sum of a sender's entries newer than a reversal; built
CONCURRENTLY on PostgreSQL, as the previous release keeps writing the table during the rollout.

Revision ID: 0016
Revises: 0015
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from services.common.migrate import create_index_beside_writers

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    # IF NOT EXISTS on PostgreSQL: a rollback to a release before the migrate runner sets
    # alembic_version back past this one (docs/sre.md "Rolling back"), and the next upgrade runs it again.
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE clawbacks ADD COLUMN IF NOT EXISTS reversed_at_us BIGINT")
    else:
        op.add_column("clawbacks", sa.Column("reversed_at_us", sa.BigInteger, nullable=True))
    create_index_beside_writers("ix_clawbacks_sender_reversed", "clawbacks", ["sender_id", "reversed_at_us"])


def downgrade() -> None:
    """Revert this revision."""
    op.drop_index("ix_clawbacks_sender_reversed", table_name="clawbacks")
    with op.batch_alter_table("clawbacks") as batch:
        batch.drop_column("reversed_at_us")
