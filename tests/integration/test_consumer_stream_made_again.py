"""A consumer replica whose stream and durable another replica made again before its next pull (NATS
back without its store, or the stream deleted on a live server) keeps pulling with no error and no
bind again: what it keeps by stream sequence from the old stream must not decide the fate of the
new stream's events.

Before: the replica had parked an event at stream sequence 1 and kept that sequence, to terminate
copies of it; the new stream's first event came at sequence 1 and was terminated as such a copy,
never applied nor parked (its producer's outbox row deleted, so lost for good).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from sqlalchemy import MetaData

from livegifts.gifting.v1 import events_pb2
from services.cli.suite import Suite, SuiteConfig, free_port
from services.common.bus import Bus
from services.common.config import ServiceSettings
from services.common.db import Database, UnitOfWork
from services.common.inbox import ACK_WAIT_S, Consumer, Subscription
from services.common.pull import Puller
from services.common.tables import add_common_tables
from tests.integration.helpers import count_rows, eventually, publish_gift_sent

DURABLE = "made-again-test"
SUBJECT = "gifting.gift.sent"


async def _reconnected(bus: Bus) -> bool:
    return bus.nc is not None and bus.nc.is_connected and bus.nc.stats["reconnects"] >= 1


@dataclass
class _Replicas:
    """Replica a's consumer, held inside its batch of "slow" until `release`; replica b not yet connected."""

    suite: Suite
    db: Database
    tables: Any
    stop: asyncio.Event
    entered: asyncio.Event
    release: asyncio.Event
    applied: list[str]
    a: Bus
    b: Bus


@contextlib.asynccontextmanager
async def _two_replicas(tmp_path: Path, **settings: Any) -> AsyncIterator[_Replicas]:
    """A nats-server of the test's own, and replica a's consumer of DURABLE running on a SQLite
    inbox: "poisoned" fails (parked at `consumer_max_deliver`), "slow" holds its batch until
    `release`, every other event is applied. Stops everything it started."""
    suite = Suite(SuiteConfig(var_dir=tmp_path, nats_port=free_port()))
    suite.start_nats()
    url = f"sqlite+aiosqlite:///{tmp_path / 'c.db'}"
    config = ServiceSettings(database_url=url, nats_url=suite.config.nats_url, **settings)  # type: ignore[call-arg]
    metadata = MetaData()
    tables = add_common_tables(metadata)
    db = Database(url, pool_size=2, pool_timeout_s=5, application_name="test")
    r = _Replicas(
        suite,
        db,
        tables,
        asyncio.Event(),
        asyncio.Event(),
        asyncio.Event(),
        [],
        Bus(config, "replica-a"),
        Bus(config, "replica-b"),
    )

    async def handle(uow: UnitOfWork, events: list[events_pb2.GiftSent]) -> None:
        for e in events:
            if e.event_id == "poisoned":
                raise RuntimeError("a row this event needs is missing")
            if e.event_id == "slow":
                r.entered.set()
                await r.release.wait()
            r.applied.append(e.event_id)

    running = None
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        await asyncio.wait_for(r.a.connect(r.stop, ["GIFTING"]), 20)
        consumer = Consumer(
            db, r.a, tables, Subscription(DURABLE, "GIFTING", SUBJECT, events_pb2.GiftSent, handle), config
        )
        running = asyncio.create_task(consumer.run(r.stop))
        yield r
    finally:
        r.release.set()
        r.stop.set()
        if running is not None:
            await asyncio.wait_for(running, 20)
        await r.a.close()
        await r.b.close()
        await db.dispose()
        suite.stop()


async def _made_again(r: _Replicas, tmp_path: Path) -> Puller:
    """NATS back without its store; replica b makes the stream and the durable again (its relay's
    publish and its consumer's bind): its puller of the new durable."""
    r.suite.kill("nats")
    shutil.rmtree(tmp_path / "nats")
    r.suite.start_nats()
    await asyncio.wait_for(r.b.connect(r.stop, ["GIFTING"]), 20)
    return await _b_binds(r)


async def _b_binds(r: _Replicas) -> Puller:
    """Replica b's puller of DURABLE, made on the stream if missing (its consumer's bind)."""
    assert r.b.nc is not None and r.b.js is not None
    config = ConsumerConfig(
        ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, ack_wait=ACK_WAIT_S, max_deliver=-1
    )
    return await Puller.open(r.b.nc, r.b.js, SUBJECT, "GIFTING", DURABLE, config)


async def _a_replies_then_b_lets_the_new_event_go(r: _Replicas, other: Puller, taken: list[Msg], applied: int) -> None:
    """Replica a commits its held batch (`applied` events in its inbox then) and sends its replies;
    then replica b lets the new event it took go (a nak, as its puller closing does): it must be
    delivered again, not taken for settled by an ack of the old stream's delivery at its sequence."""
    r.release.set()
    assert await eventually(lambda: count_rows(r.db, r.tables.inbox), lambda n: n == applied, 20) == applied
    await asyncio.sleep(1.0)
    assert r.a.nc is not None
    await r.a.nc.flush()
    other._buffer.extendleft(taken)  # back in its buffer, nak'ed by unsubscribe
    await other.unsubscribe()
    assert await eventually(lambda: count_rows(r.db, r.tables.inbox), lambda n: n == applied + 1, 20) == applied + 1, (
        "new event lost"
    )


async def test_a_replica_that_did_not_bind_again_applies_the_new_streams_event_at_a_parked_sequence(
    tmp_path: Path,
) -> None:
    async with _two_replicas(tmp_path, consumer_max_deliver=1) as r:
        await publish_gift_sent(r.a, SUBJECT, "poisoned")  # stream sequence 1
        assert await eventually(lambda: count_rows(r.db, r.tables.dead_letters), lambda n: n == 1, 20) == 1
        await publish_gift_sent(r.a, SUBJECT, "slow")  # the replica is inside this batch until `release`
        await asyncio.wait_for(r.entered.wait(), 20)

        other = await _made_again(r, tmp_path)
        await other.unsubscribe()
        await publish_gift_sent(r.b, SUBJECT, "new-event")
        assert r.b.js is not None
        assert (await r.b.js.stream_info("GIFTING")).state.last_seq == 1  # the parked event's sequence

        r.release.set()
        assert await eventually(lambda: count_rows(r.db, r.tables.inbox), lambda n: n == 2, 20) == 2, (
            "terminated unapplied"
        )
        assert r.applied == ["slow", "new-event"]


async def test_an_ack_for_the_old_streams_delivery_does_not_settle_the_new_streams_event_at_its_sequence(
    tmp_path: Path,
) -> None:
    """A replica applying a batch of the old stream acks it after the stream and durable were made
    again: JetStream settles an ack by its subject's stream sequence, so the old delivery's ack
    settled the new stream's event at that sequence, delivered meanwhile to another replica. When
    that replica let it go (nak'ed, or died before its ack), the event was never delivered again:
    lost, neither applied nor parked. Now the old delivery's ack is not sent."""
    other = None
    async with _two_replicas(tmp_path) as r:
        try:
            await publish_gift_sent(r.a, SUBJECT, "slow")  # stream sequence 1; held in this batch until `release`
            await asyncio.wait_for(r.entered.wait(), 20)

            # NATS back without its store; the other replica makes the stream and the durable again,
            # and pulls the new stream's first event (sequence 1, as the held one's).
            other = await _made_again(r, tmp_path)
            await publish_gift_sent(r.b, SUBJECT, "new-event")
            taken = await other.fetch(1, timeout=10)
            assert [m.metadata.sequence.stream for m in taken] == [1]
            assert r.b.js is not None
            assert (await r.b.js.consumer_info("GIFTING", DURABLE)).num_ack_pending == 1

            # The held replica, connected again, commits "slow" and acks it (to the old stream's
            # sequence 1). (Before it reconnects no reply is sent at all: nats-py would keep it for
            # the server it reconnects to.)
            assert await eventually(lambda: _reconnected(r.a), bool, 20)
            await _a_replies_then_b_lets_the_new_event_go(r, other, taken, applied=1)
            assert r.applied == ["slow", "new-event"]
        finally:
            if other is not None:
                await other.unsubscribe()


async def test_an_ack_for_the_old_streams_delivery_is_not_sent_when_the_stream_is_made_again_on_a_live_server(
    tmp_path: Path,
) -> None:
    """As above, but NATS stays up: an operator deletes the stream (`nats stream rm`) and the other
    replica makes it and the durable again. The held replica then had no pull request open (its
    batch of one filled it, and one more event waits in its buffer), so no pull status told it,
    and no reconnect either: its ack of "slow" settled the new stream's event at sequence 1,
    which was lost when the other replica let it go. Now JetStream's advisories of the stream
    deleted and created have it read the stream's creation time again before that ack."""
    other = None
    async with _two_replicas(tmp_path, consumer_batch_size_max=1, consumer_linger_s=0) as r:
        try:
            await publish_gift_sent(r.a, SUBJECT, "slow")  # stream sequence 1; held until `release`
            await asyncio.wait_for(r.entered.wait(), 20)
            await publish_gift_sent(r.a, SUBJECT, "buffered")  # fills the open request: none open after
            assert r.a.js is not None
            assert await eventually(lambda: _delivered(r.a), lambda n: n == 2, 20) == 2

            await asyncio.wait_for(r.b.connect(r.stop, ["GIFTING"]), 20)
            assert r.b.js is not None and r.b.nc is not None
            await r.b.js.delete_stream("GIFTING")
            assert await r.b.restore_stream("GIFTING")
            other = await _b_binds(r)
            await publish_gift_sent(r.b, SUBJECT, "new-event")
            taken = await other.fetch(1, timeout=10)
            assert [m.metadata.sequence.stream for m in taken] == [1]
            assert r.a.nc is not None and r.a.nc.stats["reconnects"] == 0

            await _a_replies_then_b_lets_the_new_event_go(r, other, taken, applied=2)
            assert r.applied == ["slow", "buffered", "new-event"]
        finally:
            if other is not None:
                await other.unsubscribe()


async def _delivered(bus: Bus) -> int:
    """How many events DURABLE has delivered (to whichever replica)."""
    assert bus.js is not None
    info = await bus.js.consumer_info("GIFTING", DURABLE)
    return info.delivered.stream_seq if info.delivered else 0
