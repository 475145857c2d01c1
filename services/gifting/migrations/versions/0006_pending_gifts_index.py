"""The sweeper's index holds PENDING gifts only.

ix_gift_events_status_updated (status, updated_at_us) held two entries for every gift ever sent
(its PENDING and its SENT row version) to find the few still pending. The partial index holds
the pending ones: it stays as small as the gifts in flight, and marking a gift SENT or
CANCELLED adds no entry to it. The sweeper's query, this release's and the previous one's
(status = :param AND updated_at_us < :cutoff), is planned on it on both backends
(tests/integration/test_migrations.py checks the plan).

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PENDING_ONLY = sa.text("status = 'PENDING'")


def upgrade() -> None:
    """Apply this revision."""
    op.create_index(
        "ix_gift_events_pending",
        "gift_events",
        ["updated_at_us"],
        unique=False,
        sqlite_where=_PENDING_ONLY,
        postgresql_where=_PENDING_ONLY,
    )
    op.drop_index("ix_gift_events_status_updated", table_name="gift_events")


def downgrade() -> None:
    """Revert this revision."""
    op.create_index("ix_gift_events_status_updated", "gift_events", ["status", "updated_at_us"], unique=False)
    op.drop_index("ix_gift_events_pending", table_name="gift_events")
