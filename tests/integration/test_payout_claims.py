"""Payout's dispatcher claims a withdrawal before the provider is asked, holding the creator's row
(PostgreSQL `FOR SHARE`): a clawback whose transaction is still open when the claim reads the
balance is waited for, and holds the withdrawal, instead of being missed by a read that sees only
what had committed.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import text

from livegifts.payout.v1 import payout_pb2
from services.payout.usecases import Payout
from tests.unit.test_payout_dispatch import approved_withdrawal, payout_on, status_of

GUARD_S = 20


@pytest.mark.parametrize("empty_database", ["postgres"], indirect=True)
async def test_a_clawback_still_committing_when_the_dispatcher_claims_holds_the_withdrawal(empty_database: str) -> None:
    async with payout_on(empty_database, pool_size=3) as (payout, provider):
        withdrawal_id = await approved_withdrawal(payout, "creator-a")
        async with payout.db.engine.connect() as clawback:
            # A reversal's clawback has taken the creator below zero and not committed yet.
            await clawback.execute(text("UPDATE creators SET diamonds_available = -1 WHERE creator_id = 'creator-a'"))
            round_ = asyncio.create_task(payout.dispatch_once())
            waiting = text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            deadline = time.monotonic() + GUARD_S
            async with payout.db.engine.connect() as probe:
                while not round_.done() and time.monotonic() < deadline:
                    if (await probe.execute(waiting)).scalar_one():
                        break  # the claim waits for the clawback's row
                    await asyncio.sleep(0.02)
            assert not round_.done(), "the round ended without waiting for the clawback in flight"
            await clawback.commit()
        async with asyncio.timeout(GUARD_S):
            assert await round_ == 0
        assert provider.submitted == []
        assert await status_of(payout, withdrawal_id) == payout_pb2.WITHDRAWAL_STATUS_APPROVED  # held, not lost


@pytest.mark.parametrize("empty_database", ["postgres"], indirect=True)
async def test_a_failed_verification_still_committing_when_the_dispatcher_claims_holds_the_withdrawal(
    empty_database: str,
) -> None:
    async with payout_on(empty_database, pool_size=3) as (payout, provider):
        withdrawal_id = await approved_withdrawal(payout, "creator-a")
        method_id = (await payout.get_withdrawal(withdrawal_id)).method_id
        async with payout.db.engine.connect() as kyc:
            # An operator marks the method FAILED (KYC) and has not committed yet.
            await kyc.execute(
                text("UPDATE payout_methods SET verification = 'FAILED' WHERE method_id = :m"), {"m": method_id}
            )
            round_ = asyncio.create_task(payout.dispatch_once())
            waiting = text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            deadline = time.monotonic() + GUARD_S
            async with payout.db.engine.connect() as probe:
                while not round_.done() and time.monotonic() < deadline:
                    if (await probe.execute(waiting)).scalar_one():
                        break  # the claim waits for the method's row
                    await asyncio.sleep(0.02)
            assert not round_.done(), "the round ended without waiting for the verification in flight"
            await kyc.commit()
        async with asyncio.timeout(GUARD_S):
            assert await round_ == 0
        assert provider.submitted == []
        assert await status_of(payout, withdrawal_id) == payout_pb2.WITHDRAWAL_STATUS_APPROVED  # held, not paid


@pytest.mark.parametrize("empty_database", ["postgres"], indirect=True)
async def test_a_rejection_and_a_claim_of_the_same_withdrawal_at_once_do_not_deadlock(
    empty_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # RejectWithdrawal takes the withdrawal's row, then the creator's (releasing the diamonds), as
    # a callback does; a claim that took them the other way round would wait for each other, and
    # PostgreSQL would abort one of them (deadlock detected).
    async with payout_on(empty_database, pool_size=4) as (payout, provider):
        withdrawal_id = await approved_withdrawal(payout, "creator-a")
        moved, go = asyncio.Event(), asyncio.Event()
        release = Payout._release

        async def paused_release(self: Payout, uow, row) -> None:  # type: ignore[no-untyped-def]
            moved.set()  # the withdrawal's row is taken (REJECTED, not committed)
            await go.wait()
            await release(self, uow, row)

        monkeypatch.setattr(Payout, "_release", paused_release)
        reject = asyncio.create_task(
            payout.reject_withdrawal(
                payout_pb2.RejectWithdrawalRequest(withdrawal_id=withdrawal_id, reason="fraud", idempotency_key="r-1"),
                "ops",
            )
        )
        async with asyncio.timeout(GUARD_S):
            await moved.wait()
        round_ = asyncio.create_task(payout.dispatch_once())
        waiting = text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        deadline = time.monotonic() + GUARD_S
        async with payout.db.engine.connect() as probe:
            while not round_.done() and time.monotonic() < deadline:
                if (await probe.execute(waiting)).scalar_one():
                    break  # the claim waits for the rejection
                await asyncio.sleep(0.02)
        go.set()
        async with asyncio.timeout(GUARD_S):
            rejected = await reject
            assert await round_ == 0
        assert rejected.status == payout_pb2.WITHDRAWAL_STATUS_REJECTED
        assert provider.submitted == []
        earnings = await payout.get_earnings("creator-a")
        assert (earnings.diamonds_available, earnings.diamonds_held) == (20_000, 0)
