"""Seed policy version 1: creators get 50% of a coin's value as diamonds (DOMAIN.md).

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Insert policy version 1."""
    table = sa.table(
        "policies",
        sa.column("version", sa.Integer),
        sa.column("creator_share_bp", sa.Integer),
        sa.column("changed_by", sa.String),
        sa.column("changed_at_us", sa.BigInteger),
    )
    op.bulk_insert(table, [{"version": 1, "creator_share_bp": 5000, "changed_by": "migration", "changed_at_us": 0}])


def downgrade() -> None:
    """Remove policy version 1."""
    op.execute("DELETE FROM policies WHERE version = 1")
