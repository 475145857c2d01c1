"""A WatchStream client whose network vanishes without a word (no FIN, no RST) is let go by the
server's keepalive; a quiet one that is alive is not.

Between the client and a gifting server in this process sits a TCP proxy that can freeze: it stops
forwarding in both directions and keeps both sockets open, the half-open connection a phone that
lost its network or a NAT that dropped its state leaves behind. Without keepalive the server keeps
such a watcher (its slot of WATCHERS_MAX, its queue) until TCP or gRPC's default 2-hour keepalive
notices; enough of them and every new overlay is refused TOO_MANY_WATCHERS.

The feed is a FeedHub without NATS that the test hands events to, as its subscription would.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from livegifts.gifting.v1 import gifting_pb2, gifting_pb2_grpc
from services.common.auth import OperatorAuth
from services.common.clients import make_channel
from services.common.db import Database
from services.common.grpcserver import ServiceRegistration, create_server
from services.common.migrate import upgrade_head
from services.common.outbox import Outbox
from services.gifting.config import GiftingSettings
from services.gifting.feed import FeedHub
from services.gifting.readmodels import ReadModels
from services.gifting.server import GiftingServicer
from services.gifting.storage import common
from services.gifting.usecases import Gifting, _gift_sent_event

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "gifting" / "migrations"
KEEPALIVE_TIME_S = 1.0
KEEPALIVE_TIMEOUT_S = 1.0
# A healthy feed stays quiet through several of the server's pings: more than gRPC's default of 2
# pings without data, after which the server would stop pinging and never notice a later death.
QUIET_S = 4 * KEEPALIVE_TIME_S
SLACK_S = 2.0  # timers, the handler's cancellation and a loaded machine on top of time + timeout
STEP_S = 5.0  # a bound on each wait of the test: a stall fails it, it does not hang it


class FreezingProxy:
    """A TCP proxy on 127.0.0.1 to `upstream`; `freeze()` stops it forwarding both ways, sockets open."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        """Listen; the port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def freeze(self) -> None:
        """Forward nothing more, either way, and close nothing: both peers see silence."""
        self.flowing.clear()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._writers.append(client_w)
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream)
        self._writers.append(up_w)
        for reader, writer in ((client_r, up_w), (up_r, client_w)):
            self._pipes.add(asyncio.create_task(self._pipe(reader, writer)))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                await self.flowing.wait()
                data = await reader.read(65536)
                if not data:
                    break
                await self.flowing.wait()  # frozen meanwhile: what was read stays here
                writer.write(data)
                await writer.drain()
        if self.flowing.is_set():  # a peer closed: pass it on, unless frozen (then nothing passes)
            writer.close()

    async def close(self) -> None:
        """Stop listening and drop every connection and pipe."""
        assert self._server is not None
        self._server.close()
        for task in self._pipes:
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()


@dataclass
class Served:
    gifting: Gifting
    hub: FeedHub
    port: int


def _settings(url: str, **kw: object) -> GiftingSettings:
    return GiftingSettings(
        database_url=url,
        nats_url="nats://127.0.0.1:1",
        wallet_addr="127.0.0.1:1",
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    """Gifting's servicer on a server built as the service builds it, with the keepalive settings
    at a second each so that the test runs in seconds."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'gifting.db'}"
    await upgrade_head(MIGRATIONS, url)
    db = Database(url, pool_size=2, pool_timeout_s=5, application_name="gifting-test")
    settings = _settings(url, grpc_keepalive_time_s=KEEPALIVE_TIME_S, grpc_keepalive_timeout_s=KEEPALIVE_TIMEOUT_S)
    hub = FeedHub(None, watchers_max=10, queue_size_max=100)  # type: ignore[arg-type] # no bus: the test publishes
    hub.ready.set()
    gifting = Gifting(db, Outbox(common.outbox), None, settings, hub)
    servicer = GiftingServicer(gifting, ReadModels(db), OperatorAuth(None))
    name = gifting_pb2.DESCRIPTOR.services_by_name["GiftingService"].full_name
    running = await create_server(
        [ServiceRegistration(gifting_pb2_grpc.add_GiftingServiceServicer_to_server, servicer, name)],
        "127.0.0.1",
        0,
        "livegifts.gifting",
        trace_spans=False,
        keepalive_time_s=settings.grpc_keepalive_time_s,
        keepalive_timeout_s=settings.grpc_keepalive_timeout_s,
    )
    try:
        yield Served(gifting, hub, running.port)
    finally:
        await running.server.stop(0)
        await db.dispose()


@dataclass
class _Msg:
    """What FeedHub reads of a NATS message."""

    data: bytes
    subject: str = "gifting.gift.sent"


async def _publish(served: Served, stream_id: str, event_id: str) -> None:
    """Hand a gift to the live feed, as the relay's publish reaches the hub's subscription."""
    row = {"event_id": event_id, "kind": "GIFT", "stream_id": stream_id, "creator_id": "c", "sender_id": "v"}
    row |= {"gift_id": "rose", "quantity": 1, "coins": 1, "updated_at_us": time.time_ns() // 1000, "created_at_us": 0}
    await served.hub._on_gift(_Msg(_gift_sent_event(row).SerializeToString()))  # type: ignore[arg-type]


async def _released_within(hub: FeedHub, bound_s: float) -> float | None:
    """Seconds until the hub holds no watcher, or None if it still holds one after `bound_s`."""
    started = time.monotonic()
    while time.monotonic() - started < bound_s:
        if hub.watchers == 0:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    return None


async def test_a_quiet_live_feed_is_kept_and_one_whose_network_vanished_is_released_within_the_keepalive(
    served: Served,
) -> None:
    req = gifting_pb2.StartStreamRequest(creator_id="creator", title="t", idempotency_key="s-creator")
    stream_id = (await served.gifting.start_stream(req)).stream_id
    proxy = FreezingProxy(served.port)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{await proxy.start()}")
    try:
        watch = gifting_pb2_grpc.GiftingServiceStub(channel).WatchStream(
            gifting_pb2.WatchStreamRequest(stream_id=stream_id)
        )
        await asyncio.wait_for(watch.initial_metadata(), STEP_S)  # the feed is listening
        assert served.hub.watchers == 1

        # Alive but quiet, longer than several keepalive pings: the client answers them, the feed stays.
        await asyncio.sleep(QUIET_S)
        assert served.hub.watchers == 1 and not watch.done()
        await _publish(served, stream_id, "g1")
        assert (await asyncio.wait_for(watch.read(), STEP_S)).gift_event_id == "g1"

        # Its network vanishes: nothing more arrives, nothing is closed.
        proxy.freeze()
        bound_s = KEEPALIVE_TIME_S + KEEPALIVE_TIMEOUT_S + SLACK_S
        released_after = await _released_within(served.hub, bound_s)
        assert released_after is not None, f"the dead client still holds its feed after {bound_s} s"
    finally:
        await proxy.close()
        await channel.close()


async def test_a_service_call_over_a_connection_that_vanished_ends_at_its_deadline(served: Served) -> None:
    # The services' own channels (make_channel: gifting -> wallet, payout -> wallet) are as
    # long-lived, but every unary call on them has a deadline (OUTGOING_DEADLINE_S): a replica
    # gone behind a half-open connection costs each call its deadline, never a call held for
    # good; the channel's keepalive (30 s while calls are in flight) then drops the connection.
    req = gifting_pb2.StartStreamRequest(creator_id="creator", title="t", idempotency_key="s-creator")
    stream_id = (await served.gifting.start_stream(req)).stream_id
    proxy = FreezingProxy(served.port)
    deadline_s = 1.0
    channel = make_channel(f"127.0.0.1:{await proxy.start()}", deadline_s)
    try:
        stub = gifting_pb2_grpc.GiftingServiceStub(channel)
        get = gifting_pb2.GetStreamRequest(stream_id=stream_id)
        assert (await asyncio.wait_for(stub.GetStream(get), STEP_S)).stream_id == stream_id  # connected
        proxy.freeze()
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await asyncio.wait_for(stub.GetStream(get), STEP_S)
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < deadline_s + SLACK_S
    finally:
        await proxy.close()
        await channel.close()
