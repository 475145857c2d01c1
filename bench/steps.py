"""The saga's batched steps alone, in one process: CPU per batch, client and PostgreSQL.

`python -m bench.steps [--step spend|begin|sent ...] [--batch 16 ...] [--batches 300]` creates a
fresh database per step and batch size, runs the service's migrations, then runs the step on
batches of new keys, one after the other, and prints the process CPU and the PostgreSQL CPU per
batch (every postgres process on the machine: run it on an otherwise idle machine), the median
of `--rounds` rounds. No gRPC, no NATS, no other service: a change to one step shows here
without the whole suite's noise (the full bench's phase-to-phase spread on a shared host is
±15%). The databases are dropped afterwards.

- `spend`: the wallet's `SpendBatch.run` (behind Spend and SpendMany), 300 funded viewers.
- `begin`: gifting's step 1 (`_begin_batch`: plan and record PENDING gifts) for SendGift calls
  to 40 live streams; the wallet's eligibility answers come from gifting's cache, filled during
  the warm-up by an in-process stand-in that says every user may take part (the real wallet's
  check is not what is measured here).
- `sent`: gifting's step 3 (`_mark_sent_batch`: PENDING -> SENT and the outbox events) of the
  gifts `begin` recorded.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop
from sqlalchemy import insert

from bench.loadgen import postgres_cpu_seconds
from livegifts.gifting.v1 import gifting_pb2
from livegifts.wallet.v1 import wallet_pb2
from services.common.db import Database
from services.common.migrate import upgrade_head
from services.common.outbox import Outbox
from tests.integration import pg

ROOT = Path(__file__).resolve().parents[1]
VIEWERS = 300
STREAMS = 40
WARMUP_BATCHES = 20
STEPS = ("spend", "begin", "sent")


class _Eligible:
    """Gifting's wallet client for this benchmark: every user may take part (cached after the first ask)."""

    async def GetAccountRestrictionsMany(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        return wallet_pb2.GetAccountRestrictionsManyResponse(
            restrictions=[wallet_pb2.AccountRestrictions(user_id=u, may_spend=True) for u in req.user_ids]
        )


async def _timed(batches: list[Any], run: Callable[[Any], Awaitable[Any]]) -> tuple[float, float]:
    """(client ms, PostgreSQL ms) per batch of running `run` on each batch in turn."""
    c0, p0 = time.process_time(), postgres_cpu_seconds()
    for b in batches:
        await run(b)
    n = len(batches)
    return 1000 * (time.process_time() - c0) / n, 1000 * (postgres_cpu_seconds() - p0) / n


async def _seeded(url: str, service: str, table: Any, rows: list[dict[str, Any]]) -> Database:
    """The service's database at `url`, migrated, with `rows` in `table`."""
    await upgrade_head(ROOT / "services" / service / "migrations", url)
    db = Database(url, pool_size=2, pool_timeout_s=5, application_name="bench-steps")
    try:
        async with db.unit_of_work() as uow:
            await uow.conn.execute(insert(table), rows)
            await uow.commit()
    except BaseException:
        await db.engine.dispose()
        raise
    return db


async def _spend(url: str, batch: int, batches: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    from services.wallet.spending import SpendBatch
    from services.wallet.storage import accounts

    funded = [
        {"account_id": f"user:v{i}", "user_id": f"v{i}", "balance": 10**9, "updated_at_us": 0} for i in range(VIEWERS)
    ]
    db = await _seeded(url, "wallet", accounts, funded)
    try:
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

        async def run(r: list[wallet_pb2.SpendRequest]) -> None:
            out = await spending.run(r, settle_refusals=False)
            assert all(isinstance(o, wallet_pb2.SpendResponse) for o in out), out

        for _ in range(WARMUP_BATCHES):
            await run(reqs())
        return {"spend": [await _timed([reqs() for _ in range(batches)], run) for _ in range(rounds)]}
    finally:
        await db.engine.dispose()


async def _gift(url: str, batch: int, batches: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    from services.gifting.config import GiftingSettings
    from services.gifting.storage import common, streams
    from services.gifting.usecases import Gifting

    live = [
        {"stream_id": f"s{i}", "creator_id": f"c{i}", "title": "t", "status": "LIVE", "started_at_us": 0}
        for i in range(STREAMS)
    ]
    db = await _seeded(url, "gifting", streams, live)
    try:
        settings = GiftingSettings(database_url=url, nats_url="nats://127.0.0.1:1", wallet_addr="127.0.0.1:1")
        gifting = Gifting(db, Outbox(common.outbox), _Eligible(), settings)
        rnd = random.Random(8)
        names = ["rose", "gg", "finger-heart", "panda", "hand-wave"]

        def reqs() -> list[gifting_pb2.SendGiftRequest]:
            return [
                gifting_pb2.SendGiftRequest(
                    stream_id=f"s{rnd.randrange(STREAMS)}",
                    sender_id=f"v{rnd.randrange(VIEWERS)}",
                    gift_id=rnd.choice(names),
                    quantity=1,
                    idempotency_key=uuid.uuid4().hex,
                )
                for _ in range(batch)
            ]

        begun: list[list[dict[str, Any]]] = []

        async def begin(r: list[gifting_pb2.SendGiftRequest]) -> None:
            rows = await gifting._begin_batch(r)
            assert all(isinstance(x, dict) and x["status"] == "PENDING" for x in rows), rows
            begun.append(rows)

        async def sent(rows: list[dict[str, Any]]) -> None:
            out = await gifting._mark_sent_batch([(x["event_id"], 100) for x in rows])
            assert all(isinstance(x, dict) and x["status"] == "SENT" for x in out), out

        for _ in range(WARMUP_BATCHES):
            await begin(reqs())
            await sent(begun.pop())
        out: dict[str, list[tuple[float, float]]] = {"begin": [], "sent": []}
        for _ in range(rounds):
            out["begin"].append(await _timed([reqs() for _ in range(batches)], begin))
            out["sent"].append(await _timed(begun, sent))
            begun.clear()
        return out
    finally:
        await db.engine.dispose()


def main() -> None:
    """`python -m bench.steps`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin URL")
    parser.add_argument("--step", choices=STEPS, action="append", help="repeatable; default: all")
    parser.add_argument("--batch", type=int, action="append", help="items per batch (repeatable; default 8 and 100)")
    parser.add_argument("--batches", type=int, default=300, help="batches per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    steps = args.step or list(STEPS)
    for batch in args.batch or [8, 100]:
        runs: list[Callable[[str, int, int, int], Awaitable[dict[str, list[tuple[float, float]]]]]] = []
        if "spend" in steps:
            runs.append(_spend)
        if "begin" in steps or "sent" in steps:
            runs.append(_gift)
        for run in runs:
            name = f"lgsteps_{uuid.uuid4().hex[:8]}"
            pg.create_database(args.url, name)
            try:
                results = uvloop.run(run(pg.database_url(args.url, name), batch, args.batches, args.rounds))
            finally:
                pg.drop_database(args.url, name)
            for step, per_round in results.items():
                if step not in steps:
                    continue
                client = [c for c, _ in per_round]
                server = [s for _, s in per_round]
                print(
                    f"{step:5s} batch {batch:3d}: client CPU {statistics.median(client):6.3f} ms/batch,"
                    f" PostgreSQL CPU {statistics.median(server):6.3f} ms/batch"
                    f"  (rounds: {' '.join(f'{c:.2f}/{s:.2f}' for c, s in per_round)})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
