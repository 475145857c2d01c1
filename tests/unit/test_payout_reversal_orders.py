"""Payout's clawback, the real use cases over SQLite: a sender's reversals and gifts consumed in any
order, in any batches, with the settler running between them, claw back exactly what they would
have in order (the most the reversals may take of gifts recorded before them), never a coin twice.

test_payout_domain.py holds the same property of the domain functions over a model; this one holds
the SQL around them (`_claw`, `_stand_in_takes`, the batch's unwritten entries, `_settle_sender`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from livegifts.gifting.v1 import events_pb2 as gifting_events
from livegifts.wallet.v1 import events_pb2 as wallet_events
from services.payout.storage import clawback_shortfalls, clawbacks, creators, earnings
from services.payout.usecases import Payout
from tests.support.payout import max_clawable, payout_on

T0_US = 1_795_305_600_000_000  # times below are seconds after it
STEP_US = 1_000_000


@pytest.fixture(scope="module")
def payout_loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[asyncio.Runner, Payout]]:
    """One migrated database and one event loop for every example: each example's sender and
    creators are its own, so examples do not meet."""
    path: Path = tmp_path_factory.mktemp("reversal-orders") / "payout.db"
    runner = asyncio.Runner()
    cm = payout_on(f"sqlite+aiosqlite:///{path}")
    payout, _provider = runner.run(cm.__aenter__())
    try:
        yield runner, payout
    finally:
        runner.run(cm.__aexit__(None, None, None))
        runner.close()


def _reversal(tag: str, sender: str, i: int, at_s: int, coins: int) -> wallet_events.PurchaseReversed:
    return wallet_events.PurchaseReversed(
        event_id=f"{tag}-r{i}-{uuid.uuid4().hex[:8]}",
        purchase_id=f"{tag}-p{i}",
        user_id=sender,
        coins=coins,
        coins_already_spent=coins,
        kind="CHARGED_BACK",
        occurred_at={"seconds": T0_US // STEP_US + at_s},
    )


def _gift(tag: str, sender: str, i: int, at_s: int, coins: int, sent_late_s: int) -> gifting_events.GiftSent:
    return gifting_events.GiftSent(
        event_id=f"{tag}-g{i}",
        kind=gifting_events.GIFT_KIND_GIFT,
        stream_id="s",
        creator_id=f"{tag}-c{i % 2}",
        sender_id=sender,
        gift_id="rose",
        quantity=coins,
        coins=coins,
        recorded_at={"seconds": T0_US // STEP_US + at_s},
        # Sent (its SENT flip, by the sweeper perhaps) at or after it was recorded.
        occurred_at={"seconds": T0_US // STEP_US + at_s + sent_late_s},
    )


async def _run(payout: Payout, reversals: list[tuple[int, int]], gifts: list[tuple[int, int, int]], plan: Any) -> None:
    tag = uuid.uuid4().hex[:10]
    sender = f"{tag}-viewer"
    rv = [_reversal(tag, sender, i, at, n) for i, (at, n) in enumerate(reversals)]
    gs = [_gift(tag, sender, i, at, n, late) for i, (at, n, late) in enumerate(gifts)]
    steps: list[tuple[str, int]] = [("r", i) for i in range(len(rv))] + [("g", i) for i in range(len(gs))]
    steps = plan.draw(st.permutations(steps))
    sf, cb, e = clawback_shortfalls.c, clawbacks.c, earnings.c

    async def settle() -> None:  # the settler's round, on this sender's shortfalls only
        async with payout.db.unit_of_work(readonly=True) as uow:
            ids = (
                await uow.conn.execute(
                    select(sf.reversal_event_id)
                    .where(sf.sender_id == sender, sf.coins_open > 0)
                    .order_by(sf.reversal_event_id)
                )
            ).scalars()
        for rid in list(ids):
            async with payout.db.unit_of_work() as uow:
                if await payout._settle_shortfall(uow, rid):
                    await uow.commit()

    async def check_state() -> tuple[dict[str, int], dict[str, int]]:
        async with payout.db.unit_of_work(readonly=True) as uow:
            clawed = {
                r.event_id: (int(r.coins_clawed_back), int(r.coins), int(r.recorded_at_us))
                for r in await uow.conn.execute(select(earnings).where(e.sender_id == sender))
            }
            entries = (await uow.conn.execute(select(clawbacks).where(cb.sender_id == sender))).all()
            open_by = dict(
                (await uow.conn.execute(select(sf.purchase_id, sf.coins_open).where(sf.sender_id == sender))).all()
            )
            diamonds = dict(
                (
                    await uow.conn.execute(
                        select(creators.c.creator_id, creators.c.diamonds_clawed_back).where(
                            creators.c.creator_id.like(f"{tag}-%")
                        )
                    )
                ).all()
            )
        taken: dict[str, int] = {}
        for x in entries:
            taken[x.purchase_id] = taken.get(x.purchase_id, 0) + x.coins
        assert sum(c for c, _, _ in clawed.values()) == sum(taken.values()), "entries and earnings disagree"
        assert all(0 <= c <= n for c, n, _ in clawed.values())
        for i, (_, want) in enumerate(reversals):
            p = f"{tag}-p{i}"
            assert taken.get(p, 0) + open_by.get(p, 0) <= want, f"reversal {i} took or owes more than it claims"
        for c, d in diamonds.items():
            assert d == sum(x.diamonds for x in entries if x.creator_id == c), "a creator's clawed diamonds"
        # Every clawed coin can be given to a reversal at or after its gift's recording.
        at_of = {f"{tag}-p{i}": T0_US + at * STEP_US for i, (at, _) in enumerate(reversals)}
        for tau_s in range(-1, 21):
            tau = T0_US + tau_s * STEP_US
            after = sum(c for c, _, rec in clawed.values() if rec > tau)
            newer = sum(n for p, n in taken.items() if at_of[p] > tau)
            assert after <= newer, f"coins of gifts recorded after {tau_s} clawed beyond the reversals after it"
        return taken, open_by

    pending_r: list[wallet_events.PurchaseReversed] = []
    pending_g: list[gifting_events.GiftSent] = []
    for kind, i in steps:
        (pending_r if kind == "r" else pending_g).append(rv[i] if kind == "r" else gs[i])
        # The consumer's batches: several events in one transaction, or one at a time.
        if plan.draw(st.booleans()):
            async with payout.db.unit_of_work() as uow:
                if pending_r:
                    await payout.claw_back(uow, pending_r)
                if pending_g:
                    await payout.credit_gifts(uow, pending_g)
                await uow.commit()
            pending_r, pending_g = [], []
            await check_state()
        if plan.draw(st.booleans()):
            await settle()
    async with payout.db.unit_of_work() as uow:
        if pending_r:
            await payout.claw_back(uow, pending_r)
        if pending_g:
            await payout.credit_gifts(uow, pending_g)
        await uow.commit()
    for _ in range(len(reversals) + 1):
        await settle()
    taken, open_by = await check_state()
    assert sum(taken.values()) == max_clawable(reversals, [(at, n) for at, n, _ in gifts])
    for i, (_, want) in enumerate(reversals):
        p = f"{tag}-p{i}"
        assert taken.get(p, 0) + open_by.get(p, 0) == want, f"reversal {i}: taken and open make its claim"


@given(
    st.lists(st.tuples(st.integers(0, 20), st.integers(1, 50)), min_size=1, max_size=5),
    st.lists(
        st.tuples(st.integers(0, 20), st.integers(1, 50), st.sampled_from([0, 0, 1, 5, -1])), min_size=1, max_size=6
    ),
    st.data(),
)
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_reversals_and_gifts_in_any_order_and_batches_claw_back_what_they_would_in_order(
    payout_loop: tuple[asyncio.Runner, Payout],
    reversals: list[tuple[int, int]],
    gifts: list[tuple[int, int, int]],
    plan: Any,
) -> None:
    runner, payout = payout_loop
    runner.run(_run(payout, reversals, gifts, plan))
