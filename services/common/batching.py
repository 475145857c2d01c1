"""Group commit for the gift saga: concurrent callers of one step share one transaction.

A `MicroBatcher` runs one batch at a time. The first caller starts a batch at once (no timer, so
a lone caller waits for nothing); callers that arrive while that batch is being written queue up
and go together in the next one, at most `size_max` per batch. Under load the batch grows to
what arrived during one commit; without load it is one item. Each caller gets its own result or
its own exception: batching shares the transaction, never the outcome. The shared work runs in
the context (trace) of the batch's first caller; when spans are recorded, every other caller's
span gets a link to that caller's span (where the shared work shows), and the first caller's
span an event with the batch's size (a batch of one caller: neither). What the batch writes for
one caller must carry that caller's trace, not the first's: a `run` that writes events gets each
caller's trace context in its item (gifting's SENT flip: `otel_context.get_current()` at submit,
one contextvar read) and hands it to `Outbox.add_many`, which stores each event's own headers.

A caller that goes away while its item waits for a batch (its deadline passed, its client
cancelled) leaves its future done: with `skip_abandoned` (every batcher but gifting's SENT flip)
its item is dropped when the next batch is taken, never run, and counted in
livegifts_batch_items_skipped_total. Under a burst above what the database takes, every caller
queued behind a slow batch has often given up by the time its turn comes; running their items
anyway spent each later batch on answers nobody read, and the callers still waiting (and every
retry under the same keys) queued behind that wasted work. Dropping is safe: the item never
started, so it is not done at all, which its caller's DEADLINE_EXCEEDED already allows (a
retry under the same key does it then). An item whose batch has started is done whole or not
at all by `run`'s transaction, whatever its caller does meanwhile. The SENT flip keeps its
abandoned items: their coins are already spent, and the flip finishes the gift now instead of
leaving it to the sweeper (a CancelSpend call to the wallet per gift, minutes later).

Choices: A) a fixed delay to gather a batch (adds latency even when idle); B) one batch in flight,
the next gathering meanwhile (this); C) several in flight (more concurrency on the database, but
on SQLite writers are serialized anyway and on PostgreSQL the wallet is the narrower step).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from opentelemetry import trace

from services.common.errors import check
from services.common.metrics import BATCH_ITEMS, BATCH_ITEMS_SKIPPED
from services.common.telemetry import recording

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """Queue items; one task at a time hands them to `run` in batches and answers each caller."""

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[list[R | BaseException]]],
        size_max: int,
        name: str,
        *,
        skip_abandoned: bool = True,
    ) -> None:
        check(size_max >= 1, "a batch holds at least one item")
        self._run = run
        self.size_max = size_max
        self.name = name
        self.skip_abandoned = skip_abandoned
        self._items = BATCH_ITEMS.labels(name)  # metric livegifts_batch_items{batcher=name}
        self._skipped = BATCH_ITEMS_SKIPPED.labels(name)
        self._queue: list[tuple[T, asyncio.Future[R], contextvars.Context]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """The result of `item` once the batch it joined is done (or its exception)."""
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut, contextvars.copy_context()))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        while self._queue:
            batch = self._take()
            if not batch:
                continue  # every caller taken had gone: nothing to run
            self._items.observe(len(batch))
            if len(batch) > 1 and recording():  # a lone caller shares nothing
                self._link_callers(batch)
            try:
                # In the context of the batch's first caller: its trace carries the shared work.
                results = await asyncio.create_task(self._run([item for item, _, _ in batch]), context=batch[0][2])
                check(len(results) == len(batch), "one result per item")
            except BaseException as exc:  # noqa: BLE001 - handed to every caller of this batch
                waiting = [fut for _, fut, _ in batch if not fut.done()]
                for fut in waiting:
                    fut.set_exception(exc)
                if not waiting and not isinstance(exc, asyncio.CancelledError):
                    # Every caller went away first (its deadline), so no call answers this error and
                    # the error mapping never logs it: a database stall longer than the callers'
                    # deadlines (a lock held, DB_STATEMENT_TIMEOUT_S expiring) said nothing at all.
                    log.warning(
                        "batch failed after its callers had gone (their deadlines); nothing was answered",
                        extra={"batcher": self.name, "items": len(batch), "error": repr(exc)},
                    )
                if isinstance(exc, asyncio.CancelledError):
                    # Stopping: callers still queued get the same answer instead of waiting for
                    # their deadlines (their work never started).
                    for _, fut, _ in self._queue:
                        if not fut.done():
                            fut.set_exception(exc)
                    self._queue.clear()
                    raise
                continue
            for (_, fut, _), res in zip(batch, results, strict=True):
                if fut.done():
                    continue  # the caller went away (its deadline); the work stands, like a lost answer
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)

    def _take(self) -> list[tuple[T, asyncio.Future[R], contextvars.Context]]:
        """The next batch off the queue: at most `size_max` items, without (`skip_abandoned`) those
        whose callers have gone, which are dropped unrun."""
        batch: list[tuple[T, asyncio.Future[R], contextvars.Context]] = []
        taken = 0
        for entry in self._queue:
            if len(batch) == self.size_max:
                break
            taken += 1
            if self.skip_abandoned and entry[1].done():
                self._skipped.inc()
                continue
            batch.append(entry)
        del self._queue[:taken]
        return batch

    def _link_callers(self, batch: list[tuple[T, asyncio.Future[R], contextvars.Context]]) -> None:
        """Let each caller's trace find the batch: the shared work shows in the first caller's
        trace only, and the others' spans ended at the wait with nothing to say where it went."""
        spans = [ctx.run(trace.get_current_span) for _, _, ctx in batch]
        attributes = {"livegifts.batcher": self.name, "livegifts.batch.size": len(batch)}
        first = spans[0].get_span_context()
        if spans[0].is_recording():
            spans[0].add_event("batch run in this trace", attributes)
        if not first.is_valid:
            return  # the first caller had no trace: there is nothing to link to
        for span in spans[1:]:
            # Live and sampled (a caller gone at its deadline is not), and not the first's own.
            if span.is_recording() and span.get_span_context() != first:
                span.add_link(first, attributes)
