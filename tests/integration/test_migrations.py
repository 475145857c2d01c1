"""Each service's migration history builds exactly the schema its code declares, on both backends.

The tables the code uses (`services/<svc>/storage.py`) and the tables the migrations create at
start are written separately; Alembic's comparison finds any table, column, type or index one
has and the other lacks. Migration 0004 also removes the outbox rows earlier versions kept after
publishing them, and keeps the unpublished ones.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Engine, Executable, event, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from services.common.db import normalize_url, sqlite_transactions_by_sqlalchemy
from services.common.migrate import MIGRATION_LOCK_KEY, alembic_config, upgrade_head
from services.common.pruning import AgePruner
from services.common.sql import CODE_POINT_INDEXES
from services.common.tables import DEAD_LETTERS_EVENT_INDEX
from services.gifting.storage import KEY_LOST

SERVICES = ("wallet", "gifting", "payout")
ROOT = Path(__file__).resolve().parents[2]


async def _execute(url: str, *statements: str) -> list[tuple[object, ...]]:
    """Run statements in one transaction; the rows of the last."""
    engine = create_async_engine(normalize_url(url))
    try:
        async with engine.begin() as conn:
            rows: list[tuple[object, ...]] = []
            for s in statements:
                result = await conn.execute(text(s))
                rows = [tuple(r) for r in result] if result.returns_rows else []
            return rows
    finally:
        await engine.dispose()


@pytest.mark.parametrize("service", SERVICES)
async def test_the_migrations_build_the_schema_the_code_declares(empty_database: str, service: str) -> None:
    await upgrade_head(ROOT / "services" / service / "migrations", empty_database)
    declared = importlib.import_module(f"services.{service}.storage").metadata
    engine = create_async_engine(normalize_url(empty_database))
    try:
        async with engine.connect() as conn:
            diff = await conn.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(sync, opts={"compare_type": True, "include_object": _comparable}),
                    declared,
                )
            )
    finally:
        await engine.dispose()
    assert diff == [], f"{service}: the migrations and storage.py disagree"


def _comparable(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
    """What Alembic can compare: not the code point indexes (`sql.code_point_index`), which
    PostgreSQL reflects without their collation; `test_the_audits_full_read_is_served_by_the_code_point_index`
    checks them."""
    return not (type_ == "index" and name in CODE_POINT_INDEXES)


@pytest.mark.parametrize("service", SERVICES)
async def test_migration_0004_deletes_the_outbox_rows_kept_after_publishing(empty_database: str, service: str) -> None:
    cfg = alembic_config(ROOT / "services" / service / "migrations", empty_database)
    await asyncio.to_thread(command.upgrade, cfg, "0003")
    insert = (
        "INSERT INTO outbox (event_id, subject, payload, headers, created_at_us, published_at_us, attempts) "
        "VALUES ('{}', 's.x.y', '', '{{}}', 1, {}, 0)"
    )
    await _execute(empty_database, insert.format("published", 2), insert.format("waiting", "NULL"))
    await asyncio.to_thread(command.upgrade, cfg, "head")
    assert await _execute(empty_database, "SELECT event_id FROM outbox") == [("waiting",)]
    # And back: the downgrade runs (it recreates the indexes); the published row stays gone (it was sent).
    await asyncio.to_thread(command.downgrade, cfg, "0003")
    assert await _execute(empty_database, "SELECT event_id FROM outbox") == [("waiting",)]


async def _gifting_plan(
    url: str, statement: Callable[[str], Executable], values: dict[str, object] | None = None
) -> str:
    """The plan of gifting's `statement(dialect)` as its code sends it, with bound parameters (the
    planner must still see that the WHERE implies a partial index's predicate), on a migrated
    database. `values` binds the parameters the statement leaves unset."""
    return await _plan(url, "gifting", statement, values)


async def _plan(
    url: str,
    service: str,
    statement: Callable[[str], Executable],
    values: dict[str, object] | None = None,
    forbid: tuple[str, ...] = (),
) -> str:
    """`_gifting_plan` on any service's migrated database; on PostgreSQL with the plan nodes in
    `forbid` (e.g. "sort") forbidden too, so the plan says whether an index can do their work."""
    await upgrade_head(ROOT / "services" / service / "migrations", url)
    engine = create_async_engine(normalize_url(url))
    try:
        # An IN of a list is sent as one parameter per item, as the code's execution expands it.
        compiled = statement(engine.dialect.name).compile(engine, compile_kwargs={"render_postcompile": True})
        bound = compiled.params | (values or {})
        params = tuple(bound[name] for name in compiled.positiontup or ())
        async with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                # An empty table is cheaper to scan: forbid that, so the plan says whether the index can serve.
                for node in ("seqscan", *forbid):
                    await conn.exec_driver_sql(f"SET LOCAL enable_{node} = off")
                plan = (await conn.exec_driver_sql(f"EXPLAIN {compiled}", params)).all()
            else:
                plan = (await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", params)).all()
    finally:
        await engine.dispose()
    return " ".join(str(c) for row in plan for c in row)


WINDOWS = {  # service: (table, id column, time column, the index the window is read by)
    "wallet": ("spends", "idempotency_key", "created_at_us", "ix_spends_created"),
    "gifting": ("gift_events", "event_id", "created_at_us", "ix_gift_events_created"),
    "payout": ("earnings", "event_id", "credited_at_us", "ix_earnings_credited"),
}


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("after", ["", "1500/e1"])
@pytest.mark.parametrize("bounds", [("", ""), ("a", ""), ("a", "f")], ids=["no id bounds", "after_id", "both"])
async def test_the_audit_windows_pages_are_served_by_the_time_index(
    empty_database: str, service: str, after: str, bounds: tuple[str, str]
) -> None:
    """`livegifts audit --detail-since` reads a window a page at a time: each page is a range of
    the (time, id) index, not a scan of the books; with id bounds too (a chunk of a large window),
    which PostgreSQL's planner served from the id's own index when it could (the bounds in the
    database's collation), reading that id range of the whole table and sorting it for every
    page."""
    from services.common.audit import window_select

    storage = importlib.import_module(f"services.{service}.storage")
    name, id_col, time_col, index = WINDOWS[service]
    t = storage.metadata.tables[name].c
    plan = await _plan(
        empty_database,
        service,
        lambda dialect: window_select(
            [t[id_col], t[time_col]], t[time_col], t[id_col], 1_000, after, 5000, bounds, dialect
        ),
    )
    assert index in plan, plan


CODE_POINT_INDEX = {  # service: (table, id column, the index the audit's full read is read by on PostgreSQL)
    "wallet": ("spends", "idempotency_key", "ix_spends_key_code_point"),
    "gifting": ("gift_events", "event_id", "ix_gift_events_id_code_point"),
    "payout": ("earnings", "event_id", "ix_earnings_id_code_point"),
}


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("bounds", [("", ""), ("a", ""), ("a", "f")], ids=["first page", "a later page", "bounded"])
async def test_the_audits_full_read_is_served_by_the_code_point_index(
    empty_database: str, service: str, bounds: tuple[str, str]
) -> None:
    """`livegifts audit --detail` reads every id a page at a time in code point order: on
    PostgreSQL COLLATE "C", which the primary key's index (the database's collation) cannot give,
    so an index of the id COLLATE "C" reads each page as a range, in order (a sort forbidden, as
    on a large table it would be the plan's whole cost: every id above the bound, sorted for
    5,000); on SQLite (BINARY is code point order) the primary key's index, none of its own."""
    from services.common.audit import full_select

    storage = importlib.import_module(f"services.{service}.storage")
    name, id_col, index = CODE_POINT_INDEX[service]
    table = storage.metadata.tables[name]
    after, up_to = bounds
    plan = await _plan(
        empty_database,
        service,
        lambda dialect: full_select(list(table.c), table.c[id_col], after, up_to, 5000, dialect),
        forbid=("sort",),
    )
    if empty_database.startswith("postgresql"):
        assert index in plan and "Sort" not in plan, plan
        if after:
            assert id_col in _index_bound(plan), plan
    else:
        assert "USING" in plan and "TEMP B-TREE" not in plan and index not in plan, plan


@pytest.mark.parametrize("after", [None, (1_500, "wd_1")])
async def test_the_withdrawal_review_queues_pages_are_served_by_the_status_oldest_index(
    empty_database: str, after: tuple[int, str] | None
) -> None:
    """ListWithdrawals without creator_id: one status, oldest first, a page at a time: a range of
    (status, requested_at_us, withdrawal_id), not every withdrawal of the status read and sorted,
    and a later page starts where its token points, not at the status's oldest row; with each
    row's hold joined from its creator and method, as ListWithdrawals reads it."""
    from services.payout.domain import WithdrawalStatus
    from services.payout.storage import withdrawals
    from services.payout.usecases import _WITH_HOLD, _keyset_select, _withdrawals_where

    w = withdrawals.c
    where = _withdrawals_where("", WithdrawalStatus.PENDING_REVIEW)
    plan = await _plan(
        empty_database,
        "payout",
        lambda dialect: _keyset_select(
            withdrawals, where, w.requested_at_us, w.withdrawal_id, after, 51, oldest_first=True, joined=_WITH_HOLD
        ),
    )
    assert "ix_withdrawals_status_oldest" in plan, plan
    if after is not None:
        assert "requested_at_us" in _index_bound(plan), plan


@pytest.mark.parametrize("after", [(-1, ""), (1_500, "wd_1")], ids=["from the start", "from a cursor"])
async def test_the_dispatchers_read_is_served_by_a_status_index(empty_database: str, after: tuple[int, str]) -> None:
    """The dispatcher's read, oldest first from its cursor, reads the withdrawals of its two
    statuses by index, not every withdrawal ever made; on SQLite a range of
    (status, requested_at_us) each. PostgreSQL, on empty tables, takes both statuses from
    ix_withdrawals_status and sorts the few rows: APPROVED and unsubmitted PROCESSING ones are
    those in flight only."""
    from services.payout.usecases import dispatch_select

    # The held creators, one parameter: an array on PostgreSQL, JSON text on SQLite (sent as is).
    held = ["creator-held"] if empty_database.startswith("postgresql") else '["creator-held"]'
    plan = await _plan(
        empty_database, "payout", lambda dialect: dispatch_select(dialect, after, 50, held=True), {"held": held}
    )
    assert "ix_withdrawals_status" in plan, plan
    if not empty_database.startswith("postgresql"):
        assert "ix_withdrawals_status_oldest" in plan and "requested_at_us" in _index_bound(plan), plan


def _index_bound(plan: str) -> str:
    """What a plan bounds its index range by: PostgreSQL's "Index Cond", SQLite's "(a=? AND b>?)"
    after USING INDEX (a condition only filtered, row by row, is in neither)."""
    if "Index Cond:" in plan:
        return plan.split("Index Cond:", 1)[1].split("Filter:", 1)[0]
    return plan.split("USING INDEX", 1)[1].split(")", 1)[0]


DEAD_LETTERS_INDEX_REVISION = {"wallet": "0011", "gifting": "0015", "payout": "0013"}


@pytest.mark.parametrize("service", SERVICES)
async def test_the_parked_gauges_count_is_served_by_the_consumer_index(empty_database: str, service: str) -> None:
    """Every replica counts dead_letters by consumer every minute (ParkedGauge): from the
    (consumer, event_id) index, not a read of every parked event's payload and error."""
    from services.common.deadletters import parked_counts

    storage = importlib.import_module(f"services.{service}.storage")
    plan = await _plan(empty_database, service, lambda dialect: parked_counts(storage.common.dead_letters))
    assert DEAD_LETTERS_EVENT_INDEX in plan, plan


@pytest.mark.parametrize("service", SERVICES)
async def test_the_dead_letters_consumer_index_goes_with_a_downgrade_and_comes_back(
    empty_database: str, service: str
) -> None:
    cfg = alembic_config(ROOT / "services" / service / "migrations", empty_database)
    revision = DEAD_LETTERS_INDEX_REVISION[service]
    previous = ScriptDirectory.from_config(cfg).get_revision(revision).down_revision
    exists = (
        "SELECT count(*) FROM pg_indexes WHERE indexname = 'ix_dead_letters_consumer_event'"
        if empty_database.startswith("postgresql")
        else "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = 'ix_dead_letters_consumer_event'"
    )
    await asyncio.to_thread(command.upgrade, cfg, revision)  # (the unique index replaces it later)
    await _execute(
        empty_database,
        "INSERT INTO dead_letters (consumer, subject, event_id, payload, error, received_at_us) "
        "VALUES ('c1', 's.x.y', 'e1', '', 'boom', 1)",
    )
    assert await _execute(empty_database, exists) == [(1,)]
    await asyncio.to_thread(command.downgrade, cfg, previous)
    assert await _execute(empty_database, exists) == [(0,)]
    await asyncio.to_thread(command.upgrade, cfg, revision)
    assert await _execute(empty_database, exists) == [(1,)]
    assert await _execute(empty_database, "SELECT consumer, event_id FROM dead_letters") == [("c1", "e1")]


# Each service's revision that makes dead_letters one row per (consumer, event_id), AUTOINCREMENT on SQLite.
DEAD_LETTERS_UNIQUE_REVISION = {"wallet": "0016", "gifting": "0018", "payout": "0018"}
_PARK = (
    "INSERT INTO dead_letters (consumer, subject, event_id, payload, error, received_at_us) "
    "VALUES ('{}', 's.x.y', {}, '', '{}', 1)"
)


@pytest.mark.parametrize("service", SERVICES)
async def test_the_dead_letters_migration_keeps_the_oldest_of_each_event_parked_twice(
    empty_database: str, service: str
) -> None:
    """Two replicas parking one event at the same moment both inserted it before the unique index:
    the migration deletes the later rows (production may hold them), keeps undecodable rows (no
    event id) each, and the index then refuses a second row; down and up again keeps the rest."""
    cfg = alembic_config(ROOT / "services" / service / "migrations", empty_database)
    revision = DEAD_LETTERS_UNIQUE_REVISION[service]
    previous = ScriptDirectory.from_config(cfg).get_revision(revision).down_revision
    await asyncio.to_thread(command.upgrade, cfg, previous)
    parks = [
        ("c1", "'e1'", "first"),
        ("c1", "'e1'", "second"),  # the same event, parked again: deleted
        ("c2", "'e1'", "other consumer"),
        ("c1", "NULL", "undecodable a"),
        ("c1", "NULL", "undecodable b"),
        ("c1", "'e2'", "e2"),
        ("c1", "'e1'", "third"),  # deleted
        ("c1", "'e2'", "e2 again"),  # deleted
    ]
    await _execute(empty_database, *(_PARK.format(*p) for p in parks))
    await asyncio.to_thread(command.upgrade, cfg, "head")
    kept = [("first", 1), ("other consumer", 3), ("undecodable a", 4), ("undecodable b", 5), ("e2", 6)]
    assert await _execute(empty_database, "SELECT error, id FROM dead_letters ORDER BY id") == kept
    with pytest.raises(Exception, match="(?i)unique"):
        await _execute(empty_database, _PARK.format("c1", "'e1'", "fourth"))
    await _execute(empty_database, _PARK.format("c1", "NULL", "undecodable c"))  # each its own row
    await asyncio.to_thread(command.downgrade, cfg, previous)
    await asyncio.to_thread(command.upgrade, cfg, "head")
    after = await _execute(empty_database, "SELECT error FROM dead_letters ORDER BY id")
    assert [e for (e,) in after] == [e for e, _ in kept] + ["undecodable c"]


@pytest.mark.parametrize("service", SERVICES)
async def test_dead_letter_ids_are_not_reused_once_a_replay_deleted_the_row(empty_database: str, service: str) -> None:
    """`dead-letters replay <id>` and the park's log line name a row by id: once its row is gone,
    that id must never name another event (SQLite without AUTOINCREMENT gave it to the next park),
    also on a table parked in before the migration (the rebuild keeps the rows and their ids)."""
    cfg = alembic_config(ROOT / "services" / service / "migrations", empty_database)
    revision = DEAD_LETTERS_UNIQUE_REVISION[service]
    previous = ScriptDirectory.from_config(cfg).get_revision(revision).down_revision
    await asyncio.to_thread(command.upgrade, cfg, previous)
    await _execute(empty_database, _PARK.format("c", "'a'", "x"))
    await asyncio.to_thread(command.upgrade, cfg, "head")
    await _execute(empty_database, _PARK.format("c", "'b'", "x"))
    assert await _execute(empty_database, "SELECT event_id, id FROM dead_letters ORDER BY id") == [("a", 1), ("b", 2)]
    await _execute(empty_database, "DELETE FROM dead_letters WHERE id = 2")  # replayed
    await _execute(empty_database, _PARK.format("c", "'c'", "x"))
    (later,) = (await _execute(empty_database, "SELECT id FROM dead_letters WHERE event_id = 'c'"))[0]
    assert isinstance(later, int) and later > 2, "a replayed dead letter's id was given to another event"


async def test_the_dead_letters_unique_index_is_built_again_by_a_retry_after_a_failed_build(
    empty_database: str,
) -> None:
    """A duplicate the previous release parks between the migration's de-duplication and the end of
    its CONCURRENTLY build fails the build, leaving the index INVALID and the revision unstamped:
    the retry must de-duplicate again and build it again, not take it as done."""
    if not empty_database.startswith("postgresql"):
        pytest.skip("SQLite: the index is built in the migrations' one transaction")
    cfg = alembic_config(ROOT / "services" / "payout" / "migrations", empty_database)
    revision = DEAD_LETTERS_UNIQUE_REVISION["payout"]
    previous = ScriptDirectory.from_config(cfg).get_revision(revision).down_revision
    await asyncio.to_thread(command.upgrade, cfg, previous)
    await _execute(empty_database, _PARK.format("c", "'e'", "first"))
    # The failed attempt: its index left INVALID (and not enforcing), a duplicate parked, no stamp.
    await _execute(
        empty_database,
        f"CREATE INDEX {DEAD_LETTERS_EVENT_INDEX} ON dead_letters (consumer, event_id)",
        "UPDATE pg_index SET indisvalid = false, indisready = false"
        f" WHERE indexrelid = '{DEAD_LETTERS_EVENT_INDEX}'::regclass",
        _PARK.format("c", "'e'", "second"),
    )
    await asyncio.to_thread(command.upgrade, cfg, "head")
    valid = f"SELECT indisvalid, indisunique FROM pg_index WHERE indexrelid = '{DEAD_LETTERS_EVENT_INDEX}'::regclass"
    assert await _execute(empty_database, valid) == [(True, True)]
    assert await _execute(empty_database, "SELECT error FROM dead_letters") == [("first",)]


# Each service's revisions that rebuild a table on SQLite (an Alembic batch: a copy, then the swap).
OUTBOX_AUTOINCREMENT_REVISION = {"wallet": "0008", "gifting": "0009", "payout": "0008"}
_REBUILDS = {"outbox": OUTBOX_AUTOINCREMENT_REVISION, "dead_letters": DEAD_LETTERS_UNIQUE_REVISION}
_ROWS = {
    "outbox": "INSERT INTO outbox (event_id, subject, payload, headers, created_at_us, attempts)"
    " VALUES ('e', 's.x.y', '', '{}', 1, 0)",
    "dead_letters": _PARK.format("c", "'e'", "x"),
}


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("table", sorted(_REBUILDS))
async def test_a_sqlite_table_rebuild_stopped_part_way_is_rolled_back_and_done_again_by_the_retry(
    empty_database: str, service: str, table: str
) -> None:
    """A revision stopped between its rebuild's copy and the swap (disk full, a kill, a later
    statement failing) must leave the schema as it was: its CREATE TABLE _alembic_tmp_<table> ran
    in autocommit, outside any transaction, and every retry failed "already exists"."""
    if not empty_database.startswith("sqlite"):
        pytest.skip("PostgreSQL: the rebuild is SQLite's (an identity never reuses an id)")
    cfg = alembic_config(ROOT / "services" / service / "migrations", empty_database)
    previous = ScriptDirectory.from_config(cfg).get_revision(_REBUILDS[table][service]).down_revision
    await asyncio.to_thread(command.upgrade, cfg, previous)
    await _execute(empty_database, _ROWS[table])

    def disk_full(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.split()[:3] == ["DROP", "TABLE", table]:
            raise sqlite3.OperationalError("database or disk is full")

    event.listen(Engine, "before_cursor_execute", disk_full)
    try:
        with pytest.raises(OperationalError, match="disk is full"):
            await asyncio.to_thread(command.upgrade, cfg, "head")
    finally:
        event.remove(Engine, "before_cursor_execute", disk_full)
    tables = "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE '_alembic_tmp%'"
    assert await _execute(empty_database, tables) == []
    assert await _execute(empty_database, "SELECT version_num FROM alembic_version") == [(previous,)]
    await asyncio.to_thread(command.upgrade, cfg, "head")
    assert await _execute(empty_database, "SELECT version_num FROM alembic_version") == [
        (_head(service, empty_database),)
    ]
    assert await _execute(empty_database, f"SELECT id, subject FROM {table}") == [(1, "s.x.y")]


async def test_an_autocommit_block_runs_outside_a_transaction_on_sqlite_too(empty_database: str) -> None:
    """A migration's autocommit_block (Alembic's AUTOCOMMIT isolation level) must not get the BEGIN
    the migrations' SQLite transactions do: VACUUM refuses to run in a transaction, and a PRAGMA
    such as foreign_keys does nothing in one."""
    if not empty_database.startswith("sqlite"):
        pytest.skip("PostgreSQL: its driver's autocommit, no begin event of ours")
    engine = create_async_engine(normalize_url(empty_database), poolclass=NullPool)
    sqlite_transactions_by_sqlalchemy(engine)
    try:
        async with engine.connect() as conn:
            await conn.execute(text("CREATE TABLE t (x INTEGER)"))
            await conn.commit()
            autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await autocommit.exec_driver_sql("VACUUM")
    finally:
        await engine.dispose()


async def test_the_audits_legacy_reversal_claims_read_the_reversals_index_not_the_journal(empty_database: str) -> None:
    """Every audit run sums what reversals from before wallet migration 0007 claimed, each read from
    its ledger entry found by purchase: from the reversals' partial index (migration 0013), not a
    scan of journal_entries (one entry per spend, the largest of the wallet's tables)."""
    from services.wallet import domain
    from services.wallet.storage import REVERSAL_ENTRIES
    from services.wallet.usecases import legacy_claims_select

    plan = await _plan(empty_database, "wallet", lambda dialect: legacy_claims_select())
    assert "ix_journal_entries_reversal" in plan, plan
    # The predicate names every reversal kind the wallet posts, and nothing else.
    reversal_kinds = {k for k in domain.ENTRY_KINDS if k.startswith("REVERSAL_")}
    assert {k for k in domain.ENTRY_KINDS if f"'{k}'" in REVERSAL_ENTRIES} == reversal_kinds


async def test_the_audits_open_shortfall_total_reads_the_open_only_index(empty_database: str) -> None:
    """Every audit run sums the coins open shortfalls still owe: from their partial index, not a
    scan of every shortfall ever recorded (settled ones stay as a record)."""
    from services.payout.usecases import open_shortfalls_select

    plan = await _plan(empty_database, "payout", lambda dialect: open_shortfalls_select())
    assert "ix_clawback_shortfalls_open" in plan, plan


@pytest.mark.parametrize("after", [(-1, ""), (500, "e1")], ids=["from the start", "from a cursor"])
async def test_the_sweepers_query_is_served_by_the_pending_only_index(
    empty_database: str, after: tuple[int, str]
) -> None:
    from services.gifting.storage import stale_pending

    plan = await _gifting_plan(empty_database, lambda dialect: stale_pending(1_000, 10, after))
    assert "ix_gift_events_pending" in plan, plan


async def test_a_resumed_feeds_catch_up_read_is_served_by_the_stream_sent_index(empty_database: str) -> None:
    from services.gifting.storage import sent_after

    plan = await _gifting_plan(empty_database, lambda dialect: sent_after("s1", 1_000, "e1", 200))
    assert "ix_gift_events_stream_sent" in plan, plan


@pytest.mark.parametrize("inclusive", [True, False])
async def test_a_resumed_feeds_read_back_for_open_combos_is_served_by_the_stream_sent_index(
    empty_database: str, inclusive: bool
) -> None:
    from services.gifting.storage import sent_before

    plan = await _gifting_plan(empty_database, lambda dialect: sent_before("s1", 1_000, "e1", 200, inclusive=inclusive))
    assert "ix_gift_events_stream_sent" in plan, plan


async def test_the_key_only_pruners_delete_is_served_by_the_key_only_index(empty_database: str) -> None:
    from services.gifting.keyrows import KeyOnlyPruner
    from tests.integration.helpers import service_settings

    settings = service_settings(empty_database)
    pruner = KeyOnlyPruner(None, settings)  # type: ignore[arg-type] # only its statement is planned
    plan = await _gifting_plan(empty_database, lambda dialect: pruner._delete, {"before": 1_000})
    assert "ix_gift_events_key_only" in plan, plan


async def test_the_daily_leaderboard_pruners_delete_is_served_by_the_day_index(empty_database: str) -> None:
    from services.gifting.config import GiftingSettings
    from services.gifting.readmodels import LeaderboardDailyPruner

    # A BRIN index is costed by the table's pages, so the plan is judged on a table of some size:
    # 60 days of 1,000 senders in the two scopes, analyzed. (Without ix_leaderboard_daily_day
    # PostgreSQL scans the whole primary key: day is its third column.)
    await upgrade_head(ROOT / "services" / "gifting" / "migrations", empty_database)
    rows = ", ".join(
        f"('{scope}', 's{i % 50}', {day}, 'v{i}', 1)"
        for day in range(60)
        for i in range(1_000)
        for scope in ("STREAM", "CREATOR")
    )
    await _execute(
        empty_database,
        f"INSERT INTO leaderboard_daily (scope, scope_id, day, sender_id, coins) VALUES {rows}",
        "ANALYZE leaderboard_daily",
    )
    settings = GiftingSettings(database_url=empty_database, nats_url="nats://127.0.0.1:1", wallet_addr="127.0.0.1:1")
    pruner = LeaderboardDailyPruner(None, settings)  # type: ignore[arg-type] # only its statement is planned
    plan = await _gifting_plan(empty_database, lambda dialect: pruner._delete, {"before": 10})
    assert "ix_leaderboard_daily_day" in plan, plan


# A gift_events row as gifting's migrations 0006-0008 have it: event id, idempotency key (SQL: NULL
# or quoted), client key, status, and its created/updated time.
_GIFT_EVENT = (
    "INSERT INTO gift_events (event_id, idempotency_key, client_key, request_hash, kind, stream_id, "
    "creator_id, sender_id, gift_id, quantity, unit_price_coins, coins, status, created_at_us, "
    "updated_at_us) VALUES ('{}', {}, '{}', 'h', 'GIFT', 's', 'c', 'v', 'rose', 1, 1, 1, '{}', {}, {})"
)


async def test_migration_0007_gives_cancelled_gifts_their_key_back_unless_a_later_gift_holds_it(
    empty_database: str,
) -> None:
    cfg = alembic_config(ROOT / "services" / "gifting" / "migrations", empty_database)
    await asyncio.to_thread(command.upgrade, cfg, "0006")
    rows = [
        ("a-old", "NULL", "a", "CANCELLED", 1),  # cancelled twice: the latest gets the key
        ("a-new", "NULL", "a", "CANCELLED", 2),
        ("b-cancelled", "NULL", "b", "CANCELLED", 1),  # a retry's gift holds the key already
        ("b-sent", "'b'", "b", "SENT", 2),
        ("c-pending", "'c'", "c", "PENDING", 1),
    ]
    await _execute(empty_database, *(_GIFT_EVENT.format(e, k, ck, st, t, t) for e, k, ck, st, t in rows))
    await asyncio.to_thread(command.upgrade, cfg, "head")
    keys = "SELECT event_id, idempotency_key FROM gift_events ORDER BY event_id"
    assert await _execute(empty_database, keys) == [
        ("a-new", "a"),
        ("a-old", None),
        ("b-cancelled", None),
        ("b-sent", "b"),
        ("c-pending", "c"),
    ]
    # And back: cancelled gifts hold no key, as the code before it expects.
    await asyncio.to_thread(command.downgrade, cfg, "0006")
    assert [k for _, k in await _execute(empty_database, keys)] == [None, None, None, "b", "c"]


async def test_the_key_restorers_query_is_served_by_the_key_lost_index(empty_database: str) -> None:
    from services.gifting.storage import keys_lost

    plan = await _gifting_plan(empty_database, lambda dialect: keys_lost(dialect, 10))
    assert "ix_gift_events_key_lost" in plan, plan


async def test_migration_0008_marks_the_keys_retries_moved_and_leaves_the_lost_ones_to_the_restorer(
    empty_database: str,
) -> None:
    cfg = alembic_config(ROOT / "services" / "gifting" / "migrations", empty_database)
    await asyncio.to_thread(command.upgrade, cfg, "0007")
    rows = [
        ("a-cancelled", "NULL", "a", "CANCELLED", 1),  # a retry moved its key to a-sent
        ("a-sent", "'a'", "a", "SENT", 2),
        ("b-cancelled", "NULL", "b", "CANCELLED", 3),  # an old pod cancelled it after 0007: the key is lost
        ("c-cancelled", "'c'", "c", "CANCELLED", 4),  # kept its key
    ]
    await _execute(empty_database, *(_GIFT_EVENT.format(e, k, ck, st, t, t) for e, k, ck, st, t in rows))
    await asyncio.to_thread(command.upgrade, cfg, "head")
    moved = "SELECT event_id, key_moved_at_us FROM gift_events ORDER BY event_id"
    assert await _execute(empty_database, moved) == [
        ("a-cancelled", 1),
        ("a-sent", None),
        ("b-cancelled", None),
        ("c-cancelled", None),
    ]
    lost = "SELECT event_id FROM gift_events WHERE " + KEY_LOST
    assert await _execute(empty_database, lost) == [("b-cancelled",)]
    await asyncio.to_thread(command.downgrade, cfg, "0007")
    assert len(await _execute(empty_database, "SELECT event_id FROM gift_events")) == 4


@pytest.mark.parametrize("service", SERVICES)
async def test_outbox_ids_are_not_reused_once_the_relay_has_drained_the_table(
    empty_database: str, service: str
) -> None:
    """The audit's outbox cut-off is the highest id it saw: a row written later must have a higher one."""
    await upgrade_head(ROOT / "services" / service / "migrations", empty_database)
    insert = (
        "INSERT INTO outbox (event_id, subject, payload, headers, created_at_us, attempts) "
        "VALUES ('{}', 's.x.y', '', '{{}}', 1, 0)"
    )
    await _execute(empty_database, insert.format("a"), insert.format("b"))
    (highest,) = (await _execute(empty_database, "SELECT max(id) FROM outbox"))[0]
    await _execute(empty_database, "DELETE FROM outbox")  # the relay: published, deleted
    await _execute(empty_database, insert.format("c"))
    (later,) = (await _execute(empty_database, "SELECT id FROM outbox"))[0]
    assert isinstance(highest, int) and isinstance(later, int) and later > highest


@pytest.mark.parametrize("service", SERVICES)
async def test_replicas_migrating_together_take_turns_even_through_a_concurrent_index_build(
    empty_database: str, service: str
) -> None:
    """Gifting's 0008 commits inside its migration (CREATE INDEX CONCURRENTLY); the advisory lock
    the replicas queue on must outlast that commit, or the second would run 0008 beside the first."""
    if not empty_database.startswith("postgresql"):
        pytest.skip("SQLite: one process migrates its own file")
    # Processes, as replicas are (Alembic's context is one per process).
    code = (
        "import asyncio, sys; from pathlib import Path; from services.common.migrate import upgrade_head;"
        " asyncio.run(upgrade_head(Path(sys.argv[1]), sys.argv[2]))"
    )
    argv = [sys.executable, "-c", code, str(ROOT / "services" / service / "migrations"), empty_database]
    procs = [await asyncio.create_subprocess_exec(*argv, cwd=ROOT) for _ in range(3)]
    codes = await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), 120)
    assert codes == [0, 0, 0]
    heads = await _execute(empty_database, "SELECT version_num FROM alembic_version")
    assert len(heads) == 1, heads
    invalid = "SELECT count(*) FROM pg_index WHERE NOT indisvalid"
    assert await _execute(empty_database, invalid) == [(0,)]


async def test_gifting_0008_completes_on_a_retry_after_an_attempt_stopped_past_its_own_commits(
    empty_database: str,
) -> None:
    """0008 commits its column and index outside the migrations' transaction on PostgreSQL: an
    attempt stopped after them (a crash before the revision is stamped, a CONCURRENTLY build cut
    short, leaving its index INVALID) must not keep every later start from migrating."""
    if not empty_database.startswith("postgresql"):
        pytest.skip("SQLite: 0008 runs in the migrations' one transaction")
    cfg = alembic_config(ROOT / "services" / "gifting" / "migrations", empty_database)
    await asyncio.to_thread(command.upgrade, cfg, "0008")
    await _execute(
        empty_database,
        "UPDATE alembic_version SET version_num = '0007'",  # the stamp never committed
        "UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'ix_gift_events_key_lost'::regclass",
    )
    await asyncio.to_thread(command.upgrade, cfg, "head")
    valid = "SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_gift_events_key_lost'::regclass"
    assert await _execute(empty_database, valid) == [(True,)]
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert await _execute(empty_database, "SELECT version_num FROM alembic_version") == [(head,)]


# Each service's revision that adds the idempotency records' age index (IdempotencyPruner).
IDEMPOTENCY_INDEX_REVISION = {"wallet": "0009", "gifting": "0010", "payout": "0009"}


@pytest.mark.parametrize("service", SERVICES)
async def test_the_idempotency_index_is_built_again_by_a_retry_after_an_interrupted_build(
    empty_database: str, service: str
) -> None:
    """The index is built CONCURRENTLY, outside the migrations' transaction, so that the previous
    release's commands keep recording their answers: a build cut short leaves it INVALID and the
    revision unstamped, and the retry must build it again, not take it as done."""
    if not empty_database.startswith("postgresql"):
        pytest.skip("SQLite: the index is built in the migrations' one transaction")
    cfg = alembic_config(ROOT / "services" / service / "migrations", empty_database)
    revision = IDEMPOTENCY_INDEX_REVISION[service]
    await asyncio.to_thread(command.upgrade, cfg, revision)
    previous = ScriptDirectory.from_config(cfg).get_revision(revision).down_revision
    await _execute(
        empty_database,
        f"UPDATE alembic_version SET version_num = '{previous}'",  # the stamp never committed
        "UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'ix_idempotency_keys_created_at'::regclass",
    )
    await asyncio.to_thread(command.upgrade, cfg, "head")
    valid = "SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_idempotency_keys_created_at'::regclass"
    assert await _execute(empty_database, valid) == [(True,)]


async def test_a_replica_waiting_for_another_ones_migration_says_so(
    empty_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An init container that waits on the lock shows only `Init:0/1`: its log must say why."""
    if not empty_database.startswith("postgresql"):
        pytest.skip("SQLite: no migration lock")
    import asyncpg

    holder = await asyncpg.connect(normalize_url(empty_database).replace("+asyncpg", ""))
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        with caplog.at_level(logging.INFO, logger="services.common.migrate"):
            migrating = asyncio.create_task(upgrade_head(ROOT / "services" / "wallet" / "migrations", empty_database))
            for _ in range(200):  # 10 s
                if "waiting for the migration lock" in caplog.text or migrating.done():
                    break
                await asyncio.sleep(0.05)
            assert not migrating.done(), "it migrated while another replica held the lock"
            assert "waiting for the migration lock" in caplog.text
            await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
            await asyncio.wait_for(migrating, 60)
    finally:
        await holder.close()


async def test_payout_migration_0011_hides_the_domain_of_stored_paypal_masks_and_nothing_else(
    empty_database: str,
) -> None:
    cfg = alembic_config(ROOT / "services" / "payout" / "migrations", empty_database)
    await asyncio.to_thread(command.upgrade, cfg, "0010")
    insert = (
        "INSERT INTO payout_methods (method_id, creator_id, kind, masked, fingerprint, provider_token, "
        "currency_code, verification, created_at_us, updated_at_us) "
        "VALUES ('{}', 'c', '{}', '{}', 'f', 't', 'USD', 'VERIFIED', 1, 1)"
    )
    rows = [
        ("pm_a", "PAYPAL", "j•••@janedoe.dev"),
        ("pm_b", "PAYPAL", "•••@mail.corp.example.co.uk"),  # a one-letter name
        ("pm_c", "PAYPAL", "j•••@x.io"),  # a one-letter domain is not shown whole either
        ("pm_d", "BANK", "DE ••••••••3000"),
        ("pm_e", "BANK", "••34 (routing 0015)"),
    ]
    await _execute(empty_database, *(insert.format(*row) for row in rows))
    await asyncio.to_thread(command.upgrade, cfg, "head")
    masks = "SELECT method_id, masked FROM payout_methods ORDER BY method_id"
    after = [
        ("pm_a", "j•••@j•••.dev"),
        ("pm_b", "•••@m•••.uk"),
        ("pm_c", "j•••@•••.io"),
        ("pm_d", "DE ••••••••3000"),
        ("pm_e", "••34 (routing 0015)"),
    ]
    assert await _execute(empty_database, masks) == after
    # One-way: the downgrade leaves the hidden masks (the code before shows them as they are).
    await asyncio.to_thread(command.downgrade, cfg, "0010")
    assert await _execute(empty_database, masks) == after


def _head(service: str, url: str) -> str:
    head = ScriptDirectory.from_config(
        alembic_config(ROOT / "services" / service / "migrations", url)
    ).get_current_head()
    assert head is not None
    return head


@pytest.mark.parametrize("service", SERVICES)
async def test_a_rollback_starts_on_a_database_a_later_release_migrated(
    empty_database: str, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """`kubectl rollout undo` runs this release's `migrate` init container on a database a later
    release took past this release's head: left as it is (later migrations are expand-only), not
    Alembic's "Can't locate revision" exit 1 that kept every pod of the rollback in Init."""
    migrations = ROOT / "services" / service / "migrations"
    await upgrade_head(migrations, empty_database)
    later = f"{int(_head(service, empty_database)) + 1:04d}"
    await _execute(empty_database, f"UPDATE alembic_version SET version_num = '{later}'")
    with caplog.at_level(logging.INFO, logger="services.common.migrate"):
        await upgrade_head(migrations, empty_database)
    assert await _execute(empty_database, "SELECT version_num FROM alembic_version") == [(later,)]
    assert "at a later release's revision" in caplog.text
    assert "migrations applied" not in caplog.text


@pytest.mark.parametrize("revision", ["0000", "abc123"])
async def test_a_revision_no_later_release_of_this_service_made_is_still_refused(
    empty_database: str, revision: str
) -> None:
    migrations = ROOT / "services" / "wallet" / "migrations"
    await upgrade_head(migrations, empty_database)
    await _execute(empty_database, f"UPDATE alembic_version SET version_num = '{revision}'")
    with pytest.raises(CommandError, match="Can't locate revision"):
        await upgrade_head(migrations, empty_database)


async def test_another_services_database_is_still_refused_though_its_revision_is_higher(empty_database: str) -> None:
    """Payout's numbers run past the wallet's: the wallet pointed at payout's database finds its
    own tables missing there, and does not take payout's head for a later wallet release."""
    await upgrade_head(ROOT / "services" / "payout" / "migrations", empty_database)
    assert int(_head("payout", empty_database)) > int(_head("wallet", empty_database))
    with pytest.raises(CommandError, match="Can't locate revision"):
        await upgrade_head(ROOT / "services" / "wallet" / "migrations", empty_database)


async def test_a_later_revision_on_a_schema_lacking_a_column_of_this_release_is_refused(
    empty_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A later release only adds (expand-only): a database at a higher revision that lacks one of
    this release's columns is not one a later release left (a mistyped `UPDATE alembic_version`,
    a restored dump), and serving on it would fail call by call; refused as Alembic refuses it."""
    migrations = ROOT / "services" / "payout" / "migrations"
    await upgrade_head(migrations, empty_database)
    later = f"{int(_head('payout', empty_database)) + 1:04d}"
    await _execute(
        empty_database,
        "DROP INDEX ix_clawbacks_sender_reversed",
        "ALTER TABLE clawbacks DROP COLUMN reversed_at_us",
        f"UPDATE alembic_version SET version_num = '{later}'",
    )
    with (
        caplog.at_level(logging.INFO, logger="services.common.migrate"),
        pytest.raises(CommandError, match="Can't locate revision"),
    ):
        await upgrade_head(migrations, empty_database)
    said = [r for r in caplog.records if "lacks columns it declares" in r.getMessage()]
    assert [getattr(r, "columns", None) for r in said] == ["clawbacks.reversed_at_us"]


# The newest revision of each service in the release before the migrate runner left a later
# release's revision alone (f72aee8): a rollback to it sets alembic_version back to these first.
REVISIONS_OF_THE_RELEASE_BEFORE = {"wallet": "0010", "gifting": "0014", "payout": "0012"}


@pytest.mark.parametrize("service", SERVICES)
async def test_the_revisions_a_rollback_sets_back_run_again_on_the_schema_they_left(
    empty_database: str, service: str
) -> None:
    """docs/sre.md "Rolling back": to roll back to f72aee8, alembic_version is set back to its newest
    revision, the later revisions' schema left in place; the next upgrade runs them again on it."""
    if not empty_database.startswith("postgresql"):
        pytest.skip("PostgreSQL: the rollback runbook is the Kubernetes one")
    migrations = ROOT / "services" / service / "migrations"
    await upgrade_head(migrations, empty_database)
    back = REVISIONS_OF_THE_RELEASE_BEFORE[service]
    await _execute(empty_database, f"UPDATE alembic_version SET version_num = '{back}'")
    await upgrade_head(migrations, empty_database)
    head = _head(service, empty_database)
    assert await _execute(empty_database, "SELECT version_num FROM alembic_version") == [(head,)]


DAY_US = 86_400_000_000
# Each pruner's table as gifting's migrations make it: its age index, its age column, the column's
# value of a day's start, and a day of rows from generate_series `g` ({day}: the rows' day).
PRUNED_TABLES = {
    "inbox": (
        "ix_inbox_received_at",
        "received_at_us",
        DAY_US,
        "INSERT INTO inbox (consumer, event_id, received_at_us) SELECT 'payout-gift-sent', 'e' || g, {day_us} + g"
        " FROM generate_series({first}, {last}) g",
    ),
    "idempotency": (
        "ix_idempotency_keys_created_at",
        "created_at_us",
        DAY_US,
        "INSERT INTO idempotency_keys (scope, key, request_hash, response, created_at_us)"
        " SELECT 'SendGift', 'k' || g, 'h', '\\x00', {day_us} + g FROM generate_series({first}, {last}) g",
    ),
    "leaderboard_daily": (
        "ix_leaderboard_daily_day",
        "day",
        1,
        "INSERT INTO leaderboard_daily (scope, scope_id, day, sender_id, coins)"
        " SELECT 'STREAM', 's' || (g % 50), {day}, 'v' || g, 1 FROM generate_series({first}, {last}) g",
    ),
}


def _pruner(name: str, url: str) -> AgePruner:
    """The pruner of `name` in PRUNED_TABLES, on gifting's tables; only its statement is used."""
    from services.common.idempotency import IdempotencyPruner
    from services.common.inbox import InboxPruner
    from services.gifting.config import GiftingSettings
    from services.gifting.readmodels import LeaderboardDailyPruner
    from services.gifting.storage import common

    settings = GiftingSettings(database_url=url, nats_url="nats://127.0.0.1:1", wallet_addr="127.0.0.1:1")
    if name == "inbox":
        return InboxPruner(None, common, settings)  # type: ignore[arg-type]
    if name == "idempotency":
        return IdempotencyPruner(None, common, settings)  # type: ignore[arg-type]
    return LeaderboardDailyPruner(None, settings)  # type: ignore[arg-type]


@pytest.mark.parametrize("pruner", PRUNED_TABLES)
async def test_a_pruners_round_reads_the_rows_due_not_the_table_once_pruned_pages_hold_new_rows(
    empty_database: str, pruner: str
) -> None:
    """The inbox, idempotency and daily leaderboard pruners find the rows older than the
    retention by an index of their age. After a while of pruning, the pages its deletes freed
    hold new rows: the index must still lead to the rows due alone. A BRIN index (these were, on
    PostgreSQL, until wallet 0015 / gifting 0017 / payout 0017) cannot: a range's summary only
    widens, so a range of pruned pages refilled spans the oldest day and the newest, matches
    "older than" and is read whole; in production every range ends up so, and each round read
    the whole table (45 days of inbox every 10 minutes) to delete ten minutes' rows.

    30 days of 5,000 rows, the first 15 pruned and vacuumed, 15 new days written into the freed
    pages, analyzed; then the pruner's chunk when day 15 is due, run (and rolled back) under
    EXPLAIN ANALYZE: the age index must lead to day 15's rows, nothing thrown away on recheck."""
    index, column, unit, insert = PRUNED_TABLES[pruner]
    statement = _pruner(pruner, empty_database)._delete
    before = 16 * unit
    if not empty_database.startswith("postgresql"):
        plan = await _gifting_plan(empty_database, lambda dialect: statement, {"before": before})
        assert index in plan, plan
        return
    await upgrade_head(ROOT / "services" / "gifting" / "migrations", empty_database)
    per_day = 5_000

    def day(d: int) -> str:
        return insert.format(day=d, day_us=d * DAY_US, first=d * per_day, last=(d + 1) * per_day - 1)

    table = statement.table.name
    engine = create_async_engine(normalize_url(empty_database), isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            for d in range(30):
                await conn.exec_driver_sql(day(d))
            await conn.exec_driver_sql(f"VACUUM ANALYZE {table}")
            await conn.exec_driver_sql(f"DELETE FROM {table} WHERE {column} < {15 * unit}")
            await conn.exec_driver_sql(f"VACUUM {table}")
            for d in range(30, 45):
                await conn.exec_driver_sql(day(d))
            await conn.exec_driver_sql(f"VACUUM ANALYZE {table}")
            compiled = statement.compile(engine)
            bound = compiled.params | {"before": before}
            params = tuple(bound[name] for name in compiled.positiontup or ())
            await conn.exec_driver_sql("BEGIN")
            await conn.exec_driver_sql("SET LOCAL enable_seqscan = off")  # as _plan: the index or nothing
            rows = (await conn.exec_driver_sql(f"EXPLAIN (ANALYZE, COSTS OFF) {compiled}", params)).all()
            await conn.exec_driver_sql("ROLLBACK")
    finally:
        await engine.dispose()
    plan = "\n".join(str(r[0]) for r in rows)
    assert index in plan, plan
    assert "Rows Removed by Index Recheck" not in plan and "lossy" not in plan, plan
