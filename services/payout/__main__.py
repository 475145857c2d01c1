"""`python -m services.payout [serve|migrate]`: the payout service."""

from __future__ import annotations

from pathlib import Path

from livegifts.gifting.v1 import events_pb2 as gifting_events
from livegifts.payout.v1 import payout_pb2, payout_pb2_grpc
from services.common.app import Runtime, ServiceSpec, Wiring, main
from services.common.audit import audit_registration, table_query
from services.common.grpcserver import ServiceRegistration
from services.common.inbox import Subscription
from services.payout.config import PayoutSettings
from services.payout.server import PayoutServicer
from services.payout.storage import common, earnings
from services.payout.usecases import Payout


async def wire(rt: Runtime) -> Wiring:
    """Build the payout use cases, servicer and its gift-event consumer."""
    payout = Payout(rt.db, rt.outbox)
    name = payout_pb2.DESCRIPTOR.services_by_name["PayoutService"].full_name
    return Wiring(
        [
            ServiceRegistration(payout_pb2_grpc.add_PayoutServiceServicer_to_server, PayoutServicer(payout), name),
            audit_registration(
                {
                    "earnings": table_query(
                        rt.db,
                        earnings,
                        id_col="event_id",
                        amount_col="coins",
                        party_col="creator_id",
                        status="CREDITED",
                    )
                }
            ),
        ],
        subscriptions=[
            Subscription(
                durable="payout-gift-sent",
                stream="GIFTING",
                subject="gifting.gift.sent",
                event_type=gifting_events.GiftSent,
                handle=payout.credit_gifts,
            )
        ],
    )


SPEC = ServiceSpec(
    name="payout",
    settings_cls=PayoutSettings,
    migrations_dir=Path(__file__).parent / "migrations",
    tables=common,
    streams=["PAYOUT", "GIFTING"],
    wire=wire,
)

if __name__ == "__main__":
    main(SPEC)
