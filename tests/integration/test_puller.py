"""The pull consumer's fetch (services/common/pull.py) against a real nats-server (JetStream,
file store, sync_interval always).

Every message comes once and in order, whether a fetch finds it buffered or waits for it; an
idle fetch times out in its own time and one that waits answers as soon as a message lands;
while the caller applies a batch the next one is delivered into the buffer;
however many fetches time out, the server holds at most one of our pull requests; what is
buffered at close is nak'ed and redelivered at once; a deleted consumer fails the fetch rather
than leaving it to time out for ever; and a nats-server killed under an open request and
started again finds the puller fetching, no message lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import APIError

from services.cli.suite import Suite, SuiteConfig, free_port
from services.common import pull
from services.common.bus import described
from services.common.pull import Puller
from tests.integration.helpers import eventually

STREAM, SUBJECT = "PULLTEST", "pulltest.x"


@pytest.fixture
def suite(tmp_path: Path) -> Iterator[Suite]:
    s = Suite(SuiteConfig(var_dir=tmp_path, nats_port=free_port()))
    s.start_nats()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
async def js(suite: Suite) -> AsyncIterator[tuple[Client, JetStreamContext]]:
    nc = await nats.connect(suite.config.nats_url, reconnect_time_wait=0.1, max_reconnect_attempts=-1)
    try:
        ctx = nc.jetstream(timeout=5)
        await ctx.add_stream(StreamConfig(name=STREAM, subjects=[SUBJECT], storage=StorageType.FILE))
        yield nc, ctx
    finally:
        await nc.close()


def _config() -> ConsumerConfig:
    return ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=30, max_ack_pending=10_000)


@contextlib.asynccontextmanager
async def _puller(js: tuple[Client, JetStreamContext], durable: str = "d") -> AsyncIterator[Puller]:
    p = await Puller.open(js[0], js[1], SUBJECT, stream=STREAM, durable=durable, config=_config())
    try:
        yield p
    finally:
        await p.unsubscribe()


async def _publish(ctx: JetStreamContext, first: int, n: int) -> None:
    for i in range(first, first + n):
        await ctx.publish(SUBJECT, str(i).encode())


@contextlib.asynccontextmanager
async def _within(seconds: float, failure: str) -> AsyncIterator[None]:
    """Fail with `failure` unless the block ends within `seconds` (a liveness bound, far from the behaviour's)."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        pytest.fail(failure)


def _buffered(p: Puller) -> Callable[[], Awaitable[int]]:
    """A probe of how many messages `p` holds (for `eventually`: load may delay their arrival)."""

    async def probe() -> int:
        return p.buffered

    return probe


async def _drain(p: Puller, want: int, batch: int) -> list[int]:
    got: list[int] = []
    while len(got) < want:
        msgs = await p.fetch(batch, timeout=2)
        assert 1 <= len(msgs) <= batch
        for m in msgs:
            got.append(int(m.data))
            await m.ack()
    return got


async def test_every_message_comes_once_and_in_order_whether_buffered_or_awaited(
    js: tuple[Client, JetStreamContext],
) -> None:
    nc, ctx = js
    await _publish(ctx, 0, 300)  # a backlog: the first request brings its batch at once
    async with _puller(js) as p:
        first = await _drain(p, 300, 100)  # three requests, each filled at once
        assert p.buffered == 0
        fetch = asyncio.create_task(p.fetch(100, timeout=5))  # the fourth, open since the last fetch
        await asyncio.sleep(0.2)
        await _publish(ctx, 300, 50)  # delivered to it: the first to the fetch, the rest buffered
        came = await fetch
        second = [int(m.data) for m in came]
        for m in came:
            await m.ack()
        # The rest reach the buffer as the client reads them (a loaded machine reads them late).
        assert await eventually(_buffered(p), lambda n: n == 50 - len(second), 10) == 50 - len(second)
        second += await _drain(p, 50 - len(second), 100)
        with pytest.raises(TimeoutError):
            await p.fetch(100, timeout=0.3)
    assert first + second == list(range(350))
    info = await ctx.consumer_info(STREAM, "d")
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_an_idle_fetch_times_out_on_time_and_a_waiting_one_answers_at_once(
    js: tuple[Client, JetStreamContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    nc, ctx = js
    # Requests that last a minute: a fetch that waited for its request's end instead of its own
    # timeout, or for the next request instead of a delivery, would take that long. The outer
    # bounds sit far from both sides (0.5 s and 0.3 s against 60 s), so a slow machine cannot
    # fail them and a broken fetch cannot pass them.
    monkeypatch.setattr(pull, "REQUEST_EXPIRES_S", 60.0)
    async with _puller(js) as p:
        started = time.monotonic()
        async with _within(20, "an idle fetch waited for its pull request to expire, not its own 0.5 s"):
            with pytest.raises(TimeoutError):
                await p.fetch(10, timeout=0.5)
        # Not before its time either (a lower bound: load can only make it later).
        assert time.monotonic() - started >= 0.45

        async def publish_later() -> None:
            await asyncio.sleep(0.3)
            await ctx.publish(SUBJECT, b"7")

        task = asyncio.create_task(publish_later())
        async with _within(20, "a waiting fetch did not answer when a message was delivered to it"):
            msgs = await p.fetch(10, timeout=60)
        await task
        assert [int(m.data) for m in msgs] == [7]
        await msgs[0].ack()
        assert msgs[0].metadata.num_delivered == 1 and msgs[0].metadata.sequence.stream == 1


async def test_the_server_never_holds_more_than_one_of_its_pull_requests(
    js: tuple[Client, JetStreamContext],
) -> None:
    nc, ctx = js
    async with _puller(js) as p:
        for _ in range(20):  # fetches that give up long before their request expires
            with pytest.raises(TimeoutError):
                await p.fetch(50, timeout=0.02)
        with contextlib.suppress(TimeoutError):
            await p.fetch(50, timeout=0.3)  # one that lets its own request open
        info = await ctx.consumer_info(STREAM, "d")
        assert info.num_waiting <= 1, info.num_waiting
        await _publish(ctx, 0, 3)
        assert await _drain(p, 3, 50) == [0, 1, 2]


async def test_a_request_is_open_while_the_caller_applies_what_a_fetch_returned(
    js: tuple[Client, JetStreamContext],
) -> None:
    nc, ctx = js
    await _publish(ctx, 0, 5)
    async with _puller(js) as p:
        msgs = await p.fetch(5, timeout=2)  # fills its request exactly: the next is sent before it returns
        while len(msgs) < 5:  # delivered in parts: each fetch asks for 5, as the consumer's always ask alike
            msgs += await p.fetch(5, timeout=2)
        for m in msgs:
            await m.ack()
        await _publish(ctx, 5, 3)  # while the caller is busy: delivered, not left on the server
        assert await eventually(_buffered(p), lambda n: n == 3, 5) == 3
        assert [int(m.data) for m in await p.fetch(5, timeout=2)] == [5, 6, 7]


async def test_what_is_buffered_at_close_is_redelivered_at_once(js: tuple[Client, JetStreamContext]) -> None:
    nc, ctx = js
    async with _puller(js) as p:
        fetch = asyncio.create_task(p.fetch(100, timeout=5))  # opens a request for 100
        await asyncio.sleep(0.2)
        await _publish(ctx, 0, 1)
        msgs = await fetch
        assert [int(m.data) for m in msgs] == [0]
        await msgs[0].ack()
        await _publish(ctx, 1, 19)  # the same request delivers them into the buffer
        assert await eventually(_buffered(p), lambda n: n == 19, 5) == 19
    # At once, not after ack_wait (30 s): each of _drain's fetches gives up after 2 s.
    async with _puller(js) as again:
        got = await _drain(again, 19, 100)
    assert sorted(got) == list(range(1, 20))  # redeliveries come in no promised order


async def test_a_deleted_consumer_fails_the_fetch(js: tuple[Client, JetStreamContext]) -> None:
    nc, ctx = js
    async with _puller(js) as p:
        fetch = asyncio.create_task(p.fetch(10, timeout=10))
        await asyncio.sleep(0.3)  # its pull request is open on the server
        await ctx.delete_consumer(STREAM, "d")
        with pytest.raises(APIError):
            await asyncio.wait_for(fetch, 5)


async def test_a_pull_nothing_answers_fails_the_fetch_saying_so(js: tuple[Client, JetStreamContext]) -> None:
    """A pull request on a durable the server does not have (its store lost, the durable deleted
    between two requests) is answered 503, no responders. nats-py raised that as an APIError with
    no code and no description, so the consumer logged `nats: ServiceUnavailableError: code=None
    err_code=None description='None'`, which names nothing to look at."""
    nc, ctx = js
    async with _puller(js) as p:
        await ctx.delete_consumer(STREAM, "d")  # before any request: the first one finds nothing
        with pytest.raises(Exception) as raised:
            await asyncio.wait_for(p.fetch(10, timeout=10), 5)
    text = described(raised.value)
    assert "code=503" in text and "description='no responders: the server has no such durable" in text, text


async def test_after_nats_server_is_killed_and_restarted_the_puller_fetches_on(
    suite: Suite, js: tuple[Client, JetStreamContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    nc, ctx = js
    monkeypatch.setattr(pull, "REQUEST_EXPIRES_S", 30.0)  # far longer than a restart takes
    await _publish(ctx, 0, 3)
    async with _puller(js) as p:
        assert await _drain(p, 3, 50) == [0, 1, 2]  # and its next request is open now
        killed = time.monotonic()
        suite.kill("nats")
        suite.restart("nats")
        quick = nc.jetstream(timeout=0.3)
        while True:  # connected again, and JetStream has recovered the stream
            assert time.monotonic() - killed < 15, "nats-server did not come back within 15 s"
            with contextlib.suppress(Exception):
                if nc.is_connected and (await quick.stream_info(STREAM)).state.messages == 3:
                    break
            await asyncio.sleep(0.05)
        await _publish(ctx, 3, 3)  # stored after the restart: only a request made since can bring them
        # Each of _drain's fetches gives up after 2 s, long before the request sent ahead of the
        # kill would expire (30 s): the reconnect, not its expiry, must make the puller ask again.
        got: list[int] = []
        while not {3, 4, 5} <= set(got):
            got += await _drain(p, 1, 50)
        # 0-2 may come again: their acks can die with the server (the inbox makes that harmless).
        assert set(got) <= set(range(6)), got


async def test_a_durable_made_by_an_earlier_release_takes_this_releases_settings(
    js: tuple[Client, JetStreamContext],
) -> None:
    # The consumer parks an event itself after CONSUMER_MAX_DELIVER failures. A durable kept as
    # an earlier release made it, with a lower max_deliver, would stop delivering an event before
    # the consumer parks it: neither applied nor parked, for good.
    nc, ctx = js
    old = _config()
    old.max_deliver, old.filter_subject, old.durable_name = 2, SUBJECT, "d"
    await ctx.add_consumer(STREAM, config=old)
    await _publish(ctx, 0, 1)
    new = _config()
    new.max_deliver = 5
    p = await Puller.open(nc, ctx, SUBJECT, stream=STREAM, durable="d", config=new)
    try:
        for delivery in (1, 2, 3):
            async with _within(20, f"delivery {delivery} never came: the durable kept its old max_deliver"):
                while True:
                    with contextlib.suppress(TimeoutError):
                        msgs = await p.fetch(1, timeout=2)
                        break
            assert msgs[0].metadata.num_delivered == delivery
            await msgs[0].nak()
        info = await ctx.consumer_info(STREAM, "d")
        assert info.config.max_deliver == 5
    finally:
        await p.unsubscribe()
