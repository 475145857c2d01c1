"""An index to find old inbox rows: the InboxPruner deletes them after INBOX_RETENTION_DAYS.

BRIN on PostgreSQL: rows arrive in received order, so a few summary pages find the old ones
and an insert writes no index entry of its own (autosummarize keeps the summaries current
between vacuums). SQLite has B-trees only.

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_index(
        "ix_inbox_received_at",
        "inbox",
        ["received_at_us"],
        unique=False,
        postgresql_using="brin",
        postgresql_with={"autosummarize": "on"},
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_index("ix_inbox_received_at", table_name="inbox")
