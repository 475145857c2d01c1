"""`python -m services.gifting [serve|migrate]`: the gifting service."""

from __future__ import annotations

# ruff: noqa: E402 - the handler goes in before the slow imports below (services/common/early_signals.py)
from services.common.early_signals import exit_on_sigterm

exit_on_sigterm()

from pathlib import Path

from livegifts.gifting.v1 import gifting_pb2, gifting_pb2_grpc
from livegifts.wallet.v1 import wallet_pb2_grpc
from services.common.app import Runtime, ServiceSpec, Wiring, main
from services.common.audit import audit_registration, table_query
from services.common.auth import OperatorAuth
from services.common.clients import make_channel
from services.common.grpcserver import ServiceRegistration
from services.gifting.config import GiftingSettings
from services.gifting.feed import FeedHub
from services.gifting.keyrows import KeyOnlyPruner
from services.gifting.readmodels import LeaderboardDailyPruner, ReadModels
from services.gifting.server import GiftingServicer
from services.gifting.storage import common, gift_events
from services.gifting.usecases import Gifting


async def wire(rt: Runtime) -> Wiring:
    """Build the use cases, the wallet client, the sweeper, the read-model consumer, the live feed and
    the pruner of answered unlocks' key rows."""
    settings: GiftingSettings = rt.settings
    channel = make_channel(settings.wallet_addr, settings.outgoing_deadline_s)
    feed = FeedHub(rt.bus, settings.watchers_max, settings.watch_queue_size_max)
    gifting = Gifting(rt.db, rt.outbox, wallet_pb2_grpc.WalletServiceStub(channel), settings, feed)
    read_models = ReadModels(rt.db)
    servicer = GiftingServicer(
        gifting, read_models, OperatorAuth(settings.operator_token, settings.operator_token_previous)
    )
    name = gifting_pb2.DESCRIPTOR.services_by_name["GiftingService"].full_name

    async def close() -> None:
        await channel.close()

    return Wiring(
        [
            ServiceRegistration(gifting_pb2_grpc.add_GiftingServiceServicer_to_server, servicer, name),
            audit_registration(
                {
                    "gifts": table_query(
                        rt.db,
                        gift_events,
                        id_col="event_id",
                        amount_col="coins",
                        time_col="created_at_us",
                        party_col="creator_id",
                        status_col="status",
                    )
                }
            ),
        ],
        subscriptions=[read_models.subscription()],
        background=[
            gifting.sweeper,
            feed.run,
            KeyOnlyPruner(rt.db, settings).run,
            LeaderboardDailyPruner(rt.db, settings).run,
        ],
        # Each WatchStream holds a call open; FeedHub refuses feeds past WATCHERS_MAX.
        streaming_rpcs_max=settings.watchers_max,
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
