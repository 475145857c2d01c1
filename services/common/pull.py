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

A reply (ack, nak, term, +WPI) goes to the delivery's subject
`$JS.ACK.<stream>.<durable>.<delivered>.<stream seq>.<consumer seq>.<timestamp>.<pending>`, which
JetStream settles by stream and durable name and stream sequence: one to a delivery of a stream
since made again (NATS back without its store, the stream and durable made again by any replica)
settles whatever the new stream has pending at that sequence. `Binding` tells such deliveries
apart (JetStream's advisories of the stream deleted or created tell it of one made again while
connected), and their replies are not sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import time
from collections import deque
from collections.abc import Iterable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, StatusCode
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

log = logging.getLogger(__name__)

# How long a pull request lasts on the server. Not a fetch's timeout: the request outlives fetches
# (a fetch that times out leaves it open for the next), and the server drops it sooner when our
# inbox loses its interest (the puller closed, the connection lost).
REQUEST_EXPIRES_S = 5.0
_ENDING = {StatusCode.NO_MESSAGES, StatusCode.REQUEST_TIMEOUT}
# What a 503 to a pull request means: no server answers for that durable. In a cluster also for
# the seconds the durable's leader is elected (its server died or stepped down).
NO_RESPONDERS = (
    "no responders: the server has no such durable (deleted, or its stream or store lost), its leader is being"
    " elected (a cluster) or JetStream is down"
)
# The settings of a durable that `Puller.open` brings in step with the caller's (all editable).
_KEPT_IN_STEP = ("filter_subject", "ack_wait", "max_deliver", "max_ack_pending")


# The attribute a delivery is tagged with as it arrives: the `Binding.epoch` it came under.
_EPOCH = "_livegifts_epoch"
# How long a reply waits for a lost connection to come back before it is not sent (its event is
# delivered again after ack_wait; the inbox makes that a no-op if it was applied). Once per outage:
# the replies after the first that waited in vain are not sent without a wait.
RECONNECT_WAIT_S = 5.0
# How long after a failed read of the stream's creation time no other is tried: the replies to
# earlier deliveries meanwhile are not sent (their events come again).
STREAM_READ_RETRY_S = 1.0
# The JetStream advisories after which a binding reads its stream's creation time again before its
# next reply (nats-server sends them to whoever listens, as nats-server 2.15 names them): its stream
# deleted or created, its durable deleted (a stream's deletion sends its durables' first).
ADVISORIES = (
    "$JS.EVENT.ADVISORY.STREAM.DELETED.{stream}",
    "$JS.EVENT.ADVISORY.STREAM.CREATED.{stream}",
    "$JS.EVENT.ADVISORY.CONSUMER.DELETED.{stream}.{durable}",
)
# What the creation time of a stream not known (its read failed) is taken as: later than any
# delivery's, so no delivery from before is taken for one of it.
_UNKNOWN = datetime.datetime.max.replace(tzinfo=datetime.UTC)


class Binding:
    """The stream a consumer's deliveries must come from for a reply to settle them.

    JetStream settles a reply by the stream sequence its subject names, so a reply to a delivery
    of a stream since made again settled the new stream's event at that sequence: an ack lost a
    new event (acked, never applied), a term terminated it. A stream made again is told by its
    creation time (`created`, read at each bind, and again before the next reply after a reconnect,
    a pull that ended in an error, or an advisory of the stream deleted or created or of the
    durable deleted, `ADVISORIES`): a delivery whose stream time (its subject's timestamp) is
    older than the creation of the stream bound now is of an older stream, and gets no reply
    (`settles`). Its event comes again from the new stream if it is there, and the inbox makes it
    a no-op if it was applied. Deliveries that arrived after the bound stream's creation was read
    (`tag`, `epoch`) are its own, whatever their timestamps say (a clock of a cluster's other server
    behind the one that made the stream would otherwise hold back one of its events for ever).
    Nor is a reply sent while the connection is down: nats-py keeps what is published then and
    sends it to the server it reconnects to, which may have come back without its store. It waits
    for the connection (`RECONNECT_WAIT_S`, once per outage) and the stream's creation time read
    again, so the acks of a batch applied across a restart (the store kept) still reach the server.

    The advisories are how a stream made again on a live server is seen (`nats stream rm`, then a
    replica's restore_stream and bind) by a replica with no pull request open at the time (a busy
    one: a batch buffered, none asked), which no pull status tells: its acks after the batch's
    commit settled the new stream's events at those sequences. They are core NATS messages, read
    in order with the rest of the connection, and the new stream's first event is delivered only
    after the stream and the durable are made again (a few round trips after the deletion's
    advisory), so a reply is still sent wrongly only if this process stalls for that long between
    its check and the reply leaving it (or the advisory is lost: a subscription's pending limit
    overrun, a cluster route down while the connection stays up). No read per batch closes that:
    a stall between the read and the reply is the same window.
    """

    def __init__(self, stream: str, durable: str) -> None:
        self.stream = stream
        self.durable = durable
        self.created: datetime.datetime | None = None  # None: not bound yet, every reply is sent
        self.epoch = 0  # one more each time `created` changes
        # Times it was told the stream or durable may have been made again (a pull that ended in
        # an error, an advisory, `doubt`), and how many of those the last read of `created`
        # followed: a count, not a flag, so one told during a read is not cleared by its answer.
        self._doubts = 0
        self._doubts_read = 0
        self._watching: Client | None = None  # the connection the advisories are subscribed on
        self._watched: set[str] = set()  # which of them so far (a bind cancelled midway: the rest)
        self.dropped = 0  # replies not sent, since the process started
        self._dropped_logged: tuple[int, int] | None = None  # (epoch, reconnects) of the last line
        self._js: JetStreamContext | None = None
        self._nc: Client | None = None
        self._reconnects = 0  # the connection's reconnect count `created` was read at
        self._gave_up: int | None = None  # the reconnect count a wait for the connection ran out at
        # One read of the creation time at a time, and none again until a failed one's pause is
        # over (`STREAM_READ_RETRY_S`): each reply waited for a read of its own, up to the
        # JetStream timeout (5 s), one after another for a batch's acks, while the stream could
        # not be read (a leader being elected, quorum lost).
        self._reading = asyncio.Lock()
        self._read_again_at = 0.0
        self._gone = False  # the last read found no stream (deleted): `created` unknown

    async def bind(self, nc: Client, js: JetStreamContext) -> None:
        """Read the stream's creation time (at a bind, once the durable is there)."""
        self._nc, self._js = nc, js
        if self._watching is not nc:
            self._watching, self._watched = nc, set()
        # Before the read: a change made after it is told.
        for subject in ADVISORIES:
            if subject not in self._watched:
                await nc.subscribe(subject.format(stream=self.stream, durable=self.durable), cb=self._on_advisory)
                self._watched.add(subject)
        self._reconnects = nc.stats["reconnects"]
        doubts = self._doubts
        self._set((await js.stream_info(self.stream)).created)
        self._doubts_read = doubts
        # Read: a failed read's pause is over, or the next doubt within it would go unread.
        self._read_again_at, self._gone = 0.0, False

    @property
    def suspect(self) -> bool:
        """Whether `created` must be read again before the next reply (`doubt`)."""
        return self._doubts != self._doubts_read

    def doubt(self) -> None:
        """The stream or the durable may have been made again: read `created` before the next reply."""
        self._doubts += 1

    async def _on_advisory(self, msg: Msg) -> None:
        self.doubt()

    def _set(self, created: datetime.datetime | None) -> None:
        if created != self.created:
            self.created = created
            self.epoch += 1

    def tag(self, msg: Msg) -> None:
        setattr(msg, _EPOCH, self.epoch)

    async def check(self) -> bool:
        """Whether the connection is up (waited for, `RECONNECT_WAIT_S`); and read the creation
        time again if the connection was lost since (the server may have come back without its
        store), a pull ended in an error or an advisory came (the durable or stream deleted or
        made again). A read that fails
        leaves it unknown (no earlier delivery settles) until one succeeds. Never raises."""
        nc, js = self._nc, self._js
        if nc is None or js is None:
            return True
        if not await self._connected(nc):
            return False
        if not self.suspect and nc.stats["reconnects"] == self._reconnects:
            return True
        async with self._reading:
            if self.suspect or nc.stats["reconnects"] != self._reconnects:  # not read meanwhile
                if time.monotonic() < self._read_again_at:
                    return nc.is_connected  # a read failed just now: `created` stays unknown
                reconnects, doubts = nc.stats["reconnects"], self._doubts
                try:
                    info = await js.stream_info(self.stream)
                except Exception as exc:  # noqa: BLE001 - unknown until the next read
                    self._gone = isinstance(exc, NotFoundError)
                    self._set(_UNKNOWN)
                    self._read_again_at = time.monotonic() + STREAM_READ_RETRY_S
                    return nc.is_connected
                self._gone = False
                self._reconnects, self._doubts_read = reconnects, doubts
                self._set(info.created)
        return nc.is_connected

    async def _connected(self, nc: Client) -> bool:
        if nc.is_connected:
            return True
        outage = nc.stats["reconnects"]
        if self._gave_up == outage:
            return False
        deadline = time.monotonic() + RECONNECT_WAIT_S
        # Polled: nats-py sets no event when it has reconnected.
        while not nc.is_connected and not nc.is_closed and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if nc.is_connected:
            return True
        self._gave_up = outage
        return False

    def current(self, msg: Msg) -> bool:
        """Whether `msg` is a delivery of the stream bound now (a cheap test, no call to NATS)."""
        if getattr(msg, _EPOCH, self.epoch) >= self.epoch or self.created is None:
            return True
        try:
            return msg.metadata.timestamp >= self.created
        except Exception:  # noqa: BLE001 - not a JetStream delivery: nothing to settle wrongly
            return True

    async def settles(self, msg: Msg) -> bool:
        """Whether a reply to `msg` may be sent; if not, it is counted (and logged once per binding
        and connection)."""
        connected = await self.check()
        if connected and self.current(msg):
            return True
        self.dropped += 1
        key = (self.epoch, self._nc.stats["reconnects"] if self._nc is not None else 0)
        if self._dropped_logged != key:
            self._dropped_logged = key
            unknown = self.created == _UNKNOWN
            if not connected:
                why = "NATS is still disconnected"
            elif unknown and self._gone:
                # After STREAM.DELETED: not a read that failed, a stream lost with its events
                why = "its stream is gone (deleted: its events not yet consumed are lost, run the audit)"
            elif unknown:
                # Most often a cluster electing a leader or without quorum (docs/sre.md, "NATS down
                # or without quorum"): the line said "its stream was made again since", which sent
                # an SRE after lost events when nothing was lost.
                why = "its stream could not be read since the connection was lost or a pull failed"
            else:
                why = "its stream was made again since"
            log.warning(
                f"no ack, nak or term sent for a delivery: {why} (its event comes again, or was applied);"
                " further ones not logged until the next bind",
                extra={
                    "consumer": self.durable,
                    "stream": self.stream,
                    "stream_seq": _stream_seq(msg),
                    "stream_created": ("deleted" if self._gone else "unknown") if unknown else str(self.created),
                    "replies_not_sent": self.dropped,
                },
            )
        return False


def _stream_seq(msg: Msg) -> int | None:
    """The delivery's stream sequence for a log line; None where its subject has none."""
    try:
        return int(msg.metadata.sequence.stream)
    except Exception:  # noqa: BLE001 - not a JetStream delivery
        return None


async def say_in_progress(msgs: Iterable[Msg], binding: Binding | None = None) -> None:
    """Tell the server each message is still being worked on (+WPI), so its ack_wait starts again;
    not those of a stream since made again (`Binding`). Never raises: one lost with the connection
    is delivered again, as it would be without it."""
    for msg in msgs:
        with contextlib.suppress(Exception):
            if binding is None or await binding.settles(msg):
                await msg.in_progress()


class Puller:
    """Fetches batches from one durable pull consumer (same `fetch`/`unsubscribe` as nats-py's)."""

    def __init__(
        self, nc: Client, js: JetStreamContext, stream: str, durable: str, binding: Binding | None = None
    ) -> None:
        self._nc = nc
        self.binding = binding if binding is not None else Binding(stream, durable)
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
        cls,
        nc: Client,
        js: JetStreamContext,
        subject: str,
        stream: str,
        durable: str,
        config: ConsumerConfig,
        binding: Binding | None = None,
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
        puller = cls(nc, js, stream, durable, binding)
        puller.created = info.created
        await puller.binding.bind(nc, js)
        puller._sub = await nc.subscribe(f"{puller._prefix}.*", cb=puller._on_msg)
        return puller

    @property
    def buffered(self) -> int:
        """Messages delivered and not yet handed out by a fetch."""
        return len(self._buffer)

    async def _on_msg(self, msg: Msg) -> None:
        status = JetStreamContext.is_status_msg(msg)
        if not status:
            self.binding.tag(msg)
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
        if status not in _ENDING:
            self.binding.doubt()  # the durable or its stream may have been made again
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
        await say_in_progress(list(self._buffer), self.binding)

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
            msg = self._buffer.popleft()
            with contextlib.suppress(Exception):
                if await self.binding.settles(msg):
                    await msg.nak()
        return unhandled
