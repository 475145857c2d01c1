"""An index of each stream's SENT gifts in feed order, for a WatchStream that resumes after a cursor.

A resumed feed reads the stream's gifts sent after its cursor, a page at a time, ordered by
(updated_at_us, event_id): a SENT row's updated_at_us is when it was marked SENT and never
changes after. Partial on status = 'SENT' (the same text as storage.SENT_ONLY, so PostgreSQL
plans on it whatever it does with bound parameters): a gift enters it once, when it is marked
SENT; pending and cancelled gifts never do. Built CONCURRENTLY on PostgreSQL: gift_events is the
largest table, and the previous release keeps sending gifts during the rollout.

Revision ID: 0011
Revises: 0010
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from services.common.migrate import create_index_beside_writers

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SENT_ONLY = sa.text("status = 'SENT'")


def upgrade() -> None:
    """Apply this revision."""
    create_index_beside_writers(
        "ix_gift_events_stream_sent",
        "gift_events",
        ["stream_id", "updated_at_us", "event_id"],
        sqlite_where=_SENT_ONLY,
        postgresql_where=_SENT_ONLY,
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_index("ix_gift_events_stream_sent", table_name="gift_events")
