"""An index to find old KEY_ONLY rows: the KeyOnlyPruner deletes them after IDEMPOTENCY_RETENTION_DAYS.

A KEY_ONLY row records only the key of an unlock answered by the user's earlier unlock
(services/gifting/keyrows.py). Partial on status = 'KEY_ONLY' (the same text as
storage.KEY_ONLY_ROWS, so PostgreSQL plans on it whatever it does with bound parameters): gifts
never enter it. Built CONCURRENTLY on PostgreSQL: gift_events is the largest table, and the
previous release keeps sending gifts during the rollout.

Revision ID: 0012
Revises: 0011
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from services.common.migrate import create_index_beside_writers

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEY_ONLY = sa.text("status = 'KEY_ONLY'")


def upgrade() -> None:
    """Apply this revision."""
    create_index_beside_writers(
        "ix_gift_events_key_only",
        "gift_events",
        ["created_at_us"],
        sqlite_where=_KEY_ONLY,
        postgresql_where=_KEY_ONLY,
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_index("ix_gift_events_key_only", table_name="gift_events")
