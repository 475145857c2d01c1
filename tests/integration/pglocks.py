"""What the lock-order tests on PostgreSQL watch: sessions waiting for a lock, and deadlocks.

A test forces an interleaving by holding a row from a third transaction and starting each
contender once the ones before it wait; it then checks that PostgreSQL reported no deadlock.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy import text

from services.common.db import Database

LOCK_WAIT_S_MAX = 10.0
LOCK_WAITERS = text(
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
)


async def wait_for_lock_waiters(db: Database, n: int) -> None:
    """Until `n` sessions of this database wait for a lock (at most LOCK_WAIT_S_MAX)."""
    deadline = time.monotonic() + LOCK_WAIT_S_MAX
    while True:
        async with db.unit_of_work(readonly=True) as uow:
            waiting = (await uow.conn.execute(LOCK_WAITERS)).scalar_one()
        if waiting >= n:
            return
        assert time.monotonic() < deadline, f"{waiting} of {n} sessions wait for a lock after {LOCK_WAIT_S_MAX} s"
        await asyncio.sleep(0.05)


async def wait_for_a_lock_waiter_or_the_end(db: Database, task: asyncio.Task[Any], guard_s: float) -> None:
    """Until a session of this database waits for a lock, or `task` has ended (at most `guard_s`).
    The caller asserts which: a task that ended without waiting did not see the row in flight."""
    deadline = time.monotonic() + guard_s
    async with db.engine.connect() as probe:
        while not task.done() and time.monotonic() < deadline:
            if (await probe.execute(LOCK_WAITERS)).scalar_one():
                return
            # pg_stat_activity is read once per transaction: without a new one, every read saw
            # the sessions as they were at the first, and a waiter that came later never showed.
            await probe.rollback()
            await asyncio.sleep(0.02)


def count_deadlocks(db: Database) -> list[int]:
    """A counter of the deadlocks PostgreSQL reports to this engine's statements (retried or not)."""
    seen = [0]

    def on_error(ctx: Any) -> None:
        orig = getattr(ctx.original_exception, "orig", ctx.original_exception)
        if getattr(orig, "sqlstate", None) == "40P01" or "deadlock detected" in str(orig):
            seen[0] += 1

    sa_event.listen(db.engine.sync_engine, "handle_error", on_error)
    return seen
