"""Transactional outbox: events are rows written with the state change; a relay publishes them.

Choices for when to publish: A) inside the request, before commit (an event for a change that
may roll back); B) after commit from the request (lost if the process dies in between);
C) a row in the same transaction and a relay that publishes after commit. We take C: the relay
deletes a row only after JetStream's PubAck, so a crash republishes, and the Nats-Msg-Id
(= event id) plus the consumers' inbox make the republish harmless.

A published row is deleted rather than marked: the event lives on in JetStream, the table stays
as small as the backlog (it grew by every event ever published before), and PostgreSQL writes
no new row version and no index entries for it. Rows marked by earlier versions
(`published_at_us` set) were deleted by each service's migration 0004, which also dropped the
partial index on unpublished rows (every row is unpublished now: the primary key serves).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections import Counter
from typing import Any

import nats.errors
from google.protobuf.message import Message
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode
from sqlalchemy import Integer, Table, bindparam, delete, func, not_, select

from services.common import faults
from services.common.bus import Bus, described, is_stream_missing, message_bytes, stream_of
from services.common.config import ServiceSettings
from services.common.db import Database, UnitOfWork
from services.common.errors import check
from services.common.loops import sleep_unless_stopped, wait_until_set
from services.common.metrics import (
    OUTBOX_HELD,
    OUTBOX_OLDEST,
    OUTBOX_PENDING,
    OUTBOX_PUBLISH_ERRORS,
    OUTBOX_PUBLISHED,
)
from services.common.sql import Bulk, bulk_insert, one_of_array, one_of_param
from services.common.telemetry import extract_context, inject_headers, recording
from services.common.timeutil import now_us

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

ATOMIC_BATCH_MAX = 1000  # nats-server's limit on the messages of one atomic batch
ERR_BATCH_DUPLICATE_MSG_ID = 10201  # JetStream: "atomic publish batch contains duplicate message id"
# JetStream's refusals that every later batch would meet too: atomic publish disabled on the
# stream (10174), a header it does not take in a batch (10177), a batch over its limit (10199).
# Any other refusal is of this batch only: incomplete (10176: a message lost in a reconnect, or
# the batch timed out on a stalled disk), a missing sequence (10175), a full stream.
ERR_BATCH_NEVER = {10174, 10177, 10199}
# The headers an atomic batch adds to each event, at their longest (`_publish_atomic`): a row is
# sized with them, whichever way it goes.
BATCH_HEADERS_MAX = {"Nats-Batch-Id": "0" * 32, "Nats-Batch-Sequence": str(ATOMIC_BATCH_MAX), "Nats-Batch-Commit": "1"}
_ID_ONLY = {"Nats-Msg-Id": ""}
BATCH_HEADERS_BYTES = message_bytes(b"", _ID_ONLY | BATCH_HEADERS_MAX) - message_bytes(b"", _ID_ONLY)  # 98
# What the relay's sizing (`_publish`) adds to any row's payload at the least: the header block
# with Nats-Msg-Id (an empty id), and the batch headers. A row whose payload is over max_payload
# less this is refused whatever its headers (`OutboxRelay._read` past RELAY_HELD_MAX): every
# header a publish carries (stored, a publish span's trace context, the event id) only adds to
# it. The stored headers are not counted: their JSON can be longer than their wire form
# (`"k": "v", ` against `k: v\r\n`, escapes), so its length bounds nothing. A row its headers
# take over is found at its publish, as before (`_hold`).
WIRE_BYTES_MIN = message_bytes(b"", _ID_ONLY) + BATCH_HEADERS_BYTES  # 125
# Past RELAY_HELD_MAX, the rows read past by size are counted again (a walk of the outbox) after a
# pass that sent something, else at most this often: an idle relay polls every
# RELAY_POLL_INTERVAL_S, and a count at each poll doubled its walks of a large outbox.
SKIPPED_RECOUNT_INTERVAL_S = 10.0


class OversizedEventError(nats.errors.MaxPayloadError):
    """A row the server would refuse: its event and headers exceed the server's max_payload."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__()
        self.size = size
        self.limit = limit

    def __str__(self) -> str:
        return f"nats: maximum payload exceeded ({self.size} bytes, max_payload {self.limit})"


# A row's outcome until its publish answers: what an exception midway leaves for the rows after.
_NOT_PUBLISHED = object()


def new_event_id() -> str:
    """A fresh, globally unique id: 128 random bits as 32 hex digits.

    uuid4().hex's form without its version bits, at a fifth of its cost (no UUID object): a
    batch of 100 gifts makes 100 of these in gifting and 100 entry ids in the wallet.
    """
    return os.urandom(16).hex()


class Outbox:
    """Adds events to the outbox table inside a unit of work, and wakes the relay after commit."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.wakeup = asyncio.Event()
        self._insert: dict[str, Bulk] = {}  # by dialect, built on first use

    def _bulk_insert(self, dialect: str) -> Bulk:
        bulk = self._insert.get(dialect)
        if bulk is None:
            names = ["event_id", "subject", "payload", "headers", "created_at_us"]
            bulk = self._insert[dialect] = bulk_insert(dialect, self.table, names)
        return bulk

    async def add(self, uow: UnitOfWork, subject: str, event_id: str, event: Message) -> None:
        """Write one event in the caller's transaction (published after commit)."""
        await self.add_many(uow, [(subject, event_id, event)])

    async def add_many(
        self, uow: UnitOfWork, events: list[tuple[str, str, Message]], contexts: list[Any] | None = None
    ) -> None:
        """Write several events in the caller's transaction with one statement.

        Each event carries the current trace context, or with `contexts` (one per event) its own:
        a group commit writes its callers' events in its first caller's context, and each event
        must continue the trace of the call it belongs to (its publish, and its consumers' work).
        """
        if not events:
            return
        if contexts is None:
            headers = [json.dumps(inject_headers())] * len(events)
        else:
            check(len(contexts) == len(events), "one trace context per event")
            headers = _stored_headers(contexts)
        created = now_us()
        bulk = self._bulk_insert(uow.conn.dialect.name)
        await uow.conn.execute(
            bulk.stmt,
            bulk.params(
                [
                    {
                        "event_id": event_id,
                        "subject": subject,
                        "payload": event.SerializeToString(),
                        "headers": h,
                        "created_at_us": created,
                    }
                    for (subject, event_id, event), h in zip(events, headers, strict=True)
                ]
            ),
        )
        uow.after_commit(self.wakeup.set)

    async def marks(self, uow: UnitOfWork) -> tuple[int, int]:
        """(lowest id of an unpublished row or 0, highest id present or 0): the audit's cut-off.

        Ids are never reused (PostgreSQL's identity, SQLite's AUTOINCREMENT), so a row written
        later has a higher id than any present now, even once the table has drained.

        An audit that saw last id M is done waiting once the lowest unpublished id is past M, however
        many events were written since.
        """
        t = self.table.c
        first = (await uow.conn.execute(select(func.min(t.id)).where(t.published_at_us.is_(None)))).scalar_one()
        last = (await uow.conn.execute(select(func.max(t.id)))).scalar_one()
        return int(first or 0), int(last or 0)

    async def pending(self, uow: UnitOfWork) -> int:
        """How many events are written but not yet acked by JetStream."""
        return int(
            (
                await uow.conn.execute(
                    select(func.count()).select_from(self.table).where(self.table.c.published_at_us.is_(None))
                )
            ).scalar_one()
        )


class OutboxRelay:
    """Publishes unsent outbox rows to JetStream in id order, with backoff on failure.

    A batch of rows goes as one atomic batch publish where the stream allows it (one request,
    one PubAck, one fsync for up to 1,000 events: with `sync_interval: always` a per-event
    publish waits for one fsync each); otherwise, or when the server refuses the batch, as
    pipelined single publishes. Either way a row is deleted only after its event is stored.

    Replicas (PostgreSQL): every replica runs a relay over the one outbox table. Choices: A) each
    reads every unsent row (measured with three replicas at 1,000 events/s: 1.9 publishes per
    event, and each overlap made the server refuse an atomic batch, so its rows went one publish
    and one fsync each); B) `FOR UPDATE SKIP LOCKED`: relays publish disjoint batches in parallel,
    but a later batch may be stored before an earlier one still in flight, and the live feed
    promises a sender's gifts in the order they were sent; C) the oldest batch claimed with
    `FOR UPDATE` in the transaction that deletes it, held over the publish: a second relay waits for
    the first's batch to be stored and deleted, then takes the rows after it. We take C: each
    event is published once and the stream keeps the outbox's order; one relay publishes at a
    time, and one relay's atomic batches carry thousands of events a second. A relay that dies
    mid-publish releases its claim with its connection, and the next relay republishes those rows
    (harmless: Nats-Msg-Id and the consumers' inbox). SQLite has one process per database file,
    and a write transaction held over a publish would stop its every writer: there the relay
    reads, publishes, and deletes in a second transaction.
    """

    def __init__(self, db: Database, bus: Bus, outbox: Outbox, settings: ServiceSettings) -> None:
        self.db = db
        self.bus = bus
        self.outbox = outbox
        self.table = outbox.table
        self.batch_size_max = settings.relay_batch_size_max
        self.publish_timeout_s = settings.outgoing_deadline_s
        self.poll_interval_s = settings.relay_poll_interval_s
        self.backoff_max_s = settings.relay_backoff_max_s
        self.linger_s = settings.relay_linger_s
        self.held_max = settings.relay_held_max
        t = self.table
        # Built once: one cache key and one compiled form whatever the batch (`= ANY(:ids)` on
        # PostgreSQL; an expanding IN on SQLite).
        self._unsent = (
            select(t.c.id, t.c.event_id, t.c.subject, t.c.payload, t.c.headers, t.c.created_at_us)
            .where(t.c.published_at_us.is_(None))
            .order_by(t.c.id)
            .limit(self.batch_size_max)
        )
        self._claim = None if db.sqlite else self._unsent.with_for_update()
        # The same reads past the rows held for their size (`_hold`), used while there are any.
        # The held ids go as one parameter (an array; JSON on SQLite): bound one each, more than
        # 32,766 of them failed every read on SQLite, so the relay stopped.
        self._unsent_past_held = self._unsent.where(not_(one_of_array(db.dialect, t.c.id, "held")))
        self._claim_past_held = None if db.sqlite else self._unsent_past_held.with_for_update()
        self._held_left = select(t.c.id).where(t.c.published_at_us.is_(None), one_of_array(db.dialect, t.c.id, "held"))
        # Past RELAY_HELD_MAX (`_hold`), the reads also pass every row whose payload alone is too
        # large. length() is in bytes on both sides for the payload's type (PostgreSQL's bytea, as
        # octet_length, read from the value's header without detoasting it; SQLite's BLOB, without
        # reading its pages): a check of each row the read passes, in id order, as the held ids.
        too_large = func.length(t.c.payload) > bindparam("room", type_=Integer)
        self._unsent_fitting = self._unsent_past_held.where(not_(too_large))
        self._claim_fitting = None if db.sqlite else self._unsent_fitting.with_for_update()
        self._too_large = select(func.count()).select_from(t).where(t.c.published_at_us.is_(None), too_large)
        self._delete_sent = delete(t).where(one_of_param(db.dialect, t.c.id, "ids"))
        # Rows whose event is larger than the server takes (a producer bug), by id: their size on
        # the wire and their payload's. At most RELAY_HELD_MAX (`_hold`), and those the last pass
        # sent, until the next read.
        self._held: dict[int, tuple[int, int]] = {}
        # Past RELAY_HELD_MAX: the reads pass the rows too large by their payload (`_hold`), and
        # how many there were when last counted.
        self._skipping = False
        self._skipped = 0
        self._counted_at = 0.0  # time.monotonic() of the last count

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until `stop` is set."""
        while not self.bus.connected.is_set():
            # NATS not reached yet (at start, or down then): events wait in the outbox, and the
            # backlog's age is still measured, so its alert fires as it would after a disconnect.
            try:
                await self._measure_backlog()
            except Exception as exc:  # noqa: BLE001 - the database may be down too; measured again next poll
                log.warning("outbox backlog not measured", extra={"error": repr(exc)})
            await wait_until_set(self.bus.connected, stop, self.poll_interval_s)
            if stop.is_set():
                return
        backoff_s = 0.05
        while not stop.is_set():
            try:
                # Cleared before the read, so a commit landing after it (and its wake-up) is
                # seen by this read or wakes the wait below; cleared after, it could wait a poll.
                self.outbox.wakeup.clear()
                sent = await self.relay_once()
                backoff_s = 0.05
                if sent >= self.batch_size_max:
                    continue  # more waiting: go again at once
                if sent > 1 and self.linger_s:
                    # Under load (more than one event came at once), let a few more commits land
                    # so the next batch carries them all. A lone event never waits.
                    await sleep_unless_stopped(stop, self.linger_s)
                    continue
                await wait_until_set(self.outbox.wakeup, stop, self.poll_interval_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the rows stay unsent; retry with backoff
                OUTBOX_PUBLISH_ERRORS.inc()
                log.warning("outbox relay failed, retrying", extra={"error": repr(exc), "retry_in_s": backoff_s})
                await sleep_unless_stopped(stop, backoff_s)
                backoff_s = min(backoff_s * 2, self.backoff_max_s)

    async def relay_once(self) -> int:
        """Publish one batch of unsent rows; returns how many were acked (and deleted)."""
        if self._claim is None:
            async with self.db.unit_of_work(readonly=True) as uow:
                rows = await self._read(uow, claim=False)
            self._waited(rows)
            results, acked = await self._publish(rows)
            if acked:
                async with self.db.unit_of_work() as uow:
                    await self._delete(uow, acked)
        else:
            async with self.db.unit_of_work() as uow:
                rows = await self._read(uow, claim=True)
                self._waited(rows)
                results, acked = await self._publish(rows)
                if acked:
                    await self._delete(uow, acked)
        for subject, n in Counter(r.subject for r in rows if r.id in acked).items():
            OUTBOX_PUBLISHED.labels(subject).inc(n)
        skipping = self._skipping
        kept = self._hold(rows, results, acked)
        switched = self._skipping and not skipping
        if self._skipping and (
            switched
            or (
                len(rows) < self.batch_size_max
                and (acked or time.monotonic() - self._counted_at >= SKIPPED_RECOUNT_INTERVAL_S)
            )
        ):
            await self._count_skipped(switched)
        OUTBOX_HELD.set(len(self._held) - sum(1 for row_id in acked if row_id in self._held) + self._skipped)
        failed = len(rows) - len(acked) - len(kept)
        OUTBOX_PENDING.set(failed)
        if not failed and len(rows) < self.batch_size_max:
            OUTBOX_OLDEST.set(0)  # the read found every waiting row (but those held), and all of them went
        if failed:
            first = next(
                res for r, res in zip(rows, results, strict=True) if isinstance(res, BaseException) and r.id not in kept
            )
            await self._restore_missing_streams(rows, results)
            raise RuntimeError(f"{failed} of {len(rows)} publishes failed: {described(first)}")
        return len(acked)

    async def _restore_missing_streams(self, rows: list[Any], results: list[Any]) -> None:
        """Create again the streams the publishes found missing (deleted while we ran), or set back
        their subjects (edited): without it, every event waited in the outbox until the service
        restarted. The rows go at the next pass, after the usual backoff.

        A publish to a subject no stream takes answers "no response from stream" only when nothing
        else listens on it. Gifting's live feed has a core NATS subscription on gifting.gift.sent,
        which takes the message and never replies: the publish times out instead, as it does when
        the cluster has no quorum. So for a stream whose publishes timed out, the stream is looked
        at (one stream info, once per failed pass, so once per backoff) and mended if it no longer
        takes the suite's subjects; a look that fails too (JetStream unreachable) is left to the
        next pass, and the pass's own error is what the relay logs.
        """
        missing: set[str | None] = set()
        timed_out: set[str | None] = set()
        for r, res in zip(rows, results, strict=True):
            if is_stream_missing(res):
                missing.add(stream_of(r.subject))
            elif isinstance(res, nats.errors.TimeoutError):
                timed_out.add(stream_of(r.subject))
        for stream in sorted(s for s in missing if s is not None):
            await self.bus.restore_stream(stream)
        for stream in sorted(s for s in timed_out - missing if s is not None):
            try:
                await self.bus.restore_stream(stream)
            except Exception as exc:  # noqa: BLE001 - JetStream not answering: the publishes' timeout says it
                log.info("stream not checked after a publish timeout", extra={"stream": stream, "error": repr(exc)})

    async def _read(self, uow: UnitOfWork, *, claim: bool) -> list[Any]:
        """The next batch of unsent rows (claimed with `claim`), past those held for their size
        while the server's max_payload is still below it."""
        check(self.bus.nc is not None, "self.bus.nc is not None")
        limit = self.bus.nc.max_payload
        if self._held:
            # The one place held rows are let go: those sent since, by this relay (a larger
            # max_payload took them) or by another pod's, sharing the outbox (else this relay's
            # gauge, and its alert, stayed up until it restarted).
            left = (await uow.conn.execute(self._held_left, {"held": list(self._held)})).scalars()
            self._held = {row_id: self._held[row_id] for row_id in left}
        held = [row_id for row_id, (size, _payload) in self._held.items() if size > limit]
        if self._skipping:
            # The held ids are those the size filter does not pass (a lower limit may have made one so).
            room = limit - WIRE_BYTES_MIN
            self._held = {row_id: sizes for row_id, sizes in self._held.items() if sizes[1] <= room}
            held = [row_id for row_id, (size, _payload) in self._held.items() if size > limit]
            stmt = self._claim_fitting if claim else self._unsent_fitting
            return list((await uow.conn.execute(stmt, {"held": held, "room": room})).all())
        if not held:
            return list((await uow.conn.execute(self._claim if claim else self._unsent)).all())
        stmt = self._claim_past_held if claim else self._unsent_past_held
        return list((await uow.conn.execute(stmt, {"held": held})).all())

    async def _count_skipped(self, switched: bool) -> None:
        """Count the rows the reads pass for their payload's size (past RELAY_HELD_MAX): when the
        relay starts passing them (logged), and after a read that found every waiting row, so the
        count scans no more of the table than that read did (a full batch may have stopped short
        of a large backlog): one that sent something, else at most every
        SKIPPED_RECOUNT_INTERVAL_S (another pod may have sent them). None left: the reads take
        them again."""
        check(self.bus.nc is not None, "self.bus.nc is not None")
        room = self.bus.nc.max_payload - WIRE_BYTES_MIN
        async with self.db.unit_of_work(readonly=True) as uow:
            self._skipped = int((await uow.conn.execute(self._too_large, {"room": room})).scalar_one())
        self._counted_at = time.monotonic()
        if switched:
            log.error(
                "outbox relay holds RELAY_HELD_MAX events larger than NATS takes; now reads past each one"
                " too large by its payload alone",
                extra={"held_max": self.held_max, "skipped": self._skipped, "max_payload": room + WIRE_BYTES_MIN},
            )
        elif self._skipped == 0:
            self._skipping = False

    def _hold(self, rows: list[Any], results: list[Any], acked: set[int]) -> set[int]:
        """Keep the rows whose event is larger than the server takes out of the next reads, each
        logged and counted once. Returns the ids of `rows` so kept (their refusal fails no pass).

        They stay unsent in the table, where the audit sees them in flight: a producer bug to fix
        (the suite's events fit EVENT_BYTES_MAX, which a service checks at connect), or a server
        whose max_payload went down since. Choices: A) fail the pass, as any refusal (every pass
        then failed and backed off, so the events behind such a row went at most a batch per
        RELAY_BACKOFF_MAX_S); B) delete or park the row (its state change is committed, and the
        event would be gone for good); C) hold it and publish the rest. We take C. A held row goes
        once a connection's max_payload takes it (a restart, or a reconnect to a larger server).

        Held ids are read past at every pass (`_read`), so at most RELAY_HELD_MAX are kept. Beyond
        them, choices: A) fail the pass, as above (the oldest rows come first in every read: once a
        batch of them waited, the relay sent nothing at all); B) a cursor past them (a row
        committed late, with a lower id, would be skipped for good); C) no more ids: the reads also
        pass every row whose payload alone is too large (`WIRE_BYTES_MIN`), a check of the row
        each read already looks at, and the gauge counts them (`_count_skipped`). We take C. The
        held ids are then those too large with their headers only (a payload within a few KB of
        the limit); beyond RELAY_HELD_MAX of those, a row fails the pass as in A. The relay leaves
        this mode once no row is too large by its payload.
        """
        kept: set[int] = set()
        refused = []
        oversized = [(r, res) for r, res in zip(rows, results, strict=True) if isinstance(res, OversizedEventError)]
        if not oversized:
            return kept
        room = oversized[0][1].limit - WIRE_BYTES_MIN
        # Held rows acked in this pass (a larger max_payload took them) are let go at the next
        # read; they hold no place now (else a row oversized in this pass was refused for them).
        gone = sum(1 for row_id in acked if row_id in self._held)
        if not self._skipping:
            new = sum(1 for r, _res in oversized if r.id not in self._held)
            # Rows too large by their payload, in this pass or among those held: passed by their
            # size, they free the ids the others need (else one row over only with its headers,
            # once the held ids were all such rows, failed every pass).
            if len(self._held) - gone + new > self.held_max and (
                any(len(r.payload) > room for r, _res in oversized)
                or any(payload > room for _size, payload in self._held.values())
            ):
                self._skipping = True
                self._held = {i: sizes for i, sizes in self._held.items() if sizes[1] <= room}
                gone = sum(1 for row_id in acked if row_id in self._held)
        for r, res in oversized:
            if self._skipping and len(r.payload) > room:
                self._held.pop(r.id, None)  # the reads pass it by its size now
                kept.add(r.id)
                continue
            if r.id not in self._held:
                if len(self._held) - gone >= self.held_max:
                    refused.append(r)
                    continue
                log.error(
                    "outbox event larger than NATS takes; kept in the outbox, the others go on",
                    extra={"event_id": r.event_id, "subject": r.subject, "bytes": res.size, "max_payload": res.limit},
                )
            self._held[r.id] = (res.size, len(r.payload))
            kept.add(r.id)
        if refused:
            log.error(
                "outbox relay holds RELAY_HELD_MAX events larger than NATS takes; more fail its passes",
                extra={"held_max": self.held_max, "not_held": len(refused), "event_id": refused[0].event_id},
            )
        return kept

    async def _measure_backlog(self) -> None:
        """The backlog's age without publishing: the oldest unsent row's."""
        async with self.db.unit_of_work(readonly=True) as uow:
            oldest = (await uow.conn.execute(self._unsent.limit(1))).all()
        self._waited(oldest)

    @staticmethod
    def _waited(rows: list[Any]) -> None:
        """The backlog's age as this read found it: rows come oldest first, so while JetStream
        refuses them (or the relay falls behind) the gauge keeps growing with the first one."""
        OUTBOX_OLDEST.set(max(0, now_us() - rows[0].created_at_us) / 1e6 if rows else 0)

    async def _publish(self, rows: list[Any]) -> tuple[list[Any], set[int]]:
        """Publish `rows` in order: each one's outcome (an exception if it was not stored), and
        the ids of those stored."""
        if not rows:
            return [], set()
        # Each row's stored trace headers, parsed once for its publish span and its message.
        stored = [json.loads(r.headers) if r.headers != "{}" else {} for r in rows]
        spans = _publish_spans(rows, stored) if recording() else None
        headers = [_headers(stored[i], r.event_id, spans[i] if spans else None) for i, r in enumerate(rows)]
        results: list[Any] = [_NOT_PUBLISHED] * len(rows)
        # Rows the server would refuse are not sent: nats-py refuses a payload over max_payload
        # (after an atomic batch's first events went out), and the server closed the connection on
        # one under it whose headers took it over.
        check(self.bus.nc is not None, "self.bus.nc is not None")
        limit = self.bus.nc.max_payload
        sendable = []
        for i, (r, h) in enumerate(zip(rows, headers, strict=True)):
            size = message_bytes(r.payload, h) + BATCH_HEADERS_BYTES
            if size > limit:
                results[i] = OversizedEventError(size, limit)
            else:
                sendable.append(i)
        try:
            for start in range(0, len(sendable), ATOMIC_BATCH_MAX):
                at = sendable[start : start + ATOMIC_BATCH_MAX]
                chunk = [rows[i] for i in at]
                chunk_headers = [headers[i] for i in at]
                stream = self.bus.atomic_stream_of({r.subject for r in chunk}) if len(chunk) > 1 else None
                if stream is not None and await self._publish_atomic(stream, chunk, chunk_headers):
                    outcomes: list[Any] = [None] * len(chunk)
                else:
                    outcomes = await self._publish_each(chunk, chunk_headers)
                for i, res in zip(at, outcomes, strict=True):
                    results[i] = res
        finally:
            if spans:
                _end_publish_spans(spans, results)
        faults.point("relay.after_puback_before_mark")
        acked = {
            r.id
            for r, res in zip(rows, results, strict=True)
            if res is not _NOT_PUBLISHED and not isinstance(res, BaseException)
        }
        return results, acked

    async def _delete(self, uow: UnitOfWork, ids: set[int]) -> None:
        """Delete the rows whose events are stored, and commit."""
        await uow.conn.execute(self._delete_sent, {"ids": list(ids)})
        await uow.commit()

    async def _publish_each(self, rows: list[Any], headers: list[dict[str, str]]) -> list[Any]:
        """One publish per row, pipelined: all go out on the one connection in id order, then the acks."""
        js = self.bus.js
        check(js is not None, "js is not None")
        return await asyncio.gather(
            *(js.publish(r.subject, r.payload, headers=h) for r, h in zip(rows, headers, strict=True)),
            return_exceptions=True,
        )

    async def _publish_atomic(self, stream: str, rows: list[Any], row_headers: list[dict[str, str]]) -> bool:
        """Store `rows` in `stream` as one atomic batch: all or none, one ack (and one fsync) for all.

        False if the server did not store the batch, or its answer was lost: the caller then
        publishes the rows one by one, which is always safe, since JetStream drops a Nats-Msg-Id
        it already holds. That is also how a republish after a crash goes: a batch holding an
        event id the stream already has is refused whole ("duplicate message id").
        """
        nc = self.bus.nc
        check(nc is not None, "nc is not None")
        batch_id = uuid.uuid4().hex
        try:
            for seq, (r, h) in enumerate(zip(rows, row_headers, strict=True), start=1):
                headers = dict(h)
                headers["Nats-Batch-Id"] = batch_id
                headers["Nats-Batch-Sequence"] = str(seq)
                if seq < len(rows):
                    await nc.publish(r.subject, r.payload, headers=headers)
                    continue
                headers["Nats-Batch-Commit"] = "1"
                reply = await nc.request(r.subject, r.payload, timeout=self.publish_timeout_s, headers=headers)
            answer = json.loads(reply.data)
        except Exception as exc:  # noqa: BLE001 - unknown outcome: the one-by-one path settles it
            log.info("atomic batch not acked; publishing one by one", extra={"stream": stream, "error": repr(exc)})
            return False
        if "error" in answer or answer.get("count") != len(rows) or answer.get("stream") != stream:
            error = answer.get("error") or {}
            if error.get("err_code") == ERR_BATCH_DUPLICATE_MSG_ID:
                log.info("atomic batch holds events already stored; publishing one by one", extra={"stream": stream})
            elif error and error.get("err_code") not in ERR_BATCH_NEVER:
                # This batch only: turned off, every event after a NATS reconnect or a disk stall
                # paid its own publish and fsync until the process restarted.
                log.warning(
                    "atomic batch refused; publishing it one by one",
                    extra={"stream": stream, "error": json.dumps(answer)},
                )
            else:
                # Not a republish: the server will not take our batches (a setting, a limit). Stop
                # trying them on this stream rather than paying for two publishes of every event.
                self.bus.atomic_streams.discard(stream)
                log.warning(
                    "atomic batch refused; this stream now gets single publishes",
                    extra={"stream": stream, "error": json.dumps(answer)},
                )
            return False
        return True


def _stored_headers(contexts: list[Any]) -> list[str]:
    """Each trace context as an outbox row stores it (JSON of its W3C headers), built once per
    distinct context: callers outside any trace share the one empty context, and without an
    exporter that is the common case (an inject and a dumps per batch, as before)."""
    built: dict[int, str] = {}  # by id(): the contexts are alive in `contexts` meanwhile
    out = []
    for ctx in contexts:
        h = built.get(id(ctx))
        if h is None:
            carrier = inject_headers(ctx)
            if carrier.keys() == {"traceparent"}:
                # The usual carrier, as json.dumps writes it at half its cost: the W3C propagator
                # formats it from integers (hex digits and dashes, nothing to escape).
                h = f'{{"traceparent": "{carrier["traceparent"]}"}}'
            else:
                h = json.dumps(carrier)
            built[id(ctx)] = h
        out.append(h)
    return out


def _headers(stored: dict[str, str], event_id: str, span: Span | None = None) -> dict[str, str]:
    """The stored trace headers (parsed, completed in place) plus Nats-Msg-Id (JetStream
    de-duplicates republishes by it).

    With `span` (the event's publish span), the trace context is that span's instead: the
    consumer's span then hangs under the publish, which hangs under the span that wrote the event.
    """
    out = stored
    if span is not None:
        out.update(inject_headers(trace.set_span_in_context(span)))
    out["Nats-Msg-Id"] = event_id
    return out


def _publish_spans(rows: list[Any], stored: list[dict[str, str]]) -> list[Span]:
    """A PRODUCER span per row (spans recorded only), each in the trace its event was written in.

    Without it a trace went from the writer's span straight to the consumer's: the time an event
    waited in the outbox and its publish were nowhere, nor which relay published it. Choices: A) one
    span for the batch, linked to the events' traces (the traces themselves still skip the
    publish); B) a span per event (this; only when spans are recorded, so nothing when they are not).
    """
    at = now_us()
    return [
        tracer.start_span(
            f"publish {r.subject}",
            context=extract_context(headers),
            kind=trace.SpanKind.PRODUCER,
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": r.subject,
                "messaging.message.id": r.event_id,
                "messaging.batch.message_count": len(rows),
                "outbox.waited_s": max(0, at - r.created_at_us) / 1e6,
            },
        )
        for r, headers in zip(rows, stored, strict=True)
    ]


def _end_publish_spans(spans: list[Span], results: list[Any]) -> None:
    """End each publish span, marked an error when its event was not stored (or never sent)."""
    for span, res in zip(spans, results, strict=True):
        if res is _NOT_PUBLISHED:
            span.set_status(Status(StatusCode.ERROR, "not published"))
        elif isinstance(res, BaseException):
            span.set_status(Status(StatusCode.ERROR, repr(res)))
        span.end()
