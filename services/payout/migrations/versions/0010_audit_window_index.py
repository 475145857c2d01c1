"""An index of the earnings in credit order, for the audit's recent window.

`livegifts audit --detail-since` reads the ids of a recent window a page at a time, in
(credited_at_us, event_id) order (ListAuditRecords with since_us): without this index each page
scanned the whole table. Built CONCURRENTLY on PostgreSQL (earnings is among the largest
tables, and the previous release keeps writing it during the rollout).

Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence

from alembic import op

from services.common.migrate import create_index_beside_writers

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    create_index_beside_writers("ix_earnings_credited", "earnings", ["credited_at_us", "event_id"])


def downgrade() -> None:
    """Revert this revision."""
    op.drop_index("ix_earnings_credited", table_name="earnings")
