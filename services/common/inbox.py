"""Durable pull consumers with an inbox: each event id takes effect once, in the effect's transaction.

A batch of messages is handled in one transaction: the new event ids go into the inbox table
and the handler applies all their effects (e.g. one diamond update per creator per batch);
only after the commit are the messages acked. A crash before the ack redelivers the batch,
and the inbox makes it a no-op. A batch that fails is retried one message at a time so one
bad event cannot hold up the rest; an event that keeps failing or cannot be decoded is
parked in the dead_letters table for an operator and terminated, never silently dropped.
One whose try ends the process fails no try and is never parked; past CONSUMER_MAX_DELIVER
deliveries this process cannot account for it is tried alone, after the rest of its batch
(`_unaccounted_for`), so it takes no other event down with it.
A failure that is not the event's (the database down or refusing writes, a conflict to retry)
never counts towards parking: the event is nak'ed with the capped backoff for as long as that
lasts, and applied once the database is back, with no operator's replay. Nor does a delivery
never tried: a batch whose handling ends in an error midway (a park or a nak failing as the
database or NATS goes) nak's the events it had not tried yet, uncounted.

Inbox rows are kept `INBOX_RETENTION_DAYS` (45 by default), longer than JetStream keeps an
event (30 days), so any redelivery or replay the streams can make still finds its row; the
`InboxPruner` deletes older rows in short transactions, except those of events still parked
(applied meanwhile by a later redelivery: their replay must find the row, however late). The
outbox relay's republish after a crash (PubAck received, row not yet deleted) comes when the
service restarts: a service down for longer than the retention should be restarted with
pruning off (0) until its outbox is empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import random
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import nats.errors
from google.protobuf.message import DecodeError, Message
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from opentelemetry import trace
from sqlalchemy import delete, select, union_all

from services.common import faults
from services.common.bus import Bus, described, is_stream_missing
from services.common.config import ServiceSettings
from services.common.db import Database, UnitOfWork, insert_ignore
from services.common.dependency_errors import error_kind, is_retryable, is_unavailable
from services.common.errors import DomainError, check, is_text, shown
from services.common.loops import sleep_unless_stopped, wait_until_set
from services.common.metrics import (
    CONSUMED,
    CONSUMER_BATCH,
    CONSUMER_LOOP_FAILURES,
    CONSUMER_POSITION_CHECK,
    DEAD_LETTERS,
    INBOX_PRUNED,
)
from services.common.pruning import AgePruner
from services.common.pull import Binding, Puller, say_in_progress
from services.common.sql import bulk_insert_new, one_of
from services.common.tables import CommonTables
from services.common.telemetry import extract_context, recording, remote_context, spanning
from services.common.throttle import KeyedLogThrottle
from services.common.timeutil import now_us

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

E = TypeVar("E", bound=Message)

# Links a batch's `process` span carries, one per message: a bound, so a batch of thousands
# (CONSUMER_BATCH_SIZE_MAX allows 10,000) does not make a span of that size; the rest are counted.
BATCH_LINKS_MAX = 128

# At most one "event not applied, the database is unavailable" line per consumer and kind of
# error (`error_kind`: its class and database code) this often: an outage fails every pending
# event (up to max_ack_pending) every backoff, which logged a line per event per retry. The line
# counts the retries it stands for. Per kind, so that one outage's lines (a connection refused)
# do not hide the first line of another that starts meanwhile (a full disk, a read-only standby).
OUTAGE_LOG_INTERVAL_S = 30.0
# The kinds of error a consumer's outage lines are throttled apart by: a few in practice, bounded.
OUTAGE_KINDS_MAX = 64
# The `result` label of livegifts_events_consumed_total, each exported at 0 from the start.
CONSUMED_RESULTS = ("applied", "duplicate", "replayed", "retry")


REDELIVERY_DELAY_S_MAX = 10.0
# How many stream sequences the position check (`Consumer.behind`) looks back from the durable's
# ack floor for the last event of its subject: the floor may rest on another subject's message
# (payout-gift-sent's stream also holds gifting.stream.ended).
POSITION_SCAN_MAX = 256
# The `result` label of livegifts_consumer_position_check, each exported at 0 from the start.
POSITION_OK, POSITION_BEHIND, POSITION_NOT_CHECKED = "ok", "behind", "not_checked"
POSITION_RESULTS = (POSITION_OK, POSITION_BEHIND, POSITION_NOT_CHECKED)

# The durable's ack_wait: how long JetStream waits for a delivery's ack before it delivers the
# event again. It is also how soon the events of a consumer that died mid-batch come back, so it
# stays short; a batch that legitimately takes longer (each statement may wait up to
# DB_STATEMENT_TIMEOUT_S, 60 s by default, on a lock) is kept from being redelivered meanwhile by
# in-progress acks (`_InProgress`), not by a longer wait. (Choices: A) ack_wait above the
# statement timeout: still short of a batch of several statements, and 2x slower recovery from a
# crash; B) in-progress acks while the batch is applied: chosen, and the durable's config, kept
# in step by Puller.open, does not change, so old and new pods agree during a rolling upgrade.)
ACK_WAIT_S = 30
# How long a consumer waits for NATS at a time before it looks at `stop` again (it is woken by either).
NATS_WAIT_S = 60.0
# How often, while a batch is applied, its messages and those buffered behind it are said to be
# in progress: three times per ack_wait, so one lost or late +WPI costs nothing.
IN_PROGRESS_PER_ACK_WAIT = 3
# For how many statement timeouts at most a batch's messages are held that way (10 minutes with
# the defaults). Each statement is bounded, so a batch held longer is stuck (a hung handler, a
# one-by-one retry of thousands of events behind a lock): its events are let go to be redelivered,
# to this replica or another, and the inbox makes a second application a no-op.
IN_PROGRESS_STATEMENT_TIMEOUTS_MAX = 10


def redelivery_delay_s(delivered: int) -> float:
    """How long a failed event waits before its next delivery: 0.2 s doubling to 10 s.

    The exponent is capped first: an outage now never parks an event, so `delivered` keeps
    growing for as long as it lasts (about 360 an hour at the cap), and `0.1 * 2**delivered`
    raised OverflowError once it passed 1023, ending the consumer's handling of that batch.
    """
    return min(0.1 * 2 ** min(delivered, 8), REDELIVERY_DELAY_S_MAX)


# NATS refusing to send an ack (its connection closed, draining or reconnecting, its buffer full):
# the effect committed, so a failure of the bus, never of the event.
_BUS_GONE = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionDrainingError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.NoServersError,
)


def _not_the_events_fault(exc: BaseException) -> bool:
    """Whether a failure says nothing about the event: the database (or another dependency) is
    down or refuses writes (is_unavailable: refused connections, 08/53/57P, a full or read-only
    store), or a conflict to retry (serialization failure, deadlock), or NATS would not take the
    ack of an event applied (`_BUS_GONE`: counted, an event on its last allowed delivery was
    parked although its effect had committed). Such a failure does not count towards
    CONSUMER_MAX_DELIVER: parking on it put healthy events in dead_letters during an outage of a
    few minutes. A domain error (whatever its code), a constraint violation or a bug counts."""
    return isinstance(exc, _BUS_GONE) or (not isinstance(exc, DomainError) and is_retryable(exc))


class ReplayFailed(Exception):
    """A parked event could not be applied again; it stays parked.

    `message` may go to the caller: it names no internals (no SQL, no values, no driver text).
    `detail` is the whole error, for the log only.
    """

    def __init__(self, parked: dict[str, Any], message: str, detail: str) -> None:
        super().__init__(message)
        self.parked = parked
        self.message = message
        self.detail = detail


def _whole(exc: BaseException) -> str:
    """An error as the log should have it: its class and its text (for SQLAlchemy's errors the
    statement and its parameters, which repr() leaves out)."""
    return f"{type(exc).__name__}: {exc}"


def _trim(remembered: OrderedDict[int, Any], size_max: int) -> None:
    """Drop the oldest of what a consumer remembers by stream sequence (`_not_counted`,
    `_parked`) past `size_max`."""
    while len(remembered) > size_max:
        remembered.popitem(last=False)


# The event id a dead_letters row of an undecodable event is kept under, as it has none of its
# own: derived from its bytes, so a copy of it (its term withheld while NATS was down, or lost)
# reaching this replica or another is skipped by the unique (consumer, event_id) index as a decoded
# event's copy is. Parked with NULL, each copy had a row of its own (NULLs are distinct in a
# unique index): a second row, alert and failing replay. Same bytes, same event; 44 characters of
# the column's 64. Not shown as an event id (`is_undecodable_id`): ListDeadLetters answers "".
UNDECODABLE_ID_PREFIX = "undecodable:"
_UNDECODABLE_ID = re.compile(re.escape(UNDECODABLE_ID_PREFIX) + "[0-9a-f]{32}")


def undecodable_id(payload: bytes) -> str:
    """The dead_letters key of an undecodable event with these bytes."""
    return UNDECODABLE_ID_PREFIX + hashlib.blake2b(payload, digest_size=16).hexdigest()


def is_undecodable_id(event_id: str | None) -> bool:
    """Whether a dead_letters row's event id is `undecodable_id`'s, not an event's."""
    return event_id is not None and _UNDECODABLE_ID.fullmatch(event_id) is not None


def _digest(msg: Msg) -> bytes:
    """What tells a copy of a parked message from another message at its stream sequence."""
    return hashlib.blake2b(msg.data or b"", digest_size=16).digest()


def _in_trace_of(msg: Msg) -> contextlib.AbstractContextManager[None]:
    """The trace the message came with, current for the lines logged about it (outside the
    handler's span: without it they carried no trace id, and a gift's trace did not lead there)."""
    return remote_context((msg.headers or {}).items())


class _InProgress:
    """While a batch is handled, tells JetStream every `interval_s` that its messages not yet
    settled, and those the puller holds behind it, are still being worked on (+WPI), for at most
    `hold_s_max`; nothing is sent for a batch done within `interval_s` (the usual case).

    Without it a batch slower than ack_wait (a lock wait below DB_STATEMENT_TIMEOUT_S) had all its
    events delivered again while it was still applying them, and the next batch's, buffered
    meanwhile: duplicated work and load when the database was already struggling (a drill's 45 s
    lock on payout's `earnings`: 62 duplicate deliveries of 76 events). Each redelivery also
    raised the event's delivery count, which counts towards parking (`Consumer._failed`).
    """

    def __init__(
        self, msgs: list[Msg], puller: Puller | None, binding: Binding, interval_s: float, hold_s_max: float
    ) -> None:
        self._msgs = msgs
        self._binding = binding
        self._puller = puller
        self._interval_s = interval_s
        loop = asyncio.get_running_loop()
        self._until = loop.time() + hold_s_max
        self._task: asyncio.Task[None] | None = None
        # Also told by a flag: a cancel can be lost (asyncio.wait_for in Python 3.11 returns the
        # result of a request that came as it was cancelled, as `Binding.check`'s stream info may),
        # and the loop then went on for `hold_s_max`, holding the consumer's `close` with it.
        self._closed = False
        # A timer, not a task: a batch done before it fires costs one timer handle.
        self._timer = loop.call_later(interval_s, self._start)

    def _start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed and loop.time() < self._until:
            await say_in_progress((msg for msg in self._msgs if not msg.is_acked), self._binding)
            if self._puller is not None:
                await self._puller.in_progress()
            if self._closed:
                return
            await asyncio.sleep(self._interval_s)

    async def close(self) -> None:
        self._closed = True
        self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@dataclass(frozen=True)
class Subscription(Generic[E]):
    """What a consumer reads and how it applies a batch of new events in one transaction."""

    durable: str  # durable consumer name; also the inbox scope
    stream: str
    subject: str
    event_type: type[E]
    handle: Callable[[UnitOfWork, list[E]], Awaitable[None]]


class Consumer(Generic[E]):
    """Runs one subscription: fetch a batch, dedupe by inbox, apply, commit, ack."""

    def __init__(self, db: Database, bus: Bus, tables: CommonTables, sub: Subscription[E], settings: ServiceSettings):
        self.db = db
        self.bus = bus
        self.tables = tables
        self.sub = sub
        self.batch_size_max = settings.consumer_batch_size_max
        self.fetch_timeout_s = settings.consumer_fetch_timeout_s
        self.max_deliver = settings.consumer_max_deliver
        self.linger_s = settings.consumer_linger_s
        self._puller: Puller | None = None
        self._statement_timeout_s = settings.db_statement_timeout_s  # bounds `_InProgress`
        # Stream sequence -> deliveries of that event that failed for no fault of its own (see
        # `_not_the_events_fault`): JetStream's num_delivered counts every delivery, so the
        # event's own failures are num_delivered less these. Entries go when the event is acked
        # or parked; bounded (oldest dropped first), and kept per process: a replica that did not
        # see an event's outage deliveries counts them as failures, so it parks earlier, never
        # on an outage failure itself. Each count is kept with a digest of the message's bytes
        # (`_digest`), as `_parked` is: another event at that sequence (its stream made again
        # while this process kept pulling) starts from none.
        self._not_counted: OrderedDict[int, tuple[bytes, int]] = OrderedDict()
        self._not_counted_max = self.batch_size_max * 16
        self._position_checked = False
        # Stream sequences of the events this process parked lately (bounded alike), with a
        # digest of each one's bytes: a copy delivered before the park (JetStream redelivered it
        # while a try was still running), or after a term that was lost, is terminated, not tried
        # and parked a second time. Only a copy: another event at that sequence (its stream made
        # again while this process kept pulling, the durable made again by another replica, so
        # no bind here forgot them) is tried as any event.
        self._parked: OrderedDict[int, bytes] = OrderedDict()
        # When the durable these sequences are of was made (`_bound_to`).
        self._durable_created: datetime.datetime | None = None
        # The stream the deliveries replied to must come from (kept over binds again): a reply to
        # one of a stream since made again would settle the new stream's event at its sequence.
        self._binding = Binding(sub.stream, sub.durable)
        self._outage_log: KeyedLogThrottle[str] = KeyedLogThrottle(OUTAGE_LOG_INTERVAL_S, OUTAGE_KINDS_MAX)
        inbox = tables.inbox
        # The longest event id the inbox (and dead_letters) holds (see `_id_problem`).
        self._event_id_max: int = inbox.c.event_id.type.length
        # Built once (one cache key), one statement text for any count; the ids it returns are
        # the batch's new events.
        self._record = bulk_insert_new(db.dialect, inbox, ["consumer", "event_id", "received_at_us"], inbox.c.event_id)
        # Exported at 0 from the start: Prometheus sees no increase from a series that first
        # appears at 1, so the first event parked in a pod's life never raised the dead-letter
        # alert (`increase(livegifts_dead_letters_total[1h]) > 0`).
        DEAD_LETTERS.labels(sub.durable)
        # So are its applied, duplicate and retry counts: LivegiftsConsumerStuck compares the
        # retries with what was applied, and an applied series that never appeared would make
        # "nothing applied" invisible to increase().
        for result in CONSUMED_RESULTS:
            CONSUMED.labels(sub.durable, result)
        # And its failed tries to bind or pull, which LivegiftsConsumerNotPulling takes increase() of.
        self._loop_failures = CONSUMER_LOOP_FAILURES.labels(sub.durable)
        # And the result of its position check (`_check_position`), all 0 until it runs.
        for result in POSITION_RESULTS:
            CONSUMER_POSITION_CHECK.labels(sub.durable, result).set(0)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set; survives NATS restarts."""
        # Until NATS is first reached, or `stop`: the service's stop lets its loops end on their
        # own (app.serve), and one waiting here for a NATS never reached held it for its grace.
        while not self.bus.connected.is_set():
            if stop.is_set():
                return
            await wait_until_set(self.bus.connected, stop, NATS_WAIT_S)
        self._puller = None
        backoff_s = 0.1
        while not stop.is_set():
            try:
                if self._puller is None:
                    check(self.bus.nc is not None and self.bus.js is not None, "the bus is connected")
                    self._puller = await Puller.open(
                        self.bus.nc,  # type: ignore[arg-type]
                        self.bus.js,  # type: ignore[arg-type]
                        self.sub.subject,
                        durable=self.sub.durable,
                        stream=self.sub.stream,
                        config=ConsumerConfig(
                            ack_policy=AckPolicy.EXPLICIT,
                            deliver_policy=DeliverPolicy.ALL,
                            ack_wait=ACK_WAIT_S,
                            # Unlimited: we park it ourselves at max_deliver. A limit of ours + 1 left
                            # one more delivery to park on; when the database refused both (an
                            # outage), the server stopped delivering: neither applied nor parked.
                            max_deliver=-1,
                            max_ack_pending=self.batch_size_max * 8,
                        ),
                        binding=self._binding,
                    )
                    self._bound_to(self._puller.created)
                    if not self._position_checked:
                        self._position_checked = True
                        await self._check_position()
                try:
                    msgs = await self._puller.fetch(self.batch_size_max, timeout=self.fetch_timeout_s)
                except TimeoutError:
                    continue  # nothing came: not a failure, no warning, no backoff
                await self.process(msgs)
                backoff_s = 0.1
                if 1 < len(msgs) < self.batch_size_max and self.linger_s:
                    # Under load (more than one event came at once), let more arrive so the next
                    # fetch (and transaction) carries them all. A lone event never waits.
                    await sleep_unless_stopped(stop, self.linger_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - unacked messages are redelivered
                # Counted: a durable that refuses every pull (re-made as a push consumer by hand,
                # a limit of the account) left only these lines, no metric and no alert.
                self._loop_failures.inc()
                log.warning(
                    "consumer loop failed, retrying",
                    extra={"consumer": self.sub.durable, "error": described(exc), "retry_in_s": backoff_s},
                )
                if self._puller is not None:
                    # Never raises; naks what it buffered for the next one. Those deliveries were
                    # never tried: they are no failure of their events' (`_failed`).
                    for unhandled in await self._puller.unsubscribe():
                        self._not_its_fault(unhandled)
                self._puller = None
                if is_stream_missing(exc):
                    # Deleted while we ran: made again here (its producer may be idle), so this
                    # consumer binds at its next try instead of failing every backoff until a restart.
                    try:
                        await self.bus.restore_stream(self.sub.stream)
                    except Exception as restore_exc:  # noqa: BLE001 - tried again at the next failure
                        log.warning(
                            "stream not created again",
                            extra={"stream": self.sub.stream, "error": described(restore_exc)},
                        )
                await sleep_unless_stopped(stop, backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
        if self._puller is not None:
            # Left subscribed, a pull subscription held the connection's drain at close for its
            # whole 5 s timeout; what it had buffered is nak'ed for the next run.
            await self._puller.unsubscribe()

    def _bound_to(self, created: datetime.datetime | None) -> None:
        """Forget what is kept by stream sequence (`_not_counted`, `_parked`) when the durable bound
        is another one than before (made again: its stream deleted, or NATS back without its
        store): a stream made again numbers its events from 1 again, and a new event at the
        sequence of one parked before was terminated as its copy, never applied nor parked."""
        if created != self._durable_created:
            if self._durable_created is not None:
                self._not_counted.clear()
                self._parked.clear()
            self._durable_created = created

    async def _check_position(self) -> None:
        """Say so, once per process, when the database is behind this durable (`behind`).

        Only said, never acted on: the events past the database's point are acked and will not
        come again by themselves, and what to do depends on the service (docs/sre.md, "Restoring
        one service's database"); the consumer goes on applying new events meanwhile. A check
        that fails (NATS or the database busy at start) is logged and not retried. Its result is
        livegifts_consumer_position_check, which LivegiftsConsumerDatabaseBehind and
        LivegiftsConsumerPositionNotChecked watch: an SRE who reads no logs learns of it too.
        """
        try:
            found = await self.behind()
        except Exception as exc:  # noqa: BLE001 - a check only: consuming goes on without it
            self._position_result(POSITION_NOT_CHECKED)
            log.warning("consumer position not checked", extra={"consumer": self.sub.durable, "error": described(exc)})
            return
        self._position_result(POSITION_OK if found is None else POSITION_BEHIND)
        if found is not None:
            seq, event_id = found
            log.error(
                "the database is behind its consumer: an event it acked is not in its inbox",
                extra={
                    "consumer": self.sub.durable,
                    "stream": self.sub.stream,
                    "stream_seq": seq,
                    "event_id": event_id,
                },
            )

    def _position_result(self, result: str) -> None:
        for each in POSITION_RESULTS:
            CONSUMER_POSITION_CHECK.labels(self.sub.durable, each).set(int(each == result))

    async def behind(self) -> tuple[int, str] | None:
        """(stream sequence, event id) of an event of this subject the durable has acked that the
        database holds no record of (neither in its inbox nor parked); None when there is none.

        Every event a durable acked was recorded in the same commit as its effect, and its inbox
        row outlives the stream's copy (INBOX_RETENTION_DAYS > the stream's max age), so an acked
        event still in the stream and unknown to the database means the database lost commits it
        made: restored to an earlier point (a backup, PITR). Its effects, and those of every event
        acked after that point, are gone, and JetStream will not deliver them again.

        Which delivered events were acked is not told one by one: every event up to the ack floor
        was, and of those delivered after it all but `num_ack_pending` (in flight in another
        replica, or left unacked by a stop, until their ack_wait). So the check reads the last
        POSITION_SCAN_MAX delivered stream sequences, and the last event of its subject at or below
        the floor (the floor may rest on another subject's message: payout-gift-sent's stream also
        holds gifting.stream.ended): an unknown one at or below the floor, or more unknown ones
        above it than are pending, is an acked event the database lost.
        """
        js = self.bus.js
        check(js is not None, "the bus is connected")
        info = await js.consumer_info(self.sub.stream, self.sub.durable)  # type: ignore[union-attr]
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        top = max(floor, info.delivered.stream_seq if info.delivered else 0)
        pending = info.num_ack_pending or 0
        seen: list[tuple[int, str]] = []  # (stream sequence, event id), highest first
        low = max(floor + 1, top - POSITION_SCAN_MAX + 1)
        for seq in range(top, low - 1, -1):
            if (found := await self._event_at(seq)) is not None:
                seen.append((seq, found))
        for seq in range(floor, max(0, floor - POSITION_SCAN_MAX), -1):
            if (found := await self._event_at(seq)) is not None:
                seen.append((seq, found))
                break
        if not seen:
            return None
        ids = {event_id for _, event_id in seen}
        # Known: in the inbox or parked, one query over both tables.
        known_select = union_all(
            *(
                select(t.c.event_id).where(t.c.consumer == self.sub.durable, one_of(self.db.dialect, t.c.event_id, ids))
                for t in (self.tables.inbox, self.tables.dead_letters)
            )
        )
        async with self.db.unit_of_work(readonly=True) as uow:  # SQLite: no write lock for a read
            known = set((await uow.conn.execute(known_select)).scalars())
        unknown = [(seq, event_id) for seq, event_id in seen if event_id not in known]
        acked = [u for u in unknown if u[0] <= floor]
        if acked:
            return acked[0]
        above = [u for u in unknown if u[0] > floor]
        return above[0] if len(above) > pending else None

    async def _event_at(self, seq: int) -> str | None:
        """The event id of the stream's message `seq` when it is one of this subject's with an id
        the inbox can hold; None when it is not (gone, another subject's, undecodable)."""
        try:
            raw = await self.bus.js.get_msg(self.sub.stream, seq)  # type: ignore[union-attr]
        except NotFoundError:
            return None  # deleted, or aged out of the stream
        if raw.subject != self.sub.subject:
            return None
        try:
            event_id = getattr(self.sub.event_type.FromString(raw.data or b""), "event_id", "")
        except DecodeError:
            return None  # parked as undecodable: nothing to look it up by
        if not event_id or self._id_problem(event_id):
            return None
        return str(event_id)

    async def process(self, msgs: list[Msg]) -> None:
        """Apply a fetched batch; falls back to one message at a time when the batch fails."""
        CONSUMER_BATCH.labels(self.sub.durable).observe(len(msgs))
        in_progress = _InProgress(
            msgs,
            self._puller,
            self._binding,
            ACK_WAIT_S / IN_PROGRESS_PER_ACK_WAIT,
            IN_PROGRESS_STATEMENT_TIMEOUTS_MAX * self._statement_timeout_s,
        )
        try:
            await self._process(msgs)
        finally:
            await in_progress.close()

    async def _process(self, msgs: list[Msg]) -> None:
        # The deliveries whose outcome is told (each tried alone, or settled): the rest, should
        # this batch end in an error of its handling (the park's insert, a nak or a term failing
        # because the database or NATS went), are let go uncounted (`_let_go`).
        told: set[int] = set()
        try:
            await self._process_told(msgs, told)
        except Exception:
            await self._let_go(msgs, told)
            raise

    async def _let_go(self, msgs: list[Msg], told: set[int]) -> None:
        """The deliveries of a batch whose handling ended in an error before they were tried alone
        or settled: that is no failure of their events', so they are counted as none
        (`_not_its_fault`) and nak'ed for their next delivery, where NATS still takes a nak.

        Before, they were left as they were: JetStream delivered them again after ACK_WAIT_S, and
        each such delivery counted towards parking an event never tried (a database gone while a
        failed batch was tried one by one could park healthy events after CONSUMER_MAX_DELIVER
        of them)."""
        for msg in msgs:
            if id(msg) in told or msg.is_acked:
                continue
            self._not_its_fault(msg)
            delivered = msg.metadata.num_delivered if msg.metadata else 1
            with contextlib.suppress(Exception):  # NATS gone: it comes back after ACK_WAIT_S, uncounted
                if await self._binding.settles(msg):
                    await msg.nak(delay=redelivery_delay_s(delivered))

    async def _process_told(self, msgs: list[Msg], told: set[int]) -> None:
        if len(msgs) > 1 or self._parked:
            msgs = await self._newest(msgs, told)
        decoded: list[tuple[Msg, E]] = []
        for msg in msgs:
            try:
                event = self.sub.event_type.FromString(msg.data)
                event_id = getattr(event, "event_id", "")
                if not event_id:
                    raise DecodeError("event has no event_id")
                if problem := self._id_problem(event_id):
                    raise DecodeError(problem)
                decoded.append((msg, event))
            except DecodeError as exc:
                told.add(id(msg))
                await self._park(msg, None, f"undecodable: {exc}")
        if not decoded:
            return
        batch: list[tuple[Msg, E]] = []
        unaccounted: list[tuple[Msg, E]] = []
        for item in decoded:
            (unaccounted if self._unaccounted_for(item[0]) else batch).append(item)
        unavailable = await self._apply_or_fail(batch, told) if batch else None
        # In no set order: the events fetched with one that kills the process were delivered as
        # often, and those behind it in a fixed order would die with it after every restart.
        random.shuffle(unaccounted)
        for item in unaccounted:
            told.add(id(item[0]))
            if unavailable is not None:  # the rest would fail alike, each after its connect timeout
                await self._failed(item, unavailable)
                continue
            self._log_tried_alone(item)
            try:
                await self._apply([item])
            except Exception as exc:  # noqa: BLE001
                await self._failed(item, exc)
                if is_unavailable(exc):
                    unavailable = exc

    def _unaccounted_for(self, msg: Msg) -> bool:
        """Whether more than CONSUMER_MAX_DELIVER of the message's deliveries are none this process
        saw fail for a dependency (`_not_counted`). Past that many failures of its own it would
        have been parked, so the deliveries it cannot account for are tries that ended with no
        outcome (the process killed handling it: a segfault, an OOM kill, an os._exit), or
        deliveries to another replica or an earlier process (an outage's naks, a batch held past
        `_InProgress`'s bound). Such events are tried alone, after the rest of their batch and in
        random order (`_process_told`): one that kills the process then takes neither its batch
        nor, after a few restarts, the other events fetched with it, and the line logged before
        its try names it. Never parked for it: nothing here tells those causes apart."""
        delivered = msg.metadata.num_delivered if msg.metadata else 1
        if delivered <= self.max_deliver:
            return False
        return delivered - self._not_its_fault_count(self._sequence(msg), _digest(msg)) > self.max_deliver

    def _log_tried_alone(self, item: tuple[Msg, E]) -> None:
        """Name the event before its try alone, unless this process saw it fail for a dependency:
        during an outage each replica accounts only for its own naks, so past twice
        CONSUMER_MAX_DELIVER of them every pending event is unaccounted for, and each fetch named
        a healthy one as if it had killed the process. One that kills it with its first try after
        such failures here goes unnamed in that crash; the next process, whose counts start
        afresh, names it before its try."""
        msg, event = item
        if self._not_its_fault_count(self._sequence(msg), _digest(msg)):
            return
        with _in_trace_of(msg):
            log.warning(
                "event delivered more often than this process accounts for; tried alone, after its batch",
                extra={
                    "consumer": self.sub.durable,
                    "event_id": event.event_id,  # type: ignore[attr-defined]
                    "stream_seq": self._sequence(msg),
                    "delivered": msg.metadata.num_delivered if msg.metadata else 1,
                },
            )

    async def _apply_or_fail(self, decoded: list[tuple[Msg, E]], told: set[int]) -> Exception | None:
        """Apply `decoded` as one batch, or one by one when the batch fails, each failure to
        `_failed`; the error that said the database is unavailable, if one ended the round."""
        try:
            await self._apply(decoded)
        except Exception as exc:  # noqa: BLE001
            if len(decoded) == 1:
                told.add(id(decoded[0][0]))
                await self._failed(decoded[0], exc)
                return exc if is_unavailable(exc) else None
            if not is_unavailable(exc):
                log.warning(
                    "batch failed, retrying one by one", extra={"consumer": self.sub.durable, "error": repr(exc)}
                )
            for i, item in enumerate(decoded):
                if item[0].is_acked:
                    continue  # the batch committed and its ack failed after this one's: it is done
                try:
                    await self._apply([item])
                except Exception as one_exc:  # noqa: BLE001
                    told.add(id(item[0]))
                    await self._failed(item, one_exc)
                    if is_unavailable(one_exc):
                        # The database is down or refuses writes: the rest would fail alike (each
                        # after its own connect timeout, when the primary is gone without a word).
                        for rest in decoded[i + 1 :]:
                            told.add(id(rest[0]))
                            await self._failed(rest, one_exc)
                        return one_exc
        return None

    async def _newest(self, msgs: list[Msg], told: set[int]) -> list[Msg]:
        """The batch less the copies JetStream delivered while this process still held an earlier
        delivery of the same event (a batch held past `_InProgress`'s bound, a +WPI lost).

        Of several deliveries of one event only the newest is tried (its ack or nak settles the
        event); each older one is counted as no failure of the event's, since it was never tried
        yet raised the delivery count. A copy of an event this process parked is terminated
        again, not tried: such copies were each parked once more (seven rows for one event).
        """
        newest: dict[int | tuple[int, bytes], Msg] = {}
        for i, msg in enumerate(msgs):
            seq = self._sequence(msg)
            if seq is not None and (parked := self._parked.get(seq)) is not None and parked == _digest(msg):
                told.add(id(msg))
                with contextlib.suppress(Exception):  # already gone from the stream; best effort
                    if await self._binding.settles(msg):
                        await msg.term()
                continue
            key: int | tuple[int, bytes] = seq if seq is not None else -1 - i
            had = newest.get(key)
            if had is not None and seq is not None and _digest(had) != _digest(msg):
                # Another event at that sequence, not a copy (its stream made again while the
                # old one's deliveries were buffered here): tried too, since the other's ack
                # (JetStream settles by stream sequence) would settle it untried if dropped.
                key = (seq, _digest(msg))
                had = newest.get(key)
            if had is None:
                newest[key] = msg
                continue
            older, newer = sorted((had, msg), key=lambda m: m.metadata.num_delivered)
            newest[key] = newer
            told.add(id(older))
            self._not_its_fault(older)
        return list(newest.values())

    async def _apply(self, items: list[tuple[Msg, E]]) -> None:
        span = self._batch_span(items)
        try:
            unique: dict[str, E] = {}
            for _, e in items:
                unique.setdefault(e.event_id, e)  # type: ignore[attr-defined]
            async with self.db.unit_of_work() as uow:
                with spanning(span):  # a failure marks it without the error's text (SQL values)
                    fresh = await self._record_and_handle(uow, unique)
                await uow.commit()
            # Counted as committed: an ack NATS refuses after it leaves them applied all the same.
            CONSUMED.labels(self.sub.durable, "applied").inc(len(fresh))
            CONSUMED.labels(self.sub.durable, "duplicate").inc(len(items) - len(fresh))
            faults.point("consumer.after_commit_before_ack")
            for msg, _ in items:
                if await self._binding.settles(msg):
                    await msg.ack()
            if self._not_counted:
                for msg, _ in items:
                    self._forget(msg)
        finally:
            span.end()

    def _batch_span(self, items: list[tuple[Msg, E]]) -> trace.Span:
        """The one `process <subject>` span the batch's handler runs in: a child of the first
        sampled message's trace (the first message's if none is; what its writes carry on),
        linked to every message's own trace.

        A span per message (as before) ended each trace but the first at an empty span: the
        handler's work for the others showed in no trace of theirs. The links (OpenTelemetry's
        way for batches) lead from the work to each event's publish span, at most BATCH_LINKS_MAX;
        the rest are counted. Without an exporter only the first message's context is read (the
        no-op tracer hands it back as a non-recording span): no per-message cost on the hot path.
        """
        first = extract_context(dict(items[0][0].headers or {}))
        if not recording():
            return tracer.start_span(f"process {self.sub.subject}", context=first, kind=trace.SpanKind.CONSUMER)
        contexts = [first] + [extract_context(dict(msg.headers or {})) for msg, _ in items[1:BATCH_LINKS_MAX]]
        spans = [trace.get_current_span(ctx).get_span_context() for ctx in contexts]
        # Under the first sampled message's trace: under an unsampled first one (ParentBased
        # ratio sampling) the span was dropped, and a sampled gift later in the batch lost its
        # consumer's span and its handler's events went on unsampled - a trace recorded in part.
        parent = next((ctx for ctx, span in zip(contexts, spans, strict=True) if span.trace_flags.sampled), first)
        links = [trace.Link(span) for span in spans]
        return tracer.start_span(
            f"process {self.sub.subject}",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            links=[link for link in links if link.context.is_valid],
            attributes={
                "messaging.system": "nats",
                "messaging.operation.type": "process",
                "messaging.destination.name": self.sub.subject,
                "messaging.consumer": self.sub.durable,
                "messaging.batch.message_count": len(items),
                "messaging.batch.links_dropped": max(0, len(items) - BATCH_LINKS_MAX),
            },
        )

    async def _record_and_handle(self, uow: UnitOfWork, unique: dict[str, E]) -> dict[str, E]:
        """Record the events in the inbox and apply the new ones; returns those (the rest are duplicates)."""
        # One statement records the new events and names them: no read of the inbox first.
        received = now_us()
        # In event id order: an insert waits for an id another transaction is recording, so two
        # replicas handed the same events in other orders (a redelivery) would each wait for one
        # the other holds (a deadlock). The handler still gets them in the order they came.
        rows = [{"consumer": self.sub.durable, "event_id": eid, "received_at_us": received} for eid in sorted(unique)]
        recorded = set((await uow.conn.execute(self._record.stmt, self._record.params(rows))).scalars())
        fresh = {eid: e for eid, e in unique.items() if eid in recorded}
        if fresh:
            await self.sub.handle(uow, list(fresh.values()))
        return fresh

    async def replay(
        self,
        dead_letter_id: int,
        on_replayed: Callable[[UnitOfWork, dict[str, Any], bool], Awaitable[None]] | None = None,
    ) -> tuple[dict[str, Any], bool] | None:
        """Apply a parked event again (an operator's call, once its cause is fixed): its row as it
        was, and whether it was applied now (False: the inbox held it, nothing changed); None if
        no such row is parked for this consumer. The inbox record, the effect, the row's removal
        and `on_replayed(uow, row, applied)` (the caller's idempotency record) commit together; a
        failure leaves the row as it was. A failure of the event (it cannot be decoded, the
        handler raised) is ReplayFailed; a failure of the database (down, deadlock,
        serialization) or of `on_replayed` propagates as it is, for the service's error mapping."""
        d = self.tables.dead_letters.c
        async with self.db.unit_of_work() as uow:
            # Locked (PostgreSQL; SQLite serializes writers): a concurrent replay of the same row
            # waits, then finds it gone.
            row = (
                await uow.conn.execute(
                    select(self.tables.dead_letters)
                    .where(d.id == dead_letter_id, d.consumer == self.sub.durable)
                    .with_for_update()
                )
            ).first()
            if row is None:
                return None
            parked = row._asdict()
            try:
                event = self.sub.event_type.FromString(parked["payload"])
            except DecodeError as exc:
                name = self.sub.event_type.__name__
                raise ReplayFailed(parked, f"the payload cannot be decoded as {name}", _whole(exc)) from exc
            event_id = getattr(event, "event_id", "")
            if not event_id:
                raise ReplayFailed(parked, "the payload has no event_id", "the payload has no event_id")
            if problem := self._id_problem(event_id):  # as the consumer parked it
                raise ReplayFailed(parked, f"the {problem}", f"the {problem}")
            # Under the operator's call, with no link to the event's own trace: a parked row
            # keeps no message headers (dead_letters has no column for them), only the event id.
            replay_span = tracer.start_span(
                f"replay {parked['subject']}",
                kind=trace.SpanKind.CONSUMER,
                attributes={
                    "messaging.system": "nats",
                    "messaging.consumer": self.sub.durable,
                    "messaging.message.id": event_id,
                },
            )
            with spanning(replay_span, end_on_exit=True):
                try:
                    fresh = await self._record_and_handle(uow, {event_id: event})
                except Exception as exc:
                    if is_retryable(exc):
                        # The database failed, or the consumer met a conflict or a dependency it
                        # says to retry, not the event: answered UNAVAILABLE / ABORTED like any
                        # other RPC, so the operator retries instead of hunting a cause in the
                        # event. The rollback keeps the row parked.
                        raise
                    # The class name only: the driver's text holds SQL, constraint names and
                    # key values, which stay in the log (ReplayFailed.detail).
                    raise ReplayFailed(parked, f"the consumer raised {type(exc).__name__}", _whole(exc)) from exc
            await uow.conn.execute(delete(self.tables.dead_letters).where(d.id == dead_letter_id))
            if on_replayed is not None:
                await on_replayed(uow, parked, bool(fresh))
            await uow.commit()
        CONSUMED.labels(self.sub.durable, "replayed" if fresh else "duplicate").inc()
        return parked, bool(fresh)

    def _id_problem(self, event_id: str) -> str:
        """Why the inbox cannot hold `event_id`, from a foreign or broken producer ("" if it can).

        Such an event is parked as undecodable. A longer id than the column holds was recorded cut
        on PostgreSQL while the insert's array was of the column's VARCHAR(64) (the cast truncated),
        so the event passed for a duplicate: acked, never applied; since its array is of unbounded
        text (`sql._array_of`) the insert fails, and its batch with it, on each delivery until the
        event is parked: it is parked at once. A control character (NUL) PostgreSQL refuses, in the
        inbox and then in dead_letters, so the event was never parked and came back every backoff.
        SQLite took both.
        """
        if len(event_id) > self._event_id_max:
            return f"event_id is longer than {self._event_id_max} characters"
        if not is_text(event_id):
            return "event_id holds a control character"
        return ""

    @staticmethod
    def _sequence(msg: Msg) -> int | None:
        return msg.metadata.sequence.stream if msg.metadata else None

    def _forget(self, msg: Msg) -> None:
        """Drop the not-counted deliveries of `msg`'s event (acked or parked): only if they are
        its own, as `_not_its_fault_count` reads them (another event at that sequence keeps its)."""
        seq = self._sequence(msg)
        if seq is not None and (kept := self._not_counted.get(seq)) is not None and kept[0] == _digest(msg):
            del self._not_counted[seq]

    def _not_its_fault_count(self, seq: int | None, digest: bytes) -> int:
        """The deliveries of the message at `seq` that failed for no fault of the event's, counted
        while it held the body of `digest` (another body at that sequence counts from 0)."""
        kept = self._not_counted.get(seq) if seq is not None else None
        return kept[1] if kept is not None and kept[0] == digest else 0

    def _not_its_fault(self, msg: Msg) -> None:
        """Count a delivery that failed for no fault of the event's."""
        seq = self._sequence(msg)
        if seq is None:
            return
        digest = _digest(msg)
        self._not_counted[seq] = (digest, self._not_its_fault_count(seq, digest) + 1)
        self._not_counted.move_to_end(seq)
        _trim(self._not_counted, self._not_counted_max)

    def _log_outage(self, msg: Msg, event: E, exc: Exception, delay_s: float) -> None:
        """One line per OUTAGE_LOG_INTERVAL_S and kind of error for the events nak'ed because the
        database failed."""
        retries = self._outage_log.occurred(error_kind(exc))
        if not retries:
            return
        with _in_trace_of(msg):
            log.warning(
                "event not applied, the database is unavailable; will be redelivered, not parked",
                extra={
                    "consumer": self.sub.durable,
                    "event_id": event.event_id,  # type: ignore[attr-defined]
                    "error": repr(exc),
                    "retries": retries,  # since the previous such line
                    "retry_in_s": delay_s,
                },
            )

    async def _failed(self, item: tuple[Msg, E], exc: Exception) -> None:
        msg, event = item
        delivered = msg.metadata.num_delivered if msg.metadata else 1
        delay_s = redelivery_delay_s(delivered)
        if _not_the_events_fault(exc):
            self._not_its_fault(msg)
            CONSUMED.labels(self.sub.durable, "retry").inc()
            if is_unavailable(exc):
                self._log_outage(msg, event, exc, delay_s)
            else:  # a conflict (deadlock, serialization failure) or NATS refusing its ack: rare, each logged
                self._log_retry(msg, event, exc)
            await self._nak(msg, delay_s)
            return
        failures = delivered - self._not_its_fault_count(self._sequence(msg), _digest(msg))
        if failures >= self.max_deliver:
            event_id = event.event_id  # type: ignore[attr-defined]
            # Past CONSUMER_MAX_DELIVER unaccounted for, it is parked on its first failure here:
            # the count is its deliveries, some tried elsewhere or never tried (`_unaccounted_for`).
            times = (
                f"{failures} times (deliveries, not all tried here)"
                if self._unaccounted_for(msg)
                else f"{failures} times"
            )
            error = f"failed {times}: {shown(exc)}; the service log has the whole error"
            await self._park(msg, event_id, error, _whole(exc))
            self._forget(msg)
            return
        CONSUMED.labels(self.sub.durable, "retry").inc()
        self._log_retry(msg, event, exc)
        await self._nak(msg, delay_s)

    async def _nak(self, msg: Msg, delay_s: float) -> None:
        if await self._binding.settles(msg):
            await msg.nak(delay=delay_s)

    def _log_retry(self, msg: Msg, event: E, exc: Exception) -> None:
        with _in_trace_of(msg):
            log.warning(
                "event failed, will be redelivered",
                extra={"consumer": self.sub.durable, "event_id": event.event_id, "error": repr(exc)},  # type: ignore[attr-defined]
            )

    async def _park(self, msg: Msg, event_id: str | None, error: str, detail: str = "") -> None:
        """Park an event: `error` is stored and shown by ListDeadLetters (no internals), `detail`
        (the whole error, SQL included) goes to the log only.

        An event parked already (by another replica, or by this consumer before a restart, its
        term lost) is only terminated, not given a second row, alert and replay: the insert skips
        a (consumer, event_id) the unique index holds, and one another replica is inserting at
        the same moment is waited for, then skipped (or inserted, if that transaction rolled
        back). An undecodable event (`event_id` None) is kept under `undecodable_id` of its bytes."""
        d = self.tables.dead_letters
        async with self.db.unit_of_work() as uow:
            parked = await uow.conn.execute(
                insert_ignore(self.db.dialect, d)
                .values(
                    consumer=self.sub.durable,
                    subject=msg.subject,
                    event_id=event_id if event_id is not None else undecodable_id(msg.data or b""),
                    payload=msg.data,
                    error=error[:2000],
                    received_at_us=now_us(),
                )
                .returning(d.c.id)
            )
            dead_letter_id = parked.scalar_one_or_none()
            await uow.commit()
        already = dead_letter_id is None
        # Kept, counted and logged before the term: a term lost with the connection leaves the
        # event to come again, and its copy is then terminated, not parked a second time (so it
        # is counted and logged here or never: the alert watches the count).
        if (seq := self._sequence(msg)) is not None:
            self._parked[seq] = _digest(msg)
            self._parked.move_to_end(seq)  # the newest, also over another event's park at seq
            _trim(self._parked, self._not_counted_max)
        with _in_trace_of(msg):
            if already:
                log.info(
                    "event parked already in dead_letters; its copy terminated",
                    extra={"consumer": self.sub.durable, "event_id": event_id, "error": detail or error},
                )
            else:
                DEAD_LETTERS.labels(self.sub.durable).inc()
                log.error(
                    "event parked in dead_letters",
                    extra={
                        "consumer": self.sub.durable,
                        "event_id": event_id,
                        "dead_letter_id": dead_letter_id,  # what `dead-letters replay` takes
                        "error": detail or error,
                    },
                )
        if await self._binding.settles(msg):
            await msg.term()


class InboxPruner(AgePruner):
    """Deletes inbox rows older than the retention, a chunk per transaction, every interval;
    the rows of events still parked in dead_letters stay (their replay must find them)."""

    def __init__(self, db: Database, tables: CommonTables, settings: ServiceSettings) -> None:
        inbox = tables.inbox
        parked = tables.dead_letters.c
        # A parked row has no age limit, and the event may have been applied meanwhile (a later
        # redelivery, parked row left behind): its inbox row is what makes the replay a no-op,
        # so it stays while the event is parked, and goes in the first round after the replay.
        # (Refusing old replays instead would leave an operator no way to apply an event parked
        # longer than the retention.) It reads ux_dead_letters_consumer_event, not the table.
        still_parked = (
            select(parked.id).where(parked.consumer == inbox.c.consumer, parked.event_id == inbox.c.event_id).exists()
        )
        super().__init__(
            db,
            inbox,
            inbox.c.received_at_us,
            name="inbox",
            retention_days=settings.inbox_retention_days,
            interval_s=settings.inbox_prune_interval_s,
            pause_s=settings.prune_pause_s,
            counter=INBOX_PRUNED,
            done_line="inbox rows pruned",
            progress_line="pruning the inbox",
            keep=(still_parked,),
        )
