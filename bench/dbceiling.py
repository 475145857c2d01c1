"""The database ceiling: single-row UPDATE transactions per second from Python, durable commits.

It goes through the services' own engine (services.common.db.Database): SQLite in WAL mode with
synchronous=FULL and writers serialized by the same in-process lock, PostgreSQL through asyncpg
with synchronous_commit=on and the same default pool size. Each transaction is BEGIN; UPDATE
one random row of 1,000; COMMIT, so the figure is "durable commits per second" on this disk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import uvloop
from sqlalchemy import text

from services.common.db import Database

ROWS = 1_000


async def measure(url: str, concurrencies: list[int], duration_s: float, pool_size: int, seed: int) -> dict[str, float]:
    """Transactions per second at each concurrency."""
    db = Database(url, pool_size=pool_size, pool_timeout_s=30, application_name="bench-dbceiling")
    rnd = random.Random(seed)
    try:
        async with db.unit_of_work() as uow:
            await uow.conn.execute(text("DROP TABLE IF EXISTS bench_counter"))
            await uow.conn.execute(text("CREATE TABLE bench_counter (id INTEGER PRIMARY KEY, n BIGINT NOT NULL)"))
            await uow.conn.execute(
                text("INSERT INTO bench_counter (id, n) VALUES (:id, 0)"), [{"id": i} for i in range(ROWS)]
            )
            await uow.commit()
        stmt = text("UPDATE bench_counter SET n = n + 1 WHERE id = :id")
        out: dict[str, float] = {}
        for c in concurrencies:
            done = 0
            deadline = time.monotonic() + duration_s

            async def worker(deadline: float) -> None:
                nonlocal done
                while time.monotonic() < deadline:
                    async with db.unit_of_work() as uow:
                        await uow.conn.execute(stmt, {"id": rnd.randrange(ROWS)})
                        await uow.commit()
                    done += 1

            t0 = time.monotonic()
            await asyncio.gather(*(worker(deadline) for _ in range(c)))
            out[str(c)] = done / (time.monotonic() - t0)
        async with db.unit_of_work() as uow:
            await uow.conn.execute(text("DROP TABLE bench_counter"))
            await uow.commit()
        return out
    finally:
        await db.dispose()


def main() -> None:
    """`python -m bench.dbceiling --url URL --concurrency 1,16,64 --duration-s 4` prints JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--duration-s", type=float, default=4.0)
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--seed", type=int, default=8)
    args = parser.parse_args()
    cs = [int(c) for c in args.concurrency.split(",")]
    print(json.dumps(uvloop.run(measure(args.url, cs, args.duration_s, args.pool_size, args.seed))))


if __name__ == "__main__":
    main()
