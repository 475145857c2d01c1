"""A cancelled gift keeps its idempotency key, on SQLite and PostgreSQL, on both saga paths.

A gift the wallet refused is cancelled. A retry of the same request may send it later (after a
top-up, say), as a new gift under the same key; a different request under that key is refused
as IDEMPOTENCY_KEY_REUSED, never charged. Concurrent retries of a cancelled gift send one gift.

Gifting's use cases over a real database of their own; the wallet is a small in-memory ledger
with the wallet's contract for these calls (each spend keyed by the gift's id, a cancelled key
refused for good), so the test can refuse a spend and then allow it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import select

from livegifts.gifting.v1 import gifting_pb2
from livegifts.wallet.v1 import wallet_pb2
from services.common.db import Database
from services.common.errors import DomainError
from services.common.migrate import upgrade_head
from services.common.outbox import Outbox
from services.gifting.config import GiftingSettings
from services.gifting.storage import common, gift_events
from services.gifting.usecases import Gifting
from tests.unit.test_gift_saga import wallet_refusal

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "gifting" / "migrations"
OUTCOME = wallet_pb2.CancelSpendResponse


class Ledger:
    """Coins per user; each spend key spends once, and a cancelled key never spends."""

    def __init__(self) -> None:
        self.coins: dict[str, int] = {}
        self.spent: dict[str, wallet_pb2.SpendResponse] = {}
        self.cancelled: set[str] = set()
        self.attempts: list[str] = []  # every spend asked for, by key

    def _spend(self, req: wallet_pb2.SpendRequest) -> tuple[wallet_pb2.SpendResponse | None, str]:
        self.attempts.append(req.idempotency_key)
        if req.idempotency_key in self.spent:
            return self.spent[req.idempotency_key], ""
        if req.idempotency_key in self.cancelled:
            return None, "SPEND_CANCELLED"
        if self.coins.get(req.user_id, 0) < req.amount:
            return None, "INSUFFICIENT_COINS"
        self.coins[req.user_id] -= req.amount
        answer = wallet_pb2.SpendResponse(
            spend_id=req.idempotency_key, amount=req.amount, balance_after=self.coins[req.user_id]
        )
        self.spent[req.idempotency_key] = answer
        return answer, ""

    async def GetAccountRestrictionsMany(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        return wallet_pb2.GetAccountRestrictionsManyResponse(
            restrictions=[wallet_pb2.AccountRestrictions(user_id=u, may_spend=True) for u in req.user_ids]
        )

    async def Spend(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        answer, reason = self._spend(req)
        if answer is None:
            code = grpc.StatusCode.ABORTED if reason == "SPEND_CANCELLED" else grpc.StatusCode.FAILED_PRECONDITION
            raise wallet_refusal(code, "refused", reason)
        return answer

    async def SpendMany(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        results = []
        for s in req.spends:
            answer, reason = self._spend(s)
            if answer is not None:
                results.append(wallet_pb2.SpendManyResult(spent=answer))
                continue
            if req.settle_refusals:
                self.cancelled.add(s.idempotency_key)
            code = grpc.StatusCode.ABORTED if reason == "SPEND_CANCELLED" else grpc.StatusCode.FAILED_PRECONDITION
            error = wallet_pb2.SpendItemError(
                code=code.value[0], reason=reason, message="refused", settled=req.settle_refusals
            )
            results.append(wallet_pb2.SpendManyResult(error=error))
        return wallet_pb2.SpendManyResponse(results=results)

    async def CancelSpend(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        if req.idempotency_key in self.spent:
            return OUTCOME(outcome=OUTCOME.OUTCOME_SPENT, spend=self.spent[req.idempotency_key])
        self.cancelled.add(req.idempotency_key)
        return OUTCOME(outcome=OUTCOME.OUTCOME_CANCELLED)


@pytest.fixture(params=[True, False], ids=["group-commit", "one-by-one"])
async def gifting(empty_database: str, request: pytest.FixtureRequest) -> AsyncIterator[Gifting]:
    await upgrade_head(MIGRATIONS, empty_database)
    db = Database(empty_database, pool_size=8, pool_timeout_s=5, application_name="gifting-test")
    settings = GiftingSettings(
        database_url=empty_database,
        nats_url="nats://127.0.0.1:1",
        wallet_addr="127.0.0.1:1",
        group_commit=request.param,
    )
    try:
        yield Gifting(db, Outbox(common.outbox), Ledger(), settings)
    finally:
        await db.dispose()


async def _reason(call: Any) -> str:
    try:
        await call
    except DomainError as exc:
        return exc.reason
    raise AssertionError("the call succeeded")


async def _rows_of(g: Gifting, key: str) -> list[tuple[str, str | None]]:
    """(status, idempotency key) of every gift first recorded under `key`, oldest first."""
    e = gift_events.c
    async with g.db.unit_of_work(readonly=True) as uow:
        rows = await uow.conn.execute(
            select(e.status, e.idempotency_key).where(e.client_key == key).order_by(e.created_at_us, e.event_id)
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]


async def test_a_cancelled_gifts_key_refuses_other_requests_and_sends_its_own_once(gifting: Gifting) -> None:
    wallet: Ledger = gifting.wallet
    wallet.coins["v"] = 10
    stream = await gifting.start_stream(gifting_pb2.StartStreamRequest(creator_id="c", title="t", idempotency_key="s"))
    panda3 = gifting_pb2.SendGiftRequest(
        stream_id=stream.stream_id, sender_id="v", gift_id="panda", quantity=3, idempotency_key="k"
    )
    assert await _reason(gifting.send_gift(panda3)) == "INSUFFICIENT_COINS"  # 15 coins
    assert await _rows_of(gifting, "k") == [("CANCELLED", "k")]

    panda1 = gifting_pb2.SendGiftRequest()
    panda1.CopyFrom(panda3)
    panda1.quantity = 1  # 5 coins: the ledger would pay for it
    tip = gifting_pb2.SendTipRequest(stream_id=stream.stream_id, sender_id="v", coins=5, idempotency_key="k")
    spends = len(wallet.attempts)
    assert await _reason(gifting.send_gift(panda1)) == "IDEMPOTENCY_KEY_REUSED"
    assert await _reason(gifting.send_tip(tip)) == "IDEMPOTENCY_KEY_REUSED"
    batch = await gifting.send_gifts(gifting_pb2.SendGiftsRequest(gifts=[panda1]))
    assert batch.results[0].error.reason == "IDEMPOTENCY_KEY_REUSED"
    assert len(wallet.attempts) == spends and wallet.coins["v"] == 10  # nothing was even asked

    # After a top-up, five concurrent retries and a batch retry: one new gift, charged once.
    wallet.coins["v"] = 100
    sent = await asyncio.gather(*(gifting.send_gift(panda3) for _ in range(5)))
    assert {r.gift_event_id for r in sent} == {sent[0].gift_event_id}
    assert sent[0].status == gifting_pb2.GIFT_STATUS_SENT and sent[0].sender_balance == 85
    again = await gifting.send_gifts(gifting_pb2.SendGiftsRequest(gifts=[panda3]))
    assert again.results[0].receipt.gift_event_id == sent[0].gift_event_id
    assert await _reason(gifting.send_gift(panda1)) == "IDEMPOTENCY_KEY_REUSED"
    assert wallet.coins["v"] == 85 and len(wallet.spent) == 1
    assert await _rows_of(gifting, "k") == [("CANCELLED", None), ("SENT", "k")]


async def test_a_retry_of_a_cancelled_gift_is_checked_anew_and_keeps_the_key_when_refused(gifting: Gifting) -> None:
    wallet: Ledger = gifting.wallet
    stream = await gifting.start_stream(gifting_pb2.StartStreamRequest(creator_id="c", title="t", idempotency_key="s"))
    tip = gifting_pb2.SendTipRequest(stream_id=stream.stream_id, sender_id="v", coins=7, idempotency_key="k")
    assert await _reason(gifting.send_tip(tip)) == "INSUFFICIENT_COINS"
    await gifting.end_stream(gifting_pb2.EndStreamRequest(stream_id=stream.stream_id, idempotency_key="e"))
    wallet.coins["v"] = 100
    items = gifting_pb2.SendGiftsRequest(
        gifts=[
            gifting_pb2.SendGiftRequest(stream_id=stream.stream_id, sender_id="v", gift_id="rose", idempotency_key="k")
        ]
    )
    assert await _reason(gifting.send_tip(tip)) == "STREAM_NOT_LIVE"  # checked as a new tip would be
    assert (await gifting.send_gifts(items)).results[0].error.reason == "IDEMPOTENCY_KEY_REUSED"
    assert await _rows_of(gifting, "k") == [("CANCELLED", "k")]
    assert wallet.coins["v"] == 100


async def test_a_cancelled_unlocks_key_unlocks_only_its_own_content(gifting: Gifting) -> None:
    wallet: Ledger = gifting.wallet

    async def content(n: int) -> str:
        req = gifting_pb2.CreateContentRequest(creator_id="c", title="t", price_coins=30, idempotency_key=f"c{n}")
        return (await gifting.create_content(req)).content_id

    first, second = await content(1), await content(2)
    unlock = gifting_pb2.UnlockContentRequest(user_id="v", content_id=first, idempotency_key="k")
    assert await _reason(gifting.unlock_content(unlock)) == "INSUFFICIENT_COINS"
    wallet.coins["v"] = 100
    other = gifting_pb2.UnlockContentRequest(user_id="v", content_id=second, idempotency_key="k")
    assert await _reason(gifting.unlock_content(other)) == "IDEMPOTENCY_KEY_REUSED"
    receipt = await gifting.unlock_content(unlock)
    assert (receipt.already_unlocked, receipt.sender_balance) == (False, 70)
    assert (await gifting.check_access("v", first)).has_access
    assert not (await gifting.check_access("v", second)).has_access
    assert await _rows_of(gifting, "k") == [("CANCELLED", None), ("SENT", "k")]
