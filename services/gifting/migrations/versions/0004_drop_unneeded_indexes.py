"""Indexes no query needs any more, and outbox rows published before rows were deleted.

The relay deletes an outbox row once JetStream has acked it, so every row left is unpublished
and the partial index on unpublished ids only repeated the primary key: one index entry less
per event. Rows that earlier versions marked published (`published_at_us` set) are never read
again; they are removed here.

gift_events.stream_id had an index no query uses.

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    op.execute("DELETE FROM outbox WHERE published_at_us IS NOT NULL")
    op.drop_index("ix_outbox_unpublished", table_name="outbox")
    # Nothing reads gift events by stream (leaderboards and stats are their own tables). The index
    # cost an entry at the insert and another at the SENT update, which changes indexed columns.
    op.drop_index("ix_gift_events_stream_id", table_name="gift_events")


def downgrade() -> None:
    """Revert this revision (the deleted outbox rows were published: they are not needed back)."""
    op.create_index("ix_gift_events_stream_id", "gift_events", ["stream_id"], unique=False)
    op.create_index(
        "ix_outbox_unpublished",
        "outbox",
        ["id"],
        unique=False,
        sqlite_where=sa.text("published_at_us IS NULL"),
        postgresql_where=sa.text("published_at_us IS NULL"),
    )
