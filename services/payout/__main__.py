"""`python -m services.payout [serve|migrate]`: the payout service."""

from __future__ import annotations

# ruff: noqa: E402 - the handler goes in before the slow imports below (services/common/early_signals.py)
from services.common.early_signals import exit_on_sigterm

exit_on_sigterm()

from pathlib import Path

from livegifts.gifting.v1 import events_pb2 as gifting_events
from livegifts.payout.v1 import payout_pb2, payout_pb2_grpc
from livegifts.wallet.v1 import events_pb2 as wallet_events
from livegifts.wallet.v1 import wallet_pb2_grpc
from services.common.app import Runtime, ServiceSpec, Wiring, main
from services.common.audit import audit_registration, table_query
from services.common.auth import OperatorAuth
from services.common.clients import make_channel
from services.common.config import secret_bytes
from services.common.consumers import PAYOUT_GIFT_SENT, PAYOUT_PURCHASE_REVERSED
from services.common.grpcserver import ServiceRegistration
from services.common.inbox import Subscription
from services.payout.config import PayoutSettings
from services.payout.providers import DevPayoutProvider
from services.payout.server import PayoutServicer
from services.payout.storage import common, earnings
from services.payout.usecases import Payout


async def wire(rt: Runtime) -> Wiring:
    """Build the payout use cases, servicer, consumers (gifts, reversals) and background loops."""
    settings: PayoutSettings = rt.settings
    provider = DevPayoutProvider(
        settings.payout_webhook_secret.get_secret_value().encode(),
        settings.payout_signature_tolerance_s,
        settings.dev_provider_auto_callback,
        settings.dev_provider_latency_s,
        previous_secret=secret_bytes(settings.payout_webhook_secret_previous),
        settles_payouts=settings.dev_provider_settles_payouts,
    )
    # Eligibility (18+, not blocked) asks the wallet, which holds ages, once per RequestWithdrawal
    # with the outgoing deadline; a wallet outage refuses withdrawals (UNAVAILABLE), never credits.
    channel = make_channel(settings.wallet_addr, settings.outgoing_deadline_s)
    payout = Payout(rt.db, rt.outbox, provider, wallet_pb2_grpc.WalletServiceStub(channel), settings)
    servicer = PayoutServicer(payout, OperatorAuth(settings.operator_token, settings.operator_token_previous))
    name = payout_pb2.DESCRIPTOR.services_by_name["PayoutService"].full_name

    async def close() -> None:
        await channel.close()

    return Wiring(
        [
            ServiceRegistration(payout_pb2_grpc.add_PayoutServiceServicer_to_server, servicer, name),
            audit_registration(
                {
                    "earnings": table_query(
                        rt.db,
                        earnings,
                        id_col="event_id",
                        amount_col="coins",
                        time_col="credited_at_us",
                        party_col="creator_id",
                        status="CREDITED",
                    )
                }
            ),
        ],
        background=[payout.dispatcher, payout.reconciler, payout.shortfall_settler],
        close=close,
        subscriptions=[
            Subscription(
                durable=PAYOUT_GIFT_SENT,
                stream="GIFTING",
                subject="gifting.gift.sent",
                event_type=gifting_events.GiftSent,
                handle=payout.credit_gifts,
            ),
            Subscription(
                durable=PAYOUT_PURCHASE_REVERSED,
                stream="WALLET",
                subject="wallet.purchase.reversed",
                event_type=wallet_events.PurchaseReversed,
                handle=payout.claw_back,
            ),
        ],
    )


SPEC = ServiceSpec(
    name="payout",
    settings_cls=PayoutSettings,
    migrations_dir=Path(__file__).parent / "migrations",
    tables=common,
    streams=["PAYOUT", "GIFTING", "WALLET"],
    wire=wire,
)

if __name__ == "__main__":
    main(SPEC)
