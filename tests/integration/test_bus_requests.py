"""A request whose publish fails (NATS down, the client's reconnect buffer full) leaves nothing
behind in the connection: the relay makes one per outbox row every backoff of an outage, and the
connection lives as long as the process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats.errors

from tests.integration.helpers import bus_on_own_nats

PAYLOAD = b"x" * 100_000  # ~21 of them fill nats-py's reconnect buffer (2 MB)
REFUSED = 50  # publishes refused with a full buffer


async def test_a_request_refused_while_nats_is_down_is_forgotten(tmp_path: Path) -> None:
    async with bus_on_own_nats(tmp_path, "requests-test") as (suite, bus, stop):
        await asyncio.wait_for(bus.connect(stop, ["GIFTING"]), 20)
        assert bus.js is not None and bus.nc is not None
        await bus.js.publish("gifting.gift.sent", b"before")
        suite.kill("nats")
        for _ in range(200):  # the client sees the connection gone at once (EOF), within 10 s at most
            if not bus.nc.is_connected:
                break
            await asyncio.sleep(0.05)
        assert not bus.nc.is_connected
        refused = 0
        while refused < REFUSED:
            try:
                # Buffered (and timed out) until the buffer is full, then refused at once.
                await bus.js.publish("gifting.gift.sent", PAYLOAD, timeout=0.05)
            except nats.errors.OutboundBufferLimitError:
                refused += 1
            except nats.errors.TimeoutError:
                pass
        # nats-py's map of the requests waiting for an answer (reply token -> future): a refused
        # publish left its entry there for ever, never answered nor timed out.
        assert len(bus.nc._resp_map) == 0, f"{len(bus.nc._resp_map)} requests still waiting after {refused} refused"
