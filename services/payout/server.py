"""PayoutService servicer: proto in, use case, proto out."""

from __future__ import annotations

from typing import Any

from livegifts.payout.v1 import payout_pb2, payout_pb2_grpc
from services.payout.usecases import Payout


class PayoutServicer(payout_pb2_grpc.PayoutServiceServicer):
    """Thin adapter over the payout use cases."""

    def __init__(self, payout: Payout) -> None:
        self.p = payout

    async def GetEarnings(self, request: payout_pb2.GetEarningsRequest, context: Any) -> Any:
        """A creator's diamonds."""
        return await self.p.get_earnings(request.creator_id)

    async def GetPolicy(self, request: payout_pb2.GetPolicyRequest, context: Any) -> Any:
        """The policy in force."""
        return await self.p.get_policy()

    async def GetAudit(self, request: payout_pb2.GetAuditRequest, context: Any) -> Any:
        """Totals for reconciliation."""
        return await self.p.audit()
