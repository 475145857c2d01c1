"""An index to find old idempotency records: the IdempotencyPruner deletes them after IDEMPOTENCY_RETENTION_DAYS.

BRIN on PostgreSQL, as the inbox's (0005): records are written in created order, so a few
summary pages find the old ones and a command's insert writes no index entry of its own.
SQLite has B-trees only. Built CONCURRENTLY on PostgreSQL: the table has grown since the
service began, and the previous release keeps recording its commands' answers during the
rollout.

Revision ID: 0009
Revises: 0008
"""

from collections.abc import Sequence

from alembic import op

from services.common.migrate import create_index_beside_writers

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    create_index_beside_writers(
        "ix_idempotency_keys_created_at",
        "idempotency_keys",
        ["created_at_us"],
        postgresql_using="brin",
        postgresql_with={"autosummarize": "on"},
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_index("ix_idempotency_keys_created_at", table_name="idempotency_keys")
