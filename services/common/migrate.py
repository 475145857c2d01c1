"""Alembic, one history per service, run at start (or by `python -m services.<svc> migrate`)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from alembic import command, context, op
from alembic.config import Config
from sqlalchemy import MetaData, inspect, pool, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, async_engine_from_config

from services.common.db import (
    driver_sqlstate,
    ensure_sqlite_dir,
    normalize_url,
    postgres_connect_args,
    sqlite_transactions_by_sqlalchemy,
)
from services.common.tables import DEAD_LETTERS_EVENT_INDEX

log = logging.getLogger(__name__)

MIGRATION_LOCK_KEY = 7301163  # the PostgreSQL advisory lock migrations take, per database
MIGRATION_LOCK_POLL_S = 0.5  # how often a replica tries again for it while another migrates
# How often a replica waiting for it says so: an init container that waits shows only `Init:0/1`.
MIGRATION_LOCK_LOG_EVERY_S = 30.0

# PostgreSQL: how long one migration statement may wait for a table lock (lock_timeout of the
# migration's connection; MIGRATION_LOCK_TIMEOUT_S). An ALTER TABLE, a DROP or a plain CREATE
# INDEX queued behind a long transaction (a slow report, pg_dump, an open psql session) makes
# every later statement on that table queue behind it: the live release's traffic on it stops
# for as long as the migration waits. Bounded, that stall lasts at most this long per attempt.
MIGRATION_LOCK_TIMEOUT_S = 3.0
# How long the attempts may go on before the migration gives up (MIGRATION_LOCK_GIVE_UP_S): it
# then exits non-zero, and Kubernetes restarts the init container with its own back-off.
MIGRATION_LOCK_GIVE_UP_S = 120.0
# Between attempts, with the lock wait's transaction rolled back (live traffic flows again):
# 1 s, doubling, at most 15 s, so the stalls stay a small share of the time.
MIGRATION_RETRY_FIRST_S = 1.0
MIGRATION_RETRY_MAX_S = 15.0
LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of a statement cancelled by lock_timeout
BLOCKERS_SHOWN_MAX = 5  # sessions named in the log line of a lock wait that timed out
_QUERY_SHOWN_MAX = 120  # characters of each one's query
_LOCK_TIMEOUT_ATTR = "livegifts_lock_timeout_s"
_GIVE_UP_ATTR = "livegifts_lock_give_up_s"
_LATER_RELEASE_ATTR = "livegifts_later_release_revision"


class MigrationBlockedError(Exception):
    """A migration step kept waiting for a table lock past its lock timeout until the give-up time."""


def alembic_config(migrations_dir: Path, url: str) -> Config:
    """An Alembic config for one service's migrations folder and database."""
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


async def upgrade_head(
    migrations_dir: Path,
    url: str,
    *,
    lock_timeout_s: float = MIGRATION_LOCK_TIMEOUT_S,
    give_up_s: float = MIGRATION_LOCK_GIVE_UP_S,
) -> None:
    """Bring the database to the newest revision (Alembic runs its own loop in a thread).

    PostgreSQL: a statement waits at most `lock_timeout_s` for a table lock; a step that times
    out is rolled back and tried again until `give_up_s`, then MigrationBlockedError."""
    ensure_sqlite_dir(url)
    cfg = alembic_config(migrations_dir, url)
    cfg.attributes[_LOCK_TIMEOUT_ATTR] = lock_timeout_s
    cfg.attributes[_GIVE_UP_ATTR] = give_up_s
    await asyncio.to_thread(command.upgrade, cfg, "head")
    if _LATER_RELEASE_ATTR in cfg.attributes:
        return  # _run_sync said so
    log.info("migrations applied", extra={"migrations": str(migrations_dir)})


def _take_migration_lock(connection: Connection) -> None:
    # Replicas starting together: one migrates, the others wait and then find nothing to do.
    # A session lock, not a transaction's: a migration that must run outside the transaction
    # (CREATE INDEX CONCURRENTLY, in an autocommit block) commits it, and the lock must stay.
    # The others wait between short tries, in no transaction: a CONCURRENTLY build waits for
    # every older snapshot to end, so one held while blocked on this lock would wait forever.
    # Held through the retries of a lock wait that timed out, so that the replicas do not each
    # take their turn at stalling the table.
    started = time.monotonic()
    said = None
    while True:
        got = connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        held = bool(got.scalar_one())
        connection.commit()
        if held:
            return
        now = time.monotonic()
        if said is None or now - said >= MIGRATION_LOCK_LOG_EVERY_S:
            waited_s = round(now - started, 1)
            log.info("waiting for the migration lock: another replica is migrating", extra={"waited_s": waited_s})
            said = now
        time.sleep(MIGRATION_LOCK_POLL_S)


def _run_sync(connection: Connection, metadata: MetaData) -> None:
    # A new migration context per attempt: nothing of an attempt rolled back carries over.
    sqlite = connection.dialect.name == "sqlite"
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=sqlite,  # SQLite can only ALTER through table copies
        compare_type=True,
    )
    later = _later_release_revision(connection, metadata)
    if later is not None:
        head = context.script.get_current_head()
        context.config.attributes[_LATER_RELEASE_ATTR] = later
        log.warning(
            "the database is at a later release's revision: left as it is, this release serves on it",
            extra={"revision": later, "head": head},
        )
        return
    with context.begin_transaction():
        context.run_migrations()


def _later_release_revision(connection: Connection, metadata: MetaData) -> str | None:
    """The database's revision if a later release of this service migrated it past this one's newest
    (a rollback: `kubectl rollout undo` starts this release's init container on it), else None.

    Alembic refuses a revision its scripts do not know ("Can't locate revision"), which kept the
    previous release's pods in Init:CrashLoopBackOff after a rollback, and an old pod restarted
    during a rollout too. A later release's migrations only add to the schema (expand-only,
    tests/unit/test_migrations_expand_only.py), so this release's code serves on it unchanged.
    Only a numbered revision above this release's head, on a database holding every table and
    column this release declares: an unknown revision of another kind, another service's
    database (its numbers run on, its tables differ), or one whose schema a later release cannot
    have left (a column missing, which expand-only never drops: a mistyped `UPDATE
    alembic_version` of a rollback, a restored dump) is still refused by Alembic."""
    current = context.get_context().get_current_heads()
    script = context.script
    heads = script.get_heads()
    if len(current) != 1 or len(heads) != 1 or not (current[0].isdigit() and heads[0].isdigit()):
        return None
    known = {rev.revision for rev in script.walk_revisions()}
    if current[0] in known or int(current[0]) <= int(heads[0]):
        return None
    inspector = inspect(connection)
    if set(metadata.tables) - set(inspector.get_table_names()):
        return None
    lacking = [
        f"{table.name}.{column}"
        for table in metadata.tables.values()
        for column in sorted(set(table.columns.keys()) - {c["name"] for c in inspector.get_columns(table.name)})
    ]
    if lacking:
        log.error(
            "the database is at a revision above this release's but lacks columns it declares:"
            " no later release left it so (they only add), refused",
            extra={"revision": current[0], "head": heads[0], "columns": ", ".join(lacking[:10])},
        )
        return None
    return current[0]


# The sessions that may hold the lock a migration statement waited for: those of this database
# whose transaction began before the wait did and that hold a lock on one of its tables, oldest
# first. (The wait is over when we ask, so pg_blocking_pids cannot tell any more.)
_BLOCKERS = text(
    "SELECT a.pid, coalesce(a.application_name, '') AS application_name, coalesce(a.state, '') AS state,"
    " coalesce(round(extract(epoch FROM now() - a.xact_start)), 0) AS xact_age_s,"
    " coalesce(round(extract(epoch FROM now() - a.query_start)), 0) AS query_age_s,"
    " left(regexp_replace(coalesce(a.query, ''), '\\s+', ' ', 'g'), :query_max) AS query,"
    " (array_agg(DISTINCT c.relname ORDER BY c.relname))[1:5] AS tables"
    " FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid JOIN pg_class AS c ON c.oid = l.relation"
    " WHERE l.granted AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND c.relkind IN ('r', 'p') AND c.relnamespace <> 'pg_catalog'::regnamespace"
    " AND a.pid <> pg_backend_pid() AND a.xact_start <= now() - make_interval(secs => :waited_s)"
    " GROUP BY a.pid, a.application_name, a.state, a.xact_start, a.query_start, a.query"
    " ORDER BY a.xact_start LIMIT :shown"
)


def _blockers(connection: Connection, waited_s: float) -> str:
    """The likely blockers of a lock wait that timed out, as one line (at most BLOCKERS_SHOWN_MAX)."""
    rows = connection.execute(
        _BLOCKERS, {"waited_s": waited_s, "query_max": _QUERY_SHOWN_MAX, "shown": BLOCKERS_SHOWN_MAX}
    ).all()
    connection.rollback()
    if not rows:
        return "no session holds a table lock since before the wait (it has ended)"
    return "; ".join(
        f"pid {r.pid} ({r.application_name or 'no application_name'}, {r.state}, transaction open {r.xact_age_s:.0f} s,"
        f" last query started {r.query_age_s:.0f} s ago: {r.query!r}) holding {', '.join(r.tables)}"
        for r in rows
    )


def _statement(exc: DBAPIError) -> str:
    return " ".join(str(exc.statement or "").split())[:_QUERY_SHOWN_MAX]


async def _migrate_retrying(conn: AsyncConnection, metadata: MetaData, lock_timeout_s: float, give_up_s: float) -> None:
    """Run the migrations; on PostgreSQL, roll back and try again a step that timed out waiting
    for a lock (bounded backoff), until `give_up_s`: then MigrationBlockedError."""
    postgresql = conn.dialect.name == "postgresql"
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            await conn.run_sync(_run_sync, metadata)
            return
        except DBAPIError as exc:
            if not postgresql or driver_sqlstate(exc.orig) != LOCK_NOT_AVAILABLE:
                raise
            await conn.rollback()
            # A step stopped inside an autocommit block may leave its own session setting (a
            # CONCURRENTLY build's lock_timeout 0): back to the connection's.
            await conn.execute(text("RESET lock_timeout"))
            await conn.commit()
            blockers = await conn.run_sync(_blockers, lock_timeout_s)
            waited_s = time.monotonic() - started
            facts = {
                "lock_timeout_s": lock_timeout_s,
                "attempt": attempt,
                "waited_s": round(waited_s, 1),
                "statement": _statement(exc),
                "blockers": blockers,
            }
            if waited_s >= give_up_s:
                log.error("migration gave up: a table lock stayed taken", extra=facts)
                raise MigrationBlockedError(
                    f"gave up after {waited_s:.0f} s ({attempt} attempts, MIGRATION_LOCK_GIVE_UP_S={give_up_s:g}):"
                    f" each waited MIGRATION_LOCK_TIMEOUT_S={lock_timeout_s:g} s for a table lock other"
                    f" sessions held, and was rolled back; waiting: {facts['statement']!r}; held since before"
                    f" the wait by: {blockers}. End that transaction (or wait for it) and migrate again"
                ) from exc
            retry_in_s = min(MIGRATION_RETRY_FIRST_S * 2 ** (attempt - 1), MIGRATION_RETRY_MAX_S, give_up_s - waited_s)
            log.warning(
                "migration step waited too long for a table lock: rolled back, will try again",
                extra={**facts, "retry_in_s": round(retry_in_s, 1)},
            )
            await asyncio.sleep(retry_in_s)


async def _run_async(metadata: MetaData) -> None:
    cfg = context.config
    section = cfg.get_section(cfg.config_ini_section, {})
    lock_timeout_s = float(cfg.attributes.get(_LOCK_TIMEOUT_ATTR, MIGRATION_LOCK_TIMEOUT_S))
    give_up_s = float(cfg.attributes.get(_GIVE_UP_ATTR, MIGRATION_LOCK_GIVE_UP_S))
    postgresql = make_url(section["sqlalchemy.url"]).get_backend_name() == "postgresql"
    kw: dict[str, Any] = {}
    if postgresql:
        # In the start-up packet, so it is the session's default: RESET (after a CONCURRENTLY
        # build, or a revision's own SET) comes back to it.
        lock_timeout = f"{max(1, round(lock_timeout_s * 1000))}ms"
        section["sqlalchemy.url"], libpq_args = postgres_connect_args(section["sqlalchemy.url"])
        kw["connect_args"] = {"server_settings": {"lock_timeout": lock_timeout}, **libpq_args}
    engine = async_engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool, **kw)
    if not postgresql:
        # Each revision in one SQLite transaction, its DDL included (SQLite's DDL is
        # transactional): a revision stopped part way (disk full, a kill, a statement failing) is
        # rolled back whole, and the retry runs it again on the schema before it.
        sqlite_transactions_by_sqlalchemy(engine)
    try:
        async with engine.connect() as conn:
            if postgresql:
                await conn.run_sync(_take_migration_lock)
            await _migrate_retrying(conn, metadata, lock_timeout_s, give_up_s)
            if postgresql:  # (a failure closes the connection, which ends the lock with the session)
                await conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
                await conn.commit()
    finally:
        await engine.dispose()


def run_env(metadata: MetaData) -> None:
    """Body of every service's migrations/env.py (online mode only: we always have the database)."""
    asyncio.run(_run_async(metadata))


def rebuild_sqlite_outbox(autoincrement: bool) -> None:
    """In a migration: rebuild the outbox table on SQLite with (or without) AUTOINCREMENT, rows
    and ids kept; on PostgreSQL nothing (an identity never reuses an id)."""
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table("outbox", recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}):
        pass


def create_index_beside_writers(name: str, table: str, columns: list[str], *, before: str = "", **kw: Any) -> None:
    """In a migration: create an index without holding up the table's writers.

    On PostgreSQL the previous release keeps writing the table while the new one migrates (a
    rolling update), and a plain CREATE INDEX blocks every write for the whole scan: it is built
    CONCURRENTLY, outside the migrations' transaction, and an attempt stopped part way (leaving
    the index INVALID, the revision unstamped) is built again by the retry. On SQLite the service
    is one process, stopped while it migrates.

    With no lock timeout: the build waits, by design, for every transaction older than it (a
    report's snapshot, pg_dump) and PostgreSQL counts that wait against lock_timeout, which
    would cancel it and leave the index INVALID; its own lock blocks no reads nor writes.

    `before`: SQL run just before the build, by every attempt (on PostgreSQL committed at once,
    under the migration's lock timeout): for a unique index, the deletion of the rows it would
    refuse.
    """
    if op.get_bind().dialect.name != "postgresql":
        if before:
            op.execute(before)
        op.create_index(name, table, columns, **kw)
        return
    with op.get_context().autocommit_block():
        if before:
            op.execute(before)
        op.execute("SET lock_timeout = 0")
        invalid = op.get_bind().execute(
            text("SELECT count(*) FROM pg_index WHERE indexrelid = to_regclass(:name) AND NOT indisvalid"),
            {"name": name},
        )
        if invalid.scalar_one():
            op.execute(f'DROP INDEX CONCURRENTLY "{name}"')
        op.create_index(name, table, columns, postgresql_concurrently=True, if_not_exists=True, **kw)
        op.execute("RESET lock_timeout")  # the migration connection's MIGRATION_LOCK_TIMEOUT_S


def create_code_point_index(name: str, table: str, column: str) -> None:
    """In a migration: `sql.code_point_index` on PostgreSQL, built beside the writers; nothing on
    SQLite (BINARY is code point order: the primary key's index serves)."""
    if op.get_bind().dialect.name == "postgresql":
        create_index_beside_writers(name, table, [text(f'{column} COLLATE "C"')])


def drop_code_point_index(name: str, table: str) -> None:
    """Undo create_code_point_index."""
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index(name, table_name=table)


IDEMPOTENCY_AGE_INDEX = "ix_idempotency_keys_created_at"
# The pruners' age indexes as the earlier releases had them on PostgreSQL (`PRUNER_AGE_INDEXES`).
_BRIN: dict[str, Any] = {"postgresql_using": "brin", "postgresql_with": {"autosummarize": "on"}}


def create_idempotency_age_index() -> None:
    """In a migration of each service: the index the IdempotencyPruner finds old records by.

    BRIN on PostgreSQL, as the inbox's (0005): records are written in created order, so a few
    summary pages find the old ones and a command's insert writes no index entry of its own.
    SQLite has B-trees only. Built beside the writers (`create_index_beside_writers`): the table
    has grown since the service began, and the previous release keeps recording its commands'
    answers during the rollout. (A B-tree on PostgreSQL too since `replace_brin_with_btree`.)
    """
    create_index_beside_writers(
        IDEMPOTENCY_AGE_INDEX,
        "idempotency_keys",
        ["created_at_us"],
        **_BRIN,
    )


def drop_idempotency_age_index() -> None:
    """Undo create_idempotency_age_index."""
    op.drop_index(IDEMPOTENCY_AGE_INDEX, table_name="idempotency_keys")


# The pruners' age indexes that were BRIN on PostgreSQL (inbox 0005, idempotency records, gifting's
# daily leaderboard 0014) and are B-trees since (wallet 0015, gifting 0017, payout 0017): the
# index, its table and column.
PRUNER_AGE_INDEXES = {
    "ix_inbox_received_at": ("inbox", "received_at_us"),
    IDEMPOTENCY_AGE_INDEX: ("idempotency_keys", "created_at_us"),
    "ix_leaderboard_daily_day": ("leaderboard_daily", "day"),
}


def _index_method(name: str) -> str | None:
    """The access method (btree, brin) of the PostgreSQL index `name`; None if there is none."""
    return (
        op.get_bind()
        .execute(
            text("SELECT am.amname FROM pg_class c JOIN pg_am am ON am.oid = c.relam WHERE c.oid = to_regclass(:name)"),
            {"name": name},
        )
        .scalar_one_or_none()
    )


def replace_brin_with_btree(name: str) -> None:
    """In a migration: make a pruner's BRIN age index (`PRUNER_AGE_INDEXES`) a B-tree of the same name.

    A BRIN range's summary only ever widens: once the pruner has deleted a range's old rows,
    vacuum hands their space to new rows, the range then spans the oldest and the newest, and
    every range matches "older than the retention". The pruner's probe read the whole table
    every round (on the inbox, 45 days of events every 10 minutes). A B-tree finds exactly the
    rows due. On PostgreSQL the BRIN index is dropped CONCURRENTLY (a retry after an interrupted
    attempt finds it gone, or the B-tree INVALID, which `create_index_beside_writers` builds
    again) and the B-tree built beside the writers; until it is, a pruner scans the table. SQLite
    has B-trees only: nothing to do.
    """
    _rebuild_age_index(name, "brin")


def restore_brin(name: str) -> None:
    """Undo replace_brin_with_btree: the BRIN index of the earlier releases, the B-tree dropped
    CONCURRENTLY and the BRIN index built beside the writers, as the upgrade does (a rollback's
    downgrade runs beside the live release too: a plain DROP and CREATE INDEX stopped its writes
    on the table for the build, and while queued behind an older transaction)."""
    _rebuild_age_index(name, "btree", **_BRIN)


def _rebuild_age_index(name: str, replaced: str, **kw: Any) -> None:
    """On PostgreSQL: drop the age index `name` CONCURRENTLY if its access method is `replaced`,
    then build it beside the writers with `kw` (a retry after an interrupted attempt finds it
    dropped, or built INVALID, which `create_index_beside_writers` builds again)."""
    if op.get_bind().dialect.name != "postgresql":
        return
    table, column = PRUNER_AGE_INDEXES[name]
    with op.get_context().autocommit_block():
        if _index_method(name) == replaced:
            op.execute("SET lock_timeout = 0")  # waits for older transactions, as a build does
            op.execute(f'DROP INDEX CONCURRENTLY "{name}"')
            op.execute("RESET lock_timeout")
    create_index_beside_writers(name, table, [column], **kw)


DEAD_LETTERS_NONUNIQUE_INDEX = "ix_dead_letters_consumer_event"  # wallet 0011, gifting 0015, payout 0013
# The rows a unique (consumer, event_id) refuses: all but the oldest (lowest id) of each event
# parked twice by one consumer (two replicas parking it at the same moment both inserted). The
# newer copy's payload is the same event; its error, the other replica's words for the same
# failure. Undecodable rows (no event id) are each their own.
_DEAD_LETTERS_DUPLICATES = (
    "DELETE FROM dead_letters WHERE event_id IS NOT NULL AND EXISTS (SELECT 1 FROM dead_letters AS older"
    " WHERE older.consumer = dead_letters.consumer AND older.event_id = dead_letters.event_id"
    " AND older.id < dead_letters.id)"
)


def make_dead_letters_unique() -> None:
    """In a migration of each service: one dead letter per (consumer, event_id), and on SQLite
    ids never reused (AUTOINCREMENT).

    SQLite: the table is rebuilt with AUTOINCREMENT, rows and ids kept (a replay deleted a row
    and the next park took its id again); PostgreSQL's identity never reuses an id. Then the
    duplicates are deleted, the oldest of each kept, and the unique index built, CONCURRENTLY on
    PostgreSQL beside the previous release, which keeps parking events (its look-up then insert
    may still race: a park the new index refuses fails with an IntegrityError, the rest of its
    batch is nak'ed uncounted, and the event's redelivery finds the row and terminates its copy). A duplicate it inserts
    between the deletion and the end of the build fails the build (unique violation) and leaves
    the index INVALID, the revision unstamped: the next attempt (the init container restarted)
    drops it, deletes the duplicates again and builds again. The non-unique index it replaces
    goes once the unique one is built (CONCURRENTLY too: it serves the previous release's
    look-ups until then).
    """
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        with op.batch_alter_table("dead_letters", recreate="always", table_kwargs={"sqlite_autoincrement": True}):
            pass
    create_index_beside_writers(
        DEAD_LETTERS_EVENT_INDEX,
        "dead_letters",
        ["consumer", "event_id"],
        before=_DEAD_LETTERS_DUPLICATES,
        unique=True,
    )
    if sqlite:
        op.drop_index(DEAD_LETTERS_NONUNIQUE_INDEX, table_name="dead_letters", if_exists=True)
        return
    with op.get_context().autocommit_block():
        op.execute("SET lock_timeout = 0")  # waits for older transactions, as the build does
        op.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{DEAD_LETTERS_NONUNIQUE_INDEX}"')
        op.execute("RESET lock_timeout")


def unmake_dead_letters_unique() -> None:
    """Undo make_dead_letters_unique (the duplicates it deleted stay deleted)."""
    create_index_beside_writers(DEAD_LETTERS_NONUNIQUE_INDEX, "dead_letters", ["consumer", "event_id"])
    op.drop_index(DEAD_LETTERS_EVENT_INDEX, table_name="dead_letters")
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("dead_letters", recreate="always", table_kwargs={"sqlite_autoincrement": False}):
            pass
