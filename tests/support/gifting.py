"""Gifting's use cases over a migrated SQLite file, and stand-ins for the wallet as the gifting
service calls it: refusals as the real wallet's interceptor builds them, a scripted wallet, one at
its concurrent-call limit, one whose restrictions a test sets, an in-memory ledger, and gifts left
PENDING."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from livegifts.gifting.v1 import gifting_pb2
from livegifts.wallet.v1 import wallet_pb2
from services.common.db import Database
from services.common.errors import Unavailable
from services.common.grpcserver import _rich_status
from services.common.migrate import upgrade_head
from services.common.outbox import Outbox
from services.gifting.config import GiftingSettings
from services.gifting.storage import common, gift_events
from services.gifting.usecases import Gifting

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "gifting" / "migrations"


@contextlib.asynccontextmanager
async def gifting_on(tmp_path: Path, wallet: Any, **settings: Any) -> AsyncIterator[tuple[Gifting, Database]]:
    """Gifting over `wallet` (a stand-in for its client) and a migrated SQLite file in `tmp_path`,
    with `settings` changed if any: no NATS, no background loops; the database disposed after."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'gifting.db'}"
    await upgrade_head(MIGRATIONS, url)
    db = Database(url, pool_size=2, pool_timeout_s=5, application_name="test")
    base = GiftingSettings(database_url=url, nats_url="nats://127.0.0.1:1", wallet_addr="127.0.0.1:1")
    g = Gifting(db, Outbox(common.outbox), wallet, base.model_copy(update=settings) if settings else base)
    try:
        yield g, db
    finally:
        await db.dispose()


def wallet_refusal(
    code: grpc.StatusCode, message: str, reason: str, metadata: dict[str, str] | None = None
) -> grpc.aio.AioRpcError:
    """A refused call as the client sees the real wallet's: the status its error interceptor builds,
    google.rpc.ErrorInfo with the stable reason (and `metadata`) in the grpc-status-details-bin trailer."""
    status = _rich_status(code, message, reason, "livegifts.wallet", metadata or {})
    return grpc.aio.AioRpcError(
        status.code, grpc.aio.Metadata(), grpc.aio.Metadata(*status.trailing_metadata), status.details
    )


class ScriptedWallet:
    """Spend and SpendMany refuse with INSUFFICIENT_COINS; CancelSpend answers what the script says."""

    def __init__(self, arbiter_outcome: int, *, settles: bool = False) -> None:
        self.arbiter_outcome = arbiter_outcome
        self.settles = settles  # SpendMany reports its refusals as settled (settle_refusals)
        self.cancel_calls: list[str] = []
        self.spend_many_calls = 0
        self.many_calls: list[list[str]] = []  # the ids of each GetAccountRestrictionsMany call

    async def GetAccountRestrictions(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        return wallet_pb2.AccountRestrictions(user_id=req.user_id, may_spend=True)

    async def GetAccountRestrictionsMany(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        """As the wallet answers it: what GetAccountRestrictions says of each id, in order."""
        self.many_calls.append(list(req.user_ids))
        one = wallet_pb2.GetAccountRestrictionsRequest
        return wallet_pb2.GetAccountRestrictionsManyResponse(
            restrictions=[await self.GetAccountRestrictions(one(user_id=u)) for u in req.user_ids]
        )

    async def Spend(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        raise wallet_refusal(grpc.StatusCode.FAILED_PRECONDITION, "not enough coins", "INSUFFICIENT_COINS")

    async def SpendMany(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        self.spend_many_calls += 1
        error = wallet_pb2.SpendItemError(
            code=grpc.StatusCode.FAILED_PRECONDITION.value[0],
            reason="INSUFFICIENT_COINS",
            message="not enough coins",
            settled=self.settles,
        )
        return wallet_pb2.SpendManyResponse(results=[wallet_pb2.SpendManyResult(error=error) for _ in req.spends])

    async def CancelSpend(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        self.cancel_calls.append(req.idempotency_key)
        spend = wallet_pb2.SpendResponse(spend_id="s1", amount=5, balance_after=95)
        return wallet_pb2.CancelSpendResponse(outcome=self.arbiter_outcome, spend=spend)


class OverloadedWallet(ScriptedWallet):
    """A wallet at its concurrent-call limit: gRPC itself answers RESOURCE_EXHAUSTED, with no ErrorInfo."""

    def __init__(self) -> None:
        super().__init__(wallet_pb2.CancelSpendResponse.OUTCOME_CANCELLED)

    async def Spend(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            "Concurrent RPC limit exceeded!",
        )

    async def SpendMany(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        self.spend_many_calls += 1
        await self.Spend(req)


def recipient_blocked() -> grpc.aio.AioRpcError:
    """The wallet's refusal of a Spend whose recipient it has blocked: ACCOUNT_BLOCKED, role=recipient."""
    return wallet_refusal(
        grpc.StatusCode.FAILED_PRECONDITION,
        "the recipient's account is blocked",
        "ACCOUNT_BLOCKED",
        {"role": "recipient"},
    )


def recipient_blocked_item() -> wallet_pb2.SpendItemError:
    """The same refusal as a SpendMany item's error, settled."""
    return wallet_pb2.SpendItemError(
        code=grpc.StatusCode.FAILED_PRECONDITION.value[0],
        reason="ACCOUNT_BLOCKED",
        message="the recipient's account is blocked",
        settled=True,
        metadata={"role": "recipient"},
    )


class RestrictingWallet:
    """Restrictions from the sets a test fills; spends go through (balance 100), except to a
    creator in `refuses_recipient`: the wallet's own ACCOUNT_BLOCKED (role recipient), as when a
    creator is blocked within gifting's eligibility cache."""

    def __init__(self) -> None:
        self.blocked: set[str] = set()
        self.underage: set[str] = set()
        self.refuses_recipient: set[str] = set()

    async def GetAccountRestrictions(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        u = req.user_id
        return wallet_pb2.AccountRestrictions(
            user_id=u, may_spend=u not in self.blocked | self.underage, blocked=u in self.blocked
        )

    async def GetAccountRestrictionsMany(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        one = wallet_pb2.GetAccountRestrictionsRequest
        return wallet_pb2.GetAccountRestrictionsManyResponse(
            restrictions=[await self.GetAccountRestrictions(one(user_id=u)) for u in req.user_ids]
        )

    async def Spend(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        if req.recipient_user_id in self.refuses_recipient:
            raise recipient_blocked()
        return wallet_pb2.SpendResponse(spend_id=f"s-{req.idempotency_key}", amount=req.amount, balance_after=100)

    async def SpendMany(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        results = []
        for s in req.spends:
            if s.recipient_user_id in self.refuses_recipient:
                results.append(wallet_pb2.SpendManyResult(error=recipient_blocked_item()))
            else:
                results.append(wallet_pb2.SpendManyResult(spent=await self.Spend(s)))
        return wallet_pb2.SpendManyResponse(results=results)

    async def CancelSpend(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        return wallet_pb2.CancelSpendResponse(outcome=wallet_pb2.CancelSpendResponse.OUTCOME_CANCELLED)


class OneSpendFailingWallet(OverloadedWallet):
    """An overloaded wallet (every gift left PENDING) whose CancelSpend fails with `code` for the
    keys in `failing` (INTERNAL: that one spend; UNAVAILABLE: the wallet gone) and cancels the others."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: dict[str, grpc.StatusCode] = {}

    async def CancelSpend(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        if (code := self.failing.get(req.idempotency_key)) is not None:
            self.cancel_calls.append(req.idempotency_key)
            raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "it failed")
        return await super().CancelSpend(req, timeout)


class Ledger:
    """An in-memory wallet with the wallet's contract for gifting's calls: coins per user; each spend
    key spends once, and a cancelled key never spends (a test refuses a spend, then allows it)."""

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
            return wallet_pb2.CancelSpendResponse(
                outcome=wallet_pb2.CancelSpendResponse.OUTCOME_SPENT, spend=self.spent[req.idempotency_key]
            )
        self.cancelled.add(req.idempotency_key)
        return wallet_pb2.CancelSpendResponse(outcome=wallet_pb2.CancelSpendResponse.OUTCOME_CANCELLED)


async def pending_gifts(g: Gifting, db: Database, n: int) -> list[str]:
    """`n` gifts left PENDING (their spends' answers lost: over an OverloadedWallet), stale at once;
    their ids, oldest first."""
    stream = await g.start_stream(gifting_pb2.StartStreamRequest(creator_id="c1", title="t", idempotency_key="s"))
    ids = []
    for i in range(n):
        with pytest.raises(Unavailable) as err:
            await g.send_gift(
                gifting_pb2.SendGiftRequest(
                    stream_id=stream.stream_id, sender_id="v1", gift_id="panda", quantity=1, idempotency_key=f"k{i}"
                )
            )
        ids.append(err.value.metadata["gift_event_id"])
    async with db.unit_of_work() as uow:
        for i, event_id in enumerate(ids):
            await uow.conn.execute(
                gift_events.update().where(gift_events.c.event_id == event_id).values(updated_at_us=1 + i)
            )
        await uow.commit()
    return ids
