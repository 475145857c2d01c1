"""A consumer's replies across a leader election of a three-node JetStream cluster, as prod runs
NATS (deploy/k8s/overlays/prod/nats.conf: three servers, streams of three replicas).

`Binding` withholds the replies to deliveries of a stream made again, told by the stream's
creation time, read again after a reconnect. A consumer whose server dies reconnects to another
while the stream elects a leader: the read fails or times out for a while (the creation time is
unknown, and the replies to earlier deliveries wait), then answers the creation time the stream
always had, from whichever server leads it now, and the delivery in hand is settled there. The
fault drill runs the same cluster under load (tests/faults/test_faults.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import pytest
from nats.errors import NoRespondersError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NoStreamResponseError

from services.common.bus import Bus
from services.common.config import ServiceSettings
from services.common.pull import Puller
from tests.integration.helpers import publish_gift_sent
from tests.support.nats import NatsCluster, cluster_read

SUBJECT = "gifting.gift.sent"
DURABLE = "cluster-test"
SETTLED_WITHIN_S = 60.0  # elections take seconds; JetStream's API timeout is 5 s a try


async def _leader(bus: Bus) -> str:
    assert bus.js is not None
    js = bus.js

    async def named() -> str:
        leader = (await js.stream_info("GIFTING")).cluster.leader  # type: ignore[union-attr]
        assert leader, "electing"
        return str(leader)

    return await cluster_read("GIFTING's leader", named, SETTLED_WITHIN_S)


async def test_a_delivery_in_hand_is_settled_after_its_servers_death_moves_the_streams_leader(tmp_path: Path) -> None:
    cluster = NatsCluster(tmp_path)
    stop = asyncio.Event()
    settings = ServiceSettings(
        database_url="sqlite+aiosqlite:///unused.db",
        nats_url=cluster.url,
        nats_stream_replicas=3,  # type: ignore[call-arg]
    )
    bus = Bus(settings, "cluster-test")
    try:
        await asyncio.to_thread(cluster.start)
        await asyncio.wait_for(bus.connect(stop, ["GIFTING"]), 30)
        assert bus.nc is not None and bus.js is not None
        # A stream of three replicas just made answers no publish until its servers agree on it:
        # tried again, as the relay does (the message id makes a copy a duplicate).
        deadline = time.monotonic() + SETTLED_WITHIN_S
        while True:
            try:
                await publish_gift_sent(bus, SUBJECT, "in-hand")
                break
            except (NoRespondersError, NoStreamResponseError):
                assert time.monotonic() < deadline, "GIFTING took no publish"
                await asyncio.sleep(0.2)
        # Not delivered again before the test's ack, however long the election takes on a loaded machine.
        config = ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, ack_wait=3 * SETTLED_WITHIN_S
        )
        puller = await Puller.open(bus.nc, bus.js, SUBJECT, "GIFTING", DURABLE, config)
        [msg] = await puller.fetch(1, timeout=10)
        binding = puller.binding
        created = binding.created
        assert created is not None

        # The server this connection uses leads the stream: its death moves both at once.
        url = bus.nc.connected_url
        assert url is not None
        ours = next(n.name for n in cluster.nodes.values() if n.port == url.port)
        # Asked again until it is: a request lost or refused (a replica not yet current) under load.
        body = json.dumps({"placement": {"preferred": ours}}).encode()
        deadline = time.monotonic() + SETTLED_WITHIN_S
        while await _leader(bus) != ours:
            assert time.monotonic() < deadline, f"{ours} was not made GIFTING's leader"
            with contextlib.suppress(Exception):
                await bus.nc.request("$JS.API.STREAM.LEADER.STEPDOWN.GIFTING", body, timeout=5)
            await asyncio.sleep(1.0)
        await asyncio.to_thread(cluster.kill, ours)
        # Once the client has seen its server go (until then, nothing tells the binding to doubt).
        deadline = time.monotonic() + SETTLED_WITHIN_S
        while bus.nc.stats["reconnects"] < 1:
            assert time.monotonic() < deadline, "the connection never moved to another server"
            await asyncio.sleep(0.05)

        # The reply waits while the stream cannot be read; once it can, it goes.
        deadline = time.monotonic() + SETTLED_WITHIN_S
        while not await binding.settles(msg):
            assert time.monotonic() < deadline, f"the reply was withheld for {SETTLED_WITHIN_S:g} s"
            await asyncio.sleep(0.2)
        assert await _leader(bus) != ours
        assert binding.created == created, "another leader's stream taken for a stream made again"

        # Settled on the new leader: acknowledged by the server, nothing pending or delivered again.
        # (The durable may be electing its leader too: acked again until it is taken.)
        await cluster_read("the ack", lambda: msg.ack_sync(timeout=2), SETTLED_WITHIN_S)
        info = await bus.js.consumer_info("GIFTING", DURABLE)
        assert (info.num_ack_pending, info.num_redelivered, info.ack_floor.stream_seq) == (0, 0, 1)  # type: ignore[union-attr]
        await puller.unsubscribe()
    finally:
        stop.set()
        await bus.close()
        await asyncio.to_thread(cluster.stop)


pytestmark = pytest.mark.timeout(180)
