"""Inbox rows are deleted after the retention, in chunks, and never before (SQLite and PostgreSQL);
each running service prunes its own inbox.

An inbox row is what makes a redelivered event a no-op, so the pruner must keep every row
younger than INBOX_RETENTION_DAYS, which must outlive the streams' 30 days.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, insert, select

from services.cli.suite import Suite
from services.common import pruning
from services.common.db import Database
from services.common.inbox import InboxPruner
from services.gifting.storage import common
from tests.integration.conftest import suite_config
from tests.integration.helpers import eventually, logged, service_settings

DAY_US = 86_400 * 1_000_000
NOW_US = 1_800_000_000 * 1_000_000


async def _received(db: Database, rows: dict[str, int]) -> None:
    """Inbox rows of one consumer: event id -> received_at_us."""
    async with db.unit_of_work() as uow:
        await uow.conn.execute(
            insert(common.inbox),
            [{"consumer": "c", "event_id": eid, "received_at_us": at} for eid, at in rows.items()],
        )
        await uow.commit()


async def _ids(db: Database) -> list[str]:
    async with db.unit_of_work(readonly=True) as uow:
        return sorted((await uow.conn.execute(select(common.inbox.c.event_id))).scalars())


async def test_rows_past_the_retention_go_in_chunks_and_younger_ones_stay(
    gifting_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pruning, "PRUNE_CHUNK", 3)
    ages_days = {f"old-{i}": 46 + i for i in range(7)} | {"edge": 45, "young": 44, "new": 0}
    await _received(gifting_db, {eid: NOW_US - days * DAY_US for eid, days in ages_days.items()})
    pruner = InboxPruner(gifting_db, common, service_settings(gifting_db.url, inbox_retention_days=45))
    # Seven rows past 45 days, three per transaction: 3 + 3 + 1. A row exactly 45 days old stays.
    assert await pruner.prune_once(now=NOW_US) == 7
    assert await _ids(gifting_db) == ["edge", "new", "young"]
    assert await pruner.prune_once(now=NOW_US) == 0
    async with gifting_db.unit_of_work(readonly=True) as uow:
        assert (await uow.conn.execute(select(func.count()).select_from(common.inbox))).scalar_one() == 3


async def test_the_row_of_an_event_still_parked_stays_however_old(gifting_db: Database) -> None:
    """A parked event may have been applied by a later redelivery; its replay must find the inbox
    row, or it is applied twice. A row whose event is parked for another consumer is not kept."""
    await _received(gifting_db, {"parked": 0, "parked-elsewhere": 0, "done": 0})
    async with gifting_db.unit_of_work() as uow:
        await uow.conn.execute(
            insert(common.dead_letters),
            [
                {
                    "consumer": consumer,
                    "subject": "s",
                    "event_id": eid,
                    "payload": b"",
                    "error": "x",
                    "received_at_us": 0,
                }
                for consumer, eid in (("c", "parked"), ("other", "parked-elsewhere"))
            ],
        )
        await uow.commit()
    pruner = InboxPruner(gifting_db, common, service_settings(gifting_db.url))
    assert await pruner.prune_once(now=NOW_US) == 2
    assert await _ids(gifting_db) == ["parked"]


async def test_a_long_round_reports_progress_and_ends_when_the_service_stops(
    gifting_db: Database, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(pruning, "PRUNE_CHUNK", 3)
    monkeypatch.setattr(pruning, "PRUNE_PROGRESS_EVERY", 6)
    await _received(gifting_db, {f"old-{i:02d}": i for i in range(20)})
    pruner = InboxPruner(gifting_db, common, service_settings(gifting_db.url))
    with caplog.at_level(logging.INFO, logger="services.common.pruning"):
        assert await pruner.prune_once(now=NOW_US) == 20  # 3 + 3 + ... + 2
    progress = [r.rows_deleted for r in caplog.records if r.getMessage() == "pruning the inbox"]  # type: ignore[attr-defined]
    assert progress == [6, 12, 18]
    await _received(gifting_db, {f"again-{i}": i for i in range(9)})
    stopping = asyncio.Event()
    stopping.set()  # shutting down: the round ends after the chunk in hand
    assert await pruner.prune_once(now=NOW_US, stop=stopping) == 3
    assert len(await _ids(gifting_db)) == 6


def _pruned_total() -> float:
    return REGISTRY.get_sample_value("livegifts_inbox_pruned_total") or 0.0


async def test_a_backlog_of_several_chunks_goes_with_a_pause_after_each_full_chunk(
    gifting_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first round on millions of old rows must not delete them back to back: between chunks it
    pauses PRUNE_PAUSE_S, and each chunk is counted as it commits."""
    monkeypatch.setattr(pruning, "PRUNE_CHUNK", 3)
    await _received(gifting_db, {f"old-{i:02d}": i for i in range(10)} | {"new": NOW_US})
    pruner = InboxPruner(gifting_db, common, service_settings(gifting_db.url, prune_pause_s=1.5))
    pauses: list[tuple[float, int, float]] = []  # (seconds, rows left, rows counted) at each pause

    async def observed(stop: asyncio.Event, seconds: float) -> None:
        pauses.append((seconds, len(await _ids(gifting_db)), _pruned_total() - before))

    pruner.sleep = observed
    before = _pruned_total()
    assert await pruner.prune_once(now=NOW_US) == 10  # 3, pause, 3, pause, 3, pause, 1
    assert pauses == [(1.5, 8, 3), (1.5, 5, 6), (1.5, 2, 9)]
    assert _pruned_total() - before == 10
    assert await _ids(gifting_db) == ["new"]
    assert await pruner.prune_once(now=NOW_US) == 0  # a partial chunk ends the round: no pause
    assert len(pauses) == 3


async def test_a_stop_during_a_pause_ends_the_round_at_once(
    gifting_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pruning, "PRUNE_CHUNK", 3)
    await _received(gifting_db, {f"old-{i:02d}": i for i in range(10)})
    pruner = InboxPruner(gifting_db, common, service_settings(gifting_db.url, prune_pause_s=10))
    pausing = asyncio.Event()
    real_sleep = pruner.sleep

    async def pause(stop: asyncio.Event, seconds: float) -> None:
        pausing.set()
        await real_sleep(stop, seconds)  # the real wait, which a stop must cut short

    pruner.sleep = pause
    stop = asyncio.Event()
    before = _pruned_total()
    round_ = asyncio.create_task(pruner.prune_once(now=NOW_US, stop=stop))
    await asyncio.wait_for(pausing.wait(), 10)  # the first chunk is in, the 10 s pause begun
    started = time.monotonic()
    stop.set()
    assert await asyncio.wait_for(round_, 5) == 3  # not the other 7 rows, not the rest of the pause
    assert time.monotonic() - started < 2
    assert _pruned_total() - before == 3
    assert len(await _ids(gifting_db)) == 7


@pytest.mark.parametrize("seconds", [-0.1, 10.5])
def test_a_pause_between_chunks_below_0_or_above_10_seconds_is_refused(seconds: float) -> None:
    with pytest.raises(ValueError, match="prune_pause_s"):
        service_settings("sqlite+aiosqlite:///x.db", prune_pause_s=seconds)


async def test_a_retention_of_zero_keeps_every_row(gifting_db: Database) -> None:
    await _received(gifting_db, {"ancient": 0})
    pruner = InboxPruner(gifting_db, common, service_settings(gifting_db.url, inbox_retention_days=0))
    stop = asyncio.Event()
    await asyncio.wait_for(pruner.run(stop), 5)  # returns at once: nothing to do, ever
    assert await _ids(gifting_db) == ["ancient"]


@pytest.mark.parametrize("days", [1, 30])
def test_a_retention_no_longer_than_the_streams_keep_events_is_refused(days: int) -> None:
    with pytest.raises(ValueError, match="more than the 30 days the streams keep events"):
        service_settings("sqlite+aiosqlite:///x.db", inbox_retention_days=days)


async def test_a_running_service_prunes_its_inbox_every_interval(tmp_path: Path) -> None:
    """The wiring: each service runs the pruner; a row that turns old while it runs goes at the next round."""
    suite = Suite(suite_config(tmp_path, {}, {"payout": {"LIVEGIFTS_PAYOUT_INBOX_PRUNE_INTERVAL_S": "0.2"}}))
    db_file = tmp_path / "payout.db"
    try:
        await asyncio.to_thread(suite.start)  # migrates payout.db, then the first pruning round runs
        now = time.time_ns() // 1000
        with contextlib.closing(sqlite3.connect(db_file, timeout=10)) as conn, conn:
            conn.executemany(
                "INSERT INTO inbox (consumer, event_id, received_at_us) VALUES (?, ?, ?)",
                [("payout-gift-sent", "ancient", now - 46 * DAY_US), ("payout-gift-sent", "recent", now - DAY_US)],
            )

        async def kept() -> list[str]:
            with contextlib.closing(sqlite3.connect(db_file, timeout=10)) as conn:
                return sorted(r[0] for r in conn.execute("SELECT event_id FROM inbox"))

        assert await eventually(kept, lambda ids: "ancient" not in ids, 10) == ["recent"]
        assert await logged(suite, "payout", "inbox rows pruned"), "no 'inbox rows pruned' line"
    finally:
        await asyncio.to_thread(suite.stop)


@pytest.mark.parametrize("empty_database", ["postgres"], indirect=True)
async def test_two_replicas_pruning_at_once_delete_each_old_row_once_and_neither_fails(
    gifting_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every replica runs a pruner over the one inbox: their chunks pick the same oldest rows, the
    later waits for the earlier's commit and passes the rows it deleted (no deadlock, no error)."""
    monkeypatch.setattr(pruning, "PRUNE_CHUNK", 500)
    await _received(gifting_db, {f"old-{i}": NOW_US - 50 * DAY_US for i in range(3_000)} | {"young": NOW_US})
    other = Database(gifting_db.url, pool_size=2, pool_timeout_s=5, application_name="second-replica")
    try:
        pruners = [
            InboxPruner(db, common, service_settings(gifting_db.url, inbox_retention_days=45))
            for db in (gifting_db, other)
        ]
        deleted = await asyncio.wait_for(asyncio.gather(*(p.prune_once(now=NOW_US) for p in pruners)), 30)
    finally:
        await other.dispose()
    assert sum(deleted) == 3_000, deleted
    assert await _ids(gifting_db) == ["young"]
