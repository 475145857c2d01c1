"""A creator's statement reconciles on its own: each month opens with the balance the last one
closed with, and closing = opening + diamonds earned - clawed back - paid out, the balance
GetEarnings shows (available + held) at the end.

The statement's sections count by different times (credit, clawback, payment), and a withdrawal
is on the books from its request to its payment: one requested in December and paid in January
is part of December's closing balance and leaves in January. Payout's clock is moved by hand.
"""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from sqlalchemy import select

from livegifts.payout.v1 import payout_pb2
from services.payout import usecases
from services.payout.storage import withdrawals
from tests.support.payout import (
    Clock,
    approved_withdrawal,
    callback,
    consume,
    gift_event,
    month_moves,
    reversal,
    verified_method,
)


def at(year: int, month: int, day: int, hour: int = 12) -> int:
    """Unix microseconds of that UTC instant."""
    return int(dt.datetime(year, month, day, hour, tzinfo=dt.UTC).timestamp()) * 1_000_000


async def test_each_month_opens_with_the_last_ones_balance_and_closes_with_what_it_moved(  # type: ignore[no-untyped-def]
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    payout, _provider, _path = setup
    clock = Clock()
    monkeypatch.setattr(usecases, "now_us", clock)
    creator = "creator-s"

    clock.us = at(2025, 11, 15)  # 40,001 coins at 50%: 20,000.5 diamonds
    await consume(payout, gifts=[gift_event(creator, 40_001, at_s=clock.us // 1_000_000)])
    clock.us = at(2025, 12, 20)  # a coin more (the half becomes whole), then a withdrawal of 20,000
    await consume(payout, gifts=[gift_event(creator, 1, at_s=clock.us // 1_000_000)])
    method_id = await verified_method(payout, creator)
    wd = await payout.request_withdrawal(
        payout_pb2.RequestWithdrawalRequest(
            creator_id=creator, diamonds=20_000, method_id=method_id, idempotency_key=uuid.uuid4().hex
        )
    )
    assert await payout.dispatch_once() == 1  # with the provider over the new year
    clock.us = at(2026, 1, 3)
    await callback(payout, wd.withdrawal_id, "evt-paid", "payout.paid")
    clock.us = at(2026, 2, 10)  # 3 coins (1.5 diamonds), then the chargeback of those 3 coins
    await consume(payout, gifts=[gift_event(creator, 3, at_s=clock.us // 1_000_000)])
    clock.us = at(2026, 2, 11)
    await consume(payout, reversals=[reversal("rv-1", clock.us // 1_000_000, 3)])

    last = payout_pb2.StatementMonth()  # before the first year: nothing
    for year in (2025, 2026):
        statement = await payout.get_statement(creator, year)
        for m in statement.months:
            assert m.opening_diamonds == last.closing_diamonds, (year, m.month)
            assert m.closing_diamonds == m.opening_diamonds + month_moves(m), (year, m.month)
            last = m
    dec = (await payout.get_statement(creator, 2025)).months[11]
    jan, feb = (await payout.get_statement(creator, 2026)).months[:2]
    # December closes with the withdrawal still held: 20,001 on the books, 20,000 of them in it.
    assert (dec.diamonds_earned, dec.paid, dec.closing_diamonds) == (1, [], 20_001)
    assert (jan.opening_diamonds, sum(p.diamonds for p in jan.paid), jan.closing_diamonds) == (20_001, 20_000, 1)
    assert (feb.diamonds_earned, feb.diamonds_clawed_back, feb.closing_diamonds) == (1, 1, 1)
    earnings = await payout.get_earnings(creator)
    assert last.closing_diamonds == earnings.diamonds_available + earnings.diamonds_held == 1
    # The withdrawal's updated_at is the instant its statement month was chosen by (paid_at).
    paid = await payout.get_withdrawal(wd.withdrawal_id)
    assert paid.status == payout_pb2.WITHDRAWAL_STATUS_PAID
    async with payout.db.unit_of_work(readonly=True) as uow:
        w = withdrawals.c
        paid_at_us = (
            await uow.conn.execute(select(w.paid_at_us).where(w.withdrawal_id == wd.withdrawal_id))
        ).scalar_one()
    assert paid.updated_at.ToMicroseconds() == paid_at_us


async def test_a_withdrawal_says_when_it_was_paid_the_instant_its_statement_month_counts_it_by(  # type: ignore[no-untyped-def]
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    payout, _provider, _path = setup
    clock = Clock()
    monkeypatch.setattr(usecases, "now_us", clock)
    clock.us = at(2026, 3, 31, hour=20)
    paid = await approved_withdrawal(payout, "creator-p")
    failed = await approved_withdrawal(payout, "creator-f")
    assert not (await payout.get_withdrawal(paid)).HasField("paid_at")  # APPROVED: not paid
    assert await payout.dispatch_once() == 2
    assert not (await payout.get_withdrawal(paid)).HasField("paid_at")  # PROCESSING: not yet
    clock.us = at(2026, 4, 1, hour=0)  # paid after midnight: an April payment
    await callback(payout, paid, "evt-paid", "payout.paid")
    await callback(payout, failed, "evt-failed", "payout.failed")

    wd = await payout.get_withdrawal(paid)
    assert wd.status == payout_pb2.WITHDRAWAL_STATUS_PAID
    assert at(2026, 4, 1, hour=0) < wd.paid_at.ToMicroseconds() <= clock.us
    assert wd.paid_at == wd.updated_at
    (listed,) = (await payout.list_withdrawals(payout_pb2.ListWithdrawalsRequest(creator_id="creator-p"))).withdrawals
    assert listed.paid_at == wd.paid_at
    months = (await payout.get_statement("creator-p", 2026)).months
    assert (len(months[2].paid), [p.diamonds for p in months[3].paid]) == (0, [wd.diamonds])  # by paid_at
    gone = await payout.get_withdrawal(failed)
    assert gone.status == payout_pb2.WITHDRAWAL_STATUS_FAILED and not gone.HasField("paid_at")


async def test_a_statement_of_a_creator_never_credited_opens_and_closes_at_zero(setup) -> None:  # type: ignore[no-untyped-def]
    payout, _provider, _path = setup
    statement = await payout.get_statement("nobody", 2026)
    assert [(m.opening_diamonds, m.closing_diamonds) for m in statement.months] == [(0, 0)] * 12


async def test_the_closing_balance_is_available_plus_held_after_a_failure_a_rejection_and_a_negative_balance(  # type: ignore[no-untyped-def]
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A withdrawal FAILED after PROCESSING and one REJECTED while APPROVED give their diamonds back
    and leave no trace in the balance; a clawback larger than what is left makes it negative, with
    a remainder of units kept for the next whole diamond: each month still closes with what it
    moved, and the last with GetEarnings' available + held (negative); the APPROVED withdrawal
    waiting meanwhile says it is held by the balance."""
    payout, _provider, _path = setup
    clock = Clock()
    monkeypatch.setattr(usecases, "now_us", clock)
    creator = "creator-n"
    clock.us = at(2026, 5, 2)
    failed = await approved_withdrawal(payout, creator)  # 20,000 credited, all in this withdrawal
    assert await payout.dispatch_once() == 1
    clock.us = at(2026, 5, 3)
    await callback(payout, failed, "evt-failed", "payout.failed")  # PROCESSING -> FAILED: released
    method_id = (await payout.get_withdrawal(failed)).method_id
    rejected = await payout.request_withdrawal(
        payout_pb2.RequestWithdrawalRequest(
            creator_id=creator, diamonds=20_000, method_id=method_id, idempotency_key=uuid.uuid4().hex
        )
    )
    await payout.reject_withdrawal(
        payout_pb2.RejectWithdrawalRequest(
            withdrawal_id=rejected.withdrawal_id, reason="no", idempotency_key=uuid.uuid4().hex
        ),
        "operator",
    )
    clock.us = at(2026, 6, 1)  # 3 coins more: 20,001.5 diamonds credited in all
    await consume(payout, gifts=[gift_event(creator, 3, at_s=clock.us // 1_000_000)])
    waiting = await payout.request_withdrawal(
        payout_pb2.RequestWithdrawalRequest(
            creator_id=creator, diamonds=20_000, method_id=method_id, idempotency_key=uuid.uuid4().hex
        )
    )
    assert waiting.status == payout_pb2.WITHDRAWAL_STATUS_APPROVED
    clock.us = at(2026, 6, 2)  # a chargeback of 40,001 coins: 20,000.5 diamonds, 1 of them left
    await consume(payout, reversals=[reversal("rv-n", clock.us // 1_000_000, 40_001)])
    earnings = await payout.get_earnings(creator)
    assert (earnings.diamonds_available, earnings.clawback_remainder_units) == (1 - 20_000, 5_000)
    statement = await payout.get_statement(creator, 2026)
    last = payout_pb2.StatementMonth()
    for m in statement.months:
        assert m.opening_diamonds == last.closing_diamonds, m.month
        assert m.closing_diamonds == m.opening_diamonds + month_moves(m), m.month
        last = m
    assert last.closing_diamonds == earnings.diamonds_available + earnings.diamonds_held
    held = await payout.get_withdrawal(waiting.withdrawal_id)
    assert held.hold == payout_pb2.WITHDRAWAL_HOLD_BALANCE_NEGATIVE


async def test_a_closed_month_answers_the_same_whatever_happens_after_it(  # type: ignore[no-untyped-def]
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finance reruns a closed month's statement and gets the same numbers: what happens later to
    its gifts, withdrawals and reversals (a gift sent in it credited late, its coins charged back,
    a withdrawal requested in it paid) counts in the month it happens in, never in the closed one."""
    payout, _provider, _path = setup
    clock = Clock()
    monkeypatch.setattr(usecases, "now_us", clock)
    creator = "creator-closed"
    clock.us = at(2026, 3, 10)
    wd = await approved_withdrawal(payout, creator)  # 20,000 credited in March, all requested
    assert await payout.dispatch_once() == 1
    late_gift = gift_event(creator, 1_001, at_s=at(2026, 3, 31, hour=23) // 1_000_000)
    clock.us = at(2026, 4, 1)
    march = (await payout.get_statement(creator, 2026)).months[2]
    assert (march.diamonds_earned, march.closing_diamonds) == (20_000, 20_000)

    await consume(payout, gifts=[late_gift])  # sent in March, credited in April
    await callback(payout, wd, "evt-paid-closed", "payout.paid")  # requested in March, paid in April
    clock.us = at(2026, 5, 2)
    await consume(payout, reversals=[reversal("rv-closed", clock.us // 1_000_000, 1_001)])  # March's gift
    months = (await payout.get_statement(creator, 2026)).months
    assert months[2] == march
    assert (months[3].diamonds_earned, [p.diamonds for p in months[3].paid]) == (500, [20_000])
    assert months[4].diamonds_clawed_back == 500
