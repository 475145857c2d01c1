"""Payout tables (SQLAlchemy Core)."""

from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table

from services.common.tables import add_common_tables

metadata = MetaData()
common = add_common_tables(metadata)

# Versioned policy: the newest row is in force; old rows stay as the record of who changed what.
policies = Table(
    "policies",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("creator_share_bp", Integer, nullable=False),
    Column("changed_by", String(128), nullable=False),
    Column("changed_at_us", BigInteger, nullable=False),
)

# One row per creator, written once per consumed batch (not once per gift).
# earned_units = sum over events of coins * share_bp; diamonds credited = earned_units // 10000,
# so the fractional remainder (earned_units % 10000) is kept, never lost, and the result does not
# depend on the order events arrive in.
creators = Table(
    "creators",
    metadata,
    Column("creator_id", String(128), primary_key=True),
    Column("coins_received", BigInteger, nullable=False),
    Column("earned_units", BigInteger, nullable=False),
    Column("diamonds_credited", BigInteger, nullable=False),
    Column("diamonds_available", BigInteger, nullable=False),
    Column("diamonds_held", BigInteger, nullable=False),
    Column("diamonds_withdrawn", BigInteger, nullable=False),
    Column("diamonds_clawed_back", BigInteger, nullable=False),
    Column("updated_at_us", BigInteger, nullable=False),
)

# One row per consumed gift/tip/unlock event: the creator's earnings history.
earnings = Table(
    "earnings",
    metadata,
    Column("event_id", String(64), primary_key=True),
    Column("creator_id", String(128), nullable=False, index=True),
    Column("kind", String(16), nullable=False),
    Column("sender_id", String(128), nullable=False),
    Column("stream_id", String(64), nullable=False),
    Column("coins", BigInteger, nullable=False),
    Column("share_bp", Integer, nullable=False),
    Column("units", BigInteger, nullable=False),
    Column("occurred_at_us", BigInteger, nullable=False),
    Column("credited_at_us", BigInteger, nullable=False),
)
