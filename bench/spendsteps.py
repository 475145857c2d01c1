"""The wallet's spend batch alone, in one process: CPU per batch, client and PostgreSQL.

`python -m bench.spendsteps [--url ADMIN_URL] [--batch 16] [--batches 300]` creates a fresh
database, runs the wallet's migrations, funds the viewers, then runs `SpendBatch.run` (the code
behind Spend and SpendMany) on batches of new keys, one after the other, and prints the process
CPU per batch and the PostgreSQL CPU per batch (every postgres process on the machine: run it
on an otherwise idle machine). No gRPC, no NATS, no other service: a change to the spend path
shows here without the whole suite's noise. The database is dropped afterwards.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import uuid
from pathlib import Path

import uvloop
from sqlalchemy import insert

from bench.loadgen import postgres_cpu_seconds
from livegifts.wallet.v1 import wallet_pb2
from services.common.db import Database
from services.common.migrate import upgrade_head
from services.wallet.spending import SpendBatch
from services.wallet.storage import accounts
from tests.integration import pg

ROOT = Path(__file__).resolve().parents[1]
VIEWERS = 300


async def measure(url: str, batch: int, batches: int, rounds: int) -> None:
    """Print CPU per batch of `batch` spends, `rounds` times (each round `batches` batches)."""
    await upgrade_head(ROOT / "services" / "wallet" / "migrations", url)
    db = Database(url, pool_size=2, pool_timeout_s=5, application_name="bench-spendsteps")
    try:
        async with db.unit_of_work() as uow:
            await uow.conn.execute(
                insert(accounts),
                [
                    {"account_id": f"user:v{i}", "user_id": f"v{i}", "balance": 10**9, "updated_at_us": 0}
                    for i in range(VIEWERS)
                ],
            )
            await uow.commit()
        spending = SpendBatch(db, 10**6, 18, {}, lambda: int(time.time() * 1_000_000))
        rnd = random.Random(8)

        def reqs() -> list[wallet_pb2.SpendRequest]:
            return [
                wallet_pb2.SpendRequest(
                    user_id=f"v{rnd.randrange(VIEWERS)}",
                    amount=rnd.randint(1, 30),
                    idempotency_key=uuid.uuid4().hex,
                    reason=wallet_pb2.SPEND_REASON_GIFT,
                    reference_id="g",
                )
                for _ in range(batch)
            ]

        for _ in range(20):  # warm-up: prepared statements, caches
            await spending.run(reqs(), settle_refusals=False)
        client, server = [], []
        for _ in range(rounds):
            work = [reqs() for _ in range(batches)]
            c0, p0 = time.process_time(), postgres_cpu_seconds()
            for r in work:
                out = await spending.run(r, settle_refusals=False)
                assert all(isinstance(o, wallet_pb2.SpendResponse) for o in out), out
            client.append(1000 * (time.process_time() - c0) / batches)
            server.append(1000 * (postgres_cpu_seconds() - p0) / batches)
        print(
            f"batch {batch}: client CPU {statistics.median(client):.3f} ms/batch"
            f" (rounds {', '.join(f'{x:.3f}' for x in client)});"
            f" PostgreSQL CPU {statistics.median(server):.3f} ms/batch"
            f" (rounds {', '.join(f'{x:.3f}' for x in server)})"
        )
    finally:
        await db.engine.dispose()


def main() -> None:
    """`python -m bench.spendsteps`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin URL")
    parser.add_argument("--batch", type=int, action="append", help="spends per batch (repeatable; default 16 and 100)")
    parser.add_argument("--batches", type=int, default=300, help="batches per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for batch in args.batch or [16, 100]:
        name = f"lgsteps_{uuid.uuid4().hex[:8]}"
        pg.create_database(args.url, name)
        try:
            uvloop.run(measure(pg.database_url(args.url, name), batch, args.batches, args.rounds))
        finally:
            pg.drop_database(args.url, name)


if __name__ == "__main__":
    main()
