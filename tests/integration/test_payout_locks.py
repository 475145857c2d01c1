"""Payout's clawbacks on a real PostgreSQL server: the order in which they take their locks.

What only shows there: a reversal batch, the shortfall settling of a withdrawal and another
reversal batch, touching the rows of the same senders and creators at once. A third transaction
holds a creator's row so that each test meets the interleaving it is about, every time; then
both sides must finish, with no deadlock for the server to break.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select, text

from livegifts.gifting.v1 import events_pb2 as gifting_events
from livegifts.payout.v1 import payout_pb2
from livegifts.wallet.v1 import events_pb2 as wallet_events
from services.common.db import Database
from services.payout.storage import clawback_shortfalls, creators
from services.payout.usecases import Payout
from tests.integration import pg
from tests.integration.pglocks import LOCK_WAIT_S_MAX, count_deadlocks, wait_for_lock_waiters
from tests.support.payout import consume, payout_on, verified_method

NOW_S = 1_795_305_600


@pytest.fixture
async def payout(empty_database: str) -> AsyncIterator[Payout]:
    if not empty_database.startswith("postgresql"):
        pytest.skip("SQLite has one writer: clawbacks never wait for each other's rows")
    async with payout_on(empty_database, pool_size=6) as (p, _provider):
        yield p


@pytest.fixture
async def payout_en_us() -> AsyncIterator[Payout]:
    """Payout over a PostgreSQL database whose text sorts as people read it ('alice' before 'Bob'),
    as the postgres image under docker-compose sorts (en_US.utf8); ICU's en-US here."""
    with pg.en_us_database() as url:
        async with payout_on(url, pool_size=6) as (p, _provider):
            yield p


def gift(sender: str, creator: str, coins: int, at_s: int) -> gifting_events.GiftSent:
    return gifting_events.GiftSent(
        event_id=uuid.uuid4().hex,
        kind=gifting_events.GIFT_KIND_GIFT,
        stream_id="s",
        creator_id=creator,
        sender_id=sender,
        gift_id="rose",
        quantity=coins,
        coins=coins,
        occurred_at={"seconds": at_s},
        recorded_at={"seconds": at_s},
    )


def reversal(event_id: str, sender: str, coins: int, at_s: int) -> wallet_events.PurchaseReversed:
    """A chargeback of `sender`'s purchase at `at_s`, all of whose `coins` had reached creators."""
    return wallet_events.PurchaseReversed(
        event_id=event_id,
        purchase_id=f"p-{event_id}",
        user_id=sender,
        coins=coins,
        coins_already_spent=coins,
        kind="CHARGED_BACK",
        occurred_at={"seconds": at_s},
    )


async def while_creator_held(payout: Payout, creator_id: str, *calls: Any) -> list[Any]:
    """Start each call in turn, each once the ones before wait for a lock, while a third transaction
    holds `creator_id`'s row; then let it go. The calls' results (or exceptions)."""
    holder = Database(payout.db.url, pool_size=1, pool_timeout_s=5, application_name="holder")
    try:
        async with holder.unit_of_work() as held:
            c = creators.c
            await held.conn.execute(select(c.creator_id).where(c.creator_id == creator_id).with_for_update())
            tasks = []
            for i, call in enumerate(calls):
                tasks.append(asyncio.create_task(call))
                await wait_for_lock_waiters(payout.db, i + 1)
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), LOCK_WAIT_S_MAX)
    finally:
        await holder.dispose()


async def open_coins(payout: Payout) -> dict[str, int]:
    sf = clawback_shortfalls.c
    async with payout.db.unit_of_work(readonly=True) as uow:
        return dict((await uow.conn.execute(select(sf.reversal_event_id, sf.coins_open))).tuples().all())


async def test_two_reversal_batches_of_the_same_senders_in_opposite_orders_both_commit(payout: Payout) -> None:
    deadlocks = count_deadlocks(payout.db)
    await consume(payout, gifts=[gift(s, "creator-a", 10_000, NOW_S - 60) for s in ("s1", "s2")])
    # Each batch claws back from s1's and s2's gifts to creator-a, in the order its events came.
    first = [reversal("r1", "s1", 1_000, NOW_S), reversal("r2", "s2", 1_000, NOW_S)]
    second = [reversal("r3", "s2", 1_000, NOW_S), reversal("r4", "s1", 1_000, NOW_S)]
    results = await while_creator_held(payout, "creator-a", consume(payout, first), consume(payout, second))
    assert results == [None, None]
    assert deadlocks[0] == 0, f"{deadlocks[0]} deadlock(s) between the two batches"
    earned = await payout.get_earnings("creator-a")
    assert (earned.diamonds_lifetime, earned.diamonds_clawed_back, earned.diamonds_available) == (10_000, 2_000, 8_000)
    assert await open_coins(payout) == {}


async def test_a_withdrawal_settling_shortfalls_of_two_senders_and_a_reversal_batch_both_finish(payout: Payout) -> None:
    deadlocks = count_deadlocks(payout.db)
    method_id = await verified_method(payout, "creator-c")
    # s1's and s2's chargebacks are consumed before their gifts: both are shortfalls. Then the
    # gifts arrive (recorded before the chargebacks), and a gift of s0's that nobody charged back.
    await consume(payout, [reversal("a-r1", "s1", 40_000, NOW_S), reversal("b-r2", "s2", 40_000, NOW_S)])
    await consume(payout, gifts=[gift(s, "creator-c", 40_000, NOW_S - 60) for s in ("s0", "s1", "s2")])
    assert (await payout.get_earnings("creator-c")).diamonds_available == 60_000
    # The withdrawal settles both shortfalls (s1's, then s2's) while another chargeback of s2's
    # comes in, whose batch settles s2's older shortfall first.
    withdraw = payout.request_withdrawal(
        payout_pb2.RequestWithdrawalRequest(
            creator_id="creator-c", diamonds=20_000, method_id=method_id, idempotency_key=uuid.uuid4().hex
        )
    )
    wd, batch = await while_creator_held(
        payout, "creator-c", withdraw, consume(payout, [reversal("c-r3", "s2", 500, NOW_S + 100)])
    )
    assert deadlocks[0] == 0, f"{deadlocks[0]} deadlock(s) between the withdrawal and the batch: {wd!r}, {batch!r}"
    assert batch is None
    assert isinstance(wd, payout_pb2.Withdrawal) and wd.diamonds == 20_000
    earned = await payout.get_earnings("creator-c")
    assert (earned.diamonds_clawed_back, earned.diamonds_held, earned.diamonds_available) == (40_000, 20_000, 0)
    # Both chargebacks took s1's and s2's gifts whole; the new one finds nothing left of s2's.
    assert await open_coins(payout) == {"a-r1": 0, "b-r2": 0, "c-r3": 500}


async def credit_and_clawback_both_commit(
    payout: Payout, deadlocks: list[int], creators: tuple[str, str], held: str
) -> None:
    """A gift batch crediting both creators (1,000 coins each) and a reversal batch clawing back
    s1's gifts to both (10,000 coins each), started while `held`'s row is held: both commit, no
    deadlock is reported, and each creator has 5,500 diamonds, 5,000 of them clawed back."""
    credit = consume(payout, gifts=[gift("s2", c, 1_000, NOW_S) for c in creators])
    clawback = consume(payout, [reversal("r1", "s1", 20_000, NOW_S)])  # takes from both creators
    results = await while_creator_held(payout, held, credit, clawback)
    assert results == [None, None]
    assert deadlocks[0] == 0, f"{deadlocks[0]} deadlock(s) between the two batches"
    for c in creators:
        earned = await payout.get_earnings(c)
        assert (earned.diamonds_lifetime, earned.diamonds_clawed_back) == (5_500, 5_000)


async def test_a_gift_batch_and_a_reversal_batch_for_the_same_two_creators_both_commit(payout: Payout) -> None:
    deadlocks = count_deadlocks(payout.db)
    # creator-b's row is written before creator-a's: a plan that scans the table meets b first.
    for creator in ("creator-b", "creator-a"):
        await consume(payout, gifts=[gift("s1", creator, 10_000, NOW_S - 60)])
    await consume(payout, gifts=[gift("s0", f"creator-{i}", 100, NOW_S - 60) for i in range(8)])
    async with payout.db.unit_of_work() as uow:
        await uow.conn.execute(text("ANALYZE creators"))  # the statistics a busy table has
    await credit_and_clawback_both_commit(payout, deadlocks, ("creator-a", "creator-b"), held="creator-b")


async def test_a_gift_batch_and_a_reversal_batch_lock_creators_alike_whatever_the_collation(
    payout_en_us: Payout,
) -> None:
    # The database sorts "alice" before "Bob", Python's sorted() the other way round (by code
    # point): the gift batch locks its creators' rows in the database's order, the clawback in
    # Python's, unless both orders are the same.
    payout = payout_en_us
    deadlocks = count_deadlocks(payout.db)
    for creator in ("alice", "Bob"):
        await consume(payout, gifts=[gift("s1", creator, 10_000, NOW_S - 60)])
    await credit_and_clawback_both_commit(payout, deadlocks, ("alice", "Bob"), held="alice")
