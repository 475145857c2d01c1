"""A service started while its streams are sealed (the suite leaving that NATS for another,
docs/sre.md "Moving the suite to another NATS") connects, and its consumers read what they hold;
one whose stream JetStream will not update says why in its retry line."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import nats
import pytest
from nats.js.api import ConsumerConfig, StorageType, StreamConfig

from tests.integration.helpers import bus_on_own_nats


async def test_a_service_connects_to_a_sealed_stream_and_reads_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with bus_on_own_nats(tmp_path, "sealed-test") as (_suite, bus, stop):
        await asyncio.wait_for(bus.connect(stop, ["GIFTING"]), 20)
        assert bus.js is not None
        await bus.js.publish("gifting.gift.sent", b"held", headers={"Nats-Msg-Id": "e1"})
        config = (await bus.js.stream_info("GIFTING")).config
        config.sealed = True
        await bus.js.update_stream(config)
        await bus.close()

        # A pod started now: JetStream refuses to unseal, which failed every connect before.
        caplog.set_level(logging.WARNING, logger="services.common.bus")
        await asyncio.wait_for(bus.connect(stop, ["GIFTING"]), 10)
        assert bus.connected.is_set()
        assert any("stream is sealed" in r.getMessage() and r.stream == "GIFTING" for r in caplog.records)
        sub = await bus.js.pull_subscribe(
            "gifting.gift.sent", durable="sealed-reader", stream="GIFTING", config=ConsumerConfig()
        )
        (msg,) = await sub.fetch(1, timeout=5)
        assert msg.data == b"held"


async def test_a_stream_jetstream_will_not_update_is_named_in_the_connects_retry_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with bus_on_own_nats(tmp_path, "refused-test") as (suite, bus, stop):
        nc = await nats.connect(suite.config.nats_url)
        # Made by hand in memory: JetStream refuses to change a stream's storage.
        await nc.jetstream().add_stream(
            StreamConfig(name="GIFTING", subjects=["gifting.>"], storage=StorageType.MEMORY)
        )
        await nc.close()
        caplog.set_level(logging.WARNING, logger="services.common.bus")

        def errors() -> list[str]:
            return [r.error for r in caplog.records if r.getMessage() == "NATS not reachable, retrying"]

        # Until its first retry line (not a fixed second: a loaded machine takes longer to get there).
        connecting = asyncio.create_task(bus.connect(stop, ["GIFTING"]))
        try:
            deadline = time.monotonic() + 30
            while not errors():
                assert not connecting.done(), "connected to a stream JetStream would not update"
                assert time.monotonic() < deadline, "no retry line within 30 s"
                await asyncio.sleep(0.05)
        finally:
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
        # The server's code and description, not nats-py's bare `ServerError()`.
        found = errors()
        assert found and all("err_code=" in e for e in found), found
