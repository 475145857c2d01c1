"""What services.common.inbox.Consumer is given to drive its loop without NATS: a bus that is
connected, whose JetStream answers the position check for a durable that delivered nothing."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any


class FreshDurableJetStream:
    async def consumer_info(self, stream: str, durable: str) -> Any:
        # A durable that has delivered nothing yet: the position check (`Consumer.behind`) has
        # nothing to look up.
        return SimpleNamespace(ack_floor=None, delivered=None, num_ack_pending=0)


class ConnectedBus:
    """A bus that is connected (a test may put its own stand-in in `js`)."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.connected.set()
        self.nc = object()
        self.js = FreshDurableJetStream()
