"""Payout's dispatcher against a real SQLite file: what it hands to the payout provider, and when not.

Withdrawals are held while a creator's balance is negative after a clawback. The dispatcher
reads a round of APPROVED withdrawals, then submits them one by one; a clawback that commits
while an earlier one is being submitted must hold the later ones too.

The provider is a network call with a deadline (PROVIDER_TIMEOUT_S): a submission, a look-up or
a tokenization that hangs or fails leaves its work for later, and the rest of the service goes
on while one is slow.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sqlite3
import uuid
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError
from sqlalchemy import event, func, select, update

from livegifts.payout.v1 import payout_pb2
from livegifts.wallet.v1 import wallet_pb2
from services.common import signing
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from services.common.timeutil import now_us
from services.payout.config import PayoutSettings
from services.payout.providers import DevPayoutProvider, dev_payout_payload
from services.payout.storage import common, creators, daily_withdrawals, withdrawals
from services.payout.usecases import Payout
from tests.support.payout import (
    SECRET,
    RefusingProvider,
    SlowProvider,
    StuckProvider,
    approved_withdrawal,
    consume,
    gift_event,
    method_request,
    payout_on,
    reconcile_due,
    requested_withdrawal,
    reviewed_withdrawal,
    status_of,
)


def set_available(path: Path, creator: str, diamonds: int) -> None:
    """Another transaction commits a balance (a clawback, or its repayment), outside the dispatcher's."""
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE creators SET diamonds_available = ? WHERE creator_id = ?", (diamonds, creator))


async def test_a_clawback_committed_during_a_round_holds_the_withdrawals_not_yet_submitted(setup) -> None:  # type: ignore[no-untyped-def]
    payout, provider, path = setup
    first = await approved_withdrawal(payout, "creator-a")
    second = await approved_withdrawal(payout, "creator-b")
    # While the first is with the provider, a clawback takes creator-b below zero.
    provider.on_submit.append(lambda: set_available(path, "creator-b", -1))

    assert await payout.dispatch_once() == 1
    assert provider.submitted == [first]
    assert await status_of(payout, first) == payout_pb2.WITHDRAWAL_STATUS_PROCESSING
    assert await status_of(payout, second) == payout_pb2.WITHDRAWAL_STATUS_APPROVED  # held, not lost

    provider.on_submit.clear()
    set_available(path, "creator-b", 0)  # repaid: the held withdrawal goes in the next round
    assert await payout.dispatch_once() == 1
    assert provider.submitted == [first, second]
    assert await status_of(payout, second) == payout_pb2.WITHDRAWAL_STATUS_PROCESSING


async def test_a_withdrawal_is_claimed_before_the_provider_is_asked(setup) -> None:  # type: ignore[no-untyped-def]
    payout, provider, path = setup
    withdrawal_id = await approved_withdrawal(payout, "creator-a")
    seen: list[tuple[str, str]] = []

    def look() -> None:  # what the books say while the provider is being asked
        with sqlite3.connect(path) as conn:
            q = "SELECT status, provider_ref FROM withdrawals WHERE withdrawal_id = ?"
            seen.append(conn.execute(q, (withdrawal_id,)).fetchone())

    provider.on_submit.append(look)
    assert await payout.dispatch_once() == 1
    assert seen == [("PROCESSING", "")]  # on its way before any transfer could be made
    row = await payout.get_withdrawal(withdrawal_id)
    assert (row.status, row.provider_ref) == (payout_pb2.WITHDRAWAL_STATUS_PROCESSING, f"po_dev_{withdrawal_id}")
    assert await payout.dispatch_once() == 0 and provider.submitted == [withdrawal_id]  # handed over once


async def day_gross(payout: Payout, creator: str) -> list[int]:
    """The gross cash `creator`'s withdrawals count against the daily maximum, per day."""
    d = daily_withdrawals.c
    async with payout.db.unit_of_work(readonly=True) as uow:
        return list((await uow.conn.execute(select(d.gross_minor).where(d.creator_id == creator))).scalars())


async def test_an_operator_may_reject_an_approved_withdrawal_until_the_dispatcher_claims_it(setup) -> None:  # type: ignore[no-untyped-def]
    payout, provider, _path = setup
    rejected = await approved_withdrawal(payout, "creator-a")
    claimed = await approved_withdrawal(payout, "creator-b")

    def reject(withdrawal_id: str) -> payout_pb2.RejectWithdrawalRequest:
        return payout_pb2.RejectWithdrawalRequest(
            withdrawal_id=withdrawal_id, reason="fraud review", idempotency_key=uuid.uuid4().hex
        )

    out = await payout.reject_withdrawal(reject(rejected), "ops")
    assert (out.status, out.failure_reason) == (payout_pb2.WITHDRAWAL_STATUS_REJECTED, "fraud review")
    earnings = await payout.get_earnings("creator-a")
    assert (earnings.diamonds_available, earnings.diamonds_held) == (20_000, 0)  # released
    assert await day_gross(payout, "creator-a") == [0]  # and no longer counted against the day's maximum
    assert await day_gross(payout, "creator-b") == [10_000]
    assert await payout.dispatch_once() == 1 and provider.submitted == [claimed]  # never the rejected one
    with pytest.raises(FailedPrecondition) as refused:  # claimed: on its way, too late to reject
        await payout.reject_withdrawal(reject(claimed), "ops")
    assert refused.value.reason == "INVALID_WITHDRAWAL_TRANSITION"


async def test_an_operator_cannot_approve_a_reviewed_withdrawal_while_a_clawback_holds_the_balance_negative(  # type: ignore[no-untyped-def]
    setup,
) -> None:
    payout, _provider, path = setup
    wd = await reviewed_withdrawal(payout, "creator-a")  # 120,000 diamonds = $600

    def approve() -> payout_pb2.ApproveWithdrawalRequest:
        return payout_pb2.ApproveWithdrawalRequest(withdrawal_id=wd.withdrawal_id, idempotency_key=uuid.uuid4().hex)

    set_available(path, "creator-a", -50)  # a clawback after the request took the balance below zero
    with pytest.raises(FailedPrecondition) as held:
        await payout.approve_withdrawal(approve(), "ops")
    assert held.value.reason == "BALANCE_NEGATIVE"
    assert await status_of(payout, wd.withdrawal_id) == payout_pb2.WITHDRAWAL_STATUS_PENDING_REVIEW
    set_available(path, "creator-a", 0)  # repaid
    assert (await payout.approve_withdrawal(approve(), "ops")).status == payout_pb2.WITHDRAWAL_STATUS_APPROVED


@pytest.mark.parametrize("over", ["above the whole day", "above what is left"])
async def test_a_daily_limit_refusal_says_when_the_utc_day_it_counted_on_ends(  # type: ignore[no-untyped-def]
    setup, monkeypatch: pytest.MonkeyPatch, over: str
) -> None:
    payout, _provider, _path = setup
    wd = await reviewed_withdrawal(payout, "creator-a")  # $600 of the day's $1,000
    midnight = int(dt.datetime(2026, 4, 1, tzinfo=dt.UTC).timestamp()) * 1_000_000
    monkeypatch.setattr("services.payout.usecases.now_us", lambda: midnight - 1)  # the day's last microsecond
    async with payout.db.unit_of_work() as uow:  # the $600 counted on that day, as if requested then
        await uow.conn.execute(update(daily_withdrawals).values(day="2026-03-31"))
        await uow.commit()
    await consume(payout, gifts=[gift_event("creator-a", 400_000)])
    with pytest.raises(ResourceExhausted) as refused:
        await payout.request_withdrawal(
            payout_pb2.RequestWithdrawalRequest(
                creator_id="creator-a",
                diamonds=200_002 if over == "above the whole day" else 80_004,  # $1,000.01, or $400.02
                method_id=wd.method_id,
                idempotency_key=uuid.uuid4().hex,
            )
        )
    assert refused.value.reason == "DAILY_WITHDRAWAL_LIMIT"
    assert refused.value.metadata["daily_left_minor"] == "40000"  # the day's $600 counted
    if over == "above the whole day":  # no day takes it: waiting does not help, so no reset time
        assert refused.value.metadata["amount_exceeds_limit"] == "true"
        assert "resets_at_us" not in refused.value.metadata
    else:
        assert refused.value.metadata["resets_at_us"] == str(midnight)  # 2026-04-01T00:00Z: a microsecond on
        assert "amount_exceeds_limit" not in refused.value.metadata


async def fail_verification(payout: Payout, withdrawal_id: str) -> None:
    """An operator marks the withdrawal's payout method FAILED (KYC: not the creator's account)."""
    method_id = (await payout.get_withdrawal(withdrawal_id)).method_id
    await payout.verify_payout_method(
        payout_pb2.VerifyPayoutMethodRequest(method_id=method_id, verified=False, idempotency_key=uuid.uuid4().hex),
        "kyc",
    )


async def test_a_withdrawal_whose_method_failed_verification_after_the_request_is_held_not_paid(setup) -> None:  # type: ignore[no-untyped-def]
    payout, provider, _path = setup
    held = await approved_withdrawal(payout, "creator-a")
    await fail_verification(payout, held)

    assert await payout.dispatch_once() == 0 and provider.submitted == []  # no cash to that account
    assert await status_of(payout, held) == payout_pb2.WITHDRAWAL_STATUS_APPROVED  # diamonds still held

    method_id = (await payout.get_withdrawal(held)).method_id
    await payout.verify_payout_method(  # verified again: the held withdrawal goes in the next round
        payout_pb2.VerifyPayoutMethodRequest(method_id=method_id, verified=True, idempotency_key=uuid.uuid4().hex),
        "kyc",
    )
    assert await payout.dispatch_once() == 1 and provider.submitted == [held]


async def test_a_method_failed_during_a_round_holds_its_withdrawal_not_yet_claimed(setup) -> None:  # type: ignore[no-untyped-def]
    payout, provider, path = setup
    first = await approved_withdrawal(payout, "creator-a")
    second = await approved_withdrawal(payout, "creator-b")
    method_id = (await payout.get_withdrawal(second)).method_id

    def fail_second() -> None:  # KYC fails creator-b's method while the first is with the provider
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE payout_methods SET verification = 'FAILED' WHERE method_id = ?", (method_id,))

    provider.on_submit.append(fail_second)
    assert await payout.dispatch_once() == 1 and provider.submitted == [first]
    assert await status_of(payout, second) == payout_pb2.WITHDRAWAL_STATUS_APPROVED


async def test_an_operator_cannot_approve_a_withdrawal_whose_method_failed_verification_but_may_reject_it(  # type: ignore[no-untyped-def]
    setup,
) -> None:
    payout, _provider, _path = setup
    wd = await reviewed_withdrawal(payout, "creator-a")  # 120,000 diamonds = $600
    await fail_verification(payout, wd.withdrawal_id)

    with pytest.raises(FailedPrecondition) as refused:
        await payout.approve_withdrawal(
            payout_pb2.ApproveWithdrawalRequest(withdrawal_id=wd.withdrawal_id, idempotency_key=uuid.uuid4().hex),
            "ops",
        )
    assert refused.value.reason == "PAYOUT_METHOD_NOT_VERIFIED"
    assert await status_of(payout, wd.withdrawal_id) == payout_pb2.WITHDRAWAL_STATUS_PENDING_REVIEW
    out = await payout.reject_withdrawal(
        payout_pb2.RejectWithdrawalRequest(
            withdrawal_id=wd.withdrawal_id, reason="method failed verification", idempotency_key=uuid.uuid4().hex
        ),
        "ops",
    )
    assert out.status == payout_pb2.WITHDRAWAL_STATUS_REJECTED
    assert (await payout.get_earnings("creator-a")).diamonds_available == 120_000  # released


async def test_approving_a_withdrawal_past_review_whose_method_failed_is_still_an_invalid_transition(  # type: ignore[no-untyped-def]
    setup,
) -> None:
    payout, _provider, _path = setup
    auto = await approved_withdrawal(payout, "creator-a")  # approved at the request (below review)
    await fail_verification(payout, auto)
    # Approving it again (a second operator, a new key): the move it asks for cannot be made, and
    # "the method is not verified" would send the operator to reject one that may already be paid.
    with pytest.raises(FailedPrecondition) as refused:
        await payout.approve_withdrawal(
            payout_pb2.ApproveWithdrawalRequest(withdrawal_id=auto, idempotency_key=uuid.uuid4().hex), "ops"
        )
    assert refused.value.reason == "INVALID_WITHDRAWAL_TRANSITION"
    assert await status_of(payout, auto) == payout_pb2.WITHDRAWAL_STATUS_APPROVED


class EligibilityWallet:
    """The wallet's GetAccountRestrictions, from a set of blocked users the test changes."""

    def __init__(self) -> None:
        self.blocked: set[str] = set()
        self.asked: list[str] = []

    async def GetAccountRestrictions(
        self, req: wallet_pb2.GetAccountRestrictionsRequest
    ) -> wallet_pb2.AccountRestrictions:
        self.asked.append(req.user_id)
        blocked = req.user_id in self.blocked
        return wallet_pb2.AccountRestrictions(user_id=req.user_id, blocked=blocked, may_spend=not blocked)


async def test_a_creator_blocked_after_approval_is_held_and_asked_about_again_later(  # type: ignore[no-untyped-def]
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    payout, provider, _path = setup
    held = await approved_withdrawal(payout, "creator-a")
    paid = await approved_withdrawal(payout, "creator-b")
    wallet = EligibilityWallet()
    wallet.blocked.add("creator-a")  # trust and safety blocks the creator after the approval
    payout.wallet = wallet
    clock = [1000.0]
    monkeypatch.setattr("services.payout.usecases.time.monotonic", lambda: clock[0])
    count = REGISTRY.get_sample_value("livegifts_withdrawals_held_total", {"reason": "ACCOUNT_BLOCKED"}) or 0.0

    assert await payout.dispatch_once() == 1 and provider.submitted == [paid]
    assert await status_of(payout, held) == payout_pb2.WITHDRAWAL_STATUS_APPROVED  # held, diamonds still held
    assert REGISTRY.get_sample_value("livegifts_withdrawals_held_total", {"reason": "ACCOUNT_BLOCKED"}) == count + 1
    assert await payout.dispatch_once() == 0
    assert wallet.asked == ["creator-a", "creator-b"]  # not asked again every round while held

    wallet.blocked.clear()  # unblocked: the next look after the recheck time sends it
    assert payout.settings is not None
    clock[0] += payout.settings.dispatch_hold_recheck_s + 1
    assert await payout.dispatch_once() == 1 and provider.submitted == [paid, held]


HOLD = payout_pb2.WithdrawalHold


async def holds(payout: Payout, *withdrawal_ids: str) -> list[str]:
    """Each withdrawal's hold as GetWithdrawal says it ("" for none), after checking the review
    queue (every creator's APPROVED withdrawals) says the same."""
    queue = await payout.list_withdrawals(
        payout_pb2.ListWithdrawalsRequest(status=payout_pb2.WITHDRAWAL_STATUS_APPROVED, page_size=500)
    )
    listed = {w.withdrawal_id: w.hold for w in queue.withdrawals}
    out = []
    for wid in withdrawal_ids:
        got = await payout.get_withdrawal(wid)
        assert listed.get(wid, HOLD.Value("WITHDRAWAL_HOLD_UNSPECIFIED")) == got.hold, wid
        out.append(HOLD.Name(got.hold).removeprefix("WITHDRAWAL_HOLD_").replace("UNSPECIFIED", ""))
    return out


async def test_an_approved_withdrawal_says_why_the_dispatcher_holds_it_by_its_balance_and_method(setup) -> None:  # type: ignore[no-untyped-def]
    payout, provider, path = setup
    clawed = await approved_withdrawal(payout, "creator-a")
    unverified = await approved_withdrawal(payout, "creator-b")
    both = await approved_withdrawal(payout, "creator-c")
    free = await approved_withdrawal(payout, "creator-d")
    review = await reviewed_withdrawal(payout, "creator-e")
    set_available(path, "creator-a", -5)  # a clawback after the approval
    await fail_verification(payout, unverified)
    set_available(path, "creator-c", -5)
    await fail_verification(payout, both)
    set_available(path, "creator-e", -5)  # under review: it waits for an operator, not a hold

    assert await holds(payout, clawed, unverified, both, free, review.withdrawal_id) == [
        "BALANCE_NEGATIVE",
        "PAYOUT_METHOD_NOT_VERIFIED",
        "BALANCE_NEGATIVE",  # the first that holds, in the proto's order
        "",
        "",
    ]
    (mine,) = (await payout.list_withdrawals(payout_pb2.ListWithdrawalsRequest(creator_id="creator-a"))).withdrawals
    assert mine.hold == HOLD.Value("WITHDRAWAL_HOLD_BALANCE_NEGATIVE")  # the creator's own list too
    # The dispatcher takes exactly the one said not to be held.
    assert await payout.dispatch_once() == 1 and provider.submitted == [free]
    assert await holds(payout, free) == [""]  # PROCESSING: on its way
    set_available(path, "creator-a", 0)  # repaid
    assert await holds(payout, clawed) == [""]
    assert await payout.dispatch_once() == 1 and provider.submitted == [free, clawed]


async def test_an_approved_withdrawal_says_the_wallet_holds_it_until_the_dispatcher_hears_otherwise(  # type: ignore[no-untyped-def]
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    payout, provider, _path = setup
    held = await approved_withdrawal(payout, "creator-a")
    review = await reviewed_withdrawal(payout, "creator-a")  # a second one, under review
    wallet = EligibilityWallet()
    wallet.blocked.add("creator-a")
    payout.wallet = wallet
    clock = [1000.0]
    monkeypatch.setattr("services.payout.usecases.time.monotonic", lambda: clock[0])
    assert payout.settings is not None
    recheck = payout.settings.dispatch_hold_recheck_s + 1

    assert await holds(payout, held) == [""]  # the dispatcher has not asked the wallet yet
    assert await payout.dispatch_once() == 0
    assert await holds(payout, held) == ["ACCOUNT_BLOCKED"]
    approved = await payout.approve_withdrawal(
        payout_pb2.ApproveWithdrawalRequest(withdrawal_id=review.withdrawal_id, idempotency_key=uuid.uuid4().hex),
        "ops",
    )
    assert approved.hold == HOLD.Value("WITHDRAWAL_HOLD_ACCOUNT_BLOCKED")  # approved, and held at once

    async def unavailable(req: wallet_pb2.GetAccountRestrictionsRequest) -> wallet_pb2.AccountRestrictions:
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())

    monkeypatch.setattr(wallet, "GetAccountRestrictions", unavailable)
    clock[0] += recheck
    assert await payout.dispatch_once() == 0
    assert await holds(payout, held, review.withdrawal_id) == ["WALLET_UNAVAILABLE"] * 2

    monkeypatch.undo()  # the wallet answers again, the creator unblocked: both go after the recheck
    monkeypatch.setattr("services.payout.usecases.time.monotonic", lambda: clock[0])
    wallet.blocked.clear()
    clock[0] += recheck
    assert await payout.dispatch_once() == 2 and provider.submitted == [held, review.withdrawal_id]
    async with payout.db.unit_of_work(readonly=True) as uow:  # the hold it kept is gone with it
        kept = await uow.conn.execute(select(creators.c.wallet_hold).where(creators.c.creator_id == "creator-a"))
        assert kept.scalar_one() == ""


async def test_a_withdrawal_request_the_wallet_allows_clears_its_earlier_hold(  # type: ignore[no-untyped-def]
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    payout, _provider, _path = setup
    held = await approved_withdrawal(payout, "creator-a")
    wallet = EligibilityWallet()
    wallet.blocked.add("creator-a")
    payout.wallet = wallet
    assert await payout.dispatch_once() == 0
    assert await holds(payout, held) == ["ACCOUNT_BLOCKED"]
    wallet.blocked.clear()  # unblocked; the creator asks for more before the dispatcher rechecks
    method_id = (await payout.get_withdrawal(held)).method_id
    again = await requested_withdrawal(payout, "creator-a", 40_000, 20_000, method_id)
    assert again.hold == HOLD.Value("WITHDRAWAL_HOLD_UNSPECIFIED")
    assert await holds(payout, held, again.withdrawal_id) == ["", ""]  # the wallet just said yes


async def test_a_page_of_withdrawals_reads_their_holds_in_its_one_query(setup) -> None:  # type: ignore[no-untyped-def]
    payout, _provider, path = setup
    for i in range(5):
        await approved_withdrawal(payout, f"creator-{i}")
        set_available(path, f"creator-{i}", -1)
    statements: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        statements.append(statement)

    event.listen(payout.db.engine.sync_engine, "before_cursor_execute", seen)
    try:
        page = await payout.list_withdrawals(
            payout_pb2.ListWithdrawalsRequest(status=payout_pb2.WITHDRAWAL_STATUS_APPROVED)
        )
    finally:
        event.remove(payout.db.engine.sync_engine, "before_cursor_execute", seen)
    assert [w.hold for w in page.withdrawals] == [HOLD.Value("WITHDRAWAL_HOLD_BALANCE_NEGATIVE")] * 5
    assert [s for s in statements if "FROM" in s.upper()] == [statements[-1]]  # one SELECT, however many rows


def gauge(name: str) -> float:
    value = REGISTRY.get_sample_value(name)
    assert value is not None, name
    return value


async def test_withdrawals_waiting_for_the_providers_callback_are_counted_with_their_age(setup) -> None:  # type: ignore[no-untyped-def]
    payout, _provider, path = setup
    withdrawal_id = await approved_withdrawal(payout, "creator-a")
    assert await payout.dispatch_once() == 1  # submitted; no callback comes (auto_callback off)
    with sqlite3.connect(path) as conn:  # handed over an hour ago
        conn.execute("UPDATE withdrawals SET updated_at_us = updated_at_us - 3600000000")
    assert await payout.dispatch_once() == 0
    assert gauge("livegifts_withdrawals_processing") == 1
    assert 3600 <= gauge("livegifts_withdrawal_processing_oldest_seconds") < 3700

    row = await payout.get_withdrawal(withdrawal_id)
    payload = dev_payout_payload("evt-1", "payout.paid", withdrawal_id, row.net.amount_minor, row.net.currency_code)
    await payout.handle_payout_event(
        payout_pb2.HandlePayoutEventRequest(provider="dev", payload=payload, signature=signing.sign(SECRET, payload))
    )
    assert await status_of(payout, withdrawal_id) == payout_pb2.WITHDRAWAL_STATUS_PAID
    await payout.dispatch_once()
    assert gauge("livegifts_withdrawals_processing") == 0
    assert gauge("livegifts_withdrawal_processing_oldest_seconds") == 0


def waiting(metric: str, status: str) -> float:
    value = REGISTRY.get_sample_value(metric, {"status": status})
    assert value is not None, (metric, status)
    return value


async def test_withdrawals_waiting_for_review_or_held_approved_are_counted_with_their_age(setup) -> None:  # type: ignore[no-untyped-def]
    payout, _provider, path = setup
    review = await reviewed_withdrawal(payout, "creator-a")  # 120,000 diamonds = $600
    held = await approved_withdrawal(payout, "creator-b")
    set_available(path, "creator-b", -1)  # a clawback holds it, APPROVED, its diamonds held
    with sqlite3.connect(path) as conn:  # requested (and approved) two days ago
        conn.execute("UPDATE withdrawals SET updated_at_us = updated_at_us - 172800000000")
    assert await payout.dispatch_once() == 0
    for status in ("PENDING_REVIEW", "APPROVED"):
        assert waiting("livegifts_withdrawals_waiting", status) == 1
        assert 172_800 <= waiting("livegifts_withdrawal_waiting_oldest_seconds", status) < 172_900

    await payout.reject_withdrawal(
        payout_pb2.RejectWithdrawalRequest(withdrawal_id=review.withdrawal_id, idempotency_key=uuid.uuid4().hex), "ops"
    )
    set_available(path, "creator-b", 0)  # repaid: the held one goes
    assert await payout.dispatch_once() == 1
    assert await status_of(payout, held) == payout_pb2.WITHDRAWAL_STATUS_PROCESSING
    await payout.dispatch_once()  # the gauges are read as each round begins
    for status in ("PENDING_REVIEW", "APPROVED"):
        assert waiting("livegifts_withdrawals_waiting", status) == 0
        assert waiting("livegifts_withdrawal_waiting_oldest_seconds", status) == 0


def reconciled(outcome: str) -> float:
    return REGISTRY.get_sample_value("livegifts_withdrawals_reconciled_total", {"outcome": outcome}) or 0.0


async def test_a_withdrawal_whose_callback_is_late_is_settled_from_the_providers_record(setup) -> None:  # type: ignore[no-untyped-def]
    payout, _provider, _path = setup
    paid = await approved_withdrawal(payout, "creator-a")
    failed = await approved_withdrawal(payout, "creator-b", "fail.invalid")
    assert await payout.dispatch_once() == 2  # handed over; no callback comes (auto_callback off)
    after_s = payout.settings.reconcile_after_s

    assert await payout.reconcile_once() == 0  # not late yet: nothing asked
    assert await status_of(payout, paid) == payout_pb2.WITHDRAWAL_STATUS_PROCESSING
    before = reconciled("paid"), reconciled("failed")

    later = now_us() + int((after_s + 1) * 1_000_000)
    assert await payout.reconcile_once(now=later) == 2
    assert await status_of(payout, paid) == payout_pb2.WITHDRAWAL_STATUS_PAID
    assert await status_of(payout, failed) == payout_pb2.WITHDRAWAL_STATUS_FAILED
    assert (reconciled("paid"), reconciled("failed")) == (before[0] + 1, before[1] + 1)
    a, b = await payout.get_earnings("creator-a"), await payout.get_earnings("creator-b")
    assert (a.diamonds_held, a.diamonds_withdrawn) == (0, 20_000)
    assert (b.diamonds_held, b.diamonds_available, b.diamonds_withdrawn) == (0, 20_000, 0)  # released

    # The callback, delivered after all, is the same event: nothing moves twice.
    row = await payout.get_withdrawal(paid)
    payload = dev_payout_payload(f"evt_{row.provider_ref}", "payout.paid", paid, row.net.amount_minor, "USD")
    again = await payout.handle_payout_event(
        payout_pb2.HandlePayoutEventRequest(provider="dev", payload=payload, signature=signing.sign(SECRET, payload))
    )
    assert again.duplicate
    assert (await payout.get_earnings("creator-a")).diamonds_withdrawn == 20_000
    assert await payout.reconcile_once(now=later) == 0  # nothing PROCESSING is left to ask about


async def test_the_development_provider_as_deployed_pays_no_withdrawal(tmp_path: Path) -> None:
    # The manifests deploy this adapter with a real webhook secret and send no money through it:
    # a transfer it reported settled (its callback at once, or the reconciler's look-up after
    # RECONCILE_AFTER_S) made the withdrawal PAID, the creator's diamonds consumed, no cash sent.
    defaults = PayoutSettings(
        database_url="sqlite+aiosqlite://",
        nats_url="nats://127.0.0.1:1",
        wallet_addr="127.0.0.1:1",
        payout_webhook_secret=SECRET.decode(),
    )
    # As payout's wiring built it before DEV_PROVIDER_SETTLES_PAYOUTS: the callback setting alone.
    token = await DevPayoutProvider(SECRET, 300, False).tokenize("BANK", "DE89370400440532013001")
    old_wiring = DevPayoutProvider(SECRET, 300, defaults.dev_provider_auto_callback)
    assert (await old_wiring.submit("wd_1", token, 9_500, "USD")).callback is None
    assert await old_wiring.status("po_dev_wd_1", "wd_1", token, 9_500, "USD") is None
    # As it builds it now.
    assert not defaults.dev_provider_settles_payouts
    deployed = DevPayoutProvider(
        SECRET,
        300,
        defaults.dev_provider_auto_callback,
        settles_payouts=defaults.dev_provider_settles_payouts,
    )
    submission = await deployed.submit("wd_1", token, 9_500, "USD")
    assert (submission.provider_ref, submission.callback) == ("po_dev_wd_1", None)  # no callback
    assert await deployed.status("po_dev_wd_1", "wd_1", token, 9_500, "USD") is None  # not known as paid
    # Even asked to call back, it settles nothing unless a dev suite says it settles transfers.
    assert (await DevPayoutProvider(SECRET, 300, True).submit("wd_1", token, 9_500, "USD")).callback is None
    with pytest.raises(ValidationError, match="dev_provider_auto_callback(.|\n)*DEV_PROVIDER_SETTLES_PAYOUTS"):
        PayoutSettings(
            **defaults.model_dump(include={"database_url", "nats_url", "wallet_addr"}),
            payout_webhook_secret=SECRET.decode(),
            dev_provider_auto_callback=True,
        )

    async with payout_on(f"sqlite+aiosqlite:///{tmp_path / 'payout.db'}") as (payout, _):
        payout.provider = deployed
        withdrawal_id = await approved_withdrawal(payout, "creator-a")
        assert await payout.dispatch_once() == 1
        still = reconciled("still_processing")
        assert await payout.reconcile_once(now=reconcile_due(payout)) == 0
        assert reconciled("still_processing") == still + 1
        assert await status_of(payout, withdrawal_id) == payout_pb2.WITHDRAWAL_STATUS_PROCESSING  # honestly unknown
        earnings = await payout.get_earnings("creator-a")
        assert (earnings.diamonds_held, earnings.diamonds_withdrawn) == (20_000, 0)


async def test_transfers_still_under_way_do_not_keep_the_reconciler_from_later_ones(tmp_path: Path) -> None:
    async with payout_on(f"sqlite+aiosqlite:///{tmp_path / 'payout.db'}") as (payout, _):
        provider = SlowProvider()
        payout.provider = provider
        payout.settings = payout.settings.model_copy(update={"reconcile_batch_size_max": 2})
        ids = [await approved_withdrawal(payout, f"creator-{i}") for i in range(3)]
        assert await payout.dispatch_once() == 3
        later = reconcile_due(payout)
        provider.done.add(ids[2])  # only the newest has settled at the provider

        still = reconciled("still_processing")
        assert await payout.reconcile_once(now=later) == 0
        assert sorted(provider.asked) == sorted(ids[:2])  # a full batch of the oldest, both under way
        assert reconciled("still_processing") == still + 2
        assert await payout.reconcile_once(now=later) == 1  # the next round goes on after them
        assert await status_of(payout, ids[2]) == payout_pb2.WITHDRAWAL_STATUS_PAID
        provider.asked.clear()
        assert await payout.reconcile_once(now=later) == 0  # and then starts again from the oldest
        assert sorted(provider.asked) == sorted(ids[:2])


async def test_an_outcome_that_does_not_match_the_withdrawal_is_refused_and_asked_again(tmp_path: Path) -> None:
    async with payout_on(f"sqlite+aiosqlite:///{tmp_path / 'payout.db'}") as (payout, _):
        provider = SlowProvider()
        payout.provider = provider
        withdrawal_id = await approved_withdrawal(payout, "creator-a")
        assert await payout.dispatch_once() == 1
        provider.done.add(withdrawal_id)
        provider.amount_minor = 1  # the provider reports a transfer of another amount
        later = reconcile_due(payout)
        refused = reconciled("refused")
        assert await payout.reconcile_once(now=later) == 0
        assert reconciled("refused") == refused + 1
        assert await status_of(payout, withdrawal_id) == payout_pb2.WITHDRAWAL_STATUS_PROCESSING  # held, not paid
        assert (await payout.get_earnings("creator-a")).diamonds_held == 20_000
        provider.asked.clear()
        await payout.reconcile_once(now=later)
        assert provider.asked == [withdrawal_id]  # asked again next round


async def test_an_outcome_a_callback_overtook_is_counted_as_settled_meanwhile_not_refused(tmp_path: Path) -> None:
    path = tmp_path / "payout.db"
    async with payout_on(f"sqlite+aiosqlite:///{path}") as (payout, _):
        provider = SlowProvider()
        payout.provider = provider
        withdrawal_id = await approved_withdrawal(payout, "creator-a")
        assert await payout.dispatch_once() == 1
        provider.done.add(withdrawal_id)  # the look-up will say PAID ...
        real_status = provider.status

        async def overtaken(*args):  # type: ignore[no-untyped-def]
            # ... but the provider's own callback, FAILED under another event id, commits first.
            with sqlite3.connect(path) as conn:
                conn.execute("UPDATE withdrawals SET status = 'FAILED' WHERE withdrawal_id = ?", (withdrawal_id,))
            return await real_status(*args)

        provider.status = overtaken  # type: ignore[method-assign]
        later = reconcile_due(payout)
        meanwhile, refused = reconciled("settled_meanwhile"), reconciled("refused")
        assert await payout.reconcile_once(now=later) == 0
        assert await status_of(payout, withdrawal_id) == payout_pb2.WITHDRAWAL_STATUS_FAILED
        assert (reconciled("settled_meanwhile"), reconciled("refused")) == (meanwhile + 1, refused)


# ---- a provider that is slow, hangs or fails -----------------------------------------------

DEADLINE_S = 0.2  # PROVIDER_TIMEOUT_S in these tests: a call that hangs ends this soon
GUARD_S = 30.0  # only so that a deadlock fails the test instead of hanging it; never reached


def failures(call: str, outcome: str) -> float:
    labels = {"provider": "dev", "call": call, "outcome": outcome}
    return REGISTRY.get_sample_value("livegifts_provider_call_failures_total", labels) or 0.0


def stuck_provider(payout: Payout, how: str) -> StuckProvider:
    """A StuckProvider whose stuck calls `how` (hang or fail) in use, with the short deadline."""
    assert payout.settings is not None
    payout.provider = provider = StuckProvider(how)
    payout.settings = payout.settings.model_copy(update={"provider_timeout_s": DEADLINE_S})
    return provider


async def stuck_and_fine(payout: Payout, how: str) -> tuple[StuckProvider, str, str]:
    """A stuck_provider(payout, how), and creator-a's and creator-b's approved withdrawals (the
    test says which of them the provider is stuck on, and when)."""
    provider = stuck_provider(payout, how)
    return provider, await approved_withdrawal(payout, "creator-a"), await approved_withdrawal(payout, "creator-b")


@pytest.mark.parametrize("how,outcome", [("hang", "timeout"), ("fail", "error")])
async def test_a_submission_that_hangs_or_fails_leaves_its_withdrawal_claimed_and_the_round_goes_on(  # type: ignore[no-untyped-def]
    setup, caplog, how: str, outcome: str
) -> None:
    payout, _provider, _path = setup
    provider, stuck, fine = await stuck_and_fine(payout, how)
    provider.stuck.add(stuck)
    counted = failures("submit", outcome)

    with caplog.at_level(logging.WARNING, logger="services.payout.usecases"):
        assert await payout.dispatch_once() == 1  # the one the provider took; the round went on
    # Claimed before it was submitted, so on its way whatever the provider did: PROCESSING with no
    # provider reference yet, never rejected by an operator, never looked up by the reconciler.
    row = await payout.get_withdrawal(stuck)
    assert (row.status, row.provider_ref) == (payout_pb2.WITHDRAWAL_STATUS_PROCESSING, "")
    assert await status_of(payout, fine) == payout_pb2.WITHDRAWAL_STATUS_PROCESSING
    assert failures("submit", outcome) == counted + 1
    assert [r.withdrawal_id for r in caplog.records if hasattr(r, "withdrawal_id")] == [stuck]
    assert (await payout.get_earnings("creator-a")).diamonds_held == 20_000  # still held for it
    later = reconcile_due(payout)
    asked = len(provider.asked)
    await payout.reconcile_once(now=later)
    assert stuck not in provider.asked[asked:]  # the dispatcher hands it over, not the reconciler

    provider.stuck.clear()  # the provider answers again: the next round submits it
    assert await payout.dispatch_once() == 1
    row = await payout.get_withdrawal(stuck)
    assert (row.status, row.provider_ref) == (payout_pb2.WITHDRAWAL_STATUS_PROCESSING, f"po_dev_{stuck}")


async def test_a_withdrawal_the_provider_keeps_failing_is_logged_at_once_then_once_per_interval(  # type: ignore[no-untyped-def]
    setup, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A round every 0.2 s, each submitting the claimed withdrawal again: while the provider failed
    # it (an outage answering at once), each round logged a line for every such withdrawal, five a
    # second for each; every failure is still counted in livegifts_provider_call_failures_total.
    from services.common import loops, throttle

    now = [1000.0]
    monkeypatch.setattr(throttle.time, "monotonic", lambda: now[0])
    payout, _provider, _path = setup
    provider = stuck_provider(payout, "fail")
    stuck = await approved_withdrawal(payout, "creator-a")
    provider.stuck.add(stuck)
    counted = failures("submit", "error")
    line = "the payout provider did not take a withdrawal"
    with caplog.at_level(logging.WARNING, logger="services.payout.usecases"):
        for _ in range(3):
            assert await payout.dispatch_once() == 0
        now[0] += loops.FAILURE_LOG_INTERVAL_S
        assert await payout.dispatch_once() == 0
    assert failures("submit", "error") == counted + 4
    lines = [r for r in caplog.records if r.getMessage().startswith(line)]
    assert [(r.withdrawal_id, r.retries) for r in lines] == [(stuck, 1), (stuck, 3)]  # type: ignore[attr-defined]


async def test_a_dispatcher_stopped_mid_round_hands_the_provider_no_withdrawal_after_the_one_in_hand(
    tmp_path: Path,
) -> None:
    # A SIGTERM during a round: the loop finishes its round, and the round went on handing new
    # withdrawals to the provider for the whole shutdown grace, and could be cancelled in the
    # middle of one. The submission under way finishes; the rest wait for the next process.
    async with payout_on(f"sqlite+aiosqlite:///{tmp_path / 'payout.db'}") as (payout, provider):
        first, *later = [await approved_withdrawal(payout, f"creator-{n}") for n in range(3)]
        stop = asyncio.Event()
        provider.on_submit.append(stop.set)  # the SIGTERM lands while the first is submitted
        async with asyncio.timeout(GUARD_S):
            await payout.dispatcher(stop)
        assert provider.submitted == [first]
        assert await status_of(payout, first) == payout_pb2.WITHDRAWAL_STATUS_PROCESSING
        for withdrawal_id in later:
            assert await status_of(payout, withdrawal_id) == payout_pb2.WITHDRAWAL_STATUS_APPROVED
        assert await payout.dispatch_once() == 2  # the next process's round: from the first left


async def test_other_work_goes_on_while_a_submission_waits_for_the_provider(tmp_path: Path) -> None:
    # One pooled connection: a submission that held it (or SQLite's write lock) would stop the rest.
    async with payout_on(f"sqlite+aiosqlite:///{tmp_path / 'payout.db'}", pool_size=1) as (payout, _):
        provider = StuckProvider()
        payout.provider = provider  # the default deadline (10 s): the gate opens long before it
        slow = await approved_withdrawal(payout, "creator-a")
        provider.stuck.add(slow)
        round_ = asyncio.create_task(payout.dispatch_once())
        entered = asyncio.create_task(provider.entered.wait())
        await asyncio.wait({round_, entered}, timeout=GUARD_S, return_when=asyncio.FIRST_COMPLETED)
        entered.cancel()
        assert not round_.done(), "the round ended before the provider answered"

        # While the provider has not answered: another creator is credited, adds and verifies a
        # method and requests a withdrawal (writes), and reads earnings, on the same event loop.
        async with asyncio.timeout(GUARD_S):
            other = await approved_withdrawal(payout, "creator-b")
            earnings = await payout.get_earnings("creator-b")
        assert earnings.diamonds_held == 20_000
        assert not round_.done()

        provider.gate.set()
        async with asyncio.timeout(GUARD_S):
            assert await round_ == 1
        assert await status_of(payout, slow) == payout_pb2.WITHDRAWAL_STATUS_PROCESSING
        assert await payout.dispatch_once() == 1  # the one requested meanwhile: the next round's
        assert await status_of(payout, other) == payout_pb2.WITHDRAWAL_STATUS_PROCESSING


@pytest.mark.parametrize("how,outcome", [("hang", "timeout"), ("fail", "error")])
async def test_a_look_up_that_hangs_or_fails_is_counted_and_asked_again_next_round(  # type: ignore[no-untyped-def]
    setup, caplog, how: str, outcome: str
) -> None:
    payout, _provider, _path = setup
    provider, stuck, fine = await stuck_and_fine(payout, how)
    assert await payout.dispatch_once() == 2  # handed over; no callback comes (auto_callback off)
    provider.done.update({stuck, fine})  # both settled (PAID) at the provider ...
    provider.stuck.add(stuck)  # ... but asking about one hangs or fails
    later = reconcile_due(payout)
    counted, errors = reconciled("provider_error"), failures("status", outcome)

    with caplog.at_level(logging.WARNING, logger="services.payout.usecases"):
        assert await payout.reconcile_once(now=later) == 1  # the other one is settled
    assert await status_of(payout, stuck) == payout_pb2.WITHDRAWAL_STATUS_PROCESSING
    assert await status_of(payout, fine) == payout_pb2.WITHDRAWAL_STATUS_PAID
    assert (reconciled("provider_error"), failures("status", outcome)) == (counted + 1, errors + 1)
    # Under payout's logger as before late_lookups took the look-up out of it: a log search or a
    # level set by logger name still finds the line.
    assert [(r.name, r.withdrawal_id) for r in caplog.records if hasattr(r, "withdrawal_id")] == [
        ("services.payout.usecases", stuck)
    ]

    provider.stuck.clear()
    provider.asked.clear()
    assert await payout.reconcile_once(now=later) == 1  # asked again, and settled this time
    assert provider.asked == [stuck]
    assert await status_of(payout, stuck) == payout_pb2.WITHDRAWAL_STATUS_PAID


@pytest.mark.parametrize("how,outcome", [("hang", "timeout"), ("fail", "error")])
async def test_a_payout_method_the_provider_cannot_vault_is_unavailable_and_writes_nothing(  # type: ignore[no-untyped-def]
    setup, how: str, outcome: str
) -> None:
    payout, _provider, _path = setup
    provider = stuck_provider(payout, how)
    provider.stuck.add("creator-a@example.com")
    counted = failures("tokenize", outcome)

    with pytest.raises(Unavailable) as refused:
        await payout.add_payout_method(method_request("creator-a", "method-1"))
    assert refused.value.reason == "PAYOUT_PROVIDER_UNAVAILABLE"
    assert failures("tokenize", outcome) == counted + 1
    assert not (await payout.list_payout_methods(payout_pb2.ListPayoutMethodsRequest(creator_id="creator-a"))).methods
    async with payout.db.unit_of_work(readonly=True) as uow:  # the key was not taken either
        keys = (await uow.conn.execute(select(func.count()).select_from(common.idempotency))).scalar_one()
    assert keys == 0

    provider.stuck.clear()  # the retry, once the provider answers, adds it
    added = await payout.add_payout_method(method_request("creator-a", "method-1"))
    assert [
        m.method_id
        for m in (await payout.list_payout_methods(payout_pb2.ListPayoutMethodsRequest(creator_id="creator-a"))).methods
    ] == [added.method_id]


async def test_a_retried_payout_method_is_answered_from_its_record_without_asking_the_provider(setup) -> None:  # type: ignore[no-untyped-def]
    payout, _provider, _path = setup
    provider = stuck_provider(payout, "fail")
    added = await payout.add_payout_method(method_request("creator-a", "method-1"))
    provider.stuck.add("creator-a@example.com")  # the provider is down now
    assert await payout.add_payout_method(method_request("creator-a", "method-1")) == added
    assert not provider.entered.is_set()


async def test_a_payout_methods_key_record_cannot_be_used_to_guess_the_account(setup) -> None:  # type: ignore[no-untyped-def]
    # The record was a plain SHA-256 of the request: whoever reads the database knows all of it but
    # the account (the creator, the currency, the mask), so trying e-mail names or account numbers
    # until one hashes to the record recovered the full account the vault was there to keep out.
    from services.common.idempotency import request_hash

    payout, _provider, _path = setup
    request = method_request("creator-a", "method-1")
    added = await payout.add_payout_method(request)
    async with payout.db.unit_of_work(readonly=True) as uow:
        stored = (await uow.conn.execute(select(common.idempotency.c.request_hash))).scalar_one()
    assert stored != request_hash(request)  # a guess of the account cannot be checked against it
    assert await payout.add_payout_method(request) == added  # a retry still gets its first answer
    other = method_request("creator-a", "method-1")
    other.paypal_email = "someone-else@example.com"
    with pytest.raises(AlreadyExists):
        await payout.add_payout_method(other)


async def test_held_creators_do_not_keep_the_dispatcher_from_later_withdrawals(  # type: ignore[no-untyped-def]
    setup,
) -> None:
    # A round reads at most DISPATCH_BATCH_SIZE_MAX withdrawals, oldest first: those of creators
    # it holds (not asked again until DISPATCH_HOLD_RECHECK_S) must not fill every round, or the
    # withdrawals requested after them would never be submitted.
    payout, provider, _path = setup
    assert payout.settings is not None
    payout.settings = payout.settings.model_copy(update={"dispatch_batch_size_max": 1})
    held = await approved_withdrawal(payout, "creator-a")
    later = await approved_withdrawal(payout, "creator-b")
    wallet = EligibilityWallet()
    wallet.blocked.add("creator-a")
    payout.wallet = wallet

    for _ in range(3):
        await payout.dispatch_once()
    assert provider.submitted == [later]
    assert await status_of(payout, held) == payout_pb2.WITHDRAWAL_STATUS_APPROVED


async def test_a_withdrawal_the_provider_refuses_for_good_fails_and_its_diamonds_come_back(setup) -> None:  # type: ignore[no-untyped-def]
    payout, _provider, _path = setup
    provider = RefusingProvider()
    payout.provider = provider
    refused = await approved_withdrawal(payout, "creator-a")
    fine = await approved_withdrawal(payout, "creator-b")
    provider.refused.add(refused)
    counted = failures("submit", "refused")

    assert await payout.dispatch_once() == 1  # the other one went
    row = await payout.get_withdrawal(refused)
    assert row.status == payout_pb2.WITHDRAWAL_STATUS_FAILED
    assert row.failure_reason == "refused by the provider: account closed"
    earnings = await payout.get_earnings("creator-a")
    assert (earnings.diamonds_available, earnings.diamonds_held) == (20_000, 0)  # released, as FAILED does
    assert await day_gross(payout, "creator-a") == [0]  # the day's maximum too
    assert failures("submit", "refused") == counted + 1
    o = common.outbox.c
    async with payout.db.unit_of_work(readonly=True) as uow:
        subjects = list((await uow.conn.execute(select(o.subject).order_by(o.id))).scalars())
    assert subjects.count("payout.withdrawal.failed") == 1
    assert await payout.dispatch_once() == 0 and provider.submitted == [refused, fine]  # not asked again
    assert await status_of(payout, fine) == payout_pb2.WITHDRAWAL_STATUS_PROCESSING


async def test_a_callback_whose_amount_differs_from_the_withdrawal_is_refused_and_logged(  # type: ignore[no-untyped-def]
    setup, caplog: pytest.LogCaptureFixture
) -> None:
    """The provider says it moved another amount than we sent: nothing is applied, every retry is
    refused, and the log says so at once (the reconciler would only after RECONCILE_AFTER_S, and
    never with it 0), as the wallet's payment callbacks do."""
    payout, _provider, _path = setup
    withdrawal_id = await approved_withdrawal(payout, "creator-a")
    assert await payout.dispatch_once() == 1
    row = await payout.get_withdrawal(withdrawal_id)
    before = await payout.get_earnings("creator-a")

    def callback(amount: int, currency: str) -> payout_pb2.HandlePayoutEventRequest:
        payload = dev_payout_payload("evt-odd", "payout.paid", withdrawal_id, amount, currency)
        return payout_pb2.HandlePayoutEventRequest(
            provider="dev", payload=payload, signature=signing.sign(SECRET, payload)
        )

    for amount, currency in ((row.net.amount_minor + 1, "USD"), (row.net.amount_minor, "EUR")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="services.payout.usecases"):
            with pytest.raises(InvalidArgument) as err:
                await payout.handle_payout_event(callback(amount, currency))
        assert err.value.reason == "AMOUNT_MISMATCH"
        (record,) = [r for r in caplog.records if "amount or currency differs" in r.getMessage()]
        assert record.withdrawal_id == withdrawal_id  # type: ignore[attr-defined]
        assert record.provider_event_id == "evt-odd"  # type: ignore[attr-defined]
        assert (record.amount_minor, record.currency_code) == (amount, currency)  # type: ignore[attr-defined]
        assert record.withdrawal_net_minor == row.net.amount_minor  # type: ignore[attr-defined]
    assert await status_of(payout, withdrawal_id) == payout_pb2.WITHDRAWAL_STATUS_PROCESSING
    assert await payout.get_earnings("creator-a") == before
    # The event id was not recorded: the provider's corrected event under it applies.
    done = await payout.handle_payout_event(callback(row.net.amount_minor, "USD"))
    assert done.withdrawal.status == payout_pb2.WITHDRAWAL_STATUS_PAID and not done.duplicate


async def _handed_over_oldest_first(payout: Payout, n: int) -> list[str]:
    """`n` withdrawals handed to a SlowProvider (in use) that calls them all settled, PROCESSING
    since one after another, oldest first."""
    ids = [await approved_withdrawal(payout, f"creator-{i}") for i in range(n)]
    assert await payout.dispatch_once() == n
    base = now_us()
    async with payout.db.unit_of_work() as uow:
        for i, withdrawal_id in enumerate(ids):
            await uow.conn.execute(
                update(withdrawals).where(withdrawals.c.withdrawal_id == withdrawal_id).values(updated_at_us=base + i)
            )
        await uow.commit()
    payout.provider.done.update(ids)  # type: ignore[union-attr]
    return ids


async def test_a_withdrawal_whose_outcome_always_fails_to_apply_keeps_no_other_from_being_settled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Applying one withdrawal's outcome raised an error of its own (a bug, a constraint it
    # breaks), not a domain error: the round ended there, after its cursor had moved past the
    # batch, and the same withdrawals came in the same batches each pass: the one after it in its
    # batch was never looked up again, PROCESSING with its diamonds held for ever.
    async with payout_on(f"sqlite+aiosqlite:///{tmp_path / 'payout.db'}") as (payout, _):
        payout.provider = SlowProvider()
        payout.settings = payout.settings.model_copy(update={"reconcile_batch_size_max": 2})  # type: ignore[union-attr]
        broken, paid, later = await _handed_over_oldest_first(payout, 3)
        handle = payout.handle_payout_event

        async def fails_for_one(req: payout_pb2.HandlePayoutEventRequest) -> object:
            if broken.encode() in req.payload:
                raise ValueError("a bug met by this withdrawal's outcome")
            return await handle(req)

        monkeypatch.setattr(payout, "handle_payout_event", fails_for_one)
        errors = reconciled("error")
        with caplog.at_level(logging.WARNING, logger="services.payout.usecases"):
            # A pass of two rounds, and the first of the next; none raises for the broken one.
            settled = [await payout.reconcile_once(now=reconcile_due(payout)) for _ in range(3)]
        assert settled == [1, 1, 0], settled  # paid with the broken one, later, then the broken one alone
        assert await status_of(payout, paid) == payout_pb2.WITHDRAWAL_STATUS_PAID
        assert await status_of(payout, later) == payout_pb2.WITHDRAWAL_STATUS_PAID
        assert await status_of(payout, broken) == payout_pb2.WITHDRAWAL_STATUS_PROCESSING
        assert reconciled("error") == errors + 2, "the broken one counted each time it was asked"
        lines = [r for r in caplog.records if r.getMessage().startswith("a late withdrawal could not be reconciled")]
        # Once: the next failures of the same withdrawal within 30 s are counted on its next line.
        assert [r.withdrawal_id for r in lines] == [broken]  # type: ignore[attr-defined]


async def test_a_reconcile_round_the_database_fails_midway_starts_the_next_from_where_it_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The database went while a round applied its batch's second outcome: the round ends (each
    # withdrawal would fail alike), but its cursor had moved past the batch, so the next round
    # began after it and the withdrawal it failed at waited for the next pass.
    from sqlalchemy import exc as sa_exc

    async with payout_on(f"sqlite+aiosqlite:///{tmp_path / 'payout.db'}") as (payout, _):
        payout.provider = provider = SlowProvider()
        payout.settings = payout.settings.model_copy(update={"reconcile_batch_size_max": 2})  # type: ignore[union-attr]
        first, second, third = await _handed_over_oldest_first(payout, 3)
        handle = payout.handle_payout_event
        outage = [second]

        async def database_gone_once(req: payout_pb2.HandlePayoutEventRequest) -> object:
            if outage and outage[0].encode() in req.payload:
                outage.clear()
                raise sa_exc.OperationalError("UPDATE withdrawals", {}, Exception("could not connect to server"))
            return await handle(req)

        monkeypatch.setattr(payout, "handle_payout_event", database_gone_once)
        with pytest.raises(sa_exc.OperationalError):
            await payout.reconcile_once(now=reconcile_due(payout))
        assert await payout.reconcile_once(now=reconcile_due(payout)) == 2  # where it failed, then the next
        assert provider.asked == [first, second, second, third]


async def test_a_reconciler_stopped_mid_round_asks_the_provider_about_no_withdrawal_after_the_one_in_hand(
    tmp_path: Path,
) -> None:
    # A SIGTERM during a round: the loop finishes its round within the shutdown grace, and the
    # round went on looking up each late withdrawal of its batch, up to PROVIDER_TIMEOUT_S each
    # against a slow provider, and was cancelled in the middle of one. The look-up under way
    # finishes; the rest wait for the next round (the next process's), from the first left.
    async with payout_on(f"sqlite+aiosqlite:///{tmp_path / 'payout.db'}") as (payout, _):
        payout.provider = provider = SlowProvider()
        first, *rest = await _handed_over_oldest_first(payout, 3)
        # Late at once (the loop asks by the time now): 0 would turn the look-ups off.
        payout.settings = payout.settings.model_copy(update={"reconcile_after_s": 1e-6})  # type: ignore[union-attr]
        stop = asyncio.Event()
        ask = provider.status

        async def stopped_meanwhile(*args: object) -> object:
            stop.set()  # the SIGTERM lands while the first is looked up
            return await ask(*args)

        provider.status = stopped_meanwhile  # type: ignore[method-assign]
        async with asyncio.timeout(GUARD_S):
            await payout.reconciler(stop)
        assert provider.asked == [first]
        assert await status_of(payout, first) == payout_pb2.WITHDRAWAL_STATUS_PAID
        for withdrawal_id in rest:
            assert await status_of(payout, withdrawal_id) == payout_pb2.WITHDRAWAL_STATUS_PROCESSING
        assert await payout.reconcile_once() == 2
        assert provider.asked == [first, *rest]


async def test_a_withdrawal_whose_reference_cannot_be_stored_keeps_no_other_from_the_provider(  # type: ignore[no-untyped-def]
    setup, caplog: pytest.LogCaptureFixture
) -> None:
    # The oldest withdrawal's reference could not be stored, every round (the provider answers
    # one its column does not hold: PostgreSQL's 22001, here a trigger's refusal): the round ended
    # at it, and as each round starts from the oldest, no withdrawal after it reached the provider.
    payout, provider, path = setup
    stuck = await approved_withdrawal(payout, "creator-a")
    other = await approved_withdrawal(payout, "creator-b")
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TRIGGER refuse_ref BEFORE UPDATE OF provider_ref ON withdrawals "
            f"WHEN NEW.provider_ref != '' AND NEW.withdrawal_id = '{stuck}' "
            "BEGIN SELECT RAISE(ABORT, 'value too long for type character varying(128)'); END"
        )
    with caplog.at_level(logging.WARNING, logger="services.payout.usecases"):
        submitted = [await payout.dispatch_once() for _ in range(2)]  # neither raises for the stuck one
    assert submitted == [1, 0], submitted  # the other, then the stuck one alone again (not counted)
    assert await status_of(payout, other) == payout_pb2.WITHDRAWAL_STATUS_PROCESSING
    assert other in provider.submitted
    assert provider.submitted.count(stuck) == 2, "claimed, it is submitted again each round"
    lines = [r for r in caplog.records if r.getMessage().startswith("a withdrawal was not handed to the provider")]
    # Once: the dispatcher tries every 0.2 s, and its next failures are counted on a line 30 s on.
    assert [r.withdrawal_id for r in lines] == [stuck]  # type: ignore[attr-defined]


async def _requested_one_after_another(payout: Payout, ids: Sequence[str]) -> None:
    """`ids` requested one microsecond after another, in that order."""
    base = now_us()
    async with payout.db.unit_of_work() as uow:
        for i, withdrawal_id in enumerate(ids):
            await uow.conn.execute(
                update(withdrawals).where(withdrawals.c.withdrawal_id == withdrawal_id).values(requested_at_us=base + i)
            )
        await uow.commit()


async def test_a_full_batch_of_withdrawals_that_fail_keeps_no_later_one_from_the_provider(  # type: ignore[no-untyped-def]
    setup,
) -> None:
    # A round reads DISPATCH_BATCH_SIZE_MAX withdrawals, oldest first: a full batch of them each
    # failing on its own (here a trigger refusing their references) was read again every round,
    # and no withdrawal requested after them ever reached the provider.
    payout, provider, path = setup
    payout.settings = payout.settings.model_copy(update={"dispatch_batch_size_max": 2})
    ids = [await approved_withdrawal(payout, f"creator-{i}") for i in range(3)]
    await _requested_one_after_another(payout, ids)
    stuck = "', '".join(ids[:2])
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TRIGGER refuse_ref BEFORE UPDATE OF provider_ref ON withdrawals "
            f"WHEN NEW.provider_ref != '' AND NEW.withdrawal_id IN ('{stuck}') "
            "BEGIN SELECT RAISE(ABORT, 'value too long for type character varying(128)'); END"
        )
    assert await payout.dispatch_once() == 0  # the full batch, each failing
    assert await payout.dispatch_once() == 1  # after it: the later one
    assert await status_of(payout, ids[2]) == payout_pb2.WITHDRAWAL_STATUS_PROCESSING
    assert provider.submitted == ids
    # That batch was short: the next round starts from the oldest again.
    provider.submitted.clear()
    assert await payout.dispatch_once() == 0
    assert provider.submitted == ids[:2]


async def test_a_dispatch_round_the_database_ends_is_taken_up_by_the_next_from_where_it_ended(  # type: ignore[no-untyped-def]
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The round had read a full batch, so its cursor had moved past it: the database going at
    # its second withdrawal must not leave that one for the next pass over every withdrawal.
    from sqlalchemy import exc as sa_exc

    payout, provider, _path = setup
    payout.settings = payout.settings.model_copy(update={"dispatch_batch_size_max": 2})
    ids = [await approved_withdrawal(payout, f"creator-{i}") for i in range(3)]
    await _requested_one_after_another(payout, ids)
    hand_over = payout._hand_over
    outage = [ids[1]]

    async def database_gone_once(row, unsubmitted):  # type: ignore[no-untyped-def]
        if outage and row.withdrawal_id == outage[0]:
            outage.clear()
            raise sa_exc.OperationalError("UPDATE withdrawals", {}, Exception("could not connect to server"))
        return await hand_over(row, unsubmitted)

    monkeypatch.setattr(payout, "_hand_over", database_gone_once)
    with pytest.raises(sa_exc.OperationalError):
        await payout.dispatch_once()
    assert await payout.dispatch_once() == 2  # where it ended, then the later one
    assert provider.submitted == ids


async def test_a_dispatch_round_the_database_ends_at_a_dev_callback_is_taken_up_after_that_withdrawal(  # type: ignore[no-untyped-def]
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The dev provider's callback (auto_callback) meets the database gone after the first
    # withdrawal was submitted: the round ends, and the next starts after that one, not after
    # the whole batch it had read (the second waited for the next pass over every withdrawal).
    from sqlalchemy import exc as sa_exc

    payout, provider, _path = setup
    payout.settings = payout.settings.model_copy(update={"dispatch_batch_size_max": 2})
    provider.auto_callback = True
    ids = [await approved_withdrawal(payout, f"creator-{i}") for i in range(3)]
    await _requested_one_after_another(payout, ids)
    handle = payout.handle_payout_event
    outage = [True]

    async def database_gone_once(req):  # type: ignore[no-untyped-def]
        if outage:
            outage.clear()
            raise sa_exc.OperationalError("UPDATE withdrawals", {}, Exception("could not connect to server"))
        return await handle(req)

    monkeypatch.setattr(payout, "handle_payout_event", database_gone_once)
    with pytest.raises(sa_exc.OperationalError):
        await payout.dispatch_once()
    assert provider.submitted == ids[:1]
    assert await payout.dispatch_once() == 2  # after the one submitted: the second, then the third
    assert provider.submitted == ids
