"""GiftingService servicer: proto in, use case, proto out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from livegifts.gifting.v1 import gifting_pb2, gifting_pb2_grpc
from services.common.auth import OperatorAuth
from services.gifting.readmodels import ReadModels
from services.gifting.usecases import Gifting


class GiftingServicer(gifting_pb2_grpc.GiftingServiceServicer):
    """Thin adapter over the gifting use cases."""

    def __init__(self, gifting: Gifting, read_models: ReadModels, auth: OperatorAuth) -> None:
        self.g = gifting
        self.rm = read_models
        self.auth = auth

    async def ListGifts(self, request: gifting_pb2.ListGiftsRequest, context: Any) -> Any:
        """The gift catalog."""
        return await self.g.list_gifts(request.include_retired)

    async def UpsertGift(self, request: gifting_pb2.UpsertGiftRequest, context: Any) -> Any:
        """Operator: add, reprice or retire a gift."""
        return await self.g.upsert_gift(request, self.auth.require(context))

    async def StartStream(self, request: gifting_pb2.StartStreamRequest, context: Any) -> Any:
        """Go live."""
        return await self.g.start_stream(request)

    async def EndStream(self, request: gifting_pb2.EndStreamRequest, context: Any) -> Any:
        """End a stream."""
        return await self.g.end_stream(request)

    async def GetStream(self, request: gifting_pb2.GetStreamRequest, context: Any) -> Any:
        """One stream."""
        return await self.g.get_stream(request.stream_id)

    async def SendGift(self, request: gifting_pb2.SendGiftRequest, context: Any) -> Any:
        """Send a gift during a live stream."""
        return await self.g.send_gift(request)

    async def SendGifts(self, request: gifting_pb2.SendGiftsRequest, context: Any) -> Any:
        """Many gifts in one call, each with its own key and result."""
        return await self.g.send_gifts(request)

    async def SendTip(self, request: gifting_pb2.SendTipRequest, context: Any) -> Any:
        """Tip a live stream."""
        return await self.g.send_tip(request)

    async def CreateContent(self, request: gifting_pb2.CreateContentRequest, context: Any) -> Any:
        """Publish content users unlock for coins."""
        return await self.g.create_content(request)

    async def UnlockContent(self, request: gifting_pb2.UnlockContentRequest, context: Any) -> Any:
        """Unlock content, charged once per user."""
        return await self.g.unlock_content(request)

    async def CheckAccess(self, request: gifting_pb2.CheckAccessRequest, context: Any) -> Any:
        """Whether a user has unlocked content."""
        return await self.g.check_access(request.user_id, request.content_id)

    async def GetLeaderboard(self, request: gifting_pb2.GetLeaderboardRequest, context: Any) -> Any:
        """Top senders of a stream or a creator."""
        return await self.rm.leaderboard(request)

    async def GetCreatorStats(self, request: gifting_pb2.GetCreatorStatsRequest, context: Any) -> Any:
        """Coins a creator received by gift, stream and hour."""
        return await self.rm.creator_stats(request)

    async def WatchStream(
        self, request: gifting_pb2.WatchStreamRequest, context: Any
    ) -> AsyncIterator[gifting_pb2.StreamFeedItem]:
        """The live feed of a stream (after what it missed, given a resume cursor); initial metadata is
        sent once the feed is listening."""

        async def ready() -> None:
            await context.send_initial_metadata(())

        async for item in self.g.watch_stream(request.stream_id, ready, request.resume_cursor):
            yield item

    async def GetAudit(self, request: gifting_pb2.GetAuditRequest, context: Any) -> Any:
        """Totals for reconciliation."""
        return await self.g.audit()
