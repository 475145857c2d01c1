"""Tables every service has in its own database: idempotency records, outbox, inbox, dead letters.

Each service declares them on its own MetaData with `add_common_tables`, so they live in its
own migration history.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import BigInteger, Column, Index, Integer, LargeBinary, MetaData, String, Table, Text

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a bigint identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")

# The unique (consumer, event_id) index of dead_letters (its migrations: migrate.make_dead_letters_unique).
DEAD_LETTERS_EVENT_INDEX = "ux_dead_letters_consumer_event"


@dataclass(frozen=True)
class CommonTables:
    """The shared tables of one service's metadata."""

    idempotency: Table
    outbox: Table
    inbox: Table
    dead_letters: Table


def add_common_tables(metadata: MetaData) -> CommonTables:
    """Declare the shared tables on a service's metadata."""
    idempotency = Table(
        "idempotency_keys",
        metadata,
        Column("scope", String(64), primary_key=True),
        Column("key", String(128), primary_key=True),
        Column("request_hash", String(64), nullable=False),
        Column("response", LargeBinary, nullable=False),
        Column("created_at_us", BigInteger, nullable=False),
    )
    # For pruning by age (services/common/idempotency.py IdempotencyPruner): a B-tree, as the
    # inbox's (below).
    Index("ix_idempotency_keys_created_at", idempotency.c.created_at_us)
    outbox = Table(
        "outbox",
        metadata,
        Column("id", BigId, primary_key=True, autoincrement=True),
        Column("event_id", String(64), nullable=False, unique=True),
        Column("subject", String(200), nullable=False),
        Column("payload", LargeBinary, nullable=False),
        Column("headers", Text, nullable=False),  # JSON: trace context captured at write time
        Column("created_at_us", BigInteger, nullable=False),
        Column("published_at_us", BigInteger, nullable=True),
        Column("attempts", Integer, nullable=False, server_default="0"),
        # Ids are never reused on SQLite either (the relay deletes published rows, and without
        # AUTOINCREMENT a drained table starts again from 1): the audit's cut-off is an id.
        sqlite_autoincrement=True,
    )
    inbox = Table(
        "inbox",
        metadata,
        Column("consumer", String(100), primary_key=True),
        Column("event_id", String(64), primary_key=True),
        Column("received_at_us", BigInteger, nullable=False),
    )
    # For pruning by age (services/common/inbox.py InboxPruner). A B-tree: it finds exactly the
    # rows due. It was BRIN on PostgreSQL until migration 0015 (wallet) / 0017 (gifting, payout):
    # once pruned pages took new rows every range summary spanned old and new, and each pruning
    # round read the whole table (services.common.migrate.replace_brin_with_btree).
    Index("ix_inbox_received_at", inbox.c.received_at_us)
    dead_letters = Table(
        "dead_letters",
        metadata,
        Column("id", BigId, primary_key=True, autoincrement=True),
        Column("consumer", String(100), nullable=False),
        Column("subject", String(200), nullable=False),
        Column("event_id", String(64), nullable=True),
        Column("payload", LargeBinary, nullable=False),
        Column("error", Text, nullable=False),
        Column("received_at_us", BigInteger, nullable=False),
        # Ids are never reused on SQLite either (a replay deletes its row, and without
        # AUTOINCREMENT the next park took the highest id left plus one): an id from an old log
        # line or a `dead-letters replay <id>` in shell history would name another event.
        sqlite_autoincrement=True,
    )
    # One row per event and consumer: replicas parking one event at the same moment insert it
    # once (the park is an insert-if-absent, inbox.Consumer._park; the loser terminates its
    # copy). An undecodable event has no event id: it is parked under one derived from its bytes
    # (inbox.undecodable_id), so its copies are skipped too. (Rows parked before that have NULL,
    # and NULLs are distinct in a unique index on both backends: each kept its own row.)
    # Every replica counts the parked rows by consumer every minute (deadletters.ParkedGauge):
    # with the index the count reads this narrow index (an index-only scan), not every row's
    # payload and error (still every entry: a count by consumer has no shortcut). The inbox
    # pruner's "still parked?" anti-join, on both columns, reads the index too.
    Index(DEAD_LETTERS_EVENT_INDEX, dead_letters.c.consumer, dead_letters.c.event_id, unique=True)
    return CommonTables(idempotency, outbox, inbox, dead_letters)
