"""GiftingService servicer: proto in, use case, proto out."""

from __future__ import annotations

from typing import Any

from livegifts.gifting.v1 import gifting_pb2, gifting_pb2_grpc
from services.gifting.usecases import Gifting


class GiftingServicer(gifting_pb2_grpc.GiftingServiceServicer):
    """Thin adapter over the gifting use cases."""

    def __init__(self, gifting: Gifting) -> None:
        self.g = gifting

    async def ListGifts(self, request: gifting_pb2.ListGiftsRequest, context: Any) -> Any:
        """The gift catalog."""
        return await self.g.list_gifts(request.include_retired)

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

    async def GetAudit(self, request: gifting_pb2.GetAuditRequest, context: Any) -> Any:
        """Totals for reconciliation."""
        return await self.g.audit()
