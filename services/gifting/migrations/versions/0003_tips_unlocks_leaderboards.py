"""Tips' messages, exclusive content and unlocks, leaderboards and creator stats.

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("gift_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("message", sa.String(length=500), nullable=True))
    with op.batch_alter_table("gifts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("updated_by", sa.String(length=128), nullable=True))
    op.create_table(
        "contents",
        sa.Column("content_id", sa.String(length=64), nullable=False),
        sa.Column("creator_id", sa.String(length=128), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("price_coins", sa.BigInteger(), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("content_id"),
    )
    op.create_index("ix_contents_creator_id", "contents", ["creator_id"], unique=False)
    op.create_table(
        "content_unlocks",
        sa.Column("content_id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("content_id", "user_id"),
        sa.UniqueConstraint("event_id"),
    )
    op.create_table(
        "leaderboard_all_time",
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("scope_id", sa.String(length=128), nullable=False),
        sa.Column("sender_id", sa.String(length=128), nullable=False),
        sa.Column("coins", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "scope_id", "sender_id"),
    )
    op.create_index(
        "ix_leaderboard_all_time_rank", "leaderboard_all_time", ["scope", "scope_id", "coins"], unique=False
    )
    op.create_table(
        "leaderboard_daily",
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("scope_id", sa.String(length=128), nullable=False),
        sa.Column("day", sa.BigInteger(), nullable=False),
        sa.Column("sender_id", sa.String(length=128), nullable=False),
        sa.Column("coins", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "scope_id", "day", "sender_id"),
    )
    op.create_table(
        "creator_stats_hourly",
        sa.Column("creator_id", sa.String(length=128), nullable=False),
        sa.Column("hour", sa.BigInteger(), nullable=False),
        sa.Column("stream_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("gift_id", sa.String(length=64), nullable=False),
        sa.Column("coins", sa.BigInteger(), nullable=False),
        sa.Column("events", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("creator_id", "hour", "stream_id", "kind", "gift_id"),
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_table("creator_stats_hourly")
    op.drop_table("leaderboard_daily")
    op.drop_index("ix_leaderboard_all_time_rank", table_name="leaderboard_all_time")
    op.drop_table("leaderboard_all_time")
    op.drop_table("content_unlocks")
    op.drop_index("ix_contents_creator_id", table_name="contents")
    op.drop_table("contents")
    with op.batch_alter_table("gifts", schema=None) as batch_op:
        batch_op.drop_column("updated_by")
    with op.batch_alter_table("gift_events", schema=None) as batch_op:
        batch_op.drop_column("message")
