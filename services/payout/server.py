"""PayoutService servicer: proto in, use case, proto out. No SQL, no rules."""

from __future__ import annotations

from typing import Any

from livegifts.payout.v1 import payout_pb2, payout_pb2_grpc
from services.common.auth import OperatorAuth
from services.payout.usecases import Payout


class PayoutServicer(payout_pb2_grpc.PayoutServiceServicer):
    """Thin adapter over the payout use cases."""

    def __init__(self, payout: Payout, auth: OperatorAuth | None = None) -> None:
        self.p = payout
        self.auth = auth or OperatorAuth(None)

    async def GetEarnings(self, request: payout_pb2.GetEarningsRequest, context: Any) -> Any:
        """A creator's diamonds."""
        return await self.p.get_earnings(request.creator_id)

    async def ListEarnings(self, request: payout_pb2.ListEarningsRequest, context: Any) -> Any:
        """A creator's credited events, newest first."""
        return await self.p.list_earnings(request)

    async def GetPolicy(self, request: payout_pb2.GetPolicyRequest, context: Any) -> Any:
        """The policy in force (who changed it by name only with the operator token)."""
        return await self.p.get_policy(operator_view=self.auth.is_operator(context))

    async def SetPolicy(self, request: payout_pb2.SetPolicyRequest, context: Any) -> Any:
        """A new policy version (operator)."""
        return await self.p.set_policy(request, self.auth.require(context))

    async def AddPayoutMethod(self, request: payout_pb2.AddPayoutMethodRequest, context: Any) -> Any:
        """Register a PayPal or bank account (stored masked)."""
        return await self.p.add_payout_method(request)

    async def ListPayoutMethods(self, request: payout_pb2.ListPayoutMethodsRequest, context: Any) -> Any:
        """A creator's payout methods, a page at a time."""
        return await self.p.list_payout_methods(request)

    async def VerifyPayoutMethod(self, request: payout_pb2.VerifyPayoutMethodRequest, context: Any) -> Any:
        """Record a method's verification outcome (operator)."""
        return await self.p.verify_payout_method(request, self.auth.require(context))

    async def RequestWithdrawal(self, request: payout_pb2.RequestWithdrawalRequest, context: Any) -> Any:
        """Hold diamonds for a payout."""
        return await self.p.request_withdrawal(request)

    async def ApproveWithdrawal(self, request: payout_pb2.ApproveWithdrawalRequest, context: Any) -> Any:
        """Approve a reviewed withdrawal (operator)."""
        return await self.p.approve_withdrawal(request, self.auth.require(context))

    async def RejectWithdrawal(self, request: payout_pb2.RejectWithdrawalRequest, context: Any) -> Any:
        """Reject a reviewed withdrawal (operator)."""
        return await self.p.reject_withdrawal(request, self.auth.require(context))

    async def HandlePayoutEvent(self, request: payout_pb2.HandlePayoutEventRequest, context: Any) -> Any:
        """A signed payout-provider callback."""
        return await self.p.handle_payout_event(request)

    async def GetWithdrawal(self, request: payout_pb2.GetWithdrawalRequest, context: Any) -> Any:
        """One withdrawal (its reviewer by name only with the operator token)."""
        return await self.p.get_withdrawal(request.withdrawal_id, operator_view=self.auth.is_operator(context))

    async def ListWithdrawals(self, request: payout_pb2.ListWithdrawalsRequest, context: Any) -> Any:
        """A creator's withdrawals, newest first; every creator's (operator), oldest first."""
        if not request.creator_id:  # the review queue: other creators' withdrawals
            self.auth.require(context)
            return await self.p.list_withdrawals(request, operator_view=True)
        return await self.p.list_withdrawals(request, operator_view=self.auth.is_operator(context))

    async def GetStatement(self, request: payout_pb2.GetStatementRequest, context: Any) -> Any:
        """Earnings and payouts by month."""
        return await self.p.get_statement(request.creator_id, request.year)

    async def GetAudit(self, request: payout_pb2.GetAuditRequest, context: Any) -> Any:
        """Totals for reconciliation."""
        return await self.p.audit()
