"""A call cancelled at its deadline leaves no transaction open, on SQLite and PostgreSQL.

grpc.aio cancels a handler's task when the client's deadline passes; the cancel can land inside
a statement of an open write transaction. On SQLite such a call used to leave the service's
database write-locked until the garbage collector's next full pass (minutes): every later write
of the service failed SQLITE_BUSY (UNAVAILABLE DEPENDENCY_UNAVAILABLE). The shared cause
(services/common/db.py) is tested on a bare database; gifting's SendGifts and the wallet's
SpendMany, 100 items each, end to end.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from sqlalchemy import text

from livegifts.gifting.v1 import gifting_pb2
from livegifts.payout.v1 import payout_pb2
from livegifts.wallet.v1 import wallet_pb2
from services.common.db import Database
from tests.integration.helpers import balance, buy_coins, eventually, gift, live_stream, spend_req, uid

# Counts to 300 000, long enough on both backends (about 0.1-0.3 s) that a cancel after 30 ms
# lands inside it; RETURNING, like gifting's inserts and its SENT flip: a statement cancelled
# before its rows were fetched is left unfinished (SQLite: a cursor that keeps the connection).
SLOW_INSERT = (
    "INSERT INTO cancelled_writes (v) "
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 600000) "
    "SELECT x FROM c WHERE x % 1000 = 0 RETURNING v"
)
PROMPT_S = 5.0  # a write after the cancelled ones must get through within this (SQLite's busy wait is 10 s)


async def test_a_write_cancelled_inside_a_statement_leaves_the_database_writable(empty_database: str) -> None:
    db = Database(empty_database, pool_size=2, pool_timeout_s=5, application_name="test")
    try:
        async with db.unit_of_work() as uow:
            await uow.conn.execute(text("CREATE TABLE cancelled_writes (v INTEGER NOT NULL)"))
            await uow.commit()

        async def cancelled_write() -> None:
            async with db.unit_of_work() as uow:
                await uow.conn.execute(text("INSERT INTO cancelled_writes (v) VALUES (-1)"))
                await uow.conn.execute(text(SLOW_INSERT))
                await uow.commit()

        async def write() -> None:
            async with db.unit_of_work() as uow:
                await uow.conn.execute(text("INSERT INTO cancelled_writes (v) VALUES (1)"))
                await uow.commit()

        for _ in range(3):
            task = asyncio.create_task(cancelled_write())
            await asyncio.sleep(0.03)
            assert not task.done(), "the slow statement ended before the cancel: make it slower"
            task.cancel()
            # Kept, as a server may keep a cancelled call's exception a while (its traceback holds
            # the cancelled statement's cursor): the lock must not last as long as that does.
            with pytest.raises(asyncio.CancelledError) as cancelled:
                await task
            await asyncio.wait_for(write(), PROMPT_S)  # TimeoutError: a cancelled transaction holds the lock
            del cancelled
        async with db.unit_of_work(readonly=True) as uow:
            rows = (await uow.conn.execute(text("SELECT v FROM cancelled_writes ORDER BY v"))).scalars().all()
        assert rows == [1, 1, 1], "a cancelled transaction's writes were kept"
    finally:
        await db.dispose()


async def test_send_gifts_cancelled_at_tiny_deadlines_leaves_gifting_writable_and_charges_once(
    clients, deployment
) -> None:  # type: ignore[no-untyped-def]
    viewer, creator = uid("viewer"), uid("creator")
    await buy_coins(clients.wallet, deployment.webhook_secret, viewer, "us-usd-17500")
    start = await balance(clients, viewer)
    s = (await live_stream(clients.gifting, creator)).stream_id
    batches: list[list[gifting_pb2.SendGiftRequest]] = []
    # Deadlines from 2 to 60 ms, twice: each lands somewhere else in the call's three steps.
    for deadline in [0.002 * i for i in range(1, 31)] * 2:
        batch = [gift(s, viewer, "rose", 1) for _ in range(100)]
        batches.append(batch)
        try:
            await clients.gifting.SendGifts(gifting_pb2.SendGiftsRequest(gifts=batch), timeout=deadline)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc
        # Gifting still takes writes promptly (it answered UNAVAILABLE after 10-40 s before).
        await clients.gifting.StartStream(
            gifting_pb2.StartStreamRequest(creator_id=uid("probe"), title="probe", idempotency_key=uid("start")),
            timeout=PROMPT_S,
        )

    # Retried under the same keys: every gift is sent, and charged once (a rose is one coin).
    receipts = []
    for batch in batches:
        answer = await clients.gifting.SendGifts(gifting_pb2.SendGiftsRequest(gifts=batch), timeout=30)
        assert all(r.HasField("receipt") for r in answer.results), [r.error for r in answer.results]
        receipts += [r.receipt for r in answer.results]
        again = await clients.gifting.SendGifts(gifting_pb2.SendGiftsRequest(gifts=batch), timeout=30)
        assert [r.receipt for r in again.results] == [r.receipt for r in answer.results]
    assert len({r.gift_event_id for r in receipts}) == 6000
    assert await balance(clients, viewer) == start - 6000
    # The outbox relay (a gifting write) and payout's consumer got every gift through, once.
    earned = await eventually(
        lambda: clients.payout.GetEarnings(payout_pb2.GetEarningsRequest(creator_id=creator)),
        lambda e: e.coins_received >= 6000,
        timeout_s=60,
    )
    assert earned.coins_received == 6000


async def test_spend_many_cancelled_at_tiny_deadlines_leaves_the_wallet_writable_and_charges_once(
    clients, deployment
) -> None:  # type: ignore[no-untyped-def]
    user = uid("viewer")
    await buy_coins(clients.wallet, deployment.webhook_secret, user, "us-usd-17500")
    start = await balance(clients, user)
    batches = []
    for deadline in [0.002 * i for i in range(1, 31)] * 2:
        batch = [spend_req(user, 1) for _ in range(100)]
        batches.append(batch)
        try:
            await clients.wallet.SpendMany(wallet_pb2.SpendManyRequest(spends=batch), timeout=deadline)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc
        await clients.wallet.Spend(spend_req(user, 1), timeout=PROMPT_S)  # the wallet still takes writes
    for batch in batches:  # retried under the same keys: each spend charged once
        answer = await clients.wallet.SpendMany(wallet_pb2.SpendManyRequest(spends=batch), timeout=30)
        assert all(r.WhichOneof("outcome") == "spent" for r in answer.results), [r.error for r in answer.results]
    assert await balance(clients, user) == start - 6000 - len(batches)
