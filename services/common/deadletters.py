"""DeadLetterService: the events a service's consumers parked, and their replay (operator RPCs).

A consumer parks an event that failed CONSUMER_MAX_DELIVER times, or could not be decoded, in
its dead_letters table and terminates it in JetStream (services/common/inbox.py). Once the
cause is fixed (a bug deployed, a missing row restored), an operator lists them and replays
each through the consumer that parked it: inbox record, effect and removal of the row commit
together, so a replay takes effect once, or not at all.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlalchemy import Select, Table, func, select
from sqlalchemy.exc import IntegrityError

from livegifts.common.v1 import dead_letters_pb2, dead_letters_pb2_grpc
from services.common.auth import OperatorAuth
from services.common.db import Database, UnitOfWork
from services.common.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound, is_text, require_key
from services.common.grpcserver import ServiceRegistration
from services.common.idempotency import record, request_hash, stored_answer
from services.common.inbox import Consumer, ReplayFailed, is_undecodable_id
from services.common.loops import run_every
from services.common.metrics import DEAD_LETTERS_PARKED
from services.common.tables import CommonTables
from services.common.telemetry import current_trace_id
from services.common.timeutil import to_timestamp

log = logging.getLogger(__name__)

PAGE_SIZE_DEFAULT = 100
PAGE_SIZE_MAX = 500
_OUTCOME = dead_letters_pb2.ReplayDeadLetterResponse
REPLAY_SCOPE = "ReplayDeadLetter"
# How often the parked rows are counted for livegifts_dead_letters_parked: one grouped count of a
# table that holds only what awaits an operator.
DEAD_LETTERS_COUNT_INTERVAL_S = 60.0


def _dead_letter_pb(r: dict[str, Any]) -> dead_letters_pb2.DeadLetter:
    return dead_letters_pb2.DeadLetter(
        id=r["id"],
        consumer=r["consumer"],
        subject=r["subject"],
        event_id="" if is_undecodable_id(r["event_id"]) else (r["event_id"] or ""),
        error=r["error"],
        parked_at=to_timestamp(r["received_at_us"]),
        payload_bytes=len(r["payload"]),
    )


def _answer(parked: dict[str, Any], applied: bool) -> dead_letters_pb2.ReplayDeadLetterResponse:
    return _OUTCOME(
        dead_letter=_dead_letter_pb(parked),
        outcome=_OUTCOME.OUTCOME_APPLIED if applied else _OUTCOME.OUTCOME_DUPLICATE,
    )


class DeadLetterServicer(dead_letters_pb2_grpc.DeadLetterServiceServicer):
    """Lists parked events and replays them through the consumer that parked them."""

    def __init__(self, db: Database, tables: CommonTables, consumers: list[Consumer[Any]], auth: OperatorAuth) -> None:
        self.db = db
        self.tables = tables
        self.consumers = {c.sub.durable: c for c in consumers}
        self.auth = auth

    async def ListDeadLetters(self, request: dead_letters_pb2.ListDeadLettersRequest, context: Any) -> Any:
        """Operator: one page of parked events, oldest first."""
        self.auth.require(context)
        size = request.page_size or PAGE_SIZE_DEFAULT
        if not 1 <= size <= PAGE_SIZE_MAX:
            raise InvalidArgument(f"page_size must be 1..{PAGE_SIZE_MAX}", "INVALID_PAGE_SIZE")
        d = self.tables.dead_letters.c
        q = select(self.tables.dead_letters).where(d.id > request.after_id)
        if request.consumer:
            # Compared with stored names: text PostgreSQL cannot hold (a NUL) failed in the driver
            # as INTERNAL instead of naming the argument.
            if not is_text(request.consumer):
                raise InvalidArgument("consumer must be text without control characters", "INVALID_CONSUMER")
            q = q.where(d.consumer == request.consumer)
        async with self.db.unit_of_work(readonly=True) as uow:
            rows = [r._asdict() for r in await uow.conn.execute(q.order_by(d.id).limit(size))]
        out = dead_letters_pb2.ListDeadLettersResponse(dead_letters=[_dead_letter_pb(r) for r in rows])
        if len(rows) == size:
            out.next_after_id = rows[-1]["id"]
        return out

    async def ReplayDeadLetter(self, request: dead_letters_pb2.ReplayDeadLetterRequest, context: Any) -> Any:
        """Operator: apply one parked event again, once."""
        operator = self.auth.require(context)
        if request.id <= 0:
            raise InvalidArgument("id is required", "MISSING_FIELD", field="id")
        # The key is optional (callers from before it keep their answers). With one, a retry of a
        # replay that went through answers as it did, not UNKNOWN_DEAD_LETTER; the answer is
        # recorded in the replay's own transaction, so it exists exactly when the replay took effect.
        key = require_key(request.idempotency_key) if request.idempotency_key else ""
        digest = request_hash(request) if key else ""
        if key:
            stored = await self._stored_answer(request)
            if stored is not None:
                return stored

        async def on_replayed(uow: UnitOfWork, parked: dict[str, Any], applied: bool) -> None:
            if key:
                await record(uow, self.tables.idempotency, REPLAY_SCOPE, key, digest, _answer(parked, applied))

        d = self.tables.dead_letters.c
        async with self.db.unit_of_work(readonly=True) as uow:
            row = (await uow.conn.execute(select(d.consumer, d.event_id).where(d.id == request.id))).first()
        # The event id too, for the log line of a failed replay: support searches the log by the
        # gift's event id (docs/sre.md, "Support"), which the parked and replayed lines carry.
        consumer, event_id = (row.consumer, row.event_id) if row is not None else (None, "")
        found = None
        if consumer is not None:
            c = self.consumers.get(consumer)
            if c is None:
                raise FailedPrecondition(
                    f"consumer {consumer} no longer runs in this service", "UNKNOWN_CONSUMER", consumer=consumer
                )
            try:
                found = await c.replay(request.id, on_replayed)
            except IntegrityError:
                if not key:
                    raise
                # A concurrent call with this key committed first (the replay rolled back).
                stored = await self._stored_answer(request)
                if stored is None:
                    raise Aborted("a concurrent replay conflicted, retry with the same key", "CONFLICT") from None
                return stored
            except ReplayFailed as exc:
                # The whole error (SQL, values, traceback) goes to the log, under this call's
                # trace id; the answer names the trace so the operator finds it there.
                log.warning(
                    "dead letter replay failed; it stays parked",
                    extra={
                        "dead_letter_id": request.id,
                        "consumer": consumer,
                        "event_id": event_id,
                        "operator": operator,
                        "error": exc.detail,
                    },
                    exc_info=exc,
                )
                trace_id = current_trace_id()
                in_trace = f" (trace {trace_id})" if trace_id else ""
                raise FailedPrecondition(
                    f"the event could not be applied: {exc.message}; the service log has the error{in_trace}",
                    "REPLAY_FAILED",
                    consumer=consumer,
                    trace_id=trace_id,
                ) from None
        if found is None:  # never parked, or replayed already (by this call's retry or another operator)
            # A concurrent call with this key may have replayed it since the look-up above.
            stored = await self._stored_answer(request) if key else None
            if stored is not None:
                return stored
            raise NotFound("no event is parked with this id (replayed already?)", "UNKNOWN_DEAD_LETTER")
        parked, applied = found
        log.info(
            "dead letter replayed",
            extra={
                "dead_letter_id": request.id,
                "consumer": consumer,
                "event_id": parked["event_id"],
                "applied": applied,
                "operator": operator,
            },
        )
        return _answer(parked, applied)

    async def _stored_answer(
        self, request: dead_letters_pb2.ReplayDeadLetterRequest
    ) -> dead_letters_pb2.ReplayDeadLetterResponse | None:
        """The answer a replay under the request's key gave, or None; IDEMPOTENCY_KEY_REUSED for another dead letter."""
        return await stored_answer(self.db, self.tables.idempotency, REPLAY_SCOPE, request, _OUTCOME)


def dead_letter_registration(
    db: Database, tables: CommonTables, consumers: list[Consumer[Any]], auth: OperatorAuth
) -> ServiceRegistration:
    """The DeadLetterService registration every service adds beside its own."""
    return ServiceRegistration(
        dead_letters_pb2_grpc.add_DeadLetterServiceServicer_to_server,
        DeadLetterServicer(db, tables, consumers, auth),
        dead_letters_pb2.DESCRIPTOR.services_by_name["DeadLetterService"].full_name,
    )


def parked_counts(dead_letters: Table) -> Select[tuple[str, int]]:
    """The parked rows by consumer: read from ux_dead_letters_consumer_event, not the table."""
    d = dead_letters.c
    return select(d.consumer, func.count()).group_by(d.consumer)


class ParkedGauge:
    """Sets livegifts_dead_letters_parked{consumer} from the dead_letters table every interval.

    dead_letters has no retention: a parked event waits for an operator's replay or delete,
    however long. The counter of parked events and its alert say when one came; this says how
    many still wait, so a pile-up (a consumer parking every event) shows as growth.
    """

    def __init__(self, db: Database, tables: CommonTables, consumers: list[str]) -> None:
        self.db = db
        self.tables = tables
        # Every consumer of the service shows, at 0 when nothing of it is parked.
        self.seen: set[str] = set(consumers)

    async def count_once(self) -> int:
        """Count the parked rows by consumer and set the gauge; 0, so `run_every` logs no line."""
        async with self.db.unit_of_work(readonly=True) as uow:
            rows = (await uow.conn.execute(parked_counts(self.tables.dead_letters))).all()
        counts = {str(consumer): int(n) for consumer, n in rows}
        self.seen |= counts.keys()
        for consumer in self.seen:
            DEAD_LETTERS_PARKED.labels(consumer).set(counts.get(consumer, 0))
        return 0

    async def run(self, stop: asyncio.Event) -> None:
        """Count every DEAD_LETTERS_COUNT_INTERVAL_S until `stop`."""
        await run_every(stop, DEAD_LETTERS_COUNT_INTERVAL_S, self.count_once, "dead letters counted")
