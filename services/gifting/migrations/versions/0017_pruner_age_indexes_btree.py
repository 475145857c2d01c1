"""The pruners' age indexes become B-trees on PostgreSQL: a BRIN index stopped finding only the old rows.

A BRIN index keeps, per range of pages, the least and greatest value; an insert only widens them.
Once a pruner has deleted a range's old rows, vacuum hands their space to new rows: the range
then spans the oldest value and the newest, and every range matches "older than the retention".
After one retention's worth of turnover each pruning round read the whole table to find the
rows due (the inbox: ~45 days of events, ~12 GB at a million gifts a day, every
INBOX_PRUNE_INTERVAL_S). A B-tree finds exactly those, at ~23 bytes a row. The BRIN index is
dropped CONCURRENTLY and the B-tree of the same name built CONCURRENTLY beside the previous
release's writers (`services.common.migrate.replace_brin_with_btree`); SQLite has B-trees only.

Revision ID: 0017
Revises: 0016
"""

from collections.abc import Sequence

from services.common.migrate import replace_brin_with_btree, restore_brin

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    replace_brin_with_btree("ix_inbox_received_at")
    replace_brin_with_btree("ix_idempotency_keys_created_at")
    replace_brin_with_btree("ix_leaderboard_daily_day")


def downgrade() -> None:
    """Revert this revision."""
    restore_brin("ix_leaderboard_daily_day")
    restore_brin("ix_idempotency_keys_created_at")
    restore_brin("ix_inbox_received_at")
