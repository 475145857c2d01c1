"""An index of the gifts in creation order, for the audit's recent window.

`livegifts audit --detail-since` reads the ids of a recent window a page at a time, in
(created_at_us, event_id) order (ListAuditRecords with since_us): without this index each page
scanned the whole table. Built CONCURRENTLY on PostgreSQL (gift_events is among the largest
tables, and the previous release keeps writing it during the rollout).

Revision ID: 0013
Revises: 0012
"""

from collections.abc import Sequence

from alembic import op

from services.common.migrate import create_index_beside_writers

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    create_index_beside_writers("ix_gift_events_created", "gift_events", ["created_at_us", "event_id"])


def downgrade() -> None:
    """Revert this revision."""
    op.drop_index("ix_gift_events_created", table_name="gift_events")
