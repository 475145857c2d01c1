"""The consumer loop treats every kind of "nothing came" from a fetch as that, not as a failure.

nats-py's pull fetch raises nats.errors.TimeoutError when no message came, but a bare
asyncio.TimeoutError when its deadline passes before it sends its second pull request, which
happens on a busy machine. The loop took the latter for a failure: a warning each time and a
doubling backoff (up to 5 s) before the next fetch, so an idle consumer answered late and a busy
one lagged. The subscription here is a stand-in for the one nats-py returns (the loop's own
control flow is under test; the integration tests run it against a real nats-server).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import nats.errors
import pytest

from livegifts.gifting.v1 import events_pb2
from services.common.db import Database
from services.common.inbox import Consumer, Subscription
from services.gifting.config import GiftingSettings
from services.gifting.storage import common


class _Timeouts:
    """A pull subscription whose fetches time out, in both ways nats-py has; the last one stops the loop."""

    def __init__(self, stop: asyncio.Event, fetches: int) -> None:
        self.stop = stop
        self.left = fetches
        self.calls = 0

    async def fetch(self, batch: int, timeout: float) -> list[Any]:  # noqa: ASYNC109 - mirrors nats-py
        self.calls += 1
        self.left -= 1
        if self.left == 0:
            self.stop.set()
        if self.calls % 2:
            raise TimeoutError  # what asyncio.wait_for and nats-py's second pull request raise
        raise nats.errors.TimeoutError

    async def unsubscribe(self) -> None:
        return None


class _Bus:
    def __init__(self, psub: _Timeouts) -> None:
        self.connected = asyncio.Event()
        self.connected.set()
        psubs = [psub]

        class _Js:
            async def pull_subscribe(self, *args: Any, **kwargs: Any) -> _Timeouts:
                return psubs[0]

        self.js = _Js()


async def test_fetch_timeouts_of_either_kind_are_quiet_and_do_not_back_off(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    stop = asyncio.Event()
    psub = _Timeouts(stop, fetches=6)

    async def handle(uow: Any, events: list[Any]) -> None:
        raise AssertionError("no message was fetched")

    url = f"sqlite+aiosqlite:///{tmp_path / 'c.db'}"  # never connected to: nothing is fetched
    settings = GiftingSettings(database_url=url, nats_url="nats://127.0.0.1:1", wallet_addr="127.0.0.1:1")
    db = Database(url, pool_size=1, pool_timeout_s=1, application_name="test")
    sub = Subscription(durable="d", stream="S", subject="s.x", event_type=events_pb2.GiftSent, handle=handle)
    consumer = Consumer(db, _Bus(psub), common, sub, settings)  # type: ignore[arg-type]
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="services.common.inbox"):
        await asyncio.wait_for(consumer.run(stop), timeout=10)
    assert psub.calls == 6
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]
    await db.engine.dispose()
    assert time.monotonic() - started < 0.5, "the loop backed off after a fetch that only timed out"
