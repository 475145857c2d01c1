"""A call whose deadline passes while it waits for a group-commit batch is never run, end to end.

Under a burst above what the database takes, callers queue behind a slow batch and give up; their
items used to be run anyway in a later batch, spending it on answers nobody read while the callers
still waiting (and every retry under the same keys) queued behind that work. The wallet's spend
batcher (services/common/batching.py) now drops them unrun: the spend is not done at all, which
the caller's DEADLINE_EXCEEDED allows. A stalled batch is made here by holding the user's account
row (PostgreSQL) or the database's write lock (SQLite) from another session.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from livegifts.wallet.v1 import wallet_pb2
from tests.integration.helpers import buy_coins, spend_req, uid
from tests.integration.pglocks import LOCK_WAIT_S_MAX, LOCK_WAITERS

# SQLite: long enough that the first call's batch is writing (and stalls on the lock) before the
# second call comes; well within SQLite's busy wait (10 s), so the stalled batch is not failed by it.
# PostgreSQL shows the batch waiting for the lock (pglocks), and the test waits for that instead.
BATCH_STARTED_S = 0.5
GONE_DEADLINE_S = 0.5


async def _until_a_session_waits_for_a_lock(engine: AsyncEngine) -> None:
    """Until a session of the wallet's database waits for a lock: the first spend's batch, on the
    account row the test holds (at most LOCK_WAIT_S_MAX)."""
    deadline = time.monotonic() + LOCK_WAIT_S_MAX
    async with engine.connect() as probe:
        while not (await probe.execute(LOCK_WAITERS)).scalar_one():
            assert time.monotonic() < deadline, (
                f"the first spend's batch did not wait for the lock in {LOCK_WAIT_S_MAX} s"
            )
            await probe.rollback()  # a fresh snapshot of pg_stat_activity each time
            await asyncio.sleep(0.02)


async def test_a_spend_whose_deadline_passed_while_it_queued_behind_a_stalled_batch_never_happens(
    clients, deployment
) -> None:  # type: ignore[no-untyped-def]
    if deployment.suite is None:
        pytest.skip("external deployment: this test holds a lock on the wallet's database")
    viewer = uid("viewer")
    await buy_coins(clients.wallet, deployment.webhook_secret, viewer)
    before = (await clients.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=viewer), timeout=5)).coins
    waited, gone = uid("waited"), uid("gone")
    engine = create_async_engine(deployment.suite.config.database_url("wallet"))
    try:
        async with engine.connect() as holder:
            # Another session's write: the spend batch's own waits for it.
            await holder.execute(
                text("UPDATE accounts SET balance = balance WHERE account_id = :a"), {"a": f"user:{viewer}"}
            )
            first = asyncio.ensure_future(clients.wallet.Spend(spend_req(viewer, 3, waited), timeout=30))
            if engine.dialect.name == "postgresql":
                await _until_a_session_waits_for_a_lock(engine)
            else:
                await asyncio.sleep(BATCH_STARTED_S)
            assert not first.done(), "the first spend's batch did not stall on the lock"
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await clients.wallet.Spend(spend_req(viewer, 5, gone), timeout=GONE_DEADLINE_S)
            assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.sleep(0.2)  # the server sees the deadline too (its handler is cancelled)
            # Queued behind the gone call, so the batch that would run it runs this one too: once
            # this is answered, the gone one's fate is decided (a CancelSpend before would race it).
            later = asyncio.ensure_future(clients.wallet.Spend(spend_req(viewer, 7, uid("later")), timeout=30))
            await asyncio.sleep(0.2)
            await holder.rollback()
        assert (await first).amount == 3  # the batch that had started when its caller waited: done whole
        assert (await later).amount == 7
        # The one whose caller gave up in the queue was never run: the arbiter finds no spend under its key.
        settled = await clients.wallet.CancelSpend(wallet_pb2.CancelSpendRequest(idempotency_key=gone), timeout=5)
        assert settled.outcome == wallet_pb2.CancelSpendResponse.OUTCOME_CANCELLED
        after = (await clients.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=viewer), timeout=5)).coins
        assert after == before - 3 - 7
    finally:
        await engine.dispose()
