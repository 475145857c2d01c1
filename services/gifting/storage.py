"""Gifting tables (SQLAlchemy Core)."""

from sqlalchemy import BigInteger, Boolean, Column, Index, MetaData, String, Table, text

from services.common.tables import add_common_tables

metadata = MetaData()
common = add_common_tables(metadata)

gifts = Table(
    "gifts",
    metadata,
    Column("gift_id", String(64), primary_key=True),
    Column("name", String(100), nullable=False),
    Column("price_coins", BigInteger, nullable=False),
    Column("active", Boolean, nullable=False),
    Column("updated_at_us", BigInteger, nullable=False),
)

streams = Table(
    "streams",
    metadata,
    Column("stream_id", String(64), primary_key=True),
    Column("creator_id", String(128), nullable=False),
    Column("title", String(200), nullable=False),
    Column("status", String(16), nullable=False),
    Column("started_at_us", BigInteger, nullable=False),
    Column("ended_at_us", BigInteger, nullable=True),
)
# One live stream per creator, enforced by the database.
Index(
    "ux_streams_one_live_per_creator",
    streams.c.creator_id,
    unique=True,
    sqlite_where=text("status = 'LIVE'"),
    postgresql_where=text("status = 'LIVE'"),
)

# Every gift, tip and unlock: PENDING until the wallet has spent, then SENT, or CANCELLED.
# The client's idempotency key lives in idempotency_key while the gift is PENDING or SENT;
# a cancelled gift keeps it in client_key only, so a retry with that key may start afresh.
gift_events = Table(
    "gift_events",
    metadata,
    Column("event_id", String(64), primary_key=True),  # also the wallet spend's idempotency key
    Column("idempotency_key", String(128), nullable=True, unique=True),
    Column("client_key", String(128), nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("stream_id", String(64), nullable=False, index=True),
    Column("creator_id", String(128), nullable=False),
    Column("sender_id", String(128), nullable=False),
    Column("gift_id", String(64), nullable=False),
    Column("quantity", BigInteger, nullable=False),
    Column("unit_price_coins", BigInteger, nullable=False),
    Column("coins", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("cancel_reason", String(64), nullable=True),
    Column("sender_balance_after", BigInteger, nullable=True),
    Column("created_at_us", BigInteger, nullable=False),
    Column("updated_at_us", BigInteger, nullable=False),
)
Index("ix_gift_events_status_updated", gift_events.c.status, gift_events.c.updated_at_us)
