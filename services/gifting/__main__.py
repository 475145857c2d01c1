"""`python -m services.gifting [serve|migrate]`: the gifting service."""

from __future__ import annotations

from pathlib import Path

from livegifts.gifting.v1 import gifting_pb2, gifting_pb2_grpc
from livegifts.wallet.v1 import wallet_pb2_grpc
from services.common.app import Runtime, ServiceSpec, Wiring, main
from services.common.audit import audit_registration, table_query
from services.common.clients import make_channel
from services.common.grpcserver import ServiceRegistration
from services.gifting.config import GiftingSettings
from services.gifting.server import GiftingServicer
from services.gifting.storage import common, gift_events
from services.gifting.usecases import Gifting


async def wire(rt: Runtime) -> Wiring:
    """Build the gifting use cases, the wallet client and the sweeper."""
    settings: GiftingSettings = rt.settings
    channel = make_channel(settings.wallet_addr, settings.outgoing_deadline_s)
    gifting = Gifting(rt.db, rt.outbox, wallet_pb2_grpc.WalletServiceStub(channel), settings)
    name = gifting_pb2.DESCRIPTOR.services_by_name["GiftingService"].full_name

    async def close() -> None:
        await channel.close()

    return Wiring(
        [
            ServiceRegistration(gifting_pb2_grpc.add_GiftingServiceServicer_to_server, GiftingServicer(gifting), name),
            audit_registration(
                {
                    "gifts": table_query(
                        rt.db,
                        gift_events,
                        id_col="event_id",
                        amount_col="coins",
                        party_col="creator_id",
                        status_col="status",
                    )
                }
            ),
        ],
        background=[gifting.sweeper],
        close=close,
    )


SPEC = ServiceSpec(
    name="gifting",
    settings_cls=GiftingSettings,
    migrations_dir=Path(__file__).parent / "migrations",
    tables=common,
    streams=["GIFTING"],
    wire=wire,
)

if __name__ == "__main__":
    main(SPEC)
