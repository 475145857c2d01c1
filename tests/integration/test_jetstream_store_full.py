"""The outbox relay against a nats-server whose JetStream store is full (`max_file_store`), and
with an event larger than the server takes (`max_payload`).

A full store refuses every publish (`insufficient resources`): the relay keeps every event in
the outbox, retries with a growing backoff (no busy loop), logs what the server said, and once
space is freed stores each event once, in order. An event over max_payload with its headers (a
producer bug) is not sent: it is held in the outbox, named in the log and counted once, and the
events behind it go at once, every pass succeeding.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import ServiceUnavailableError
from prometheus_client import REGISTRY
from sqlalchemy import MetaData, event, insert
from sqlalchemy.util import await_

from services.common.bus import Bus
from services.common.config import ServiceSettings
from services.common.db import Database
from services.common.outbox import SKIPPED_RECOUNT_INTERVAL_S, WIRE_BYTES_MIN, Outbox, OutboxRelay
from services.common.tables import add_common_tables
from tests.integration import pg
from tests.integration.helpers import eventually
from tests.support.nats import nats_server
from tests.support.relays import Harness, background

STORE_BYTES = 1024 * 1024  # the server's whole JetStream file store
PAYLOAD_BYTES_MAX = 64 * 1024


@contextlib.asynccontextmanager
async def _small_server(
    tmp_path: Path, url: str | None = None, *, sqlite_variables_max: int | None = None, **overrides: Any
) -> AsyncIterator[Harness]:
    """A nats-server of its own with a 1 MiB store and 64 KiB max_payload, and one relay on SQLite
    (or on the database at `url`), with settings `overrides`; `sqlite_variables_max`: the bound
    parameters SQLite takes in a statement (32,766 in most builds, 999 before 3.32)."""
    stop = asyncio.Event()
    async with contextlib.AsyncExitStack() as undo:
        nats_url = undo.enter_context(nats_server(tmp_path, max_payload=PAYLOAD_BYTES_MAX, store_bytes=STORE_BYTES))
        url = url or f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
        metadata = MetaData()
        tables = add_common_tables(metadata)
        db = Database(url, pool_size=2, pool_timeout_s=5, application_name="store-full-test")
        undo.push_async_callback(db.dispose)
        if sqlite_variables_max is not None:
            event.listen(db.engine.sync_engine, "connect", functools.partial(_variables_max, sqlite_variables_max))
        async with db.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        settings = ServiceSettings(database_url=url, nats_url=nats_url, **overrides)  # type: ignore[call-arg]
        bus = Bus(settings, "store-full-test")
        undo.push_async_callback(bus.close)
        undo.callback(stop.set)  # before the bus closes
        await asyncio.wait_for(bus.connect(stop, ["GIFTING"]), 20)
        outbox = Outbox(tables.outbox)
        yield Harness(db, bus, tables, outbox, OutboxRelay(db, bus, outbox, settings), settings)


def _variables_max(limit: int, dbapi_connection: Any, _record: Any) -> None:
    """Lower SQLite's limit on a statement's bound parameters, on aiosqlite's thread."""
    conn = dbapi_connection.driver_connection
    await_(conn._execute(conn._conn.setlimit, sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, limit))


def _publish_errors() -> float:
    return REGISTRY.get_sample_value("livegifts_outbox_publish_errors_total") or 0.0


async def test_a_full_jetstream_store_keeps_events_in_the_outbox_without_a_busy_loop_and_they_go_once_when_freed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with _small_server(tmp_path) as h:
        js = h.bus.js
        assert js is not None
        first = await h.add_events(3)
        assert await h.relay.relay_once() == 3
        # Another stream takes the rest of the store (what a full PVC does to every stream).
        await js.add_stream(StreamConfig(name="FILLER", subjects=["filler.>"], storage=StorageType.FILE))
        with contextlib.suppress(ServiceUnavailableError):  # until the store refuses
            for _ in range(STORE_BYTES // 60_000 + 2):
                await js.publish("filler.x", b"x" * 60_000)
        later = await h.add_events(20)
        with pytest.raises(RuntimeError, match="20 of 20 publishes failed.*insufficient resources"):
            await h.relay.relay_once()
        # The relay's own loop: for 2 s it retries after 0.05, 0.1, 0.2, 0.4, 0.8 s... not at once.
        errors = _publish_errors()
        with caplog.at_level(logging.WARNING, logger="services.common.outbox"):
            async with background(h.relay.run):
                await asyncio.sleep(2.0)
        tries = _publish_errors() - errors
        assert 3 <= tries <= 7, f"{tries} failed passes in 2 s"
        lines = [r for r in caplog.records if r.message == "outbox relay failed, retrying"]
        assert len(lines) == tries and all("insufficient resources" in r.error for r in lines)
        assert await h.unpublished() == 20 and await h.stored() == 3
        await js.delete_stream("FILLER")  # space is back
        async with background(h.relay.run):
            await eventually(h.unpublished, lambda n: n == 0, 10)
        assert await h.stored_ids() == first + later, "each event once, in order"


@contextlib.asynccontextmanager
async def _small_on(db: str, tmp_path: Path, **overrides: Any) -> AsyncIterator[Harness]:
    """`_small_server` on SQLite or on a PostgreSQL database of its own (skipped without one)."""
    if db == "sqlite":
        async with _small_server(tmp_path, **overrides) as h:
            yield h
        return
    admin = pg.admin_url_or_skip()
    name = f"lg_payload_{uuid.uuid4().hex[:12]}"
    pg.create_database(admin, name)
    try:
        async with _small_server(tmp_path, pg.database_url(admin, name), **overrides) as h:
            yield h
    finally:
        pg.drop_database(admin, name)


@pytest.fixture(params=["sqlite", "postgres"])
async def small(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    """`_small_server` on SQLite, and on a PostgreSQL database of its own (skipped without one)."""
    async with _small_on(request.param, tmp_path) as h:
        yield h


async def _add_raw(h: Harness, event_id: str, payload: bytes, headers: str = "{}") -> None:
    """A row as a producer bug might write it."""
    async with h.db.unit_of_work() as uow:
        await uow.conn.execute(
            insert(h.outbox.table).values(
                event_id=event_id, subject="gifting.gift.sent", payload=payload, headers=headers, created_at_us=0
            )
        )
        await uow.commit()


def _held() -> float:
    return REGISTRY.get_sample_value("livegifts_outbox_held_events") or 0.0


async def test_an_event_larger_than_max_payload_is_held_in_the_outbox_and_the_others_go_at_once(
    small: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h = small
    before = await h.add_events(2)
    await _add_raw(h, "oversized", b"x" * (PAYLOAD_BYTES_MAX + 1))
    # Under max_payload by itself, over it with its headers: the server closed the connection on it.
    tracestate = json.dumps({"traceparent": f"00-{'a' * 32}-{'b' * 16}-01", "tracestate": "k=" + "v" * 200})
    await _add_raw(h, "over-with-headers", b"x" * (PAYLOAD_BYTES_MAX - 100), tracestate)
    after = await h.add_events(2)
    errors = _publish_errors()
    with caplog.at_level(logging.ERROR, logger="services.common.outbox"):
        assert await h.relay.relay_once() == 4, "the pass succeeds: the others go"
        more = await h.add_events(3)
        assert await h.relay.relay_once() == 3, "the held rows are read no more"
    assert await h.stored_ids() == before + after + more
    assert await h.unpublished() == 2, "held, not lost: the audit sees them in flight"
    async with h.db.unit_of_work(readonly=True) as uow:
        first, _last = await h.outbox.marks(uow)
        assert first > 0
    assert _held() == 2, "the gauge counts the held rows"
    held = [r for r in caplog.records if r.message.startswith("outbox event larger than NATS takes")]
    assert sorted(r.event_id for r in held) == ["over-with-headers", "oversized"]
    assert all(r.max_payload == PAYLOAD_BYTES_MAX and r.bytes > PAYLOAD_BYTES_MAX for r in held)
    # The relay's own loop: no failed pass, no backoff, the next events go at once.
    async with background(h.relay.run):
        later = await h.add_events(5)
        await eventually(h.unpublished, lambda n: n == 2, 5)
    assert _publish_errors() == errors
    assert (await h.stored_ids())[-5:] == later
    assert h.bus.nc is not None and h.bus.nc.stats["reconnects"] == 0, "the server never closed the connection"


async def test_a_held_event_another_relay_published_is_held_no_more(small: Harness) -> None:
    """Relays of several pods share the outbox: a row one relay held and another published
    (after `max_payload` was raised and that pod restarted, as the runbook says) leaves the
    first relay's count, so its gauge and LivegiftsOutboxEventOversized end."""
    h = small
    nc = h.bus.nc
    assert nc is not None
    other = OutboxRelay(h.db, h.bus, h.outbox, h.settings)  # another pod's relay
    limit = nc._max_payload
    nc._max_payload = PAYLOAD_BYTES_MAX // 2  # a server whose max_payload was lowered since
    try:
        await _add_raw(h, "oversized", b"x" * (PAYLOAD_BYTES_MAX * 3 // 4))
        assert await h.relay.relay_once() == 0
        assert await other.relay_once() == 0
        assert _held() == 1
    finally:
        nc._max_payload = limit  # raised again
    assert await h.relay.relay_once() == 1, "the restarted pod's relay sends it"
    assert await h.unpublished() == 0
    assert await other.relay_once() == 0
    assert _held() == 0, "the other relay holds a row that is gone"


async def _add_raw_many(h: Harness, n: int, payload: bytes) -> None:
    """`n` rows as a producer bug might write them, in one statement."""
    rows = [
        {
            "event_id": f"big-{i}",
            "subject": "gifting.gift.sent",
            "payload": payload,
            "headers": "{}",
            "created_at_us": 0,
        }
        for i in range(n)
    ]
    async with h.db.unit_of_work() as uow:
        await uow.conn.execute(insert(h.outbox.table), rows)
        await uow.commit()


async def test_more_held_events_than_sqlite_binds_parameters_are_held_and_the_others_go(tmp_path: Path) -> None:
    """Each pass reads past every held row: with their ids bound one parameter each, holding more
    rows than SQLite binds in a statement (32,766; 999 here, as before SQLite 3.32, to stay fast)
    failed every later read, and the relay sent nothing more."""
    async with _small_server(tmp_path, sqlite_variables_max=999, relay_batch_size_max=500) as h:
        nc = h.bus.nc
        assert nc is not None
        nc._max_payload = 1000  # a server whose max_payload was lowered since
        await _add_raw_many(h, 1200, b"x" * 1000)
        errors = _publish_errors()
        for _ in range(3):  # 500 rows a pass
            assert await h.relay.relay_once() == 0
        assert _held() == 1200
        later = await h.add_events(3)
        assert await h.relay.relay_once() == 3, "read past 1,200 held rows"
        assert _publish_errors() == errors
        assert await h.stored_ids() == later
        assert await h.unpublished() == 1200


async def test_beyond_relay_held_max_an_oversized_event_fails_the_pass_and_the_others_still_go(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """RELAY_HELD_MAX bounds the held ids each pass reads past: one more row too large with its
    headers (its payload alone fits, so the reads do not pass it by size) is not held but fails
    the pass (backoff, LivegiftsOutboxNotPublishing), and the events beside it go."""
    async with _small_server(tmp_path, relay_held_max=3) as h:
        nc = h.bus.nc
        assert nc is not None
        limit = nc._max_payload
        nc._max_payload = PAYLOAD_BYTES_MAX // 2  # a server whose max_payload was lowered since
        before = await h.add_events(2)
        traced = json.dumps({"traceparent": f"00-{'a' * 32}-{'b' * 16}-01"})
        for i in range(5):
            await _add_raw(h, f"oversized-{i}", b"x" * (PAYLOAD_BYTES_MAX // 2 - WIRE_BYTES_MIN), traced)
        after = await h.add_events(2)
        with caplog.at_level(logging.ERROR, logger="services.common.outbox"):
            with pytest.raises(RuntimeError, match="2 of 9 publishes failed: nats: maximum payload exceeded"):
                await h.relay.relay_once()
            assert _held() == 3, "the gauge counts the held rows, at most RELAY_HELD_MAX"
            assert await h.stored_ids() == before + after
            with pytest.raises(RuntimeError, match="2 of 2 publishes failed"):
                await h.relay.relay_once()  # the held rows are read no more; the two others fail again
        full = [r for r in caplog.records if r.message.startswith("outbox relay holds RELAY_HELD_MAX")]
        assert [(r.held_max, r.not_held, r.event_id) for r in full] == [(3, 2, "oversized-3"), (3, 2, "oversized-3")]
        held = [r for r in caplog.records if r.message.startswith("outbox event larger than NATS takes")]
        assert [r.event_id for r in held] == ["oversized-0", "oversized-1", "oversized-2"], "each logged once"
        nc._max_payload = limit  # raised again: the connection takes them all
        assert await h.relay.relay_once() == 5
        assert _held() == 0
        assert await h.unpublished() == 0


async def test_the_relays_read_past_held_rows_looks_each_row_up_in_a_hash_of_their_ids(small: Harness) -> None:
    """Each pass reads past every held row (up to RELAY_HELD_MAX, 10,000). On PostgreSQL,
    `NOT (id = ANY(:held))` in the generic plan the plan cache picks after five executions
    compared each row read with each held id: 0.2-0.4 s a pass at the cap, holding the claim
    every relay waits on. The ids are to be read once into a hash, whatever the plan."""
    h = small
    if h.db.sqlite:
        async with h.db.engine.connect() as conn:
            stmt = h.relay._unsent_past_held.compile(dialect=conn.dialect)
            values = {**stmt.params, "held": "[1, 2]"}
            params = tuple(values[name] for name in stmt.positiontup or ())
            plan = " / ".join(r[-1] for r in await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {stmt}", params))
        assert "LIST SUBQUERY" in plan and "CORRELATED" not in plan, plan
        return
    async with h.db.engine.connect() as conn:
        stmt = h.relay._claim_past_held
        assert stmt is not None
        sql = str(stmt.compile(dialect=conn.dialect))
        raw = (await conn.get_raw_connection()).driver_connection
        await raw.execute("SET plan_cache_mode = force_generic_plan")
        await raw.execute(f"PREPARE past_held AS {sql}")
        plan = " / ".join(r[0] for r in await raw.fetch("EXPLAIN EXECUTE past_held('{1,2}', 256)"))
        await raw.execute("DEALLOCATE past_held")
        await raw.execute("RESET plan_cache_mode")
    assert "hashed SubPlan" in plan and "<> ALL" not in plan, plan


async def test_past_relay_held_max_the_relays_read_walks_the_outbox_in_id_order_and_stops_at_its_batch(
    small: Harness,
) -> None:
    """Past RELAY_HELD_MAX each read also passes the rows too large by their payload: a filter on
    each row of the walk in id order, as the held ids. A plan that sorted the outbox (or scanned
    it whole) before its LIMIT would read a large backlog whole at every pass."""
    h = small
    if h.db.sqlite:
        async with h.db.engine.connect() as conn:
            stmt = h.relay._unsent_fitting.compile(dialect=conn.dialect)
            values = {**stmt.params, "held": "[1, 2]", "room": 1000}
            params = tuple(values[name] for name in stmt.positiontup or ())
            plan = " / ".join(r[-1] for r in await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {stmt}", params))
        assert "SCAN outbox" in plan and "LIST SUBQUERY" in plan and "B-TREE" not in plan, plan
        return
    async with h.db.engine.connect() as conn:
        stmt = h.relay._claim_fitting
        assert stmt is not None
        sql = str(stmt.compile(dialect=conn.dialect))
        raw = (await conn.get_raw_connection()).driver_connection
        await raw.execute(
            "INSERT INTO outbox (event_id, subject, payload, headers, created_at_us)"
            " SELECT g::text, 'gifting.gift.sent', '\\x00', '{}', 0 FROM generate_series(1, 50000) g"
        )
        await raw.execute("ANALYZE outbox")
        await raw.execute("SET plan_cache_mode = force_generic_plan")
        await raw.execute(f"PREPARE fitting AS {sql}")
        plan = " / ".join(r[0] for r in await raw.fetch("EXPLAIN EXECUTE fitting('{1,2}', 1000, 256)"))
        await raw.execute("DEALLOCATE fitting")
        await raw.execute("RESET plan_cache_mode")
    assert "Index Scan using outbox_pkey" in plan and "Sort" not in plan and "hashed SubPlan" in plan, plan


async def test_a_held_row_sent_in_a_pass_makes_room_for_an_oversized_row_of_that_same_pass(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """At RELAY_HELD_MAX, a pass whose larger max_payload takes a held row (acked, let go at the
    next read) and meets a new oversized row: that row fitted under the limit, yet was refused,
    and the pass failed (a backoff, an ERROR line, a publish error)."""
    async with _small_server(tmp_path, relay_held_max=1) as h:
        nc = h.bus.nc
        assert nc is not None
        limit = nc._max_payload
        try:
            nc._max_payload = PAYLOAD_BYTES_MAX // 2  # lowered since
            await _add_raw(h, "oversized-0", b"x" * (PAYLOAD_BYTES_MAX * 5 // 8))
            assert await h.relay.relay_once() == 0
            assert _held() == 1
            nc._max_payload = PAYLOAD_BYTES_MAX * 3 // 4  # raised: oversized-0 fits, a larger one does not
            await _add_raw(h, "oversized-1", b"x" * (PAYLOAD_BYTES_MAX * 7 // 8))
            errors = _publish_errors()
            with caplog.at_level(logging.ERROR, logger="services.common.outbox"):
                assert await h.relay.relay_once() == 1, "oversized-0 goes and the pass does not fail"
            assert _publish_errors() == errors
            assert not [r for r in caplog.records if r.message.startswith("outbox relay holds RELAY_HELD_MAX")]
            assert _held() == 1, "oversized-1 is held in oversized-0's place"
            later = await h.add_events(2)
            assert await h.relay.relay_once() == 2
            assert (await h.stored_ids())[-2:] == later
        finally:
            nc._max_payload = limit
        assert await h.relay.relay_once() == 1
        assert _held() == 0 and await h.unpublished() == 0


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
async def test_more_oversized_events_than_relay_held_max_and_a_batch_leave_every_event_that_fits_going(
    db: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Beyond RELAY_HELD_MAX the oversized rows were not held but failed the pass, and being the
    oldest they came first in every read: once a batch of them waited, the relay sent nothing.
    Past the cap it reads past every row whose payload alone is over the limit, and counts them."""
    async with _small_on(db, tmp_path, relay_held_max=3, relay_batch_size_max=4) as h:
        nc = h.bus.nc
        assert nc is not None
        limit = nc._max_payload
        nc._max_payload = PAYLOAD_BYTES_MAX // 2  # a server whose max_payload was lowered since
        sent = await h.add_events(1)
        for i in range(3 + 4 + 5):  # more than RELAY_HELD_MAX + RELAY_BATCH_SIZE_MAX
            await _add_raw(h, f"oversized-{i}", b"x" * (PAYLOAD_BYTES_MAX * 3 // 4))
            if i % 3 == 2:
                sent += await h.add_events(1)
        # Its payload fits, its headers take it over: not skipped by size, held by its id.
        traced = json.dumps({"traceparent": f"00-{'a' * 32}-{'b' * 16}-01"})
        await _add_raw(h, "over-with-headers", b"x" * (PAYLOAD_BYTES_MAX // 2 - WIRE_BYTES_MIN), traced)
        sent += await h.add_events(2)
        errors = _publish_errors()
        with caplog.at_level(logging.ERROR, logger="services.common.outbox"):
            async with background(h.relay.run):
                assert await eventually(h.unpublished, lambda n: n == 13, 10) == 13
                later = await h.add_events(5)
                assert await eventually(h.unpublished, lambda n: n == 13, 10) == 13
            assert await h.stored_ids() == sent + later, "every event that fits, once, in order"
            assert _publish_errors() == errors, "no pass failed"
            assert _held() == 13, "the gauge counts the rows read past by size and those held by id"
            async with h.db.unit_of_work(readonly=True) as uow:
                first, _last = await h.outbox.marks(uow)
            assert first > 0, "the audit sees them in flight"
        switched = [r for r in caplog.records if r.message.startswith("outbox relay holds RELAY_HELD_MAX")]
        assert [(r.held_max, r.skipped) for r in switched] == [(3, 12)], "logged once, with the count"
        nc._max_payload = limit  # raised again: the connection takes them all
        async with background(h.relay.run):
            assert await eventually(h.unpublished, lambda n: n == 0, 10) == 0
        assert await h.relay.relay_once() == 0
        assert _held() == 0


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
async def test_held_ids_taken_by_rows_too_large_by_their_payload_leave_room_for_one_too_large_by_its_headers(
    db: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """RELAY_HELD_MAX held ids, all of rows whose payload alone is over the limit, then one row
    over it only with its headers: the relay read past the held rows by their size, keeping an
    id for that row. It switched only when a row of the pass itself was too large by its
    payload, so that row was refused, and every pass failed (backoff) while it waited."""
    async with _small_on(db, tmp_path, relay_held_max=2) as h:
        nc = h.bus.nc
        assert nc is not None
        limit = nc._max_payload
        try:
            nc._max_payload = PAYLOAD_BYTES_MAX // 2  # a server whose max_payload was lowered since
            for i in range(2):
                await _add_raw(h, f"oversized-{i}", b"x" * (PAYLOAD_BYTES_MAX * 3 // 4))
            assert await h.relay.relay_once() == 0
            assert _held() == 2
            traced = json.dumps({"traceparent": f"00-{'a' * 32}-{'b' * 16}-01"})
            await _add_raw(h, "over-with-headers", b"x" * (PAYLOAD_BYTES_MAX // 2 - WIRE_BYTES_MIN), traced)
            later = await h.add_events(2)
            errors = _publish_errors()
            with caplog.at_level(logging.ERROR, logger="services.common.outbox"):
                assert await h.relay.relay_once() == 2, "the pass does not fail"
                assert await h.relay.relay_once() == 0
            assert _publish_errors() == errors
            assert not [r for r in caplog.records if r.message.endswith("more fail its passes")]
            assert await h.stored_ids() == later
            assert _held() == 3, "two passed by their size, one held by its id"
        finally:
            nc._max_payload = limit
        assert await h.relay.relay_once() == 3
        assert _held() == 0 and await h.unpublished() == 0


async def test_past_relay_held_max_an_idle_relay_counts_the_rows_it_reads_past_at_most_every_interval(
    tmp_path: Path,
) -> None:
    """The count of the rows read past by size walks the outbox: run after every short pass, an
    idle relay (a read every RELAY_POLL_INTERVAL_S) walked a large outbox twice a poll. It runs
    at the switch, after a pass that sent something, else at most every SKIPPED_RECOUNT_INTERVAL_S."""
    async with _small_server(tmp_path, relay_held_max=1) as h:
        nc = h.bus.nc
        assert nc is not None
        limit = nc._max_payload
        counts = 0
        count_skipped = h.relay._count_skipped

        async def counted(switched: bool) -> None:
            nonlocal counts
            counts += 1
            await count_skipped(switched)

        h.relay._count_skipped = counted  # type: ignore[method-assign]
        try:
            nc._max_payload = PAYLOAD_BYTES_MAX // 2
            for i in range(2):  # more than RELAY_HELD_MAX, too large by their payload
                await _add_raw(h, f"oversized-{i}", b"x" * (PAYLOAD_BYTES_MAX * 3 // 4))
            assert await h.relay.relay_once() == 0
            assert (counts, _held()) == (1, 2), "counted at the switch"
            for _ in range(5):  # idle polls
                assert await h.relay.relay_once() == 0
            assert counts == 1, "an idle poll does not walk the outbox again"
            # Another pod may have sent them: once the interval has passed, an idle poll counts again.
            h.relay._counted_at -= SKIPPED_RECOUNT_INTERVAL_S
            assert await h.relay.relay_once() == 0
            assert counts == 2, "an idle poll counts again after SKIPPED_RECOUNT_INTERVAL_S"
            assert await h.relay.relay_once() == 0
            assert counts == 2, "and then not again until the next interval"
            await h.add_events(1)
            assert await h.relay.relay_once() == 1
            assert (counts, _held()) == (3, 2), "a pass that sent something counts again"
        finally:
            nc._max_payload = limit
        assert await h.relay.relay_once() == 2
        assert _held() == 0 and await h.unpublished() == 0
