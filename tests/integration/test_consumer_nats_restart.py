"""A consumer whose NATS restarts (its store kept) while a batch is applied: every event is applied
once, none is parked, and a delivery the restart cost counts towards no event's parking.

A check of what holds (the acks and naks of the batch and of the events buffered behind it reach
the restarted server; nothing is delivered again unaccounted for), kept as a guard: an event that
fails at its first delivery only is parked (CONSUMER_MAX_DELIVER 2) if the restart cost one.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import MetaData

from livegifts.gifting.v1 import events_pb2
from services.cli.suite import Suite, SuiteConfig, free_port
from services.common import inbox as inbox_module
from services.common.bus import Bus
from services.common.config import ServiceSettings
from services.common.db import Database, UnitOfWork
from services.common.inbox import Consumer, Subscription
from services.common.tables import add_common_tables
from tests.integration.helpers import count_rows, eventually, publish_gift_sent

DURABLE = "nats-restart-test"
SUBJECT = "gifting.gift.sent"


# "while_down": the batch commits, and its acks are sent, while NATS is down for 3 s, three times
# the durable's ack_wait.
@pytest.mark.parametrize(("commit", "ack_wait_s"), [("after", 30), ("while_down", 1)])
async def test_nats_restarting_mid_batch_applies_each_event_once_and_parks_none(
    tmp_path: Path, commit: str, ack_wait_s: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inbox_module, "ACK_WAIT_S", ack_wait_s)
    suite = Suite(SuiteConfig(var_dir=tmp_path, nats_port=free_port()))
    suite.start_nats()
    url = f"sqlite+aiosqlite:///{tmp_path / 'c.db'}"
    # Parked on its second failure of its own: a delivery the restart cost, counted as a failure,
    # would park `flaky` at its first.
    settings = ServiceSettings(database_url=url, nats_url=suite.config.nats_url, consumer_max_deliver=2)  # type: ignore[call-arg]
    metadata = MetaData()
    tables = add_common_tables(metadata)
    db = Database(url, pool_size=2, pool_timeout_s=5, application_name="test")
    stop = asyncio.Event()
    entered, release = asyncio.Event(), asyncio.Event()
    applied: list[str] = []
    tries: list[str] = []
    healed = False

    class _Healing(Consumer[events_pb2.GiftSent]):
        async def _failed(self, item: Any, exc: Exception) -> None:
            nonlocal healed
            await super()._failed(item, exc)
            healed = healed or item[1].event_id == "flaky"

    async def handle(uow: UnitOfWork, events: list[events_pb2.GiftSent]) -> None:
        for e in events:
            tries.append(e.event_id)
            if e.event_id == "flaky" and not healed:
                raise RuntimeError("fails at its first delivery")
            if e.event_id == "slow":
                entered.set()
                await release.wait()
        applied.extend(e.event_id for e in events)

    bus = Bus(settings, "replica")
    running = None
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        await asyncio.wait_for(bus.connect(stop, ["GIFTING"]), 20)
        consumer = _Healing(
            db, bus, tables, Subscription(DURABLE, "GIFTING", SUBJECT, events_pb2.GiftSent, handle), settings
        )
        running = asyncio.create_task(consumer.run(stop))
        await publish_gift_sent(bus, SUBJECT, "slow")
        await asyncio.wait_for(entered.wait(), 20)
        for event_id in ("flaky", "b", "c"):  # buffered behind the batch
            await publish_gift_sent(bus, SUBJECT, event_id)
        await asyncio.sleep(0.5)

        suite.kill("nats")
        if commit == "while_down":  # its acks, and the tries of those buffered, meet no NATS
            release.set()
            await asyncio.sleep(3)
        suite.start_nats()
        assert bus.nc is not None
        await eventually(lambda: _connected(bus), bool, 20)
        release.set()
        assert await eventually(lambda: count_rows(db, tables.inbox), lambda n: n == 4, 30) == 4
        await asyncio.sleep(2)
        assert sorted(applied) == ["b", "c", "flaky", "slow"], applied
        assert await count_rows(db, tables.dead_letters) == 0
        info = await bus.js.consumer_info("GIFTING", DURABLE)  # type: ignore[union-attr]
        assert info.num_ack_pending == 0 and info.num_pending == 0, info
    finally:
        release.set()
        stop.set()
        if running is not None:
            await asyncio.wait_for(running, 20)
        await bus.close()
        await db.dispose()
        suite.stop()


async def _connected(bus: Bus) -> bool:
    return bus.nc is not None and bus.nc.is_connected
