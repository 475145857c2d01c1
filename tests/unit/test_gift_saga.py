"""The gift saga settles refused spends through the wallet's arbiter, never on its own word.

In-process: the gifting use cases on a migrated SQLite file, with a scripted wallet stub.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from livegifts.gifting.v1 import gifting_pb2
from livegifts.wallet.v1 import wallet_pb2
from services.common.db import Database
from services.common.errors import InvariantViolation, Unavailable
from services.common.migrate import upgrade_head
from services.gifting.domain import GiftKind
from services.gifting.storage import common, gift_events
from services.gifting.usecases import SWEEP_LOOP, SWEEP_WALLET_TIMEOUTS_MAX, Gifting
from tests.support.gifting import (
    MIGRATIONS,
    OneSpendFailingWallet,
    OverloadedWallet,
    ScriptedWallet,
    gifting_on,
    pending_gifts,
    recipient_blocked,
    recipient_blocked_item,
)


async def _send(g: Gifting) -> Any:
    stream = await g.start_stream(gifting_pb2.StartStreamRequest(creator_id="c1", title="t", idempotency_key="s"))
    return g.send_gift(
        gifting_pb2.SendGiftRequest(
            stream_id=stream.stream_id, sender_id="v1", gift_id="panda", quantity=1, idempotency_key="k1"
        )
    )


async def _count(db: Database, table: Any, *where: Any) -> int:
    async with db.unit_of_work(readonly=True) as uow:
        return int((await uow.conn.execute(select(func.count()).select_from(table).where(*where))).scalar_one())


async def test_a_refused_spend_that_a_concurrent_retry_completed_ends_sent_not_cancelled(tmp_path: Path) -> None:
    wallet = ScriptedWallet(wallet_pb2.CancelSpendResponse.OUTCOME_SPENT)
    async with gifting_on(tmp_path, wallet) as (g, db):
        receipt = await (await _send(g))
        assert receipt.status == gifting_pb2.GIFT_STATUS_SENT
        assert receipt.sender_balance == 95
        assert wallet.cancel_calls == [receipt.gift_event_id]
        assert await _count(db, common.outbox) == 1  # exactly one gift.sent event
        assert await _count(db, gift_events, gift_events.c.status == "CANCELLED") == 0


async def test_a_refusal_the_wallet_settled_cancels_the_gift_without_asking_the_arbiter(tmp_path: Path) -> None:
    wallet = ScriptedWallet(wallet_pb2.CancelSpendResponse.OUTCOME_SPENT, settles=True)
    async with gifting_on(tmp_path, wallet) as (g, db):
        with pytest.raises(Exception) as err:
            await (await _send(g))
        assert getattr(err.value, "reason", "") == "INSUFFICIENT_COINS"
        assert wallet.spend_many_calls == 1
        assert wallet.cancel_calls == []  # the refusal was final in the wallet's own transaction
        assert await _count(db, gift_events, gift_events.c.status == "CANCELLED") == 1
        assert await _count(db, common.outbox) == 0


@pytest.mark.parametrize("group_commit", [True, False])
async def test_both_saga_paths_ask_the_arbiter_when_the_wallet_could_not_settle(
    tmp_path: Path, group_commit: bool
) -> None:
    wallet = ScriptedWallet(wallet_pb2.CancelSpendResponse.OUTCOME_CANCELLED)
    async with gifting_on(tmp_path, wallet, group_commit=group_commit) as (g, db):
        with pytest.raises(Exception) as err:
            await (await _send(g))
        # SpendMany carries the item's reason, Spend its ErrorInfo: the same reason either way.
        assert getattr(err.value, "reason", "") == "INSUFFICIENT_COINS"
        assert await _count(db, common.outbox) == 0
        assert wallet.spend_many_calls == (1 if group_commit else 0)
        assert len(wallet.cancel_calls) == 1
        assert await _count(db, gift_events, gift_events.c.status == "CANCELLED") == 1


class RestrictionsWallet(ScriptedWallet):
    """GetAccountRestrictions answers from a dict the test changes; counts the calls."""

    def __init__(self) -> None:
        super().__init__(wallet_pb2.CancelSpendResponse.OUTCOME_CANCELLED)
        self.blocked: set[str] = set()
        self.asked: list[str] = []

    async def GetAccountRestrictions(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        self.asked.append(req.user_id)
        return wallet_pb2.AccountRestrictions(
            user_id=req.user_id, may_spend=req.user_id not in self.blocked, blocked=req.user_id in self.blocked
        )


def _held_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """time.monotonic held at 1000 s from now on; it moves only when the test adds to clock[0]."""
    clock = [1000.0]
    monkeypatch.setattr("services.gifting.usecases.time.monotonic", lambda: clock[0])
    return clock


async def test_an_eligibility_answer_near_its_end_is_used_and_asked_again_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wallet = RestrictionsWallet()
    async with gifting_on(tmp_path, wallet) as (g, db):
        clock = _held_clock(monkeypatch)
        ttl = g.settings.eligibility_cache_s
        assert (await g._restrictions({"v1"}))["v1"].may_spend
        assert wallet.asked == ["v1"]
        clock[0] += ttl * 0.5  # fresh: no call at all
        await g._restrictions({"v1"})
        assert wallet.asked == ["v1"]
        # In the last quarter: the cached answer serves this batch at once, a refresh runs behind it.
        wallet.blocked.add("v1")
        clock[0] += ttl * 0.3
        assert (await g._restrictions({"v1"}))["v1"].may_spend
        await asyncio.gather(*g._background)
        assert wallet.asked == ["v1", "v1"]
        # The refresh said "blocked": nothing is remembered, so the next batch asks and is refused.
        answer = (await g._restrictions({"v1"}))["v1"]
        assert answer.blocked and wallet.asked == ["v1", "v1", "v1"]


async def test_the_eligibility_cache_holds_the_users_of_the_last_ttl_not_every_user_since_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pod runs for weeks and meets millions of users: the answers that expired used to stay
    # until ELIGIBILITY_CACHE_ENTRIES_MAX users had come, and then every answer went at once.
    wallet = RestrictionsWallet()
    async with gifting_on(tmp_path, wallet) as (g, db):
        clock = _held_clock(monkeypatch)
        ttl = g.settings.eligibility_cache_s
        for batch in range(50):
            users = {f"v{batch}-{i}" for i in range(100)}
            assert all(a.may_spend for a in (await g._restrictions(users)).values())
            assert len(g._eligibility_cache) <= len(users)  # this batch's; the earlier ones expired
            clock[0] += ttl / 4
            assert set(await g._restrictions(users)) == users  # still remembered: no call
            assert len(wallet.many_calls) == batch + 1
            clock[0] += ttl  # every answer so far expired


async def test_a_full_eligibility_cache_forgets_its_oldest_answer_not_all_of_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wallet = RestrictionsWallet()
    async with gifting_on(tmp_path, wallet) as (g, db):
        monkeypatch.setattr("services.gifting.usecases.ELIGIBILITY_CACHE_ENTRIES_MAX", 50)
        for i in range(120):
            await g._restrictions({f"v{i}"})
        assert list(g._eligibility_cache) == [f"v{i}" for i in range(70, 120)]
        await g._restrictions({f"v{i}" for i in range(70, 120)})
        assert len(wallet.many_calls) == 120  # the 50 most recent answered from the cache


async def test_a_batch_asks_the_wallet_about_all_the_users_it_does_not_know_in_one_call(tmp_path: Path) -> None:
    wallet = RestrictionsWallet()
    wallet.blocked.add("v3")
    async with gifting_on(tmp_path, wallet) as (g, db):
        answers = await g._restrictions({"v1", "v2", "v3"})
        assert wallet.many_calls == [["v1", "v2", "v3"]]
        assert {u: a.may_spend for u, a in answers.items()} == {"v1": True, "v2": True, "v3": False}
        # v1 and v2 are remembered; v3 (refused) is asked again, with the one new user, in one call.
        await g._restrictions({"v1", "v2", "v3", "v4"})
        assert wallet.many_calls == [["v1", "v2", "v3"], ["v3", "v4"]]
        assert wallet.asked == ["v1", "v2", "v3", "v3", "v4"]


class OlderWallet(RestrictionsWallet):
    """A wallet from before GetAccountRestrictionsMany (a rolling upgrade), or one that cannot answer."""

    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__()
        self.code = code

    async def GetAccountRestrictionsMany(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        self.many_calls.append(list(req.user_ids))
        raise grpc.aio.AioRpcError(self.code, grpc.aio.Metadata(), grpc.aio.Metadata(), "no")


async def test_a_wallet_without_the_batched_call_is_asked_user_by_user(tmp_path: Path) -> None:
    wallet = OlderWallet(grpc.StatusCode.UNIMPLEMENTED)
    wallet.blocked.add("v2")
    async with gifting_on(tmp_path, wallet) as (g, db):
        answers = await g._restrictions({"v1", "v2"})
        assert {u: a.may_spend for u, a in answers.items()} == {"v1": True, "v2": False}
        assert wallet.many_calls == [["v1", "v2"]] and sorted(wallet.asked) == ["v1", "v2"]


async def test_a_wallet_that_does_not_answer_the_batched_call_leaves_its_users_unanswered(tmp_path: Path) -> None:
    wallet = OlderWallet(grpc.StatusCode.UNAVAILABLE)
    async with gifting_on(tmp_path, wallet) as (g, db):
        assert await g._restrictions({"v1", "v2"}) == {"v1": None, "v2": None}
        assert wallet.asked == []  # not retried user by user: the wallet is down, not old
        assert g._eligibility_cache == {}


@pytest.mark.parametrize("group_commit", [True, False])
async def test_a_combo_costing_more_than_one_spend_may_take_is_refused_before_anything_is_recorded(
    tmp_path: Path, group_commit: bool
) -> None:
    wallet = ScriptedWallet(wallet_pb2.CancelSpendResponse.OUTCOME_CANCELLED)
    async with gifting_on(tmp_path, wallet, group_commit=group_commit) as (g, db):
        stream = await g.start_stream(gifting_pb2.StartStreamRequest(creator_id="c1", title="t", idempotency_key="s"))
        # 286 Universes (34,999 coins each) cost 10,009,714 coins: more than the wallet spends at once
        # (SPEND_AMOUNT_MAX, 10,000,000), though well within QUANTITY_MAX.
        combo = gifting_pb2.SendGiftRequest(
            stream_id=stream.stream_id, sender_id="v1", gift_id="universe", quantity=286, idempotency_key="k1"
        )
        with pytest.raises(Exception) as err:
            await g.send_gift(combo)
        assert getattr(err.value, "reason", "") == "INVALID_QUANTITY"
        assert await _count(db, gift_events) == 0  # nothing recorded, so nothing to cancel
        assert wallet.spend_many_calls == 0 and wallet.cancel_calls == []
        # One Universe fewer fits.
        combo.quantity, combo.idempotency_key = 285, "k2"
        with pytest.raises(Exception) as err:
            await g.send_gift(combo)
        assert getattr(err.value, "reason", "") == "INSUFFICIENT_COINS"  # the scripted wallet's answer


class BlockingWallet(ScriptedWallet):
    """The wallet's answer to a spend whose recipient it has blocked since gifting's pre-check cached them:
    ACCOUNT_BLOCKED with role=recipient, settled in SpendMany, refused (and then cancelled) in Spend."""

    def __init__(self) -> None:
        super().__init__(wallet_pb2.CancelSpendResponse.OUTCOME_CANCELLED, settles=True)

    async def Spend(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        raise recipient_blocked()

    async def SpendMany(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        error = recipient_blocked_item()
        return wallet_pb2.SpendManyResponse(results=[wallet_pb2.SpendManyResult(error=error) for _ in req.spends])


@pytest.mark.parametrize("group_commit", [True, False])
async def test_both_saga_paths_name_a_creator_the_wallet_refused_as_the_pre_check_does(
    tmp_path: Path, group_commit: bool
) -> None:
    async with gifting_on(tmp_path, BlockingWallet(), group_commit=group_commit) as (g, db):
        with pytest.raises(Exception) as err:
            await (await _send(g))
        assert getattr(err.value, "reason", "") == "ACCOUNT_BLOCKED"
        assert getattr(err.value, "metadata", {}).get("role") == "creator"
        assert err.value.message == "the creator's account is blocked"  # type: ignore[attr-defined]


@pytest.mark.parametrize("group_commit", [True, False])
async def test_a_status_the_wallet_did_not_give_leaves_the_gift_pending_and_asks_for_a_retry(
    tmp_path: Path, group_commit: bool
) -> None:
    wallet = OverloadedWallet()
    async with gifting_on(tmp_path, wallet, group_commit=group_commit) as (g, db):
        with pytest.raises(Exception) as err:
            await (await _send(g))
        assert getattr(err.value, "reason", "") == "WALLET_UNAVAILABLE", err.value
        assert getattr(err.value, "metadata", {}).get("wallet_code") == "RESOURCE_EXHAUSTED"
        assert wallet.cancel_calls == []  # not settled on a status that says nothing of the spend
        assert await _count(db, gift_events, gift_events.c.status == "PENDING") == 1  # retry or sweeper
        assert await _count(db, common.outbox) == 0


@contextlib.asynccontextmanager
async def _a_gift_left_pending(tmp_path: Path) -> AsyncIterator[tuple[OverloadedWallet, Gifting, Database]]:
    """A gift whose spend's answer was lost (a status the wallet did not give), left PENDING, and a
    sweeper that settles it at once (no group commit, a pending timeout of 1 ms)."""
    wallet = OverloadedWallet()
    async with gifting_on(tmp_path, wallet, group_commit=False, pending_timeout_s=0.001) as (g, db):
        with pytest.raises(Exception) as err:
            await (await _send(g))
        assert getattr(err.value, "reason", "") == "WALLET_UNAVAILABLE", err.value
        yield wallet, g, db


@pytest.mark.parametrize(
    ("outcome", "status", "events"),
    [
        (wallet_pb2.CancelSpendResponse.OUTCOME_SPENT, "SENT", 1),
        (wallet_pb2.CancelSpendResponse.OUTCOME_CANCELLED, "CANCELLED", 0),
    ],
)
async def test_the_sweeper_sends_a_stale_pending_gift_the_wallet_charged_and_cancels_one_it_did_not(
    tmp_path: Path, outcome: int, status: str, events: int
) -> None:
    """A gift whose spend's answer was lost (here: a status the wallet did not give) stays PENDING;
    the sweeper asks the arbiter and ends it as the wallet says: a charged spend must end SENT with
    its gift.sent event (cancelling it would lose the coins), a forbidden one CANCELLED."""
    async with _a_gift_left_pending(tmp_path) as (wallet, g, db):
        assert await _count(db, gift_events, gift_events.c.status == "PENDING") == 1
        wallet.arbiter_outcome = outcome
        await asyncio.sleep(0.01)  # past the pending timeout
        assert await g.sweep_once() == 1
        assert len(wallet.cancel_calls) == 1
        assert await _count(db, gift_events, gift_events.c.status == status) == 1
        assert await _count(db, gift_events, gift_events.c.status == "PENDING") == 0
        assert await _count(db, common.outbox) == events


async def test_the_audit_counts_a_pending_gift_with_its_coins_and_then_as_cancelled(tmp_path: Path) -> None:
    """Check 3 bounds the wallet's spends by gifting's pending coins and its cancelled gifts by the
    wallet's cancelled spends: a GetAudit that reported neither would let charged-but-lost and
    cancelled-but-charged gifts pass as work in flight."""
    async with _a_gift_left_pending(tmp_path) as (_wallet, g, _db):
        audit = await g.audit()
        assert (audit.gifts_pending, audit.coins_pending, audit.gifts_sent, audit.gifts_cancelled) == (1, 5, 0, 0)
        await asyncio.sleep(0.01)
        assert await g.sweep_once() == 1  # the arbiter says CANCELLED
        audit = await g.audit()
        assert (audit.gifts_pending, audit.coins_pending, audit.gifts_sent, audit.gifts_cancelled) == (0, 0, 0, 1)


async def test_a_cancelled_sweeper_ends_only_after_both_its_loops(tmp_path: Path) -> None:
    """The service's drain cancels the sweeper and then closes the database. Its two loops ran in a
    gather, which ended the sweeper as soon as one loop was cancelled and left the other running:
    caught mid-statement, that one was still closing its connection (SQLAlchemy's shielded close)
    when the event loop's final cancellation cancelled it again, and aiosqlite's close then waited
    forever for a thread that had already stopped: the service logged "stopped" and never exited."""
    sweeping, restoring = asyncio.Event(), asyncio.Event()
    ended: list[str] = []

    async def ends_at_once(stop: asyncio.Event | None = None) -> int:
        sweeping.set()
        await asyncio.Future()  # a round in progress
        return 0

    async def ends_after_a_while() -> int:
        restoring.set()
        try:
            await asyncio.Future()
        except asyncio.CancelledError:
            for _ in range(50):  # a connection's close: some steps of the event loop
                await asyncio.sleep(0)
            ended.append("restore")
            raise
        return 0

    async with gifting_on(tmp_path, ScriptedWallet(wallet_pb2.CancelSpendResponse.OUTCOME_CANCELLED)) as (g, _db):
        g.sweep_once = ends_at_once  # type: ignore[method-assign]
        g.restore_keys_once = ends_after_a_while  # type: ignore[method-assign]
        sweeper = asyncio.create_task(g.sweeper(asyncio.Event()))
        await sweeping.wait()
        await restoring.wait()
        sweeper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sweeper
        assert ended == ["restore"], "the sweeper ended while one of its loops was still ending"


async def test_a_cancelled_batch_spend_ends_only_after_every_arbitration(tmp_path: Path) -> None:
    """A SendGifts whose call is cancelled (the client's deadline, or the drain's grace running out)
    mid-arbitration: its arbitrations ran in a gather, which ended the call as soon as the first one
    was cancelled and left the others running. One caught writing its gift's cancellation was still
    closing its connection after the handler had returned, as the sweeper's loop was (after which the
    drain disposes of the pool and the event loop's final cancellation hangs in aiosqlite's close)."""
    started: dict[str, asyncio.Event] = {"e1": asyncio.Event(), "e2": asyncio.Event()}
    ended: list[str] = []

    async def refused(gift: dict[str, Any], *_: Any) -> Any:
        started[gift["event_id"]].set()
        try:
            await asyncio.Future()  # the arbiter's call, or the gift's cancellation
        except asyncio.CancelledError:
            if gift["event_id"] == "e2":
                for _ in range(50):  # a connection's close: some steps of the event loop
                    await asyncio.sleep(0)
                ended.append("e2")
            raise

    gifts = [
        {"event_id": e, "sender_id": "v1", "creator_id": "c1", "coins": 5, "kind": GiftKind.GIFT.value}
        for e in ("e1", "e2")
    ]
    async with gifting_on(tmp_path, ScriptedWallet(wallet_pb2.CancelSpendResponse.OUTCOME_CANCELLED)) as (g, _db):
        g._refused = refused  # type: ignore[method-assign]
        call = asyncio.create_task(g._spend_chunk(gifts))
        for ev in started.values():
            await ev.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert ended == ["e2"], "the call ended while one of its arbitrations was still ending"


class CancellingWallet(ScriptedWallet):
    """A broken invariant: Spend and SpendMany charge, but the gift was cancelled in gifting meanwhile
    (as if an arbiter had answered "never spent" for a spend that then happened)."""

    def __init__(self, db: Database) -> None:
        super().__init__(wallet_pb2.CancelSpendResponse.OUTCOME_CANCELLED)
        self.db = db

    async def _cancel_gifts(self, ids: list[str]) -> None:
        async with self.db.unit_of_work() as uow:
            await uow.conn.execute(
                gift_events.update().where(gift_events.c.event_id.in_(ids)).values(status="CANCELLED")
            )
            await uow.commit()

    async def Spend(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        await self._cancel_gifts([req.idempotency_key])
        return wallet_pb2.SpendResponse(spend_id="s1", amount=req.amount, balance_after=95)

    async def SpendMany(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        self.spend_many_calls += 1
        await self._cancel_gifts([s.idempotency_key for s in req.spends])
        spent = [wallet_pb2.SpendResponse(spend_id="s1", amount=s.amount, balance_after=95) for s in req.spends]
        return wallet_pb2.SpendManyResponse(results=[wallet_pb2.SpendManyResult(spent=s) for s in spent])


@pytest.mark.parametrize("path", ["SendGift", "SendGift group-committed", "SendGifts"])
async def test_a_gift_charged_after_it_was_cancelled_fails_internal_on_every_path_never_gift_cancelled(
    tmp_path: Path, path: str
) -> None:
    """GIFT_CANCELLED tells the client to retry, and a retry restarts a cancelled gift and charges
    again: a gift found cancelled after the wallet confirmed its spend is the same INTERNAL
    (a broken invariant) on SendGift alone, group-committed, and as a SendGifts item."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'gifting.db'}"
    await upgrade_head(MIGRATIONS, url)
    probe = Database(url, pool_size=1, pool_timeout_s=5, application_name="test")
    wallet = CancellingWallet(probe)
    try:
        async with gifting_on(tmp_path, wallet, group_commit=path == "SendGift group-committed") as (g, db):
            if path == "SendGifts":
                stream = await g.start_stream(
                    gifting_pb2.StartStreamRequest(creator_id="c1", title="t", idempotency_key="s")
                )
                item = gifting_pb2.SendGiftRequest(
                    stream_id=stream.stream_id, sender_id="v1", gift_id="panda", quantity=1, idempotency_key="k1"
                )
                result = (await g.send_gifts(gifting_pb2.SendGiftsRequest(gifts=[item]))).results[0]
                assert result.WhichOneof("outcome") == "error", result
                assert (result.error.code, result.error.reason) == (grpc.StatusCode.INTERNAL.value[0], "INTERNAL")
                assert "trace_id" in result.error.metadata
                assert "cancelled" not in result.error.message  # nothing internal leaks
            else:
                with pytest.raises(InvariantViolation, match="was cancelled but its spend happened"):
                    await (await _send(g))
            assert await _count(db, common.outbox) == 0
    finally:
        await probe.dispose()


async def test_a_pending_gift_the_wallet_always_fails_to_settle_keeps_no_other_from_the_sweeper(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The wallet failed the CancelSpend of one gift (INTERNAL, every time): the sweeper's round
    # ended at it, and as each round starts from the oldest gift, every gift left PENDING after it
    # stayed PENDING for as long as that one did, its coins counted in flight.
    wallet = OneSpendFailingWallet()
    async with gifting_on(tmp_path, wallet, group_commit=False, pending_timeout_s=0.001) as (g, db):
        stream = await g.start_stream(gifting_pb2.StartStreamRequest(creator_id="c1", title="t", idempotency_key="s"))
        ids = []
        for key in ("k1", "k2"):
            with pytest.raises(Exception) as err:
                await g.send_gift(
                    gifting_pb2.SendGiftRequest(
                        stream_id=stream.stream_id, sender_id="v1", gift_id="panda", quantity=1, idempotency_key=key
                    )
                )
            ids.append(err.value.metadata["gift_event_id"])  # type: ignore[attr-defined]
        stuck, other = ids
        async with db.unit_of_work() as uow:  # oldest first: the one the wallet fails
            for i, event_id in enumerate(ids):
                await uow.conn.execute(
                    gift_events.update().where(gift_events.c.event_id == event_id).values(updated_at_us=1 + i)
                )
            await uow.commit()
        wallet.failing[stuck] = grpc.StatusCode.INTERNAL
        with caplog.at_level(logging.WARNING, logger="services.gifting.usecases"):
            settled = [await g.sweep_once() for _ in range(2)]  # neither raises for the stuck one
        assert settled == [1, 0], settled  # the other, then the stuck one alone again
        assert await _count(db, gift_events, gift_events.c.event_id == other, gift_events.c.status == "CANCELLED") == 1
        assert await _count(db, gift_events, gift_events.c.event_id == stuck, gift_events.c.status == "PENDING") == 1
        lines = [r for r in caplog.records if r.getMessage().startswith("a pending gift was not settled")]
        # Once: the next failures of the same gift within 30 s are counted on its next line.
        assert [r.gift_event_id for r in lines] == [stuck]  # type: ignore[attr-defined]

        # The wallet gone: every gift would fail alike, so the round ends at the first.
        wallet.failing = {stuck: grpc.StatusCode.UNAVAILABLE}
        calls = len(wallet.cancel_calls)
        with pytest.raises(Unavailable):
            await g.sweep_once()
        assert len(wallet.cancel_calls) == calls + 1


async def test_a_sweep_ends_at_the_wallets_third_timeout_in_a_row_not_at_one_among_answers(tmp_path: Path) -> None:
    # A hung wallet times out every CancelSpend (OUTGOING_DEADLINE_S each): the round went on
    # through all SWEEP_BATCH_SIZE_MAX gifts, 100 x 5 s, no newer stale gift settled meanwhile.
    # Timeouts with an answer between them are each that gift's own, and the round goes on.
    wallet = OneSpendFailingWallet()
    async with gifting_on(tmp_path, wallet, group_commit=False, pending_timeout_s=0.001) as (g, db):
        ids = await pending_gifts(g, db, 8)
        timing_out = [ids[i] for i in (0, 1, 3, 4, 5, 6)]  # ids[2] answered between two timeouts
        wallet.failing = dict.fromkeys(timing_out, grpc.StatusCode.DEADLINE_EXCEEDED)
        wallet.cancel_calls.clear()
        assert SWEEP_WALLET_TIMEOUTS_MAX == 3
        with pytest.raises(Unavailable) as err:
            await g.sweep_once()
        assert err.value.metadata["wallet_code"] == "DEADLINE_EXCEEDED"
        assert wallet.cancel_calls == ids[:6]  # the third in a row (ids[5]) ended it: ids[6:] not asked
        assert await _count(db, gift_events, gift_events.c.status == "CANCELLED") == 1  # ids[2]
        assert await _count(db, gift_events, gift_events.c.status == "PENDING") == 7


async def test_a_sweep_passes_over_one_gift_whose_cancel_spend_times_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wallet = OneSpendFailingWallet()
    async with gifting_on(tmp_path, wallet, group_commit=False, pending_timeout_s=0.001) as (g, db):
        ids = await pending_gifts(g, db, 5)
        slow = ids[1]
        wallet.failing = {slow: grpc.StatusCode.DEADLINE_EXCEEDED}
        counted = REGISTRY.get_sample_value("livegifts_background_item_failures_total", {"loop": SWEEP_LOOP})
        assert counted is not None  # the series is there once a Gifting is made (at 0 in a fresh process)
        with caplog.at_level(logging.WARNING, logger="services.gifting.usecases"):
            assert await g.sweep_once() == 4
        assert (
            REGISTRY.get_sample_value("livegifts_background_item_failures_total", {"loop": SWEEP_LOOP}) == counted + 1
        )
        assert await _count(db, gift_events, gift_events.c.status == "CANCELLED") == 4
        assert await _count(db, gift_events, gift_events.c.event_id == slow, gift_events.c.status == "PENDING") == 1
        lines = [r for r in caplog.records if r.getMessage().startswith("a pending gift was not settled")]
        assert [r.gift_event_id for r in lines] == [slow]  # type: ignore[attr-defined]


async def _status(db: Database, event_id: str) -> str:
    async with db.unit_of_work(readonly=True) as uow:
        return str(
            (
                await uow.conn.execute(select(gift_events.c.status).where(gift_events.c.event_id == event_id))
            ).scalar_one()
        )


async def test_the_three_oldest_gifts_timing_out_keep_no_newer_one_from_the_sweeper(tmp_path: Path) -> None:
    # Each round started from the oldest stale gift: three oldest whose CancelSpend always timed
    # out (the wallet otherwise answering) ended every round at the third, and the gifts after
    # them stayed PENDING for as long.
    wallet = OneSpendFailingWallet()
    async with gifting_on(tmp_path, wallet, group_commit=False, pending_timeout_s=0.001) as (g, db):
        ids = await pending_gifts(g, db, 5)
        wallet.failing = dict.fromkeys(ids[:3], grpc.StatusCode.DEADLINE_EXCEEDED)
        wallet.cancel_calls.clear()
        with pytest.raises(Unavailable):
            await g.sweep_once()  # ends at the third timeout in a row
        assert wallet.cancel_calls == ids[:3]
        wallet.cancel_calls.clear()
        assert await g.sweep_once() == 2  # from the gift the last round ended at, then the newer ones
        assert wallet.cancel_calls == ids[2:]
        assert [await _status(db, i) for i in ids] == ["PENDING"] * 3 + ["CANCELLED"] * 2


async def test_a_full_batch_of_gifts_that_fail_keeps_no_gift_after_it_from_the_sweeper(tmp_path: Path) -> None:
    # A batch of SWEEP_BATCH_SIZE_MAX gifts each failing on its own (INTERNAL: that one spend)
    # was read again every round, and no gift after it was ever reached.
    wallet = OneSpendFailingWallet()
    async with gifting_on(tmp_path, wallet, group_commit=False, pending_timeout_s=0.001, sweep_batch_size_max=3) as (
        g,
        db,
    ):
        ids = await pending_gifts(g, db, 5)
        wallet.failing = dict.fromkeys(ids[:3], grpc.StatusCode.INTERNAL)
        wallet.cancel_calls.clear()
        assert await g.sweep_once() == 0
        assert await g.sweep_once() == 2
        assert wallet.cancel_calls == ids
        assert [await _status(db, i) for i in ids] == ["PENDING"] * 3 + ["CANCELLED"] * 2
        # The second round's batch was short: the next starts from the oldest again.
        wallet.cancel_calls.clear()
        assert await g.sweep_once() == 0
        assert wallet.cancel_calls == ids[:3]


async def test_after_a_round_the_wallet_ended_the_next_starts_from_the_gift_it_ended_at(tmp_path: Path) -> None:
    # The round read a full batch, so the cursor had moved past it: the wallet going down at a
    # gift must not leave that gift for the next pass over every stale gift. Nor does the next
    # round start from the oldest (ids[0], which fails on its own every time).
    wallet = OneSpendFailingWallet()
    async with gifting_on(tmp_path, wallet, group_commit=False, pending_timeout_s=0.001, sweep_batch_size_max=2) as (
        g,
        db,
    ):
        ids = await pending_gifts(g, db, 6)
        wallet.failing = {ids[0]: grpc.StatusCode.INTERNAL, ids[3]: grpc.StatusCode.UNAVAILABLE}
        wallet.cancel_calls.clear()
        assert await g.sweep_once() == 1
        with pytest.raises(Unavailable):
            await g.sweep_once()
        assert wallet.cancel_calls == ids[:4]
        del wallet.failing[ids[3]]  # the wallet is back
        wallet.cancel_calls.clear()
        assert await g.sweep_once() == 2
        assert wallet.cancel_calls == ids[3:5]
        assert [await _status(db, i) for i in ids] == ["PENDING"] + ["CANCELLED"] * 4 + ["PENDING"]


async def test_a_sweeper_stopped_mid_round_settles_no_gift_after_the_one_in_hand(tmp_path: Path) -> None:
    # A SIGTERM during a round: the loop finishes its round within the shutdown grace, and the
    # round went on through its SWEEP_BATCH_SIZE_MAX CancelSpends, each up to OUTGOING_DEADLINE_S
    # against a slow wallet, and was cancelled in the middle of one. The gift under way is settled;
    # the rest wait for the next round (the next process's), from the first left.
    wallet = OneSpendFailingWallet()
    async with gifting_on(tmp_path, wallet, group_commit=False, pending_timeout_s=0.001) as (g, db):
        ids = await pending_gifts(g, db, 3)
        wallet.cancel_calls.clear()
        stop = asyncio.Event()
        cancel_spend = wallet.CancelSpend

        async def stopped_meanwhile(*args: Any, **kwargs: Any) -> Any:
            stop.set()  # the SIGTERM lands while the first is settled
            return await cancel_spend(*args, **kwargs)

        wallet.CancelSpend = stopped_meanwhile  # type: ignore[method-assign]
        await asyncio.wait_for(g.sweeper(stop), 10)
        assert wallet.cancel_calls == ids[:1]
        assert [await _status(db, i) for i in ids] == ["CANCELLED", "PENDING", "PENDING"]
        assert await g.sweep_once() == 2
        assert wallet.cancel_calls == ids
