"""Payout settles a clawback shortfall before a withdrawal can take its diamonds, on SQLite and PostgreSQL.

A reversal consumed before its gifts' events is recorded as a shortfall; the gifts' diamonds
are then credited, and the settler would take them back within CLAWBACK_SETTLE_INTERVAL_S. A
withdrawal in that interval must not get them. Payout's use cases run here over a real database
of their own (no settler loop, no wallet), so nothing but the withdrawal itself can settle.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select

from livegifts.payout.v1 import payout_pb2
from livegifts.wallet.v1 import events_pb2 as wallet_events
from services.common.errors import FailedPrecondition
from services.payout.storage import clawback_shortfalls
from services.payout.usecases import Payout
from tests.integration import pg
from tests.support.payout import gift_event, max_clawable, payout_on, verified_method

NOW_S = 1_795_305_600


@pytest.fixture
async def payout(empty_database: str) -> AsyncIterator[Payout]:
    async with payout_on(empty_database, pool_size=4) as (p, _provider):
        yield p


async def open_coins(payout: Payout) -> dict[str, int]:
    sf = clawback_shortfalls.c
    async with payout.db.unit_of_work(readonly=True) as uow:
        return dict((await uow.conn.execute(select(sf.sender_id, sf.coins_open))).tuples().all())


async def charged_back_then_gifted(payout: Payout, senders: tuple[str, ...] = ("viewer",)) -> None:
    """Each sender's 40,000 coins are charged back before payout sees the gifts; then "viewer"'s
    gifts arrive, recorded a minute before the chargeback: 20,000 diamonds to creator-c at 50%."""
    async with payout.db.unit_of_work() as uow:
        await payout.claw_back(
            uow,
            [
                wallet_events.PurchaseReversed(
                    event_id=uuid.uuid4().hex,
                    purchase_id=f"p-{sender}",
                    user_id=sender,
                    coins=40_000,
                    coins_already_spent=40_000,
                    kind="CHARGED_BACK",
                    occurred_at={"seconds": NOW_S},
                )
                for sender in senders
            ],
        )
        await uow.commit()
    assert await open_coins(payout) == dict.fromkeys(senders, 40_000)
    async with payout.db.unit_of_work() as uow:
        await payout.credit_gifts(uow, [gift_event("creator-c", 40_000, at_s=NOW_S - 60)])
        await uow.commit()
    assert (await payout.get_earnings("creator-c")).diamonds_available == 20_000


def withdraw(method_id: str) -> payout_pb2.RequestWithdrawalRequest:
    return payout_pb2.RequestWithdrawalRequest(
        creator_id="creator-c", diamonds=20_000, method_id=method_id, idempotency_key=uuid.uuid4().hex
    )


async def test_a_withdrawal_settles_the_shortfall_its_diamonds_owe_before_it_holds_them(payout: Payout) -> None:
    await charged_back_then_gifted(payout, ("viewer", "someone-else"))
    with pytest.raises(FailedPrecondition) as refused:
        await payout.request_withdrawal(withdraw(await verified_method(payout, "creator-c")))
    assert refused.value.reason == "INSUFFICIENT_DIAMONDS"
    earned = await payout.get_earnings("creator-c")
    assert (earned.diamonds_available, earned.diamonds_clawed_back, earned.diamonds_held) == (0, 20_000, 0)
    # Settled and kept although the request was refused; the other sender's shortfall, owed by no
    # earning of this creator, is left to the settler.
    assert await open_coins(payout) == {"viewer": 0, "someone-else": 40_000}
    assert await payout.settle_shortfalls_once() == 0  # nothing left to take twice


async def test_diamonds_credited_after_the_first_settling_are_settled_in_the_withdrawal_itself(
    payout: Payout,
) -> None:
    method_id = await verified_method(payout, "creator-c")
    await charged_back_then_gifted(payout)
    # The first settling finds nothing, as if the gift's credit committed just after it.
    settle = payout._settle_shortfalls_of
    calls: list[str] = []

    async def late(uow, creator_id):  # type: ignore[no-untyped-def]
        calls.append(creator_id)
        return 0 if len(calls) == 1 else await settle(uow, creator_id)

    payout._settle_shortfalls_of = late  # type: ignore[method-assign]
    with pytest.raises(FailedPrecondition) as refused:
        await payout.request_withdrawal(withdraw(method_id))
    assert refused.value.reason == "INSUFFICIENT_DIAMONDS" and calls == ["creator-c", "creator-c"]
    # Refused, so that transaction (and its settling) rolled back: still owed, for the settler.
    assert await open_coins(payout) == {"viewer": 40_000}
    assert await payout.settle_shortfalls_once() == 40_000
    assert (await payout.get_earnings("creator-c")).diamonds_available == 0


async def test_the_settler_and_a_withdrawal_settling_at_once_take_the_shortfall_once(payout: Payout) -> None:
    method_id = await verified_method(payout, "creator-c")
    await charged_back_then_gifted(payout)
    for _ in range(3):  # each round races the two again; later rounds find nothing open
        settled, refused = await asyncio.gather(
            payout.settle_shortfalls_once(),
            payout.request_withdrawal(withdraw(method_id)),
            return_exceptions=True,
        )
        assert isinstance(refused, FailedPrecondition) and refused.reason == "INSUFFICIENT_DIAMONDS"
        assert isinstance(settled, int)
    earned = await payout.get_earnings("creator-c")
    assert (earned.diamonds_available, earned.diamonds_clawed_back) == (0, 20_000)
    assert await open_coins(payout) == {"viewer": 0}
    listed = await payout.list_earnings(payout_pb2.ListEarningsRequest(creator_id="creator-c", page_size=10))
    assert [(e.coins, e.coins_clawed_back) for e in listed.entries] == [(40_000, 40_000)]


async def test_an_older_reversal_applied_after_a_newer_one_takes_the_gifts_between_them_in_its_place(
    payout: Payout,
) -> None:
    # A gift of 40,000 at NOW_S - 50 paid by the first purchase, charged back at NOW_S; a gift of
    # 40,000 at NOW_S + 100 paid by the second, charged back at NOW_S + 200. The newer chargeback
    # is applied first (the older one nak'ed and redelivered), before the second gift arrives.
    from services.payout.storage import clawbacks

    def chargeback(purchase: str, at_s: int) -> wallet_events.PurchaseReversed:
        return wallet_events.PurchaseReversed(
            event_id=uuid.uuid4().hex,
            purchase_id=purchase,
            user_id="viewer",
            coins=40_000,
            coins_already_spent=40_000,
            kind="CHARGED_BACK",
            occurred_at={"seconds": at_s},
        )

    for gifts, reversals in (
        ([gift_event("creator-a", 40_000, at_s=NOW_S - 50)], [chargeback("p-newer", NOW_S + 200)]),
        ([], [chargeback("p-older", NOW_S)]),
        ([gift_event("creator-b", 40_000, at_s=NOW_S + 100)], []),
    ):
        async with payout.db.unit_of_work() as uow:
            if gifts:
                await payout.credit_gifts(uow, gifts)
            if reversals:
                await payout.claw_back(uow, reversals)
            await uow.commit()
    assert await open_coins(payout) == {"viewer": 40_000}  # the older one: nothing before it left
    assert await payout.settle_shortfalls_once() == 40_000  # creator-b's gift, in the newer one's place

    assert await open_coins(payout) == {"viewer": 0}
    for creator in ("creator-a", "creator-b"):
        assert (await payout.get_earnings(creator)).diamonds_clawed_back == 20_000
    cb = clawbacks.c
    async with payout.db.unit_of_work(readonly=True) as uow:
        entries = (await uow.conn.execute(select(cb.purchase_id, cb.creator_id, cb.reversed_at_us))).tuples().all()
    assert sorted(entries) == [
        ("p-newer", "creator-a", (NOW_S + 200) * 1_000_000),
        ("p-older", "creator-b", NOW_S * 1_000_000),
    ]


async def test_reversals_of_one_sender_applied_in_parallel_claw_back_what_they_would_in_order(payout: Payout) -> None:
    """Six chargebacks of one sender, each consumed in its own transaction at once (replicas of
    the consumer, a parked one replayed), newest first in the start order: the sender's lock
    serializes them, and each finds what the others committed (their entries' reversal times
    included, for standing in), so none fails and, once settled, they took what they would in order."""
    from services.payout.storage import earnings

    times = [NOW_S + 10 * i for i in range(6)]
    gifts = [(NOW_S - 5 + 10 * i, 30) for i in range(6)]  # one before each chargeback
    async with payout.db.unit_of_work() as uow:
        await payout.credit_gifts(uow, [gift_event(f"creator-{i % 2}", n, at_s=at) for i, (at, n) in enumerate(gifts)])
        await uow.commit()

    async def reverse(i: int) -> None:
        async with payout.db.unit_of_work() as uow:
            await payout.claw_back(
                uow,
                [
                    wallet_events.PurchaseReversed(
                        event_id=f"r{i}-{uuid.uuid4().hex[:8]}",
                        purchase_id=f"p{i}",
                        user_id="viewer",
                        coins=50,
                        coins_already_spent=50,
                        kind="CHARGED_BACK",
                        occurred_at={"seconds": times[i]},
                    )
                ],
            )
            await uow.commit()

    await asyncio.gather(*(reverse(i) for i in reversed(range(6))))
    await payout.settle_shortfalls_once()
    e = earnings.c
    async with payout.db.unit_of_work(readonly=True) as uow:
        clawed = (await uow.conn.execute(select(e.coins_clawed_back).where(e.sender_id == "viewer"))).scalars().all()
        owed = (await uow.conn.execute(select(clawback_shortfalls.c.coins_open))).scalars().all()
    assert sum(clawed) == max_clawable([(t, 50) for t in times], gifts) == 180
    assert sum(owed) == 6 * 50 - 180


@pytest.fixture(params=["sqlite", "postgres-en-us"])
async def payout_by_collation(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Payout]:
    """Payout on SQLite (ids compared by code point, as Python compares them) and on a PostgreSQL
    database whose text sorts as people read it ("a1" before "B1"; ICU's en-US)."""
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite+aiosqlite:///{tmp_path / 'payout.db'}"
        else:
            url = stack.enter_context(pg.en_us_database())
        async with payout_on(url, pool_size=4) as (p, _provider):
            yield p


async def test_a_withdrawal_settles_every_shortfall_its_diamonds_owe_reversed_at_one_microsecond(
    payout_by_collation: Payout,
) -> None:
    # Two chargebacks of the viewer's purchases at one microsecond, consumed before their gifts:
    # "a1-..." sorts after "B1-..." by code point, before it in en-US. RequestWithdrawal settled
    # the sender's shortfalls up to the newest one by code point, then read them up to it in the
    # database's collation: on en-US "B1-..." was left open, its diamonds withdrawable.
    payout = payout_by_collation
    ids = ["a1-" + uuid.uuid4().hex, "B1-" + uuid.uuid4().hex]
    async with payout.db.unit_of_work() as uow:
        await payout.claw_back(
            uow,
            [
                wallet_events.PurchaseReversed(
                    event_id=rid,
                    purchase_id=f"p-{rid}",
                    user_id="viewer",
                    coins=20_000,
                    coins_already_spent=20_000,
                    kind="CHARGED_BACK",
                    occurred_at={"seconds": NOW_S},
                )
                for rid in ids
            ],
        )
        await payout.credit_gifts(uow, [gift_event("creator-c", 40_000, at_s=NOW_S - 60)])
        await uow.commit()

    with pytest.raises(FailedPrecondition) as refused:
        await payout.request_withdrawal(withdraw(await verified_method(payout, "creator-c")))
    assert refused.value.reason == "INSUFFICIENT_DIAMONDS"
    sf = clawback_shortfalls.c
    async with payout.db.unit_of_work(readonly=True) as uow:
        still = dict((await uow.conn.execute(select(sf.reversal_event_id, sf.coins_open))).tuples().all())
    assert still == dict.fromkeys(ids, 0)
    earned = await payout.get_earnings("creator-c")
    assert (earned.diamonds_available, earned.diamonds_clawed_back) == (0, 20_000)
