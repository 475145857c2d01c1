"""Payout's dispatcher claims a withdrawal before the provider is asked, holding the creator's row
(PostgreSQL `FOR SHARE`): a clawback whose transaction is still open when the claim reads the
balance is waited for, and holds the withdrawal, instead of being missed by a read that sees only
what had committed.

Every replica runs a dispatcher over the one database: a withdrawal one of them is handing to the
provider is not handed over by another meanwhile, and one whose replica died on the way is.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import TextClause, event, func, select, text
from sqlalchemy.util import await_

from livegifts.payout.v1 import payout_pb2
from services.common import signing
from services.payout.config import PayoutSettings
from services.payout.providers import Submission, dev_payout_payload
from services.payout.storage import common
from services.payout.usecases import DISPATCH_LOOP, Payout
from tests.integration.helpers import ReplicasAsking
from tests.integration.pglocks import wait_for_a_lock_waiter_or_the_end
from tests.support.payout import (
    SECRET,
    RecordingProvider,
    RefusingProvider,
    SlowProvider,
    StuckProvider,
    approved_withdrawal,
    payout_on,
    reconcile_due,
    status_of,
)

GUARD_S = 20
SQLITE_VARIABLES_MAX = 32_766


@contextlib.asynccontextmanager
async def _two_replicas(url: str) -> AsyncIterator[tuple[Payout, Payout, RecordingProvider]]:
    """Two replicas of payout over the database at `url`: the first, the second and the second's provider."""
    async with payout_on(url, pool_size=3) as (first, _), payout_on(url, pool_size=3) as (second, other):
        yield first, second, other


async def a_round_while_uncommitted(payout: Payout, write: TextClause, params: dict[str, str], what: str) -> None:
    """A dispatcher round started while another transaction holds `write` uncommitted: the claim
    must wait for it, not read past it; once it commits, the round ends having paid nothing."""
    async with payout.db.engine.connect() as writer:
        await writer.execute(write, params)
        round_ = asyncio.create_task(payout.dispatch_once())
        await wait_for_a_lock_waiter_or_the_end(payout.db, round_, GUARD_S)
        assert not round_.done(), f"the round ended without waiting for {what} in flight"
        await writer.commit()
    async with asyncio.timeout(GUARD_S):
        assert await round_ == 0


@pytest.mark.parametrize("empty_database", ["postgres"], indirect=True)
async def test_a_clawback_still_committing_when_the_dispatcher_claims_holds_the_withdrawal(empty_database: str) -> None:
    async with payout_on(empty_database, pool_size=3) as (payout, provider):
        withdrawal_id = await approved_withdrawal(payout, "creator-a")
        # A reversal's clawback has taken the creator below zero and not committed yet.
        clawback = text("UPDATE creators SET diamonds_available = -1 WHERE creator_id = 'creator-a'")
        await a_round_while_uncommitted(payout, clawback, {}, "the clawback")
        assert provider.submitted == []
        assert await status_of(payout, withdrawal_id) == payout_pb2.WITHDRAWAL_STATUS_APPROVED  # held, not lost


@pytest.mark.parametrize("empty_database", ["postgres"], indirect=True)
async def test_a_failed_verification_still_committing_when_the_dispatcher_claims_holds_the_withdrawal(
    empty_database: str,
) -> None:
    async with payout_on(empty_database, pool_size=3) as (payout, provider):
        withdrawal_id = await approved_withdrawal(payout, "creator-a")
        method_id = (await payout.get_withdrawal(withdrawal_id)).method_id
        # An operator marks the method FAILED (KYC) and has not committed yet.
        kyc = text("UPDATE payout_methods SET verification = 'FAILED' WHERE method_id = :m")
        await a_round_while_uncommitted(payout, kyc, {"m": method_id}, "the verification")
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
        await wait_for_a_lock_waiter_or_the_end(payout.db, round_, GUARD_S)  # the claim waits for the rejection
        go.set()
        async with asyncio.timeout(GUARD_S):
            rejected = await reject
            assert await round_ == 0
        assert rejected.status == payout_pb2.WITHDRAWAL_STATUS_REJECTED
        assert provider.submitted == []
        earnings = await payout.get_earnings("creator-a")
        assert (earnings.diamonds_available, earnings.diamonds_held) == (20_000, 0)


async def _submitting_on_the_first(first: Payout) -> tuple[str, StuckProvider, asyncio.Task[int]]:
    """A withdrawal the first replica's round has claimed and is handing to a provider that has
    not answered yet: its id, that provider (its `gate` lets it answer), and the round."""
    withdrawal_id = await approved_withdrawal(first, "creator-a")
    first.provider = slow = StuckProvider()
    slow.stuck.add(withdrawal_id)
    round_ = asyncio.create_task(first.dispatch_once())
    entered = asyncio.create_task(slow.entered.wait())
    await asyncio.wait({round_, entered}, timeout=GUARD_S, return_when=asyncio.FIRST_COMPLETED)
    entered.cancel()
    assert not round_.done(), "the first replica's round ended before the provider answered"
    return withdrawal_id, slow, round_


@contextlib.asynccontextmanager
async def _while_submitting_on_the_first(first: Payout) -> AsyncIterator[str]:
    """The id of a withdrawal `_submitting_on_the_first`, for the body to run while the provider
    has not answered (the round still waiting at its end); then the provider answers and the
    round submits that one withdrawal."""
    withdrawal_id, slow, round_ = await _submitting_on_the_first(first)
    try:
        yield withdrawal_id
        assert not round_.done(), "the provider has not answered yet"
    finally:
        slow.gate.set()
    async with asyncio.timeout(GUARD_S):
        assert await round_ == 1


@pytest.mark.parametrize("empty_database", ["postgres"], indirect=True)
async def test_a_withdrawal_one_replica_is_submitting_is_not_submitted_by_another(empty_database: str) -> None:
    # Claimed (PROCESSING, no provider reference yet) while the first replica waits for the
    # provider's answer: the second's round read it as a submission to make again, and made it.
    # The provider took it as the same transfer (by withdrawal id), but a real one answers a
    # second request under a key still in flight with an error (or a refusal, which failed the
    # withdrawal the first was paying), and every replica's round (0.2 s) asked again.
    async with _two_replicas(empty_database) as (first, second, other):
        withdrawal_id, slow, round_ = await _submitting_on_the_first(first)
        async with asyncio.timeout(GUARD_S):
            assert await second.dispatch_once() == 0
        assert other.submitted == [], "the second replica submitted what the first was submitting"
        slow.gate.set()
        async with asyncio.timeout(GUARD_S):
            assert await round_ == 1
            assert await second.dispatch_once() == 0  # with the provider now: nothing to submit
        assert (slow.submitted, other.submitted) == ([withdrawal_id], [])
        row = await second.get_withdrawal(withdrawal_id)
        assert (row.status, row.provider_ref) == (payout_pb2.WITHDRAWAL_STATUS_PROCESSING, f"po_dev_{withdrawal_id}")


@pytest.mark.parametrize("empty_database", ["postgres"], indirect=True)
async def test_a_withdrawal_whose_replica_died_while_submitting_it_is_submitted_by_another(empty_database: str) -> None:
    async with _two_replicas(empty_database) as (first, second, other):
        withdrawal_id, _slow, round_ = await _submitting_on_the_first(first)
        round_.cancel()  # the first replica is gone mid-submission (its connections with it)
        await asyncio.gather(round_, return_exceptions=True)
        async with asyncio.timeout(GUARD_S):
            assert await second.dispatch_once() == 1
        assert other.submitted == [withdrawal_id]
        assert await status_of(second, withdrawal_id) == payout_pb2.WITHDRAWAL_STATUS_PROCESSING


@pytest.mark.parametrize("empty_database", ["postgres"], indirect=True)
async def test_a_withdrawal_the_provider_refused_is_not_submitted_by_another_replica_while_it_fails(
    empty_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The refusal is for good: the first replica fails the withdrawal. Until that commits it is
    # still PROCESSING with no reference, and a second replica's round must not submit it again.
    async with _two_replicas(empty_database) as (first, second, other):
        withdrawal_id = await approved_withdrawal(first, "creator-a")
        first.provider = refusing = RefusingProvider()
        refusing.refused.add(withdrawal_id)
        failing, go = asyncio.Event(), asyncio.Event()
        refused_by_provider = Payout._refused_by_provider

        async def paused(self: Payout, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            if self is first:
                failing.set()  # refused, not yet FAILED
                await go.wait()
            await refused_by_provider(self, *args, **kwargs)

        monkeypatch.setattr(Payout, "_refused_by_provider", paused)
        round_ = asyncio.create_task(first.dispatch_once())
        async with asyncio.timeout(GUARD_S):
            await failing.wait()
            assert await second.dispatch_once() == 0
        go.set()
        async with asyncio.timeout(GUARD_S):
            assert await round_ == 0
        assert (refusing.submitted, other.submitted) == ([withdrawal_id], [])
        assert await status_of(second, withdrawal_id) == payout_pb2.WITHDRAWAL_STATUS_FAILED


class _WaitingProvider(SlowProvider):
    """A replica's provider whose look-ups wait at `gate` until every replica's has been asked once."""

    def __init__(self, gate: ReplicasAsking) -> None:
        super().__init__()
        self.gate = gate

    async def status(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        await self.gate.wait(self)
        return await super().status(*args, **kwargs)


@pytest.mark.parametrize("empty_database", ["postgres"], indirect=True)
async def test_two_replicas_looking_up_the_same_late_withdrawals_at_once_pay_each_once(empty_database: str) -> None:
    # Every replica runs a reconciler: both read the same late withdrawals, both ask the provider
    # and both apply its outcome, under one event id. Each look-up waits until both replicas are
    # asking (`_WaitingProvider`), so both rounds have read the withdrawals before either applies an
    # outcome, however late the second starts (here 0.3 s, as on a loaded machine: with 0.05 s a
    # look-up instead, the first had settled them all before the second read any).
    async with _two_replicas(empty_database) as (first, second, _other):
        ids = [await approved_withdrawal(first, f"creator-{i}") for i in range(3)]
        assert await first.dispatch_once() == 3  # with the provider; its callback never comes
        both = ReplicasAsking()
        for replica in (first, second):
            replica.provider = provider = _WaitingProvider(both)
            provider.done.update(ids)  # paid at the provider
        later = reconcile_due(first)

        async def second_later() -> int:  # its round starts late, as on a loaded machine
            await asyncio.sleep(0.3)
            return await second.reconcile_once(now=later)

        async with asyncio.timeout(GUARD_S):
            settled = await asyncio.gather(first.reconcile_once(now=later), second_later())
        assert sum(settled) == 3  # one replica applied each, the other's look-up was a duplicate
        for replica in (first, second):
            assert replica.provider.asked == ids  # type: ignore[union-attr]
        for i, withdrawal_id in enumerate(ids):
            assert await status_of(first, withdrawal_id) == payout_pb2.WITHDRAWAL_STATUS_PAID
            earnings = await first.get_earnings(f"creator-{i}")
            assert (earnings.diamonds_held, earnings.diamonds_withdrawn) == (0, 20_000)
        async with first.db.unit_of_work(readonly=True) as uow:
            o = common.outbox.c
            paid = (
                await uow.conn.execute(select(func.count()).where(o.subject == "payout.withdrawal.paid"))
            ).scalar_one()
        assert paid == 3


@pytest.mark.parametrize("empty_database", ["postgres"], indirect=True)
async def test_a_callback_while_the_withdrawal_is_being_submitted_is_not_held_up_by_the_submission(
    empty_database: str,
) -> None:
    # The dispatcher's transaction stays open over the provider's answer, holding the submission's
    # advisory lock only: the provider's callback for that withdrawal (it may come before the
    # answer) settles it at once, not after the submission, and the reference the late answer
    # brings is not written over the settled withdrawal.
    async with payout_on(empty_database, pool_size=3) as (first, _):
        async with _while_submitting_on_the_first(first) as withdrawal_id:
            net = (await first.get_withdrawal(withdrawal_id)).net
            payload = dev_payout_payload("evt-early", "payout.paid", withdrawal_id, net.amount_minor, net.currency_code)
            request = payout_pb2.HandlePayoutEventRequest(
                provider="dev", payload=payload, signature=signing.sign(SECRET, payload)
            )
            async with asyncio.timeout(5):  # a row lock held over the call would keep it until the gate
                done = await first.handle_payout_event(request)
            assert done.withdrawal.status == payout_pb2.WITHDRAWAL_STATUS_PAID
        row = await first.get_withdrawal(withdrawal_id)
        assert (row.status, row.provider_ref) == (payout_pb2.WITHDRAWAL_STATUS_PAID, "")
        earnings = await first.get_earnings("creator-a")
        assert (earnings.diamonds_held, earnings.diamonds_withdrawn) == (0, 20_000)


@pytest.mark.parametrize("empty_database", ["postgres"], indirect=True)
async def test_a_submission_waiting_for_the_provider_keeps_no_migration_from_the_withdrawals_table(
    empty_database: str,
) -> None:
    # The transaction held over the provider's answer (the submission's advisory lock) had read the
    # withdrawal again in it, and kept that read's ACCESS SHARE on withdrawals and its indexes
    # until commit: a release's ALTER TABLE withdrawals waited for the answer (up to
    # PROVIDER_TIMEOUT_S; past MIGRATION_LOCK_TIMEOUT_S it is rolled back and retried, and a
    # provider slower than that kept it from ever running), and every statement on withdrawals
    # queued behind the waiting ALTER meanwhile.
    async with payout_on(empty_database, pool_size=3) as (first, _):
        async with _while_submitting_on_the_first(first) as withdrawal_id:
            async with first.db.engine.connect() as migration:
                await migration.execute(text("SET LOCAL lock_timeout = '2s'"))
                await migration.execute(text("ALTER TABLE withdrawals ADD COLUMN probe integer"))
                await migration.rollback()
        row = await first.get_withdrawal(withdrawal_id)
        assert (row.status, row.provider_ref) == (payout_pb2.WITHDRAWAL_STATUS_PROCESSING, f"po_dev_{withdrawal_id}")


@pytest.mark.parametrize("empty_database", ["postgres"], indirect=True)
async def test_with_the_fewest_pooled_connections_allowed_other_work_goes_on_while_a_submission_and_a_publish_wait(
    empty_database: str,
) -> None:
    # The submission holds one pooled connection over the provider's answer (its advisory lock's
    # transaction) and the outbox relay one over JetStream's (its claim of the batch); with two in
    # all (DB_POOL_SIZE 2, now refused on PostgreSQL) every other use of the database waited for
    # both and failed past DB_POOL_TIMEOUT_S. (With one, for the submission alone.)
    async with payout_on(empty_database, pool_size=PayoutSettings.postgres_pool_min()) as (first, _):
        async with _while_submitting_on_the_first(first) as withdrawal_id, first.db.unit_of_work() as relay:
            await relay.conn.execute(select(common.outbox.c.id).with_for_update())  # its claim, over a publish
            async with asyncio.timeout(GUARD_S):
                other = await approved_withdrawal(first, "creator-b")
                assert (await first.get_earnings("creator-b")).diamonds_held == 20_000
        async with asyncio.timeout(GUARD_S):
            assert await first.dispatch_once() == 1  # the one requested meanwhile
        assert await status_of(first, other) == payout_pb2.WITHDRAWAL_STATUS_PROCESSING
        assert await status_of(first, withdrawal_id) == payout_pb2.WITHDRAWAL_STATUS_PROCESSING


def _sqlite_variables_max(dbapi_connection: Any, _record: Any) -> None:
    """SQLite's limit on a statement's bound parameters as most builds set it (32,766), on aiosqlite's thread."""
    conn = dbapi_connection.driver_connection
    await_(conn._execute(conn._conn.setlimit, sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, SQLITE_VARIABLES_MAX))


async def test_more_held_creators_than_a_statement_takes_parameters_keep_no_withdrawal_from_the_provider(
    empty_database: str,
) -> None:
    # The wallet down while many creators wait: each is held (DISPATCH_HOLD_RECHECK_S) and left
    # out of the dispatcher's read. Bound one parameter each, past 32,766 (SQLite) or 32,767
    # (asyncpg) every read failed, and nothing was paid until the holds expired.
    async with payout_on(empty_database) as (payout, provider):
        if payout.db.sqlite:  # as most builds take (this one's may take more)
            event.listen(payout.db.engine.sync_engine, "connect", _sqlite_variables_max)
        held = await approved_withdrawal(payout, "creator-held")
        paid = await approved_withdrawal(payout, "creator-paid")
        until = time.monotonic() + 3600
        payout._held_until = {f"creator-{i:05d}": until for i in range(40_000)}
        payout._held_until["creator-held"] = until

        assert await payout.dispatch_once() == 1
        assert provider.submitted == [paid]
        assert await status_of(payout, held) == payout_pb2.WITHDRAWAL_STATUS_APPROVED  # still held
        assert await status_of(payout, paid) == payout_pb2.WITHDRAWAL_STATUS_PROCESSING


@pytest.mark.parametrize("empty_database", ["postgres"], indirect=True)
async def test_a_refused_withdrawal_a_callback_fails_at_the_same_moment_is_no_item_failure(
    empty_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The provider refuses the submission while its FAILED callback for the same withdrawal is
    # being applied (its row updated, not yet committed). The refusal read the row unlocked
    # (PROCESSING), the callback committed, and the refusal's compare-and-set failed: ABORTED,
    # counted as the dispatcher's item failure (LivegiftsBackgroundItemFailing) for a race
    # whose outcome, FAILED with the diamonds back once, was right. SQLite serializes writers:
    # there the refusal reads the row after the callback committed.
    async with payout_on(empty_database, pool_size=4) as (payout, _):
        withdrawal_id = await approved_withdrawal(payout, "creator-a")
        net = (await payout.get_withdrawal(withdrawal_id)).net
        payload = dev_payout_payload(
            "evt-failed", "payout.failed", withdrawal_id, net.amount_minor, net.currency_code, "account closed"
        )
        callback = payout_pb2.HandlePayoutEventRequest(
            provider="dev", payload=payload, signature=signing.sign(SECRET, payload)
        )
        applying, go = asyncio.Event(), asyncio.Event()
        withdrawal_event = Payout._withdrawal_event

        async def paused(self: Payout, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            if not applying.is_set():  # the callback's, its row updated and not committed
                applying.set()
                await go.wait()
            await withdrawal_event(self, *args, **kwargs)

        monkeypatch.setattr(Payout, "_withdrawal_event", paused)
        callbacks: list[asyncio.Task[payout_pb2.HandlePayoutEventResponse]] = []

        class RefusedWhileItsCallbackApplies(RefusingProvider):
            async def submit(self, withdrawal_id: str, token: str, amount_minor: int, currency_code: str) -> Submission:
                callbacks.append(asyncio.create_task(payout.handle_payout_event(callback)))
                await applying.wait()
                return await super().submit(withdrawal_id, token, amount_minor, currency_code)

        payout.provider = provider = RefusedWhileItsCallbackApplies()
        provider.refused.add(withdrawal_id)
        counted = item_failures(DISPATCH_LOOP)
        round_ = asyncio.create_task(payout.dispatch_once())
        await wait_for_a_lock_waiter_or_the_end(payout.db, round_, GUARD_S)
        assert not round_.done(), "the refusal did not meet the callback in flight"
        go.set()
        async with asyncio.timeout(GUARD_S):
            assert await round_ == 0
            applied = await callbacks[0]

        assert item_failures(DISPATCH_LOOP) == counted  # no failure: the refusal found it settled
        assert not applied.duplicate and provider.submitted == [withdrawal_id]
        row = await payout.get_withdrawal(withdrawal_id)
        assert (row.status, row.failure_reason) == (payout_pb2.WITHDRAWAL_STATUS_FAILED, "account closed")
        earnings = await payout.get_earnings("creator-a")
        assert (earnings.diamonds_available, earnings.diamonds_held) == (20_000, 0)  # released once
        o = common.outbox.c
        async with payout.db.unit_of_work(readonly=True) as uow:
            failed = (
                await uow.conn.execute(select(func.count()).where(o.subject == "payout.withdrawal.failed"))
            ).scalar_one()
        assert failed == 1


def item_failures(loop: str) -> float:
    return REGISTRY.get_sample_value("livegifts_background_item_failures_total", {"loop": loop}) or 0.0
