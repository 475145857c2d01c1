"""A JetStream pull consumer whose messages reach a list by callback, not one awaited read each.

nats-py's `PullSubscription.fetch` reads every message with `next_msg`, an `asyncio.wait_for`
on a queue: ~20 µs of CPU per message on this machine, against ~6 µs here (bench/README.md,
section 31). A hot stream's every gift is consumed twice (payout's earnings, gifting's read
model), so that difference is a few per cent of the suite's CPU per gift.

One core subscription on a private inbox (`<inbox>.*`) takes every delivery into a buffer. A
fetch first makes sure one pull request is open on the server
(`$JS.API.CONSUMER.MSG.NEXT.<stream>.<durable>`, `batch` messages, expiring in
`REQUEST_EXPIRES_S`), then returns what is buffered, or waits for the first delivery. A request
outlives the fetch that made it: what it delivers later waits in the buffer for the next fetch,
so a busy consumer finds its next batch there while it applies the last one; and a request that
ends (filled, or expired) is followed at once by the next unless a batch is already buffered,
so a message does not wait on the server for want of a request while the consumer is busy or
lingering (a first version asked only when a fetch found the buffer empty, and the diamonds
lag's p99 at spread-c64 rose from ~225 to ~300 ms).

At most one request is open at a time. Each has its own reply subject, so its end status is
told from others': 404 and 408 end it; any other status, 409 Consumer Deleted among them, raises
from the fetch, and the consumer loop binds again after its backoff. The server never holds more
of our requests than that, whatever the rate, with one exception: after a reconnect (or an end
status that never came) the puller takes its request for lost and sends another, and if the
server did keep the first, the two live side by side until it expires (`REQUEST_EXPIRES_S`);
what either delivers lands in the same buffer.

Nothing in the buffer is acked here: the consumer acks after its commit as before, and what is
still buffered when the puller closes is nak'ed so it is redelivered at once, not after ack_wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import time
from collections import deque
from collections.abc import Iterable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, StatusCode
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

# How long a pull request lasts on the server. Not a fetch's timeout: the request outlives fetches
# (a fetch that times out leaves it open for the next), and the server drops it sooner when our
# inbox loses its interest (the puller closed, the connection lost).
REQUEST_EXPIRES_S = 5.0
_ENDING = {StatusCode.NO_MESSAGES, StatusCode.REQUEST_TIMEOUT}
# What a 503 to a pull request means: no server answers for that durable.
NO_RESPONDERS = (
    "no responders: the server has no such durable (deleted, or its stream or store lost) or JetStream is down"
)
# The settings of a durable that `Puller.open` brings in step with the caller's (all editable).
_KEPT_IN_STEP = ("filter_subject", "ack_wait", "max_deliver", "max_ack_pending")


async def say_in_progress(msgs: Iterable[Msg]) -> None:
    """Tell the server each message is still being worked on (+WPI), so its ack_wait starts again.
    Never raises: one lost with the connection is delivered again, as it would be without it."""
    for msg in msgs:
        with contextlib.suppress(Exception):
            await msg.in_progress()


class Puller:
    """Fetches batches from one durable pull consumer (same `fetch`/`unsubscribe` as nats-py's)."""

    def __init__(self, nc: Client, js: JetStreamContext, stream: str, durable: str) -> None:
        self._nc = nc
        self._next_subject = f"{js._prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._prefix = nc.new_inbox()
        self._sub: Subscription | None = None
        self._buffer: deque[Msg] = deque()
        self._requests = 0
        self._open_reply: str | None = None  # the open pull request's reply subject
        self._open_left = 0  # messages it may still deliver
        self._open_until = 0.0  # monotonic time it expires on the server
        self._open_gen = 0  # the connection's reconnect count when it was sent
        self._batch = 1  # the last fetch's batch: what a request asks for
        self._error: BaseException | None = None
        self._wake: asyncio.Future[None] | None = None
        # When the durable was made (its ConsumerInfo): another time after a bind again means the
        # durable, and maybe its stream, was made again, its stream sequences counted anew.
        self.created: datetime.datetime | None = None

    @classmethod
    async def open(
        cls, nc: Client, js: JetStreamContext, subject: str, stream: str, durable: str, config: ConsumerConfig
    ) -> Puller:
        """Bind to `durable` on `stream`, creating it from `config` (filtered to `subject`) if missing,
        or updating it where an earlier release left other settings.

        A durable outlives the release that made it: bound as it was, one made with a lower
        max_deliver stopped delivering an event before the consumer parked it (neither applied
        nor parked), and a change of ack_wait or max_ack_pending never took effect. Only the
        fields we set are compared, so a bind does not rewrite an unchanged consumer.
        """
        config.filter_subject = subject
        config.name = durable
        config.durable_name = durable
        try:
            info = await js.consumer_info(stream, durable)
        except NotFoundError:
            info = None
        had = info.config if info is not None else None
        if had is None or any(getattr(config, f) not in (None, getattr(had, f)) for f in _KEPT_IN_STEP):
            info = await js.add_consumer(stream, config=config)  # creates, or updates the editable fields
        puller = cls(nc, js, stream, durable)
        puller.created = info.created
        puller._sub = await nc.subscribe(f"{puller._prefix}.*", cb=puller._on_msg)
        return puller

    @property
    def buffered(self) -> int:
        """Messages delivered and not yet handed out by a fetch."""
        return len(self._buffer)

    async def _on_msg(self, msg: Msg) -> None:
        status = JetStreamContext.is_status_msg(msg)
        if not status:
            self._buffer.append(msg)
            if self._open_reply is not None:
                self._open_left -= 1
                if self._open_left <= 0:
                    self._open_reply = None
                    await self._renew()
            self._wakeup()
            return
        if status == StatusCode.CONTROL_MESSAGE or msg.subject != self._open_reply:
            return  # a heartbeat, or the end of a request already given up on
        self._open_reply = None
        if status in _ENDING:
            await self._renew()
        elif status == StatusCode.SERVICE_UNAVAILABLE:
            # No responders: nothing serves the durable's pull subject. nats-py raises this as a
            # ServiceUnavailableError with neither code nor description, which the consumer's
            # log showed as `code=None err_code=None description='None'`.
            self._error = ServiceUnavailableError(code=503, description=NO_RESPONDERS)
        else:
            try:
                APIError.from_msg(msg)  # raises the error the status stands for
            except APIError as exc:
                self._error = exc
        self._wakeup()

    async def _renew(self) -> None:
        """The open request ended: the next one at once, unless a batch is already buffered.

        Waiting for the next fetch instead left what was published meanwhile on the server until
        the fetch after it (a linger later). Never more than a batch and a request's worth
        buffered: beyond that the next fetch asks.
        """
        if self._sub is not None and len(self._buffer) < self._batch:
            await self._keep_open(self._batch, time.monotonic())

    def _wakeup(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _take(self, batch: int) -> list[Msg]:
        buffer = self._buffer
        n = min(batch, len(buffer))
        return [buffer.popleft() for _ in range(n)]

    async def fetch(self, batch: int = 1, timeout: float = 5.0) -> list[Msg]:  # noqa: ASYNC109 - mirrors nats-py
        """Up to `batch` messages; the first as soon as it is delivered. TimeoutError when none came."""
        if self._sub is None:
            raise ValueError("the puller is closed")
        if batch < 1 or timeout <= 0:
            raise ValueError("batch must be >= 1 and timeout > 0")
        deadline = time.monotonic() + timeout
        while True:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            now = time.monotonic()
            # Before handing out the buffer too: the request delivers the next batch while the
            # caller applies this one.
            await self._keep_open(batch, now)
            if self._buffer:
                return self._take(batch)
            left = deadline - now
            if left <= 0:
                raise TimeoutError
            self._wake = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake, max(min(left, self._open_until - now), 0.0))
            self._wake = None

    async def _keep_open(self, batch: int, now: float) -> None:
        """Send a pull request unless one is open (its end status lost, as in a reconnect, counts as ended)."""
        if self._open_reply is not None and (now >= self._open_until or self._nc.stats["reconnects"] != self._open_gen):
            self._open_reply = None
        self._batch = batch
        if self._open_reply is not None:
            return
        self._requests += 1
        reply = f"{self._prefix}.{self._requests}"
        self._open_reply = reply
        self._open_left = batch
        self._open_until = now + REQUEST_EXPIRES_S
        self._open_gen = self._nc.stats["reconnects"]
        body = {"batch": batch, "expires": int(REQUEST_EXPIRES_S * 1_000_000_000)}
        await self._nc.publish(self._next_subject, json.dumps(body).encode(), reply)

    async def in_progress(self) -> None:
        """Tell the server the buffered messages are still wanted (+WPI): they wait behind a batch
        the consumer is applying, and their ack_wait runs from their delivery. Never raises."""
        await say_in_progress(list(self._buffer))

    async def unsubscribe(self) -> list[Msg]:
        """Stop receiving; what is buffered is nak'ed, to be redelivered now rather than after ack_wait,
        and returned (delivered, never handed out: the consumer does not count them as tries).

        Never raises (a lost connection fails both steps): callers close it on their error paths.
        """
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        unhandled = list(self._buffer)
        while self._buffer:
            with contextlib.suppress(Exception):
                await self._buffer.popleft().nak()
        return unhandled
