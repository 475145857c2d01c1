"""Deleting rows past a retention: a chunk per short transaction, paced, every interval, until stopped.

The inbox (services/common/inbox.py InboxPruner) and the idempotency records
(services/common/idempotency.py IdempotencyPruner) both grow by a row per event or command
and are only needed for a while; each names its table, its age column and what it keeps, and
this does the rest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import Counter
from sqlalchemy import BigInteger, ColumnElement, Table, bindparam, delete, select, tuple_

from services.common.db import Database
from services.common.loops import run_every, sleep_unless_stopped
from services.common.metrics import PRUNER_LAST_SUCCESS
from services.common.timeutil import US_PER_DAY, now_us

log = logging.getLogger(__name__)

PRUNE_CHUNK = 5_000  # rows per delete transaction: each holds its locks briefly
PRUNE_PROGRESS_EVERY = 100_000  # rows between progress lines of one long pruning round


class AgePruner:
    """Deletes the rows of `table` whose `age_column` (microseconds, or units of `age_unit_us`) is
    older than the retention, a chunk per transaction, every interval; only rows matching all of
    `only` go (the predicate of the partial index that finds them), and rows matching any of `keep`
    stay however old."""

    def __init__(
        self,
        db: Database,
        table: Table,
        age_column: ColumnElement[int],
        *,
        name: str,
        retention_days: float,
        interval_s: float,
        pause_s: float,
        counter: Counter,
        done_line: str,
        progress_line: str,
        keep: tuple[ColumnElement[bool], ...] = (),
        only: tuple[ColumnElement[bool], ...] = (),
        age_unit_us: int = 1,
    ) -> None:
        self.db = db
        self.name = name  # the `pruner` label of livegifts_pruner_last_success_timestamp_seconds
        # A column counted in days (leaderboard_daily.day) is compared in days, so its index serves:
        # a row goes once its whole unit is older than the retention.
        self.age_unit_us = age_unit_us
        self.retention_us = int(retention_days * US_PER_DAY)
        self.interval_s = interval_s
        self.pause_s = pause_s
        # How the pause between chunks waits: returns early when its event is set. Tests replace it
        # to observe the pauses without waiting them out.
        self.sleep: Callable[[asyncio.Event, float], Awaitable[None]] = sleep_unless_stopped
        self.counter = counter
        self.done_line = done_line
        self.progress_line = progress_line
        # Read here, not at import: tests set smaller ones before they build a pruner.
        self.chunk = PRUNE_CHUNK
        self.progress_every = PRUNE_PROGRESS_EVERY
        # By primary key, through a limited select: DELETE ... LIMIT is not portable, and the
        # limit is what keeps each transaction short on a large backlog.
        key = tuple_(*table.primary_key.columns)
        oldest = (
            select(*table.primary_key.columns)
            .where(age_column < bindparam("before", type_=BigInteger), *only, *(~k for k in keep))
            .limit(self.chunk)
        )
        self._delete = delete(table).where(key.in_(oldest))

    async def run(self, stop: asyncio.Event) -> None:
        """Prune every interval until `stop` (0 days of retention: never)."""
        if self.retention_us > 0:
            # Its start counts as a success: a pruner that never completes a round is then seen
            # as stopped (LivegiftsPrunerStopped), not missing. 0 days exports nothing: no pruner.
            PRUNER_LAST_SUCCESS.labels(pruner=self.name).set_to_current_time()
            await run_every(stop, self.interval_s, lambda: self.prune_once(stop=stop), self.done_line)

    async def prune_once(self, now: int | None = None, stop: asyncio.Event | None = None) -> int:
        """Delete every row older than now - retention; how many were deleted.

        A large backlog (the first round on a database from before pruning, or after a retention
        is introduced or shortened) goes chunk after chunk, `pause_s` apart, with a progress line
        every `progress_every` rows, until done or stopped (also during a pause).
        """
        before = ((now_us() if now is None else now) - self.retention_us) // self.age_unit_us
        stop = stop if stop is not None else asyncio.Event()
        total = 0
        while True:
            async with self.db.unit_of_work() as uow:
                deleted = (await uow.conn.execute(self._delete, {"before": before})).rowcount
                await uow.commit()
            total += deleted
            self.counter.inc(deleted)  # per committed chunk: right however the round ends
            # Every committed chunk, the round's last (often of no rows: nothing to prune is a
            # pruner at work) and each of a long backlog's, which may take hours.
            PRUNER_LAST_SUCCESS.labels(pruner=self.name).set_to_current_time()
            if deleted < self.chunk or stop.is_set():
                return total
            if total % self.progress_every < self.chunk:
                log.info(self.progress_line, extra={"rows_deleted": total})
            # A full chunk: more may follow. The pause spreads a backlog's WAL and lock traffic
            # so live commits, the standby and the checkpointer keep up beside it; the round stays
            # bounded, as rows newer than `before` wait for the next round.
            if self.pause_s > 0:
                await self.sleep(stop, self.pause_s)
                if stop.is_set():
                    return total
