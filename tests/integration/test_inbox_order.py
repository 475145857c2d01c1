"""Two consumer replicas recording the same events in their inbox at once, on PostgreSQL.

A JetStream redelivery (an ack that came too late, a nak) can hand events that one replica is
still applying to another, in another batch and another order. The inbox's unique key decides
which replica applies each event; recording them must not make the two wait for each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import insert

from livegifts.gifting.v1 import events_pb2
from services.common.config import ServiceSettings
from services.common.db import Database
from services.common.inbox import Consumer, Subscription
from services.gifting.storage import common
from tests.integration.conftest import gifting_database
from tests.integration.pglocks import LOCK_WAIT_S_MAX, wait_for_lock_waiters


@pytest.fixture
async def db(empty_database: str) -> AsyncIterator[Database]:
    """An empty database with a service's real inbox table (gifting's migrations)."""
    if not empty_database.startswith("postgresql"):
        pytest.skip("SQLite has one writer: consumers never wait for each other's inbox rows")
    async with gifting_database(empty_database, pool_size=4) as database:
        yield database


async def test_two_replicas_recording_the_same_events_in_opposite_orders_apply_each_once(db: Database) -> None:
    applied: list[str] = []

    async def handle(uow: Any, events: list[Any]) -> None:
        applied.extend(e.event_id for e in events)

    sub = Subscription(durable="d", stream="S", subject="s.x", event_type=events_pb2.GiftSent, handle=handle)
    settings = ServiceSettings(database_url=db.url, nats_url="nats://127.0.0.1:1")
    replicas = [Consumer(db, None, common, sub, settings) for _ in range(2)]  # type: ignore[arg-type]

    async def batch(consumer: Consumer[Any], ids: list[str]) -> None:
        async with db.unit_of_work() as uow:
            await consumer._record_and_handle(uow, {i: events_pb2.GiftSent(event_id=i) for i in ids})
            await uow.commit()

    # A third transaction is recording e3 (and rolls back): the first batch records e1 and waits
    # there; the second records e2 and waits for e1.
    holder = Database(db.url, pool_size=1, pool_timeout_s=5, application_name="holder")
    try:
        async with holder.unit_of_work() as uow:
            await uow.conn.execute(insert(common.inbox).values(consumer="d", event_id="e3", received_at_us=0))
            a = asyncio.create_task(batch(replicas[0], ["e1", "e3", "e2"]))
            await wait_for_lock_waiters(db, 1)
            b = asyncio.create_task(batch(replicas[1], ["e2", "e1"]))
            await wait_for_lock_waiters(db, 2)
        results = await asyncio.wait_for(asyncio.gather(a, b, return_exceptions=True), LOCK_WAIT_S_MAX)
    finally:
        await holder.dispose()
    assert results == [None, None]
    assert sorted(applied) == ["e1", "e2", "e3"]  # each once, by whichever replica recorded it
