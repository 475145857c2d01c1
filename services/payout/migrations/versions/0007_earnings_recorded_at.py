"""When gifting recorded each gift, before its coins were spent; an index of open shortfalls.

A purchase reversal claws back only gifts paid for before it. The gift event's `occurred_at` is
when the gift became SENT, which for a gift the sweeper settles can be after the reversal although
its coins were spent before; `recorded_at` (new in gifting.gift.sent) is when it was recorded
PENDING. Nullable: earnings from older events keep comparing `occurred_at_us`. The shortfall
settler reads only open shortfalls (coins_open > 0): a partial index holds just those.

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
    op.add_column("earnings", sa.Column("recorded_at_us", sa.BigInteger(), nullable=True))
    op.create_index(
        "ix_clawback_shortfalls_open",
        "clawback_shortfalls",
        ["reversal_event_id"],
        postgresql_where=sa.text("coins_open > 0"),
        sqlite_where=sa.text("coins_open > 0"),
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_index("ix_clawback_shortfalls_open", table_name="clawback_shortfalls")
    with op.batch_alter_table("earnings") as batch:
        batch.drop_column("recorded_at_us")
