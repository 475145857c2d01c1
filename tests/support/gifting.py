"""Stand-ins for the wallet as the gifting service calls it: refusals as the real wallet's
interceptor builds them, a scripted wallet and one at its concurrent-call limit."""

from __future__ import annotations

from typing import Any

import grpc

from livegifts.wallet.v1 import wallet_pb2
from services.common.grpcserver import _rich_status


def wallet_refusal(code: grpc.StatusCode, message: str, reason: str) -> grpc.aio.AioRpcError:
    """A refused call as the client sees the real wallet's: the status its error interceptor builds,
    google.rpc.ErrorInfo with the stable reason in the grpc-status-details-bin trailer."""
    status = _rich_status(code, message, reason, "livegifts.wallet", {})
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
