"""Promotions, spending limits with per-period counters, price lists in GBP, EUR, JPY and a US web list.

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

# (region, currency, [(coins, price in minor units)]): in-app price lists. GB is DOMAIN.md's
# public list; EUR and JPY follow the US list at local price points (JPY has no minor unit).
PRICE_LISTS = [
    ("GB", "GBP", [(65, 89), (330, 449), (660, 899), (1320, 1799), (3300, 4499), (6600, 8999), (16500, 21999)]),
    ("DE", "EUR", [(70, 109), (350, 549), (700, 1099), (1400, 2199), (3500, 5499), (7000, 10999), (17500, 27499)]),
    ("FR", "EUR", [(70, 109), (350, 549), (700, 1099), (1400, 2199), (3500, 5499), (7000, 10999), (17500, 27499)]),
    ("JP", "JPY", [(70, 160), (350, 800), (700, 1600), (1400, 3200), (3500, 8000), (7000, 16000), (17500, 40000)]),
]
# Web purchases skip the app store's cut (DOMAIN.md: 70 coins $0.74); the rest scale alike.
US_WEB = [(70, 74), (350, 370), (700, 740), (1400, 1480), (3500, 3700), (7000, 7400), (17500, 18500)]


def upgrade() -> None:
    """Add promotions, limits, counters, purchase promotion columns; seed the price lists."""
    op.create_table(
        "promotions",
        sa.Column("promotion_id", sa.String(length=64), nullable=False),
        sa.Column("package_id", sa.String(length=64), nullable=False),
        sa.Column("bonus_coins", sa.BigInteger(), nullable=False),
        sa.Column("discount_bps", sa.Integer(), nullable=False),
        sa.Column("starts_at_us", sa.BigInteger(), nullable=False),
        sa.Column("ends_at_us", sa.BigInteger(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("updated_by", sa.String(length=128), nullable=False),
        sa.Column("updated_at_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("promotion_id"),
    )
    with op.batch_alter_table("promotions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_promotions_package_id"), ["package_id"], unique=False)
    op.create_table(
        "spending_limits",
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("setter", sa.String(length=16), nullable=False),
        sa.Column("period", sa.String(length=8), nullable=False),
        sa.Column("limit_coins", sa.BigInteger(), nullable=True),
        sa.Column("pending_limit_coins", sa.BigInteger(), nullable=True),
        sa.Column("pending_at_us", sa.BigInteger(), nullable=True),
        sa.Column("updated_at_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "setter", "period"),
    )
    op.create_table(
        "spend_counters",
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("period", sa.String(length=8), nullable=False),
        sa.Column("period_key", sa.String(length=16), nullable=False),
        sa.Column("spent_coins", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "period", "period_key"),
    )
    with op.batch_alter_table("coin_packages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("channel", sa.String(length=8), server_default="APP", nullable=False))
    with op.batch_alter_table("purchases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("bonus_coins", sa.BigInteger(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("promotion_id", sa.String(length=64), server_default="", nullable=False))
        batch_op.add_column(sa.Column("region", sa.String(length=8), server_default="", nullable=False))

    table = sa.table(
        "coin_packages",
        sa.column("package_id", sa.String),
        sa.column("region", sa.String),
        sa.column("currency_code", sa.String),
        sa.column("coins", sa.BigInteger),
        sa.column("price_minor", sa.BigInteger),
        sa.column("active", sa.Boolean),
        sa.column("channel", sa.String),
    )
    op.bulk_insert(
        table,
        [
            {
                "package_id": f"{region.lower()}-{currency.lower()}-{coins}",
                "region": region,
                "currency_code": currency,
                "coins": coins,
                "price_minor": minor,
                "active": True,
                "channel": "APP",
            }
            for region, currency, rows in PRICE_LISTS
            for coins, minor in rows
        ]
        + [
            {
                "package_id": f"us-usd-web-{coins}",
                "region": "US",
                "currency_code": "USD",
                "coins": coins,
                "price_minor": cents,
                "active": True,
                "channel": "WEB",
            }
            for coins, cents in US_WEB
        ],
    )


def downgrade() -> None:
    """Revert this revision."""
    op.execute("DELETE FROM coin_packages WHERE package_id LIKE 'us-usd-web-%'")
    with op.batch_alter_table("coin_packages", schema=None) as batch_op:
        batch_op.drop_column("channel")
    for region, currency, _rows in PRICE_LISTS:
        op.execute(f"DELETE FROM coin_packages WHERE package_id LIKE '{region.lower()}-{currency.lower()}-%'")
    with op.batch_alter_table("purchases", schema=None) as batch_op:
        batch_op.drop_column("region")
        batch_op.drop_column("promotion_id")
        batch_op.drop_column("bonus_coins")
    op.drop_table("spend_counters")
    op.drop_table("spending_limits")
    with op.batch_alter_table("promotions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_promotions_package_id"))
    op.drop_table("promotions")
