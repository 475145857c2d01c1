"""Gifting tables (SQLAlchemy Core)."""

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    MetaData,
    Select,
    String,
    Table,
    TextClause,
    bindparam,
    or_,
    select,
    text,
)

from services.common.sql import Bulk, after_key, bulk_insert, bulk_update, code_point_index
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
    Column("updated_by", String(128), nullable=True),  # the operator of the last change
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
# The client's idempotency key lives in idempotency_key, and stays there when the gift is
# CANCELLED: a retry of the same request moves it to a new gift, a different request is refused
# (migration 0007). client_key keeps it for good, also on gifts a retry has moved it from;
# key_moved_at_us says when it moved (a cancelled gift without key and without it lost its key
# to an older release's cancel: migration 0008, `Gifting.restore_keys_once`).
gift_events = Table(
    "gift_events",
    metadata,
    Column("event_id", String(64), primary_key=True),  # also the wallet spend's idempotency key
    Column("idempotency_key", String(128), nullable=True, unique=True),
    Column("client_key", String(128), nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("stream_id", String(64), nullable=False),
    Column("creator_id", String(128), nullable=False),
    Column("sender_id", String(128), nullable=False),
    Column("gift_id", String(64), nullable=False),
    Column("quantity", BigInteger, nullable=False),
    Column("unit_price_coins", BigInteger, nullable=False),
    Column("coins", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("cancel_reason", String(64), nullable=True),
    Column("sender_balance_after", BigInteger, nullable=True),
    Column("message", String(500), nullable=True),  # a tip's message
    Column("created_at_us", BigInteger, nullable=False),
    Column("updated_at_us", BigInteger, nullable=False),
    Column("key_moved_at_us", BigInteger, nullable=True),
)
# Every column but key_moved_at_us, which a new gift leaves NULL: what SendGift inserts, the
# same statement as before that column existed.
GIFT_INSERT_COLUMNS = tuple(c.name for c in gift_events.c if c.name != "key_moved_at_us")
# The sweeper's look-up: only PENDING gifts are in this index, so it stays as small as the gifts
# in flight, and a gift's SENT or CANCELLED row version adds no entry to it (migration 0006; it
# was (status, updated_at_us) over every gift ever sent).
PENDING_ONLY = "status = 'PENDING'"
Index(
    "ix_gift_events_pending",
    gift_events.c.updated_at_us,
    sqlite_where=text(PENDING_ONLY),
    postgresql_where=text(PENDING_ONLY),
)
SWEEP_START = (-1, "")  # before every gift in the sweeper's (updated_at_us, event_id) order


def stale_pending(cutoff_us: int, limit: int, after: tuple[int, str] = SWEEP_START) -> Select[tuple[int, str]]:
    """The gifts PENDING since before `cutoff_us` and after `after` in (updated_at_us, event_id)
    order, oldest first: their (updated_at_us, event_id) (the sweeper's query, from its cursor).

    The index seeks the range of updated_at_us; event_id, not in it, orders and filters only the
    gifts last written in the same microsecond. The predicate is text, identical to
    the index's, so PostgreSQL plans on the partial index whatever it does with bound parameters."""
    g = gift_events.c
    return (
        select(g.updated_at_us, g.event_id)
        .where(
            text(PENDING_ONLY),
            g.updated_at_us < cutoff_us,
            after_key(g.updated_at_us, g.event_id, after),
        )
        .order_by(g.updated_at_us, g.event_id)
        .limit(limit)
    )


# A stream's SENT gifts in feed order, for a WatchStream that resumes after a cursor (migration
# 0011). A SENT row's updated_at_us is when it was marked SENT (the GiftSent event's occurred_at)
# and never changes after; event_id breaks ties. Partial: a gift enters the index once, when it is
# marked SENT, and pending or cancelled gifts never do. The predicate is text, identical to the
# index's, so PostgreSQL plans on the partial index whatever it does with bound parameters.
SENT_ONLY = "status = 'SENT'"
Index(
    "ix_gift_events_stream_sent",
    gift_events.c.stream_id,
    gift_events.c.updated_at_us,
    gift_events.c.event_id,
    sqlite_where=text(SENT_ONLY),
    postgresql_where=text(SENT_ONLY),
)
# The audit's recent window (`livegifts audit --detail-since`) in creation order (migration 0013):
# created_at_us never changes, and event_id breaks ties.
Index("ix_gift_events_created", gift_events.c.created_at_us, gift_events.c.event_id)
# The audit's full read (`livegifts audit --detail`) in code point order, on PostgreSQL (migration 0016).
code_point_index("ix_gift_events_id_code_point", gift_events.c.event_id)


# The key rows of unlocks answered by an earlier unlock (domain.KEY_ONLY), by age: the
# KeyOnlyPruner (services/gifting/keyrows.py) deletes them after IDEMPOTENCY_RETENTION_DAYS
# (migration 0012). Partial: a gift never enters it, so it is as small as those rows and costs
# SendGift nothing. The predicate as text, identical to the index's (as SENT_ONLY above).
KEY_ONLY_ROWS = "status = 'KEY_ONLY'"
Index(
    "ix_gift_events_key_only",
    gift_events.c.created_at_us,
    sqlite_where=text(KEY_ONLY_ROWS),
    postgresql_where=text(KEY_ONLY_ROWS),
)


def sent_after(stream_id: str, after_us: int, after_event_id: str, limit: int) -> Select[Any]:
    """A stream's SENT gifts after (`after_us`, `after_event_id`), in feed order: sent time, then event id."""
    g = gift_events.c
    return (
        select(gift_events)
        .where(
            g.stream_id == stream_id,
            text(SENT_ONLY),
            after_key(g.updated_at_us, g.event_id, (after_us, after_event_id)),
        )
        .order_by(g.updated_at_us, g.event_id)
        .limit(limit)
    )


def sent_before(stream_id: str, before_us: int, before_event_id: str, limit: int, *, inclusive: bool) -> Select[Any]:
    """A stream's SENT gifts before (`before_us`, `before_event_id`), that one too if `inclusive`,
    newest first: feed order backwards, on the same index read the other way."""
    g = gift_events.c
    tie = g.event_id <= before_event_id if inclusive else g.event_id < before_event_id
    return (
        select(g.event_id, g.kind, g.sender_id, g.gift_id, g.quantity, g.updated_at_us)
        .where(
            g.stream_id == stream_id,
            text(SENT_ONLY),
            g.updated_at_us <= before_us,  # the range the index seeks; the OR only filters the ties
            or_(g.updated_at_us < before_us, tie),
        )
        .order_by(g.updated_at_us.desc(), g.event_id.desc())
        .limit(limit)
    )


# Cancelled gifts that lost their key to an older release's cancel (it cleared the key; this
# release keeps it): the key-restoring loop's look-up. Empty but during and right after a rollout
# from a release before 0007, so the loop's probe costs next to nothing (migration 0008).
KEY_LOST = "status = 'CANCELLED' AND idempotency_key IS NULL AND key_moved_at_us IS NULL"
Index(
    "ix_gift_events_key_lost",
    gift_events.c.created_at_us,
    sqlite_where=text(KEY_LOST),
    postgresql_where=text(KEY_LOST),
)


def keys_lost(dialect: str, limit: int) -> TextClause:
    """(event id, client key) of cancelled gifts without their key, newest first (so for each key its latest)."""
    # The predicate as text, identical to the index's: PostgreSQL then plans on the partial index
    # whatever it does with bound parameters. SQLite, without statistics, would rather search the
    # unique key index for NULL (every moved key's gift, then a sort): INDEXED BY holds it to this one.
    indexed = " INDEXED BY ix_gift_events_key_lost" if dialect == "sqlite" else ""
    return text(
        f"SELECT event_id, client_key FROM gift_events{indexed} WHERE {KEY_LOST}"
        " ORDER BY created_at_us DESC, event_id DESC LIMIT :limit"
    ).bindparams(limit=limit)


# Exclusive content and paid features a creator sells for coins.
contents = Table(
    "contents",
    metadata,
    Column("content_id", String(64), primary_key=True),
    Column("creator_id", String(128), nullable=False, index=True),
    Column("title", String(200), nullable=False),
    Column("price_coins", BigInteger, nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
)

# One unlock per (content, user), claimed when the unlock is recorded PENDING: two concurrent
# unlocks with different keys cannot both charge. A cancelled unlock deletes its claim.
content_unlocks = Table(
    "content_unlocks",
    metadata,
    Column("content_id", String(64), primary_key=True),
    Column("user_id", String(128), primary_key=True),
    Column("event_id", String(64), nullable=False, unique=True),
    Column("created_at_us", BigInteger, nullable=False),
)

# Read models fed by the gifting.gift.sent consumer, one row per key, added to once per batch.
# scope is STREAM or CREATOR.
leaderboard_all_time = Table(
    "leaderboard_all_time",
    metadata,
    Column("scope", String(16), primary_key=True),
    Column("scope_id", String(128), primary_key=True),
    Column("sender_id", String(128), primary_key=True),
    Column("coins", BigInteger, nullable=False),
)
Index(
    "ix_leaderboard_all_time_rank",
    leaderboard_all_time.c.scope,
    leaderboard_all_time.c.scope_id,
    leaderboard_all_time.c.coins,
)

leaderboard_daily = Table(
    "leaderboard_daily",
    metadata,
    Column("scope", String(16), primary_key=True),
    Column("scope_id", String(128), primary_key=True),
    Column("day", BigInteger, primary_key=True),  # days since the epoch, UTC
    Column("sender_id", String(128), primary_key=True),
    Column("coins", BigInteger, nullable=False),
)
# For pruning by day (services/gifting/readmodels.py LeaderboardDailyPruner): the leaderboards
# read only the last LEADERBOARD_WINDOW_DAYS. A B-tree, as the inbox's (tables.py); BRIN on
# PostgreSQL from migration 0014 to 0017.
Index("ix_leaderboard_daily_day", leaderboard_daily.c.day)

creator_stats_hourly = Table(
    "creator_stats_hourly",
    metadata,
    Column("creator_id", String(128), primary_key=True),
    Column("hour", BigInteger, primary_key=True),  # hours since the epoch, UTC
    Column("stream_id", String(64), primary_key=True),  # "" for unlocks
    Column("kind", String(16), primary_key=True),
    Column("gift_id", String(64), primary_key=True),  # content id for unlocks, "" for tips
    Column("coins", BigInteger, nullable=False),
    Column("events", BigInteger, nullable=False),
)


def upsert_add(dialect: str, table: Table, keys: list[str], add: list[str]) -> Bulk:
    """INSERT rows, or add their `add` columns to the existing rows with the same `keys`.

    One statement for a batch of rows (`Bulk`: one execution on PostgreSQL, executemany on
    SQLite) and one statement text whatever the batch size. The keys of one batch must be
    distinct (the read models fold a batch to one row per key first).
    """

    def add_on_conflict(stmt: Any) -> Any:
        return stmt.on_conflict_do_update(
            index_elements=[table.c[k] for k in keys],
            set_={c: table.c[c] + stmt.excluded[c] for c in add},
        )

    return bulk_insert(dialect, table, keys + add, on_conflict=add_on_conflict)


def sent_flip_statement() -> Bulk:
    """PostgreSQL: PENDING -> SENT with each gift's balance, one UPDATE for a batch, RETURNING the rows flipped.

    Rows `{"eid", "bal"}` plus `ts` as a parameter of its own: the bulk UPDATE pairs each event
    id with its balance, so each gift gets one new row version (a second UPDATE for the balances
    would write every row twice). PostgreSQL only: SQLite's executemany has no RETURNING.
    """
    g = gift_events.c
    flip = bulk_update(
        "postgresql",
        gift_events,
        {"eid": g.event_id.type, "bal": g.sender_balance_after.type},
        lambda row: [g.event_id == row["eid"], g.status == "PENDING"],
        lambda row: {"status": "SENT", "updated_at_us": bindparam("ts"), "sender_balance_after": row["bal"]},
    )
    return Bulk(flip.stmt.returning(*gift_events.c), flip.names, flip.arrays)
