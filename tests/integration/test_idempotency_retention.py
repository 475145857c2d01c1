"""Idempotency records are deleted after the retention, in chunks, and never before (SQLite and
PostgreSQL); each running service prunes its own.

The contract: a key answers as its first call did for at least IDEMPOTENCY_RETENTION_DAYS; after
that it is free again. The keys of gifts and spends are in their own tables and never pruned.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import insert, select, text, update

from livegifts.gifting.v1 import gifting_pb2
from services.cli.suite import Suite
from services.common import pruning
from services.common.db import Database, UnitOfWork
from services.common.idempotency import IdempotencyPruner, run_idempotent
from services.gifting.storage import common
from tests.integration.conftest import suite_config
from tests.integration.helpers import eventually, logged, service_settings

DAY_US = 86_400 * 1_000_000
NOW_US = 1_800_000_000 * 1_000_000
SERVICES = ("wallet", "gifting", "payout")


async def _recorded(db: Database, rows: dict[str, int]) -> None:
    """Idempotency records of one scope: key -> created_at_us."""
    async with db.unit_of_work() as uow:
        await uow.conn.execute(
            insert(common.idempotency),
            [
                {"scope": "S", "key": key, "request_hash": "h", "response": b"", "created_at_us": at}
                for key, at in rows.items()
            ],
        )
        await uow.commit()


async def _keys(db: Database) -> list[str]:
    async with db.unit_of_work(readonly=True) as uow:
        return sorted((await uow.conn.execute(select(common.idempotency.c.key))).scalars())


def _pruned_total() -> float:
    value = REGISTRY.get_sample_value("livegifts_idempotency_records_pruned_total")
    assert value is not None, "exported at 0 from the start, so an alert's increase() sees the first round"
    return value


async def test_records_past_the_retention_go_in_chunks_and_younger_ones_stay(
    gifting_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pruning, "PRUNE_CHUNK", 3)
    ages_days = {f"old-{i}": 31 + i for i in range(7)} | {"edge": 30, "young": 29, "new": 0}
    await _recorded(gifting_db, {key: NOW_US - days * DAY_US for key, days in ages_days.items()})
    pruner = IdempotencyPruner(gifting_db, common, service_settings(gifting_db.url))
    before = _pruned_total()
    stopping = asyncio.Event()
    stopping.set()  # shutting down: the round ends after its first transaction, which took three
    assert await pruner.prune_once(now=NOW_US, stop=stopping) == 3
    # The four other records past 30 days, three per transaction: 3 + 1. One exactly 30 days old stays.
    assert await pruner.prune_once(now=NOW_US) == 4
    assert await _keys(gifting_db) == ["edge", "new", "young"]
    assert _pruned_total() - before == 7
    assert await pruner.prune_once(now=NOW_US) == 0


async def test_a_key_answers_from_its_record_within_the_retention_and_is_free_after_it(gifting_db: Database) -> None:
    request = gifting_pb2.StartStreamRequest(creator_id="c-1", title="t", idempotency_key="k-1")
    runs: list[str] = []

    async def work(uow: UnitOfWork) -> gifting_pb2.Stream:
        runs.append("ran")
        return gifting_pb2.Stream(stream_id=f"s-{len(runs)}")

    async def call() -> gifting_pb2.Stream:
        return await run_idempotent(gifting_db, common.idempotency, "StartStream", request, gifting_pb2.Stream, work)

    assert (await call()).stream_id == "s-1"
    async with gifting_db.unit_of_work() as uow:  # the first call was 29 days ago
        await uow.conn.execute(update(common.idempotency).values(created_at_us=NOW_US - 29 * DAY_US))
        await uow.commit()
    pruner = IdempotencyPruner(gifting_db, common, service_settings(gifting_db.url))
    assert await pruner.prune_once(now=NOW_US) == 0
    assert (await call()).stream_id == "s-1"  # the retry is answered from the record
    assert runs == ["ran"]
    # Two days later the record is past the retention: it goes, and the key does its work anew.
    assert await pruner.prune_once(now=NOW_US + 2 * DAY_US) == 1
    assert (await call()).stream_id == "s-2"
    assert runs == ["ran", "ran"]


async def test_a_retention_of_zero_keeps_every_record(gifting_db: Database) -> None:
    await _recorded(gifting_db, {"ancient": 0})
    pruner = IdempotencyPruner(gifting_db, common, service_settings(gifting_db.url, idempotency_retention_days=0))
    await asyncio.wait_for(pruner.run(asyncio.Event()), 5)  # returns at once: nothing to do, ever
    assert await _keys(gifting_db) == ["ancient"]


def _last_success() -> float | None:
    return REGISTRY.get_sample_value("livegifts_pruner_last_success_timestamp_seconds", {"pruner": "idempotency"})


async def test_a_pruner_with_nothing_to_prune_counts_as_running_and_one_whose_rounds_fail_does_not(
    gifting_db: Database,
) -> None:
    # LivegiftsPrunerStopped reads this gauge: an idle suite (nothing old enough) must not page,
    # a pruner whose every round fails (or whose loop is gone) must.
    from services.common.metrics import PRUNER_LAST_SUCCESS

    pruner = IdempotencyPruner(gifting_db, common, service_settings(gifting_db.url))
    PRUNER_LAST_SUCCESS.labels(pruner="idempotency").set(0)
    assert await pruner.prune_once(now=NOW_US) == 0
    idle = _last_success()
    assert idle is not None and idle > 0
    PRUNER_LAST_SUCCESS.labels(pruner="idempotency").set(0)
    pruner._delete = text("DELETE FROM no_such_table")  # type: ignore[assignment]
    with pytest.raises(Exception, match="no_such_table"):
        await pruner.prune_once(now=NOW_US)
    assert _last_success() == 0
    # Started, it counts from its start: one that never completes a round is seen as stopped.
    stopping = asyncio.Event()
    stopping.set()
    await pruner.run(stopping)
    assert (_last_success() or 0) > 0
    # A retention of 0 is no pruner: it sets nothing, so no alert waits on it.
    PRUNER_LAST_SUCCESS.labels(pruner="idempotency").set(0)
    off = IdempotencyPruner(gifting_db, common, service_settings(gifting_db.url, idempotency_retention_days=0))
    await off.run(asyncio.Event())
    assert _last_success() == 0


@pytest.mark.parametrize("days", [0.01, 0.5])
def test_a_retention_shorter_than_a_day_is_refused(days: float) -> None:
    with pytest.raises(ValueError, match="must be at least 1 day"):
        service_settings("sqlite+aiosqlite:///x.db", idempotency_retention_days=days)


PRUNED = "idempotency records pruned"
KEY_ROWS_PRUNED = "answered unlocks' key rows pruned"


async def test_every_running_service_prunes_its_idempotency_records_every_interval(tmp_path: Path) -> None:
    """The wiring: each service runs the pruner; a record that turns old while it runs goes at the next round."""
    extra = {s: {f"LIVEGIFTS_{s.upper()}_IDEMPOTENCY_PRUNE_INTERVAL_S": "0.2"} for s in SERVICES}
    suite = Suite(suite_config(tmp_path, {}, extra))
    try:
        await asyncio.to_thread(suite.start)  # migrates each database, then the first pruning round runs
        now = time.time_ns() // 1000
        for service in SERVICES:
            with contextlib.closing(sqlite3.connect(tmp_path / f"{service}.db", timeout=10)) as conn, conn:
                conn.executemany(
                    "INSERT INTO idempotency_keys (scope, key, request_hash, response, created_at_us) "
                    "VALUES ('S', ?, 'h', x'', ?)",
                    [("ancient", now - 31 * DAY_US), ("recent", now - DAY_US)],
                )

        async def kept() -> dict[str, list[str]]:
            out = {}
            for service in SERVICES:
                with contextlib.closing(sqlite3.connect(tmp_path / f"{service}.db", timeout=10)) as conn:
                    out[service] = sorted(r[0] for r in conn.execute("SELECT key FROM idempotency_keys"))
            return out

        def pruned(keys: dict[str, list[str]]) -> bool:
            return all("ancient" not in k for k in keys.values())

        assert await eventually(kept, pruned, 10) == {s: ["recent"] for s in SERVICES}
        # The round logs once it has committed and given its connection back: the rows can be gone
        # a moment before the line is in the log (seen, polling the rows every 1 ms).
        for service in SERVICES:
            assert await logged(suite, service, PRUNED), service

        # Gifting's KEY_ONLY rows (answered unlocks' keys) go the same way; its gifts never do.
        row = (
            "INSERT INTO gift_events (event_id, idempotency_key, client_key, request_hash, kind, stream_id, "
            "creator_id, sender_id, gift_id, quantity, unit_price_coins, coins, status, created_at_us, "
            "updated_at_us) VALUES (?, ?, ?, 'h', 'UNLOCK', '', 'c', 'v', 'content', 0, 0, 0, ?, ?, ?)"
        )
        with contextlib.closing(sqlite3.connect(tmp_path / "gifting.db", timeout=10)) as conn, conn:
            conn.executemany(
                row,
                [
                    (name, name, name, status, at, at)
                    for name, status, at in [
                        ("ancient-key", "KEY_ONLY", now - 31 * DAY_US),
                        ("recent-key", "KEY_ONLY", now - DAY_US),
                        ("ancient-gift", "SENT", now - 31 * DAY_US),
                    ]
                ],
            )

        async def gift_rows() -> list[str]:
            with contextlib.closing(sqlite3.connect(tmp_path / "gifting.db", timeout=10)) as conn:
                return sorted(r[0] for r in conn.execute("SELECT event_id FROM gift_events"))

        assert await eventually(gift_rows, lambda ids: "ancient-key" not in ids, 10) == ["ancient-gift", "recent-key"]
        assert await logged(suite, "gifting", KEY_ROWS_PRUNED)
    finally:
        await asyncio.to_thread(suite.stop)
