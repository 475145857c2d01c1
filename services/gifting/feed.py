"""The live feed behind WatchStream: one core NATS subscription per replica, fanned out to watchers.

Choices: A) poll the database per watcher (load grows with watchers x polls); B) an ordered
ephemeral JetStream consumer per watcher (every watcher reads every gift of every stream,
since subjects do not carry the stream id); C) one core NATS subscription per replica on
gifting.gift.sent and gifting.stream.ended, dispatched in memory to the watchers of each
stream. We take C: any replica sees every replica's gifts, as soon as the relay publishes them.
Core NATS is at most once, and so is a feed by itself: a client that reconnects (a network blip,
a replica stopping: SHUTTING_DOWN, a slow client ended: FEED_TOO_SLOW) would lose what was sent
while it was away. So each item carries a cursor, and a watch with `resume_cursor` first reads
from the database the stream's SENT gifts after it, in feed order (sent time, then event id),
a page at a time and within a bounded window (`Gifting.watch_stream`): the watcher is registered
before that read, so a gift committed during it comes live, and live items the read already sent
are dropped by id. A watch without a cursor does no database read per item. A gift core NATS
drops while the watcher stays connected is still lost to it, unless no later gift reached it
before it reconnected. Live items come in publish order, which is feed order but for gifts whose
SENT commits overtook each other (a transaction's length apart, plus the clock difference of the
replicas that marked them): a watcher that leaves in that
moment may miss one or get one twice, so an overlay keys its items by gift_event_id. The feed also
re-reads the stream's status when idle, so a missed end event still ends it. A relay may publish
an event twice, so the hub drops event ids it has just seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg

from livegifts.gifting.v1 import events_pb2
from services.common.bus import Bus
from services.common.errors import ResourceExhausted, Unavailable, check
from services.common.metrics import FEED_WATCHERS

log = logging.getLogger(__name__)

GIFT_SENT_SUBJECT = "gifting.gift.sent"
STREAM_ENDED_SUBJECT = "gifting.stream.ended"
SEEN_EVENT_IDS_MAX = 10_000


class Ended:
    """Marker: the stream ended."""


class ShuttingDown:
    """Marker: this replica is stopping; the client should watch again (another replica)."""


Item = events_pb2.GiftSent | type[Ended] | type[ShuttingDown]


@dataclass(eq=False)  # hashed by identity: a set of watchers per stream
class Watcher:
    """One WatchStream call's queue, bounded: a client too slow to keep up is ended, not buffered forever."""

    stream_id: str
    size_max: int
    items: deque[Item] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    overflowed: bool = False

    def push(self, item: Item) -> None:
        """Queue an item (the end markers always fit)."""
        if isinstance(item, events_pb2.GiftSent) and len(self.items) >= self.size_max:
            self.overflowed = True
        else:
            self.items.append(item)
        self.wake.set()

    async def next(self, timeout_s: float) -> Item | None:
        """The next item, or None after `timeout_s` without one."""
        if self.overflowed:
            raise ResourceExhausted("the feed fell too far behind; watch again", "FEED_TOO_SLOW")
        if not self.items:
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout_s)
            if self.overflowed:
                raise ResourceExhausted("the feed fell too far behind; watch again", "FEED_TOO_SLOW")
            if not self.items:
                return None
        return self.items.popleft()


class FeedHub:
    """Subscribes once to gift and stream-end events and hands them to the watchers of each stream."""

    def __init__(self, bus: Bus, watchers_max: int, queue_size_max: int) -> None:
        self.bus = bus
        self.watchers_max = watchers_max
        self.queue_size_max = queue_size_max
        self.ready = asyncio.Event()
        self._by_stream: dict[str, set[Watcher]] = {}
        self._count = 0
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._stopping = False

    @property
    def watchers(self) -> int:
        """How many feeds are registered (at most `watchers_max`)."""
        return self._count

    async def run(self, stop: asyncio.Event) -> None:
        """Subscribe once NATS is up (the client re-subscribes after reconnects), until `stop`."""
        connected = asyncio.ensure_future(self.bus.connected.wait())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([connected, stopped], return_when=asyncio.FIRST_COMPLETED)
        connected.cancel()
        subs = []
        try:
            if not stop.is_set():
                check(self.bus.nc is not None, "self.bus.nc is not None")
                subs.append(await self.bus.nc.subscribe(GIFT_SENT_SUBJECT, cb=self._on_gift))
                subs.append(await self.bus.nc.subscribe(STREAM_ENDED_SUBJECT, cb=self._on_ended))
                self.ready.set()
                await stop.wait()
        finally:
            stopped.cancel()
            self.ready.clear()
            self._stopping = True
            for watchers in self._by_stream.values():
                for w in watchers:
                    w.push(ShuttingDown)
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    @contextlib.contextmanager
    def watch(self, stream_id: str) -> Iterator[Watcher]:
        """Register a watcher of `stream_id` for the duration of the block."""
        if self._stopping or not self.ready.is_set():
            raise Unavailable("the live feed is not connected; retry", "FEED_UNAVAILABLE")
        if self._count >= self.watchers_max:
            raise ResourceExhausted("too many live feeds on this replica; retry", "TOO_MANY_WATCHERS")
        w = Watcher(stream_id, self.queue_size_max)
        self._by_stream.setdefault(stream_id, set()).add(w)
        self._count += 1
        FEED_WATCHERS.inc()
        try:
            yield w
        finally:
            self._count -= 1
            FEED_WATCHERS.dec()
            watchers = self._by_stream.get(stream_id)
            if watchers is not None:
                watchers.discard(w)
                if not watchers:
                    del self._by_stream[stream_id]

    def _first_time(self, event_id: str) -> bool:
        if event_id in self._seen:
            return False
        self._seen[event_id] = None
        if len(self._seen) > SEEN_EVENT_IDS_MAX:
            self._seen.popitem(last=False)
        return True

    async def _on_gift(self, msg: Msg) -> None:
        try:
            event = events_pb2.GiftSent.FromString(msg.data)
        except DecodeError:
            log.warning("undecodable gift event on the live feed", extra={"subject": msg.subject})
            return
        watchers = self._by_stream.get(event.stream_id)
        if watchers and self._first_time(event.event_id):
            for w in watchers:
                w.push(event)

    async def _on_ended(self, msg: Msg) -> None:
        try:
            event = events_pb2.StreamEnded.FromString(msg.data)
        except DecodeError:
            log.warning("undecodable stream event on the live feed", extra={"subject": msg.subject})
            return
        for w in self._by_stream.get(event.stream_id, ()):
            w.push(Ended)
