"""`python -m services.wallet [serve|migrate]`: the wallet service."""

from __future__ import annotations

# ruff: noqa: E402 - the handler goes in before the slow imports below (services/common/early_signals.py)
from services.common.early_signals import exit_on_sigterm

exit_on_sigterm()

from pathlib import Path

from livegifts.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from services.common.app import Runtime, ServiceSpec, Wiring, main
from services.common.audit import audit_registration, table_query
from services.common.auth import OperatorAuth
from services.common.config import secret_bytes
from services.common.grpcserver import ServiceRegistration
from services.wallet.config import WalletSettings
from services.wallet.payments import DevProvider, PaymentRouter, parse_routes
from services.wallet.server import WalletServicer
from services.wallet.storage import common, spends
from services.wallet.usecases import Wallet


async def wire(rt: Runtime) -> Wiring:
    """Build the wallet's use cases and servicer."""
    settings: WalletSettings = rt.settings
    # PAYMENT_PROVIDER and PAYMENT_ROUTES were checked with the rest of the settings (config.py).
    provider = DevProvider(
        settings.payment_webhook_secret.get_secret_value().encode(),
        settings.payment_signature_tolerance_s,
        settings.dev_provider_latency_s,
        previous_secret=secret_bytes(settings.payment_webhook_secret_previous),
        settles_checkouts=settings.dev_provider_settles_checkouts,
    )
    router = PaymentRouter([provider], parse_routes(settings.payment_routes))
    wallet = Wallet(rt.db, rt.outbox, router, settings)
    name = wallet_pb2.DESCRIPTOR.services_by_name["WalletService"].full_name
    return Wiring(
        [
            ServiceRegistration(
                wallet_pb2_grpc.add_WalletServiceServicer_to_server,
                WalletServicer(wallet, OperatorAuth(settings.operator_token, settings.operator_token_previous)),
                name,
            ),
            audit_registration(
                {
                    "spends": table_query(
                        rt.db,
                        spends,
                        id_col="idempotency_key",
                        amount_col="amount",
                        time_col="created_at_us",
                        party_col="user_id",
                        status_col="status",
                    )
                }
            ),
        ],
        background=[wallet.reconciler],
    )


SPEC = ServiceSpec(
    name="wallet",
    settings_cls=WalletSettings,
    migrations_dir=Path(__file__).parent / "migrations",
    tables=common,
    streams=["WALLET"],
    wire=wire,
)

if __name__ == "__main__":
    main(SPEC)
