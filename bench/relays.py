"""Outbox relays of several replicas over one PostgreSQL outbox: publishes per event, and order.

`python -m bench.relays [--replicas 3] [--rate 1000] [--seconds 10]` starts a nats-server of its
own (JetStream, file store, `sync_interval: always`, a temporary directory) and creates a fresh
PostgreSQL database with one outbox table. It then runs, in this process, one `OutboxRelay` per
replica, each with its own connection pool and NATS connection. Each replica commits batches
of 14 events (a step-3 batch of gifting at c64) at its share of `--rate` events a second, and
each commit wakes that replica's relay, as in a service. It prints:
- how many publishes the relays made per event written (1.0: none twice; JetStream drops
  copies by Nats-Msg-Id, but each still costs the relay and the server);
- how many atomic batches the server refused as republishes (their rows then go one publish,
  and one fsync, each);
- how many of a replica's events the stream holds out of the order they were committed in;
- the process CPU seconds (relays and writers together).
The database and the nats-server are removed afterwards. bench/README.md section 30.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import uvloop
from sqlalchemy import MetaData, func, select

from livegifts.gifting.v1 import events_pb2
from services.cli.suite import Suite, SuiteConfig, free_port
from services.common.bus import Bus
from services.common.config import ServiceSettings
from services.common.db import Database
from services.common.outbox import Outbox, OutboxRelay, new_event_id
from services.common.tables import add_common_tables
from tests.integration import pg

SUBJECT = "gifting.gift.sent"
PER_COMMIT = 14


class _Refusals(logging.Handler):
    """Counts the relay's "batch holds events already stored" log lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "already stored" in record.getMessage():
            self.count += 1


class _Replica:
    def __init__(self, url: str, nats_url: str, i: int, tables: Any) -> None:
        self.settings = ServiceSettings(database_url=url, nats_url=nats_url)  # type: ignore[call-arg]
        self.db = Database(url, pool_size=4, pool_timeout_s=10, application_name=f"bench-relay-{i}")
        self.bus = Bus(self.settings, f"bench-relay-{i}")
        self.outbox = Outbox(tables.outbox)
        self.relay = OutboxRelay(self.db, self.bus, self.outbox, self.settings)
        self.written: list[str] = []  # event ids in commit order
        self.acked = 0
        once = self.relay.relay_once

        async def counted() -> int:
            n = await once()
            self.acked += n
            return n

        self.relay.relay_once = counted  # type: ignore[method-assign]

    async def write(self, until: float, interval_s: float) -> None:
        """Commit batches of events until the monotonic time `until`, one every `interval_s`."""
        while time.monotonic() < until:
            ids = [new_event_id() for _ in range(PER_COMMIT)]
            async with self.db.unit_of_work() as uow:
                events = [(SUBJECT, e, events_pb2.GiftSent(event_id=e, coins=1, creator_id="c")) for e in ids]
                await self.outbox.add_many(uow, events)
                await uow.commit()
            self.written += ids
            await asyncio.sleep(interval_s)


async def _unsent(r: _Replica) -> int:
    """Rows still in the outbox (a row is deleted once its event is stored)."""
    async with r.db.unit_of_work(readonly=True) as uow:
        return int((await uow.conn.execute(select(func.count()).select_from(r.outbox.table))).scalar_one())


async def _stream_order(bus: Bus, count: int) -> dict[str, int]:
    """Each stored event id's sequence in the stream."""
    assert bus.js is not None
    sub = await bus.js.subscribe(SUBJECT, ordered_consumer=True)
    seq: dict[str, int] = {}
    try:
        for _ in range(count):
            msg = await sub.next_msg(timeout=10)
            seq[(msg.headers or {})["Nats-Msg-Id"]] = msg.metadata.sequence.stream
    finally:
        await sub.unsubscribe()
    return seq


async def measure(admin_url: str, replicas: int, rate: int, seconds: float) -> dict[str, Any]:
    """Run the relays and writers for `seconds`; the figures printed by `main`."""
    refusals = _Refusals()
    logging.getLogger("services.common.outbox").addHandler(refusals)
    logging.getLogger("services.common.outbox").setLevel(logging.INFO)
    work = Path(tempfile.mkdtemp(prefix="bench-relays-"))
    suite = Suite(SuiteConfig(var_dir=work, nats_port=free_port()))
    suite.start_nats()
    name = f"lg_bench_relays_{uuid.uuid4().hex[:8]}"
    pg.create_database(admin_url, name)
    url = pg.database_url(admin_url, name)
    stop = asyncio.Event()
    reps: list[_Replica] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        metadata = MetaData()
        tables = add_common_tables(metadata)
        for i in range(replicas):
            reps.append(_Replica(url, suite.config.nats_url, i, tables))
        async with reps[0].db.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        for r in reps:
            await asyncio.wait_for(r.bus.connect(stop, ["GIFTING"]), 20)
        tasks = [asyncio.create_task(r.relay.run(stop)) for r in reps]
        cpu0 = time.process_time()
        until = time.monotonic() + seconds
        await asyncio.gather(*(r.write(until, PER_COMMIT * replicas / rate) for r in reps))
        written = sum(len(r.written) for r in reps)
        for _ in range(300):  # until every row is published and deleted, at most 30 s
            if not await _unsent(reps[0]):
                break
            await asyncio.sleep(0.1)
        cpu = time.process_time() - cpu0
        assert reps[0].bus.js is not None
        stored = (await reps[0].bus.js.stream_info("GIFTING")).state.messages
        seq = await _stream_order(reps[0].bus, stored)
        out_of_order = sum(1 for r in reps for a, b in zip(r.written, r.written[1:], strict=False) if seq[a] > seq[b])
        publishes = sum(r.acked for r in reps)
        return {
            "replicas": replicas,
            "events_written": written,
            "events_stored": stored,
            "publishes": publishes,
            "publishes_per_event": round(publishes / written, 3) if written else 0.0,
            "per_relay": [r.acked for r in reps],
            "atomic_batches_refused": refusals.count,
            "out_of_order": out_of_order,
            "cpu_s": round(cpu, 2),
        }
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for r in reps:
            await r.bus.close()
            await r.db.dispose()
        pg.drop_database(admin_url, name)
        suite.stop()
        logging.getLogger("services.common.outbox").removeHandler(refusals)


def main() -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin URL")
    parser.add_argument("--replicas", type=int, default=3, help="relays over the one outbox (default 3)")
    parser.add_argument("--rate", type=int, default=1000, help="events written a second, all replicas (default 1000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the writers write (default 10, max 120)")
    args = parser.parse_args()
    if not 1 <= args.replicas <= 16 or not 1 <= args.rate <= 20_000 or not 0 < args.seconds <= 120:
        parser.error("--replicas 1-16, --rate 1-20000, --seconds up to 120")
    print(uvloop.run(measure(args.url, args.replicas, args.rate, args.seconds)))


if __name__ == "__main__":
    main()
