"""An index to find old daily leaderboard rows: the LeaderboardDailyPruner deletes them after
LEADERBOARD_DAILY_RETENTION_DAYS.

The leaderboards read only the last LEADERBOARD_WINDOW_DAYS of leaderboard_daily; every older row
was kept for good (about one per stream and sender and one per creator and sender a day). BRIN on
PostgreSQL, as the inbox's: rows are written in day order, and a few pages index them all. Built
CONCURRENTLY beside the previous release's writers (create_index_beside_writers); the first
pruning round then deletes the backlog in paced chunks.

Revision ID: 0014
Revises: 0013
"""

from collections.abc import Sequence

from alembic import op

from services.common.migrate import create_index_beside_writers

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    create_index_beside_writers(
        "ix_leaderboard_daily_day",
        "leaderboard_daily",
        ["day"],
        postgresql_using="brin",
        postgresql_with={"autosummarize": "on"},
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_index("ix_leaderboard_daily_day", table_name="leaderboard_daily")
