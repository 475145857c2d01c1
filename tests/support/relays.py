"""Outbox relays against a nats-server of their own: replicas of one service, each with its own
pool and NATS connection over one outbox table, the events they add and what the stream stores;
and a background loop (a relay's, a consumer's) run for the length of a block."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from nats.js.errors import NotFoundError
from sqlalchemy import MetaData, func, select

from livegifts.gifting.v1 import events_pb2
from services.cli.suite import Suite, SuiteConfig, free_port
from services.common.bus import Bus
from services.common.config import ServiceSettings
from services.common.db import Database
from services.common.outbox import Outbox, OutboxRelay, new_event_id
from services.common.tables import CommonTables, add_common_tables


class Harness:
    """One relay over an outbox table, with its pool, bus and settings, and what the stream holds."""

    def __init__(
        self,
        db: Database,
        bus: Bus,
        tables: CommonTables,
        outbox: Outbox,
        relay: OutboxRelay,
        settings: ServiceSettings,
    ) -> None:
        self.db, self.bus, self.tables, self.outbox, self.relay = db, bus, tables, outbox, relay
        self.settings = settings

    async def add_events(self, n: int) -> list[str]:
        ids = [new_event_id() for _ in range(n)]
        async with self.db.unit_of_work() as uow:
            await self.outbox.add_many(
                uow,
                [("gifting.gift.sent", i, events_pb2.GiftSent(event_id=i, coins=1, creator_id="c")) for i in ids],
            )
            await uow.commit()
        return ids

    async def unpublished(self) -> int:
        t = self.outbox.table
        async with self.db.unit_of_work(readonly=True) as uow:
            q = select(func.count()).select_from(t)  # published rows are deleted
            return int((await uow.conn.execute(q)).scalar_one())

    async def stored(self) -> int:
        assert self.bus.js is not None
        return (await self.bus.js.stream_info("GIFTING")).state.messages

    async def stored_ids(self) -> list[str]:
        """The event ids the stream holds, in its order."""
        assert self.bus.js is not None
        out = []
        for seq in range(1, await self.stored() + 1):
            msg = await self.bus.js.get_msg("GIFTING", seq)
            out.append((msg.headers or {})["Nats-Msg-Id"])
        return out


@contextlib.asynccontextmanager
async def harnesses(tmp_path: Path, url: str, replicas: int, **settings: Any) -> AsyncIterator[list[Harness]]:
    """A nats-server of its own and `replicas` relays over one outbox table at `url`, each with its
    own pool and NATS connection, as in replicas of one service."""
    suite = Suite(SuiteConfig(var_dir=tmp_path, nats_port=free_port()))
    stop = asyncio.Event()
    out: list[Harness] = []
    # Each resource is registered for its undoing as soon as it exists (not once its harness is
    # whole), and undone in reverse even when an earlier undoing raises: `stop` set, buses closed,
    # pools disposed, nats-server stopped last.
    async with contextlib.AsyncExitStack() as undo:
        undo.callback(suite.stop)
        suite.start_nats()
        try:
            metadata = MetaData()
            tables = add_common_tables(metadata)
            for i in range(replicas):
                db = Database(url, pool_size=2, pool_timeout_s=5, application_name=f"test-{i}")
                undo.push_async_callback(db.dispose)
                if i == 0:
                    async with db.engine.begin() as conn:
                        await conn.run_sync(metadata.create_all)
                config = ServiceSettings(database_url=db.url, nats_url=suite.config.nats_url, **settings)  # type: ignore[call-arg]
                bus = Bus(config, f"relay-test-{i}")
                undo.push_async_callback(bus.close)
                outbox = Outbox(tables.outbox)
                out.append(Harness(db, bus, tables, outbox, OutboxRelay(db, bus, outbox, config), config))
                await asyncio.wait_for(bus.connect(stop, ["GIFTING"]), 20)
            yield out
        finally:
            stop.set()  # before the buses close


@contextlib.asynccontextmanager
async def background(loop: Callable[[asyncio.Event], Awaitable[None]]) -> AsyncIterator[None]:
    """A background loop (the relay's, a consumer's) running until the block ends, then stopped."""
    stop = asyncio.Event()
    task = asyncio.create_task(loop(stop))
    await asyncio.sleep(0)
    try:
        yield
    finally:
        stop.set()
        await task


async def stream_exists(harness: Harness) -> bool:
    """Whether the GIFTING stream is there (a probe for `eventually`)."""
    assert harness.bus.js is not None
    try:
        await harness.bus.js.stream_info("GIFTING")
    except NotFoundError:
        return False
    return True
