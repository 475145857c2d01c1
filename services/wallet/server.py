"""WalletService servicer: proto in, use case, proto out. No SQL, no rules."""

from __future__ import annotations

from typing import Any

from livegifts.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from services.common.auth import OperatorAuth
from services.wallet.usecases import Wallet


class WalletServicer(wallet_pb2_grpc.WalletServiceServicer):
    """Thin adapter over the wallet use cases; operator RPCs check the operator token first."""

    def __init__(self, wallet: Wallet, auth: OperatorAuth) -> None:
        self.w = wallet
        self.auth = auth

    async def ListCoinPackages(self, request: wallet_pb2.ListCoinPackagesRequest, context: Any) -> Any:
        """Packages a user in a region can buy."""
        return await self.w.list_packages(request)

    async def CreatePurchase(self, request: wallet_pb2.CreatePurchaseRequest, context: Any) -> Any:
        """Start a purchase (PENDING) and return its checkout session."""
        return await self.w.create_purchase(request)

    async def GetPurchase(self, request: wallet_pb2.GetPurchaseRequest, context: Any) -> Any:
        """One purchase."""
        return await self.w.get_purchase(request.purchase_id)

    async def HandlePaymentEvent(self, request: wallet_pb2.HandlePaymentEventRequest, context: Any) -> Any:
        """A signed payment-provider callback."""
        return await self.w.handle_payment_event(request)

    async def GetBalance(self, request: wallet_pb2.GetBalanceRequest, context: Any) -> Any:
        """A user's coins."""
        return await self.w.get_balance(request.user_id)

    async def ListTransactions(self, request: wallet_pb2.ListTransactionsRequest, context: Any) -> Any:
        """A user's history, newest first."""
        return await self.w.list_transactions(request)

    async def Spend(self, request: wallet_pb2.SpendRequest, context: Any) -> Any:
        """Debit coins once per idempotency key."""
        return await self.w.spend(request)

    async def SpendMany(self, request: wallet_pb2.SpendManyRequest, context: Any) -> Any:
        """Many spends in one transaction, each with its own key and result."""
        return await self.w.spend_many(request)

    async def CancelSpend(self, request: wallet_pb2.CancelSpendRequest, context: Any) -> Any:
        """Settle an unresolved spend for good."""
        return await self.w.cancel_spend(request)

    async def SetAccountRestrictions(self, request: wallet_pb2.SetAccountRestrictionsRequest, context: Any) -> Any:
        """Age and block status of a user, once per idempotency key, logged with who made the change.

        The contract (ARCHITECTURE.md) lists this RPC among those internal services call, not among
        the operator RPCs, so no token is required: trust and safety's tooling and the identity
        service call it as they are. A token that is sent is checked all the same (a wrong one is
        refused, never logged as no one), and the operator it names is logged with the change."""
        return await self.w.set_restrictions(request, self.auth.identify(context))

    async def GetAccountRestrictions(self, request: wallet_pb2.GetAccountRestrictionsRequest, context: Any) -> Any:
        """Whether a user may buy and spend."""
        return await self.w.get_restrictions(request.user_id)

    async def GetAccountRestrictionsMany(
        self, request: wallet_pb2.GetAccountRestrictionsManyRequest, context: Any
    ) -> Any:
        """Whether each of many users may buy and spend (gifting's batched pre-check)."""
        return await self.w.get_restrictions_many(request)

    async def GetAudit(self, request: wallet_pb2.GetAuditRequest, context: Any) -> Any:
        """Totals for reconciliation."""
        return await self.w.audit()

    async def SetSpendingLimits(self, request: wallet_pb2.SetSpendingLimitsRequest, context: Any) -> Any:
        """A user's own caps, or (with the operator token) an operator's caps on a user."""
        if request.set_by == wallet_pb2.LIMIT_SETTER_OPERATOR:
            return await self.w.set_spending_limits(request, self.auth.require(context))
        return await self.w.set_spending_limits(request)

    async def GetSpendingLimits(self, request: wallet_pb2.GetSpendingLimitsRequest, context: Any) -> Any:
        """Caps in force and what was spent in each period."""
        return await self.w.get_spending_limits(request.user_id)

    async def UpsertCoinPackage(self, request: wallet_pb2.UpsertCoinPackageRequest, context: Any) -> Any:
        """Operator: create or change a coin package."""
        return await self.w.upsert_package(request, self.auth.require(context))

    async def UpsertPromotion(self, request: wallet_pb2.UpsertPromotionRequest, context: Any) -> Any:
        """Operator: create or change a promotion."""
        return await self.w.upsert_promotion(request, self.auth.require(context))

    async def ListPromotions(self, request: wallet_pb2.ListPromotionsRequest, context: Any) -> Any:
        """Operator: every promotion, running or not."""
        self.auth.require(context)
        return await self.w.list_promotions(request)
