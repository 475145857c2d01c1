"""Seed the public US coin price list (DOMAIN.md); operators change it later without a deploy.

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

# (coins, price in cents): in-app prices, USD.
US_PACKAGES = [(70, 99), (350, 499), (700, 999), (1400, 1999), (3500, 4999), (7000, 9999), (17500, 24999)]


def upgrade() -> None:
    """Insert the US price list."""
    table = sa.table(
        "coin_packages",
        sa.column("package_id", sa.String),
        sa.column("region", sa.String),
        sa.column("currency_code", sa.String),
        sa.column("coins", sa.BigInteger),
        sa.column("price_minor", sa.BigInteger),
        sa.column("active", sa.Boolean),
    )
    op.bulk_insert(
        table,
        [
            {
                "package_id": f"us-usd-{coins}",
                "region": "US",
                "currency_code": "USD",
                "coins": coins,
                "price_minor": cents,
                "active": True,
            }
            for coins, cents in US_PACKAGES
        ],
    )


def downgrade() -> None:
    """Remove the seeded packages."""
    op.execute("DELETE FROM coin_packages WHERE package_id LIKE 'us-usd-%'")
