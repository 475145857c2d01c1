"""Parked events and their replay, against a real nats-server and a real database (both backends).

A consumer parks an event that keeps failing (CONSUMER_MAX_DELIVER deliveries) and one it cannot
decode, and goes on with the rest. Through DeadLetterService (a real gRPC server, operator
token) an operator lists them and replays one once its cause is fixed: it is applied once, in
one transaction with the inbox and the removal of its row; a replay that fails again, of an
undecodable payload, or of an event the inbox already holds changes nothing it should not; a
second replay, or two at once, apply nothing more. A replay the database fails (connection
dropped, deadlock) answers UNAVAILABLE / ABORTED like any RPC, one the handler fails answers
REPLAY_FAILED without the driver's text, and the inbox row of a parked event outlives the retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry import context as otel_context
from opentelemetry import propagate
from pydantic import SecretStr
from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import OperationalError

from livegifts.common.v1 import dead_letters_pb2, dead_letters_pb2_grpc
from livegifts.gifting.v1 import events_pb2
from services.common import inbox as inbox_module
from services.common.auth import OperatorAuth
from services.common.db import UnitOfWork
from services.common.deadletters import dead_letter_registration
from services.common.errors import Aborted
from services.common.grpcserver import create_server
from services.common.inbox import Consumer, InboxPruner, Subscription
from services.common.outbox import new_event_id
from services.common.telemetry import JsonFormatter
from services.common.timeutil import US_PER_DAY, now_us
from tests.integration import pg
from tests.integration.helpers import eventually, expect_error
from tests.support.relays import Harness, background, harnesses, stream_exists

TOKEN = "dead-letter-test-operator-token"
OPERATOR = (("authorization", f"Bearer {TOKEN}"), ("x-operator", "test"))
DURABLE = "dead-letter-test"
Outcome = dead_letters_pb2.ReplayDeadLetterResponse
Effect = Callable[[UnitOfWork], Awaitable[None]]


class _Rig:
    """A harness, a consumer of gifting.gift.sent that fails on `poison` (and runs `effects` first),
    and a DeadLetterService stub."""

    def __init__(
        self,
        harness: Harness,
        consumer: Consumer[Any],
        stub: Any,
        poison: set[str],
        slow: set[str],
        effects: dict[str, Effect],
    ) -> None:
        self.h, self.consumer, self.stub, self.poison, self.slow = harness, consumer, stub, poison, slow
        self.effects = effects

    async def count(self, sql: str) -> int:
        async with self.h.db.unit_of_work(readonly=True) as uow:
            return int((await uow.conn.execute(text(sql))).scalar_one())

    async def applied(self, event_id: str) -> int:
        async with self.h.db.unit_of_work(readonly=True) as uow:
            q = text("SELECT count(*) FROM applied WHERE event_id = :e")
            return int((await uow.conn.execute(q, {"e": event_id})).scalar_one())

    async def park(self, event: events_pb2.GiftSent) -> int:
        """A row as the consumer parks one (for cases the broker cannot be made to produce on cue)."""
        d = self.h.tables.dead_letters
        async with self.h.db.unit_of_work() as uow:
            await uow.conn.execute(
                insert(d).values(
                    consumer=DURABLE,
                    subject="gifting.gift.sent",
                    event_id=event.event_id,
                    payload=event.SerializeToString(),
                    error="failed 2 times: RuntimeError()",
                    received_at_us=now_us(),
                )
            )
            await uow.commit()
        async with self.h.db.unit_of_work(readonly=True) as uow:
            return int((await uow.conn.execute(select(func.max(d.c.id)))).scalar_one())

    async def replay(self, dead_letter_id: int, key: str = "") -> Any:
        return await self.stub.ReplayDeadLetter(
            dead_letters_pb2.ReplayDeadLetterRequest(id=dead_letter_id, idempotency_key=key), metadata=OPERATOR
        )

    async def parked(self, **request: Any) -> Any:
        return await self.stub.ListDeadLetters(dead_letters_pb2.ListDeadLettersRequest(**request), metadata=OPERATOR)


@contextlib.asynccontextmanager
async def _rig(tmp_path: Path, url: str) -> AsyncIterator[_Rig]:
    poison: set[str] = set()
    slow: set[str] = set()  # events whose effect takes a while: concurrent replays overlap
    effects: dict[str, Effect] = {}  # run in the handler's transaction before an event's effect
    async with harnesses(tmp_path, url, 1, consumer_max_deliver=2) as (h,):
        async with h.db.unit_of_work() as uow:
            await uow.conn.execute(text("CREATE TABLE applied (event_id VARCHAR(64) PRIMARY KEY)"))
            await uow.commit()

        async def handle(uow: UnitOfWork, events: list[events_pb2.GiftSent]) -> None:
            if poison & {e.event_id for e in events}:
                raise RuntimeError("a row this event needs is missing")
            if slow & {e.event_id for e in events}:
                await asyncio.sleep(0.5)
            for e in events:
                if e.event_id in effects:
                    await effects[e.event_id](uow)
                await uow.conn.execute(text("INSERT INTO applied (event_id) VALUES (:e)"), {"e": e.event_id})

        sub = Subscription(DURABLE, "GIFTING", "gifting.gift.sent", events_pb2.GiftSent, handle)
        consumer = Consumer(h.db, h.bus, h.tables, sub, h.settings)
        registration = dead_letter_registration(h.db, h.tables, [consumer], OperatorAuth(SecretStr(TOKEN)))
        running = await create_server([registration], "127.0.0.1", 0, "livegifts.test")
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        try:
            yield _Rig(h, consumer, dead_letters_pb2_grpc.DeadLetterServiceStub(channel), poison, slow, effects)
        finally:
            await channel.close()
            await running.server.stop(None)


@pytest.fixture
async def rig(tmp_path: Path, empty_database: str) -> AsyncIterator[_Rig]:
    async with _rig(tmp_path, empty_database) as r:
        yield r


async def test_a_failing_and_an_undecodable_event_are_parked_and_the_fixed_one_replays_once(rig: _Rig) -> None:
    ids = await rig.h.add_events(3)
    rig.poison.add(ids[1])
    assert rig.h.bus.js is not None
    await rig.h.bus.js.publish("gifting.gift.sent", b"\xff\xff not a GiftSent", headers={"Nats-Msg-Id": "junk"})
    async with background(rig.consumer.run):
        await rig.h.relay.relay_once()
        await eventually(lambda: rig.count("SELECT count(*) FROM dead_letters"), lambda n: n == 2, 20)
        await eventually(lambda: rig.count("SELECT count(*) FROM applied"), lambda n: n == 2, 5)
    assert [await rig.applied(i) for i in ids] == [1, 0, 1]  # the rest went on

    await expect_error(
        rig.stub.ListDeadLetters(dead_letters_pb2.ListDeadLettersRequest()), grpc.StatusCode.UNAUTHENTICATED
    )
    parked = (await rig.parked()).dead_letters
    failing = next(d for d in parked if d.event_id == ids[1])
    junk = next(d for d in parked if not d.event_id)
    assert failing.consumer == DURABLE and "failed 2 times" in failing.error and "undecodable" in junk.error
    first = await rig.parked(page_size=1)
    assert len(first.dead_letters) == 1 and first.next_after_id == first.dead_letters[0].id
    assert [d.id for d in (await rig.parked(after_id=first.next_after_id)).dead_letters] == [parked[1].id]
    assert (await rig.parked(consumer="another")).dead_letters == []

    # Not fixed yet: the replay fails and the event stays parked, nothing applied.
    await expect_error(rig.replay(failing.id), grpc.StatusCode.FAILED_PRECONDITION, "REPLAY_FAILED")
    await expect_error(rig.replay(junk.id), grpc.StatusCode.FAILED_PRECONDITION, "REPLAY_FAILED")
    assert len((await rig.parked()).dead_letters) == 2 and await rig.applied(ids[1]) == 0

    rig.poison.clear()  # the cause is fixed
    answer = await rig.replay(failing.id)
    assert answer.outcome == Outcome.OUTCOME_APPLIED and answer.dead_letter.event_id == ids[1]
    assert await rig.applied(ids[1]) == 1
    await expect_error(rig.replay(failing.id), grpc.StatusCode.NOT_FOUND, "UNKNOWN_DEAD_LETTER")
    assert await rig.applied(ids[1]) == 1
    assert [d.id for d in (await rig.parked()).dead_letters] == [junk.id]
    assert await rig.count(f"SELECT count(*) FROM inbox WHERE consumer = '{DURABLE}'") == 3


class _Delivery:
    """A delivery as the consumer parks it (subject, bytes, stream sequence), recording its settling."""

    subject = "gifting.gift.sent"

    def __init__(self, data: bytes, seq: int) -> None:
        self.data = data
        self.metadata = type("Meta", (), {"sequence": type("Seq", (), {"stream": seq})(), "num_delivered": 3})()
        self.headers: dict[str, str] = {}
        self.settled: list[str] = []

    async def term(self) -> None:
        self.settled.append("term")


async def test_replicas_parking_one_event_at_once_park_it_once_an_undecodable_one_too(
    rig: _Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """Two replicas parking one event at the same moment both found nothing parked and both
    inserted (look-up, then insert): two rows, two alerts, two replays. The unique (consumer,
    event_id) index and an insert-if-absent park it once, the other replica's copy terminated.
    Parks made at once, each by another replica, are the race (a park no longer looks up first).
    An undecodable event, which has no event id, was parked with NULL, distinct from every other
    NULL in the index: each copy of it (its term lost, or withheld while NATS was down) had a row,
    an alert and a failing replay of its own. It is kept under an id of its bytes."""
    from prometheus_client import REGISTRY

    replicas = [rig.consumer, Consumer(rig.h.db, rig.h.bus, rig.h.tables, rig.consumer.sub, rig.h.settings)]

    def parked_total() -> float:
        return REGISTRY.get_sample_value("livegifts_dead_letters_total", {"consumer": DURABLE}) or 0.0

    before = parked_total()
    eid = new_event_id()
    event = events_pb2.GiftSent(event_id=eid, coins=1, creator_id="c").SerializeToString()
    copies = [_Delivery(event, seq=1), _Delivery(event, seq=1)]
    with caplog.at_level(logging.INFO, logger="services.common.inbox"):
        await asyncio.gather(
            *(c._park(m, eid, "failed 2 times: RuntimeError") for c, m in zip(replicas, copies, strict=True))
        )  # type: ignore[arg-type]
        late = _Delivery(event, seq=1)  # a third copy, later, on a replica that did not park it
        third = Consumer(rig.h.db, rig.h.bus, rig.h.tables, rig.consumer.sub, rig.h.settings)
        await third._park(late, eid, "failed 2 times: RuntimeError")  # type: ignore[arg-type]
    assert await rig.count(f"SELECT count(*) FROM dead_letters WHERE event_id = '{eid}'") == 1
    assert [m.settled for m in [*copies, late]] == [["term"]] * 3
    assert parked_total() - before == 1.0, "one alert for one event"
    assert (
        len(
            [r for r in caplog.records if r.getMessage() == "event parked already in dead_letters; its copy terminated"]
        )
        == 2
    )
    (parked,) = [r for r in caplog.records if r.getMessage() == "event parked in dead_letters"]
    (row_id,) = [d.id for d in (await rig.parked()).dead_letters if d.event_id == eid]
    assert parked.dead_letter_id == row_id  # type: ignore[attr-defined]

    before = parked_total()
    junk = [_Delivery(b"\xff not a GiftSent", seq=2), _Delivery(b"\xff not a GiftSent", seq=2)]
    other = _Delivery(b"\xff another", seq=3)
    await asyncio.gather(*(c._park(m, None, "undecodable: junk") for c, m in zip(replicas, junk, strict=True)))  # type: ignore[arg-type]
    await third._park(other, None, "undecodable: junk")  # type: ignore[arg-type]
    assert [m.settled for m in [*junk, other]] == [["term"]] * 3
    assert parked_total() - before == 2.0, "one alert for each undecodable event"
    listed = [d for d in (await rig.parked()).dead_letters if d.id != row_id]
    assert sorted(d.payload_bytes for d in listed) == [len(b"\xff another"), len(b"\xff not a GiftSent")]
    assert [d.event_id for d in listed] == ["", ""]  # no event id shown: the payload could not be decoded


async def test_a_consumer_filter_no_consumer_can_have_is_invalid_not_internal(rig: _Rig) -> None:
    """The filter is compared with stored names: a NUL (text PostgreSQL cannot hold) failed in the
    driver, answered INTERNAL, instead of naming the argument."""
    await expect_error(rig.parked(consumer="payout\x00credits"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_CONSUMER")
    assert list((await rig.parked(consumer="no-such-consumer")).dead_letters) == []


async def test_a_replay_of_an_event_the_inbox_holds_changes_nothing_and_two_at_once_apply_once(rig: _Rig) -> None:
    event = events_pb2.GiftSent(event_id=new_event_id(), coins=1, creator_id="c")
    first = await rig.replay(await rig.park(event))
    assert first.outcome == Outcome.OUTCOME_APPLIED
    again = await rig.replay(await rig.park(event))  # parked twice (two redeliveries): the inbox holds it
    assert again.outcome == Outcome.OUTCOME_DUPLICATE and await rig.applied(event.event_id) == 1

    fresh = events_pb2.GiftSent(event_id=new_event_id(), coins=1, creator_id="c")
    row = await rig.park(fresh)
    rig.slow.add(fresh.event_id)  # the second replay comes while the first holds the row
    answers = await asyncio.gather(rig.replay(row), rig.replay(row), return_exceptions=True)
    outcomes = sorted(
        a.code().name if isinstance(a, grpc.aio.AioRpcError) else Outcome.Outcome.Name(a.outcome) for a in answers
    )
    assert outcomes == ["NOT_FOUND", "OUTCOME_APPLIED"], answers
    assert await rig.applied(fresh.event_id) == 1
    assert (await rig.parked()).dead_letters == []


async def test_an_event_whose_parking_the_database_refused_is_parked_on_a_later_delivery(
    rig: _Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The database is down when the event reaches CONSUMER_MAX_DELIVER (2 here): its handler fails,
    # and so does parking it, on that delivery and the next. The event must come again until
    # it is parked: a server that stopped delivering it would leave it neither applied nor parked.
    (event_id,) = await rig.h.add_events(1)
    rig.poison.add(event_id)
    park = Consumer._park
    refusals = [2]

    async def park_unless_down(self: Consumer[Any], *args: Any, **kwargs: Any) -> None:
        if refusals[0]:
            refusals[0] -= 1
            raise OperationalError("INSERT INTO dead_letters ...", {}, ConnectionRefusedError("database down"))
        await park(self, *args, **kwargs)

    monkeypatch.setattr(Consumer, "_park", park_unless_down)
    # Unacked deliveries come again after ack_wait: 1 s instead of 30, so the test is short.
    monkeypatch.setattr(inbox_module, "ACK_WAIT_S", 1)
    async with background(rig.consumer.run):
        await rig.h.relay.relay_once()
        await eventually(lambda: rig.count("SELECT count(*) FROM dead_letters"), lambda n: n == 1, 20)
    assert refusals == [0]
    assert [d.event_id for d in (await rig.parked()).dead_letters] == [event_id]
    assert await rig.applied(event_id) == 0


def _record_deliveries(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(stream sequence, delivery count) of every message the consumer is handed, in order."""
    deliveries: list[tuple[int, int]] = []
    process = Consumer.process

    async def recording(self: Consumer[Any], msgs: list[Any]) -> None:
        deliveries.extend((msg.metadata.sequence.stream, msg.metadata.num_delivered) for msg in msgs)
        await process(self, msgs)

    monkeypatch.setattr(Consumer, "process", recording)
    return deliveries


async def test_a_batch_slower_than_the_ack_wait_is_not_delivered_again_while_it_is_applied(
    rig: _Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A batch waiting on a lock (below DB_STATEMENT_TIMEOUT_S) for longer than the durable's
    # ack_wait had its events, and those buffered behind it, delivered again meanwhile (a drill:
    # 62 duplicates of 76 events): the consumer says they are in progress while it applies them.
    monkeypatch.setattr(inbox_module, "ACK_WAIT_S", 1)  # the wait 30 s stands for, so the test is short
    deliveries = _record_deliveries(monkeypatch)
    (slow_id,) = await rig.h.add_events(1)
    applying = asyncio.Event()

    async def lock_wait(uow: UnitOfWork) -> None:
        applying.set()
        await asyncio.sleep(3.5)  # three and a half ack waits

    rig.effects[slow_id] = lock_wait
    async with background(rig.consumer.run):
        await rig.h.relay.relay_once()
        await asyncio.wait_for(applying.wait(), 10)
        # Delivered while the first is applied, so buffered behind it; published straight to the
        # stream, as SQLite's writer lock (held by the consumer) would hold up the outbox's insert.
        behind_id = new_event_id()
        behind = events_pb2.GiftSent(event_id=behind_id, coins=1, creator_id="c")
        await rig.h.bus.js.publish("gifting.gift.sent", behind.SerializeToString())  # type: ignore[union-attr]
        await eventually(lambda: rig.count("SELECT count(*) FROM applied"), lambda n: n == 2, 20)
        await asyncio.sleep(1.5)  # time for a redelivery to show
    assert await rig.applied(slow_id) == 1 and await rig.applied(behind_id) == 1
    assert sorted(deliveries) == [(1, 1), (2, 1)], deliveries


async def _park_a_slow_failing_event(rig: _Rig) -> tuple[str, list[float]]:
    """One event whose every try waits 2.5 s (two and a half ack waits of 1 s) and then fails,
    consumed until it is parked and 4 s more (time for a second parking to show): its id and
    when each try started."""
    (event_id,) = await rig.h.add_events(1)
    tries: list[float] = []

    async def slow_then_fails(uow: UnitOfWork) -> None:
        tries.append(asyncio.get_running_loop().time())
        await asyncio.sleep(2.5)
        raise RuntimeError("a row this event needs is missing")

    rig.effects[event_id] = slow_then_fails
    async with background(rig.consumer.run):
        await rig.h.relay.relay_once()
        await eventually(lambda: rig.count("SELECT count(*) FROM dead_letters"), lambda n: n >= 1, 30)
        await asyncio.sleep(4)
    return event_id, tries


async def test_a_slow_failing_event_is_parked_once_after_max_deliver_failures_of_its_own(
    rig: _Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each redelivery JetStream made while a slow try was still running raised the event's
    # delivery count, which counts towards parking: the event was parked before it had failed
    # CONSUMER_MAX_DELIVER (2 here) times, and the copies buffered meanwhile were parked again.
    monkeypatch.setattr(inbox_module, "ACK_WAIT_S", 1)
    event_id, tries = await _park_a_slow_failing_event(rig)
    assert [d.event_id for d in (await rig.parked()).dead_letters] == [event_id]
    assert len(tries) == 2, tries


async def test_copies_redelivered_past_the_in_progress_bound_are_neither_counted_nor_parked_again(
    rig: _Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A batch held longer than the in-progress acks last (0 here: none are sent) has its events
    # delivered again while it runs; the copies pile up behind it. Only the newest is tried, the
    # rest count as no failure of the event's, and a copy of a parked event is not parked again.
    monkeypatch.setattr(inbox_module, "ACK_WAIT_S", 1)
    monkeypatch.setattr(inbox_module, "IN_PROGRESS_STATEMENT_TIMEOUTS_MAX", 0)
    deliveries = _record_deliveries(monkeypatch)
    event_id, tries = await _park_a_slow_failing_event(rig)
    assert [d.event_id for d in (await rig.parked()).dead_letters] == [event_id]
    assert len(tries) == 2, tries  # CONSUMER_MAX_DELIVER, though JetStream delivered it more often
    assert len(deliveries) > 2, deliveries


async def test_an_event_buffered_when_the_consumer_binds_again_is_not_counted_as_failing_there(
    rig: _Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # When the consumer's loop fails (a NATS error) it binds again and naks what its puller had
    # buffered: those deliveries were never tried, yet counted as failures of their events, so
    # one failing (CONSUMER_MAX_DELIVER 2 here) was parked after a single try.
    monkeypatch.setattr(inbox_module, "ACK_WAIT_S", 1)
    (first_id,) = await rig.h.add_events(1)
    processing = asyncio.Event()
    process = Consumer.process

    async def fails_once_with_one_buffered(self: Consumer[Any], msgs: list[Any]) -> None:
        if not processing.is_set():
            processing.set()
            await eventually(lambda: _buffered(self), lambda n: n >= 1, 10)
            raise RuntimeError("the bus failed")
        await process(self, msgs)

    async def _buffered(consumer: Consumer[Any]) -> int:
        return consumer._puller.buffered if consumer._puller is not None else 0

    monkeypatch.setattr(Consumer, "process", fails_once_with_one_buffered)
    behind_id = new_event_id()
    tries: list[str] = []

    async def fails(uow: UnitOfWork) -> None:
        tries.append(behind_id)
        raise RuntimeError("a row this event needs is missing")

    rig.effects[behind_id] = fails
    async with background(rig.consumer.run):
        await rig.h.relay.relay_once()
        await asyncio.wait_for(processing.wait(), 10)
        behind = events_pb2.GiftSent(event_id=behind_id, coins=1, creator_id="c")
        await rig.h.bus.js.publish("gifting.gift.sent", behind.SerializeToString())  # type: ignore[union-attr]
        await eventually(lambda: rig.count("SELECT count(*) FROM dead_letters"), lambda n: n >= 1, 30)
        await eventually(lambda: rig.applied(first_id), lambda n: n == 1, 10)  # after its ack_wait
    assert [d.event_id for d in (await rig.parked()).dead_letters] == [behind_id]
    assert len(tries) == 2, tries


async def test_an_event_at_the_sequence_of_one_parked_before_its_stream_was_made_again_is_applied(
    rig: _Rig,
) -> None:
    # A stream made again (deleted by hand, a NATS back without its store) numbers its events
    # from 1 again. The consumer kept the stream sequences of the events it had parked, and
    # terminated as "a copy of a parked event" the new event that came at one of them: never
    # applied, never parked.
    js = rig.h.bus.js
    assert js is not None
    (poisoned,) = await rig.h.add_events(1)
    rig.poison.add(poisoned)
    async with background(rig.consumer.run):
        await rig.h.relay.relay_once()
        parked_at = (await js.stream_info("GIFTING")).state.last_seq
        assert await eventually(lambda: rig.count("SELECT count(*) FROM dead_letters"), lambda n: n == 1, 30) == 1
        await js.delete_stream("GIFTING")
        assert await eventually(lambda: stream_exists(rig.h), bool, 20), "the consumer did not make it again"
        later = await rig.h.add_events(parked_at)  # the last one at the parked event's sequence
        await rig.h.relay.relay_once()
        assert (await js.stream_info("GIFTING")).state.last_seq == parked_at
        assert await eventually(lambda: rig.applied(later[-1]), lambda n: n == 1, 20) == 1, "terminated unapplied"
    assert [d.event_id for d in (await rig.parked()).dead_letters] == [poisoned]


async def test_the_log_lines_of_a_failing_event_carry_the_trace_it_came_with(rig: _Rig) -> None:
    # An operator follows a gift by its trace id (from the call's answer or log) to the consumer
    # that failed on it: the consumer's lines about that event must carry it.
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    token = otel_context.attach(propagate.extract({"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}))
    try:
        (event_id,) = await rig.h.add_events(1)  # its outbox row keeps the trace headers
    finally:
        otel_context.detach(token)
    rig.poison.add(event_id)
    lines: list[dict[str, Any]] = []

    class _Json(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:  # formatted as it is logged, in its context
            lines.append(json.loads(JsonFormatter("test").format(record)))

    handler = _Json()
    inbox_log = logging.getLogger("services.common.inbox")
    inbox_log.addHandler(handler)
    try:
        async with background(rig.consumer.run):
            await rig.h.relay.relay_once()
            await eventually(lambda: rig.count("SELECT count(*) FROM dead_letters"), lambda n: n == 1, 20)
    finally:
        inbox_log.removeHandler(handler)
    about = [line for line in lines if line.get("event_id") == event_id]
    assert {line["msg"] for line in about} >= {"event failed, will be redelivered", "event parked in dead_letters"}
    assert {line.get("trace_id") for line in about} == {trace_id}, about


class _DriverError(Exception):
    """What a PostgreSQL driver error carries that the error mapping reads: its SQLSTATE."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"SQLSTATE {sqlstate}")
        self.sqlstate = sqlstate


async def _drop_the_connection(uow: UnitOfWork) -> None:
    if uow.conn.dialect.name == "postgresql":
        await uow.conn.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        pytest.fail("the server kept the connection")
    # SQLite has no server to lose: the error SQLAlchemy raises for a connection a server closed.
    dropped = OperationalError(
        "UPDATE creators SET diamonds = ...", {}, ConnectionError("server closed the connection")
    )
    dropped.connection_invalidated = True
    raise dropped


async def _deadlock(uow: UnitOfWork) -> None:
    if uow.conn.dialect.name == "postgresql":
        raise_it = "DO $$ BEGIN RAISE EXCEPTION 'deadlock detected' USING ERRCODE = 'deadlock_detected'; END $$"
        await uow.conn.execute(text(raise_it))
        pytest.fail("the server raised no deadlock")
    raise OperationalError("UPDATE creators SET diamonds = ...", {}, _DriverError("40P01"))  # SQLite has no deadlocks


async def _a_conflict_to_retry(uow: UnitOfWork) -> None:
    raise Aborted("a concurrent change won; retry", "CONFLICT")  # what a consumer says to retry


async def test_a_retried_replay_with_its_key_answers_as_the_first_and_the_key_for_another_is_refused(
    rig: _Rig,
) -> None:
    event, other = (events_pb2.GiftSent(event_id=new_event_id(), coins=1, creator_id="c") for _ in range(2))
    row, other_row = await rig.park(event), await rig.park(other)
    await expect_error(rig.replay(row, "k" * 129), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_IDEMPOTENCY_KEY")
    rig.poison.add(event.event_id)  # a failed replay records no answer: the key's retry replays it
    await expect_error(rig.replay(row, "replay-1"), grpc.StatusCode.FAILED_PRECONDITION, "REPLAY_FAILED")
    rig.poison.clear()

    first = await rig.replay(row, "replay-1")
    assert first.outcome == Outcome.OUTCOME_APPLIED and first.dead_letter.event_id == event.event_id
    # The answer to the first call was lost: its retry answers the same, and applies nothing more.
    assert await rig.replay(row, "replay-1") == first
    assert await rig.applied(event.event_id) == 1
    await expect_error(rig.replay(other_row, "replay-1"), grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    assert [d.id for d in (await rig.parked()).dead_letters] == [other_row] and await rig.applied(other.event_id) == 0
    # Without a key, as before there was one: a second replay finds nothing parked.
    await expect_error(rig.replay(row), grpc.StatusCode.NOT_FOUND, "UNKNOWN_DEAD_LETTER")
    assert (await rig.replay(other_row, "replay-2")).outcome == Outcome.OUTCOME_APPLIED


async def test_concurrent_replays_under_one_key_apply_once_and_answer_alike(rig: _Rig) -> None:
    event, other = (events_pb2.GiftSent(event_id=new_event_id(), coins=1, creator_id="c") for _ in range(2))
    row, other_row = await rig.park(event), await rig.park(other)
    rig.slow.update({event.event_id, other.event_id})  # the calls overlap while the first holds its row
    same = await asyncio.gather(rig.replay(row, "replay-a"), rig.replay(row, "replay-a"))
    assert same[0] == same[1] and same[0].outcome == Outcome.OUTCOME_APPLIED, same
    assert await rig.applied(event.event_id) == 1

    # One key for two dead letters at once: one replays, the other is refused and stays parked.
    row = await rig.park(events_pb2.GiftSent(event_id=new_event_id(), coins=1, creator_id="c"))
    answers = await asyncio.gather(
        rig.replay(row, "replay-b"), rig.replay(other_row, "replay-b"), return_exceptions=True
    )
    codes = sorted(a.code().name if isinstance(a, grpc.aio.AioRpcError) else "OK" for a in answers)
    assert codes == ["ALREADY_EXISTS", "OK"], answers
    assert len((await rig.parked()).dead_letters) == 1


@pytest.mark.parametrize(
    ("effect", "code", "reason"),
    [
        (_drop_the_connection, grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE"),
        (_deadlock, grpc.StatusCode.ABORTED, "CONFLICT"),
        (_a_conflict_to_retry, grpc.StatusCode.ABORTED, "CONFLICT"),
    ],
)
async def test_a_replay_the_database_fails_answers_like_any_rpc_and_a_retry_applies_it(
    rig: _Rig, effect: Effect, code: grpc.StatusCode, reason: str
) -> None:
    event = events_pb2.GiftSent(event_id=new_event_id(), coins=1, creator_id="c")
    row = await rig.park(event)
    rig.effects[event.event_id] = effect
    err = await expect_error(rig.replay(row), code, reason)
    assert "UPDATE" not in (err.details() or "") and "SQLSTATE" not in (err.details() or ""), err.details()
    assert [d.id for d in (await rig.parked()).dead_letters] == [row] and await rig.applied(event.event_id) == 0

    rig.effects.clear()  # the database is back: the same call now applies it
    assert (await rig.replay(row)).outcome == Outcome.OUTCOME_APPLIED
    assert await rig.applied(event.event_id) == 1


async def test_a_parked_event_shows_the_operator_no_sql_and_the_log_has_the_whole_error(
    rig: _Rig, caplog: pytest.LogCaptureFixture
) -> None:
    collides, refused = await rig.h.add_events(2)

    async def collide(uow: UnitOfWork) -> None:  # a handler bug: its insert breaks a unique key
        await uow.conn.execute(text("INSERT INTO applied (event_id) VALUES (:e)"), {"e": collides})

    async def refuse(uow: UnitOfWork) -> None:  # a use case refusing the event on purpose
        raise Aborted("the creator row is being moved", "CREATOR_MOVING")

    rig.effects.update({collides: collide, refused: refuse})
    with caplog.at_level(logging.ERROR, logger="services.common.inbox"):
        async with background(rig.consumer.run):
            await rig.h.relay.relay_once()
            await eventually(lambda: rig.count("SELECT count(*) FROM dead_letters"), lambda n: n == 2, 20)
    shown = {d.event_id: d.error for d in (await rig.parked()).dead_letters}
    assert shown[collides].startswith("failed 2 times: IntegrityError;"), shown
    leaks = ["INSERT", "constraint", "UNIQUE", "applied_pkey", "applied.event_id", collides]
    assert not [leak for leak in leaks if leak in shown[collides]], shown
    assert "Aborted CREATOR_MOVING: the creator row is being moved" in shown[refused], shown
    logged = {r.event_id: r.error for r in caplog.records if r.getMessage() == "event parked in dead_letters"}  # type: ignore[attr-defined]
    assert "INSERT INTO applied" in logged[collides], logged


async def test_a_replay_the_handler_fails_names_no_sql_and_the_log_has_the_whole_error(
    rig: _Rig, caplog: pytest.LogCaptureFixture
) -> None:
    event = events_pb2.GiftSent(event_id=new_event_id(), coins=1, creator_id="c")
    row = await rig.park(event)

    async def collide(uow: UnitOfWork) -> None:  # a handler bug: its insert breaks a unique key
        await uow.conn.execute(text("INSERT INTO applied (event_id) VALUES (:e)"), {"e": event.event_id})

    rig.effects[event.event_id] = collide
    with caplog.at_level(logging.WARNING, logger="services.common.deadletters"):
        err = await expect_error(rig.replay(row), grpc.StatusCode.FAILED_PRECONDITION, "REPLAY_FAILED")
    details = err.details() or ""
    assert "IntegrityError" in details, details
    leaks = ["INSERT", "constraint", "UNIQUE", "applied_pkey", "applied.event_id", event.event_id]
    assert not [leak for leak in leaks if leak in details], details
    logged = [r for r in caplog.records if r.getMessage() == "dead letter replay failed; it stays parked"]
    assert len(logged) == 1 and "INSERT INTO applied" in logged[0].error, logged  # type: ignore[attr-defined]
    # Found by the event id support has, as the lines of its parking and of its replay are.
    assert logged[0].event_id == event.event_id, logged  # type: ignore[attr-defined]
    assert [d.id for d in (await rig.parked()).dead_letters] == [row] and await rig.applied(event.event_id) == 0


async def test_an_event_applied_while_parked_keeps_its_inbox_row_past_the_retention_so_its_replay_changes_nothing(
    rig: _Rig,
) -> None:
    event = events_pb2.GiftSent(event_id=new_event_id(), coins=1, creator_id="c")
    row = await rig.park(event)
    # A later redelivery applied it long ago and left the parked row behind.
    long_ago = now_us() - int((rig.h.settings.inbox_retention_days + 1) * US_PER_DAY)
    async with rig.h.db.unit_of_work() as uow:
        await uow.conn.execute(
            insert(rig.h.tables.inbox).values(consumer=DURABLE, event_id=event.event_id, received_at_us=long_ago)
        )
        await uow.conn.execute(text("INSERT INTO applied (event_id) VALUES (:e)"), {"e": event.event_id})
        await uow.commit()
    pruner = InboxPruner(rig.h.db, rig.h.tables, rig.h.settings)
    assert await pruner.prune_once() == 0  # still parked: its replay needs the row

    answer = await rig.replay(row)
    assert answer.outcome == Outcome.OUTCOME_DUPLICATE and await rig.applied(event.event_id) == 1
    assert await pruner.prune_once() == 1  # replayed: the row goes like any other


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).parent / "livegifts")
    return subprocess.run([exe, "dead-letters", *args], capture_output=True, text=True, timeout=60)


def test_the_cli_lists_and_replays_parked_events_of_the_running_suite(deployment: Any) -> None:
    addrs = [f"--{s}-addr={getattr(deployment, f'{s}_addr')}" for s in ("wallet", "gifting", "payout")]
    token = f"--operator-token={deployment.operator_token}"
    listed = _cli("list", *addrs, token)
    assert listed.returncode == 0 and "no parked events" in listed.stdout, listed.stdout + listed.stderr
    missing = _cli("replay", "424242", "--service", "payout", *addrs, token)
    # Errors go to stderr, stdout is only the answer (README, the CLI).
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr and not missing.stdout, (
        missing.stdout + missing.stderr
    )
    refused = _cli("list", "--service", "gifting", *addrs, "--operator-token=wrong")
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr and not refused.stdout, (
        refused.stdout + refused.stderr
    )


def _failed_deliveries(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Event id -> the highest delivery of it (JetStream's count) a consumer failed to apply,
    kept from now on by wrapping Consumer._failed."""
    deliveries: dict[str, int] = {}
    failed = Consumer._failed

    async def counting(self: Consumer[Any], item: Any, exc: Exception) -> None:
        msg, event = item
        deliveries[event.event_id] = max(deliveries.get(event.event_id, 0), msg.metadata.num_delivered)
        await failed(self, item, exc)

    monkeypatch.setattr(Consumer, "_failed", counting)
    return deliveries


async def test_events_the_database_refuses_for_longer_than_max_deliver_are_not_parked_and_apply_once_after(
    rig: _Rig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The database refuses the handler's writes (read-only: SQLite's SQLITE_READONLY from
    # query_only, PostgreSQL's 25006) for many more deliveries than CONSUMER_MAX_DELIVER (2 here),
    # while the small dead-letter insert would fit (as on a disk with a little room left, or a
    # database back between the failure and the park). An outage is not a poison message: nothing
    # may be parked, and every event applies once when the database takes writes again. A real
    # failure after the outage still parks, after max_deliver failures of its own.
    down = [True]

    async def refuse(uow: UnitOfWork) -> None:
        if not down[0]:
            return
        if uow.conn.dialect.name == "postgresql":
            refused = "DO $$ BEGIN RAISE EXCEPTION 'read-only' USING ERRCODE = 'read_only_sql_transaction'; END $$"
            await uow.conn.execute(text(refused))
        else:
            await uow.conn.exec_driver_sql("PRAGMA query_only=ON")
            try:
                await uow.conn.execute(text("INSERT INTO applied (event_id) VALUES ('refused')"))
            finally:
                await uow.conn.exec_driver_sql("PRAGMA query_only=OFF")
        pytest.fail("the database took the write")

    deliveries = _failed_deliveries(monkeypatch)
    *ids, bad = await rig.h.add_events(4)
    for event_id in (*ids, bad):
        rig.effects[event_id] = refuse
    with caplog.at_level(logging.WARNING, logger="services.common.inbox"):
        async with background(rig.consumer.run):
            await rig.h.relay.relay_once()
            over = 2 * 2 + 1  # well past max_deliver
            await eventually(
                lambda: asyncio.sleep(0, len(deliveries) == 4 and min(deliveries.values()) >= over), bool, 30
            )
            assert await rig.count("SELECT count(*) FROM dead_letters") == 0, "an outage parked events"
            assert min(deliveries.values()) >= over, deliveries
            assert await rig.count("SELECT count(*) FROM applied") == 0
            lines = [r.message for r in caplog.records]
            assert lines.count("event failed, will be redelivered") == 0, "a line per event per retry"
            outage = [r for r in caplog.records if r.message.startswith("event not applied, the database")]
            assert 1 <= len(outage) <= 2, f"{len(outage)} outage lines: at most one per 30 s"

            rig.poison.add(bad)  # a real failure now: parks after max_deliver failures of its own
            down[0] = False
            await eventually(lambda: rig.count("SELECT count(*) FROM applied"), lambda n: n == 3, 30)
            await eventually(lambda: rig.count("SELECT count(*) FROM dead_letters"), lambda n: n == 1, 30)
    assert [await rig.applied(i) for i in ids] == [1, 1, 1]
    (parked,) = (await rig.parked()).dead_letters
    assert parked.event_id == bad and "failed 2 times" in parked.error, parked.error
    assert await rig.count(f"SELECT count(*) FROM inbox WHERE consumer = '{DURABLE}'") == 3


async def test_after_a_failover_the_relay_and_the_consumer_leave_the_old_primary_and_apply_each_event_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PostgreSQL only, with its real read-only switch: connections opened while the database is
    # `default_transaction_read_only` stand for connections to a standby (each refuses writes
    # with 25006 for as long as it lives); turned off, the database is the new primary for
    # connections opened after. The relay and the consumer, whose pool holds only "standby"
    # connections, must drop them and go on without a restart.
    admin = pg.admin_url_or_skip()
    name = f"lg_failover_{uuid.uuid4().hex[:12]}"
    pg.create_database(admin, name)

    def read_only(on: bool) -> None:
        pg.run_sql(admin, f'ALTER DATABASE "{name}" SET default_transaction_read_only = {"on" if on else "off"}')

    deliveries = _failed_deliveries(monkeypatch)
    try:
        async with _rig(tmp_path, pg.database_url(admin, name)) as rig:
            published = await rig.h.add_events(3)
            assert await rig.h.relay.relay_once() == 3
            waiting = await rig.h.add_events(2)  # still in the outbox at the failover
            read_only(True)
            await rig.h.db.engine.dispose()  # from now on the pool's connections reach the "standby"
            async with background(rig.consumer.run), background(rig.h.relay.run):
                await eventually(
                    lambda: asyncio.sleep(0, len(deliveries) == 3 and min(deliveries.values()) >= 3), bool, 30
                )
                assert len(deliveries) == 3 and min(deliveries.values()) >= 3, deliveries  # past max_deliver (2)
                assert await rig.h.unpublished() == 2 and await rig.h.stored() == 3, "the relay could not claim"
                read_only(False)  # the "new primary"; the pool still holds "standby" connections
                await eventually(lambda: rig.count("SELECT count(*) FROM applied"), lambda n: n == 5, 30)
                await eventually(rig.h.unpublished, lambda n: n == 0, 30)
            assert [await rig.applied(i) for i in published + waiting] == [1] * 5
            assert await rig.count("SELECT count(*) FROM dead_letters") == 0
            assert await rig.h.stored() == 5
    finally:
        pg.drop_database(admin, name)


async def test_a_database_refusing_new_connections_parks_nothing_and_the_relay_and_the_consumer_go_on_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # PostgreSQL only: `ALLOW_CONNECTIONS false` (an operator's maintenance switch) refuses every
    # new connection with 55000, and the pool's connections are gone (terminated). That refusal
    # was not an outage to the consumer: each delivery counted towards CONSUMER_MAX_DELIVER and
    # logged "event failed, will be redelivered", a line per event per retry. It is the database
    # unavailable: nothing counted or parked, one outage line, and once connections are allowed
    # again the relay and the consumer connect anew and every event applies once, no restart.
    admin = pg.admin_url_or_skip()
    name = f"lg_refusing_{uuid.uuid4().hex[:12]}"
    pg.create_database(admin, name)

    deliveries = _failed_deliveries(monkeypatch)
    try:
        async with _rig(tmp_path, pg.database_url(admin, name)) as rig:
            published = await rig.h.add_events(3)
            assert await rig.h.relay.relay_once() == 3
            waiting = await rig.h.add_events(2)  # still in the outbox when connections are refused
            refusal = contextlib.ExitStack()
            refusal.enter_context(pg.refusing_connections(admin, name))  # until refusal.close()
            with refusal, caplog.at_level(logging.WARNING, logger="services.common.inbox"):
                async with background(rig.consumer.run), background(rig.h.relay.run):
                    await eventually(
                        lambda: asyncio.sleep(0, len(deliveries) == 3 and min(deliveries.values()) >= 3), bool, 30
                    )
                    assert len(deliveries) == 3 and min(deliveries.values()) >= 3, deliveries  # past max_deliver (2)
                    lines = [r.message for r in caplog.records]
                    assert lines.count("event failed, will be redelivered") == 0, "counted as the events' failures"
                    outage = [m for m in lines if m.startswith("event not applied, the database is unavailable")]
                    assert len(outage) == 1, f"{len(outage)} outage lines: one per 30 s"
                    refusal.close()  # connections allowed again
                    await eventually(lambda: rig.count("SELECT count(*) FROM applied"), lambda n: n == 5, 30)
                    await eventually(rig.h.unpublished, lambda n: n == 0, 30)
            assert [await rig.applied(i) for i in published + waiting] == [1] * 5
            assert await rig.count("SELECT count(*) FROM dead_letters") == 0
            assert await rig.h.stored() == 5
    finally:
        pg.drop_database(admin, name)


@pytest.mark.parametrize(
    ("event_id", "problem"),
    [("x" * 65, "event_id is longer than 64 characters"), ("abc\x00def", "event_id holds a control character")],
    ids=["too-long", "nul"],
)
async def test_an_event_whose_id_the_inbox_cannot_hold_is_parked_and_the_rest_go_on(
    rig: _Rig, event_id: str, problem: str
) -> None:
    """An event id from a foreign or broken producer that the inbox cannot hold. PostgreSQL
    recorded one over 64 characters cut to 64 (the insert's array cast truncates): taken for a
    duplicate, acked, never applied, nothing parked. It refused a NUL in the inbox, then in
    dead_letters: never parked, redelivered every backoff. SQLite applied both. Parked as
    undecodable on both, and a replay of the row refuses it."""
    event = events_pb2.GiftSent(event_id=event_id, coins=1, creator_id="c")
    assert rig.h.bus.js is not None
    await rig.h.bus.js.publish("gifting.gift.sent", event.SerializeToString(), headers={"Nats-Msg-Id": "odd"})
    ids = await rig.h.add_events(2)
    async with background(rig.consumer.run):
        await rig.h.relay.relay_once()
        assert await eventually(lambda: rig.count("SELECT count(*) FROM dead_letters"), lambda n: n == 1, 20) == 1
        assert await eventually(lambda: rig.count("SELECT count(*) FROM applied"), lambda n: n == 2, 5) == 2
    assert [await rig.applied(i) for i in ids] == [1, 1]
    (parked,) = (await rig.parked()).dead_letters
    assert not parked.event_id and f"undecodable: {problem}" in parked.error
    await expect_error(rig.replay(parked.id), grpc.StatusCode.FAILED_PRECONDITION, "REPLAY_FAILED")
    assert [d.id for d in (await rig.parked()).dead_letters] == [parked.id], "still parked, not taken for a duplicate"
    assert await rig.count("SELECT count(*) FROM applied") == 2
