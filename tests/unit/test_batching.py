"""MicroBatcher: concurrent callers share a batch; each keeps its own outcome."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from prometheus_client import REGISTRY

from services.common.batching import MicroBatcher


class _Recorder:
    """A batch function that records its batches and can be held at a gate."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def run(self, items: list[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        await self.gate.wait()
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]


async def test_concurrent_callers_share_a_batch_and_keep_their_own_results() -> None:
    rec = _Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(rec.run, size_max=10, name="test")
    results = await asyncio.gather(*(batcher.submit(i) for i in range(4)), return_exceptions=True)
    assert rec.batches == [[0, 1, 2, 3]]
    assert results[0] == 0 and results[2] == 20
    assert isinstance(results[1], ValueError) and str(results[1]) == "odd 1"
    assert isinstance(results[3], ValueError)


async def test_callers_arriving_during_a_batch_go_together_in_the_next_within_size_max() -> None:
    rec = _Recorder()
    rec.gate.clear()
    batcher: MicroBatcher[int, int] = MicroBatcher(rec.run, size_max=2, name="test-sizes")
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.01)
    later = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 4, 6)]
    await asyncio.sleep(0.01)
    rec.gate.set()
    assert await first == 0
    assert await asyncio.gather(*later) == [20, 40, 60]
    assert rec.batches == [[0], [2, 4], [6]]
    # The sizes an operator sees: three batches holding four calls.
    labels = {"batcher": "test-sizes"}
    assert REGISTRY.get_sample_value("livegifts_batch_items_count", labels) == 3
    assert REGISTRY.get_sample_value("livegifts_batch_items_sum", labels) == 4


async def test_a_failed_batch_fails_each_of_its_callers() -> None:
    async def broken(items: list[int]) -> list[int | BaseException]:
        raise RuntimeError("database down")

    batcher: MicroBatcher[int, int] = MicroBatcher(broken, size_max=10, name="test")
    results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert [str(r) for r in results] == ["database down"] * 3


async def test_a_batch_that_fails_after_its_callers_went_away_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    # A database stall longer than the callers' deadlines (a row lock, a statement timeout): each
    # caller gave up, so no call answered the batch's error and the error mapping never logged it.
    gate = asyncio.Event()

    async def stalled(items: list[int]) -> list[int | BaseException]:
        await gate.wait()
        raise TimeoutError("statement unanswered")

    batcher: MicroBatcher[int, int] = MicroBatcher(stalled, size_max=10, name="test-gone")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(batcher.submit(1), 0.01)  # the caller's deadline
    with caplog.at_level(logging.WARNING, logger="services.common.batching"):
        gate.set()
        assert batcher._task is not None
        await batcher._task
    [record] = [r for r in caplog.records if r.name == "services.common.batching"]
    assert record.levelname == "WARNING" and "callers had gone" in record.getMessage()
    assert (record.batcher, record.items) == ("test-gone", 1)  # type: ignore[attr-defined]
    assert "statement unanswered" in record.error  # type: ignore[attr-defined]


async def test_a_failed_batch_answered_to_its_callers_is_not_logged_again(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(items: list[int]) -> list[int | BaseException]:
        raise RuntimeError("database down")

    batcher: MicroBatcher[int, int] = MicroBatcher(broken, size_max=10, name="test-answered")
    with caplog.at_level(logging.WARNING, logger="services.common.batching"):
        with pytest.raises(RuntimeError):
            await batcher.submit(1)
    assert not [r for r in caplog.records if r.name == "services.common.batching"]


async def _queue_behind_a_held_batch(batcher: MicroBatcher[int, int], rec: _Recorder) -> tuple[Any, list[Any]]:
    """Item 0 in a batch held at the gate; items 2, 4, 6 queued behind it; the caller of 4 gone."""
    rec.gate.clear()
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.01)
    later = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 4, 6)]
    await asyncio.sleep(0.01)
    later[1].cancel()  # its deadline passed while it waited for the next batch
    await asyncio.sleep(0)
    rec.gate.set()
    return first, later


async def test_an_item_whose_caller_went_away_while_it_queued_is_never_run() -> None:
    # A burst above what the database takes: callers behind a slow batch give up, and their items
    # were run anyway, spending the next batches on answers nobody read.
    rec = _Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(rec.run, size_max=10, name="test-abandoned")
    first, later = await _queue_behind_a_held_batch(batcher, rec)
    assert await first == 0
    assert await later[0] == 20 and await later[2] == 60
    assert later[1].cancelled()
    assert rec.batches == [[0], [2, 6]]
    assert REGISTRY.get_sample_value("livegifts_batch_items_skipped_total", {"batcher": "test-abandoned"}) == 1


async def test_a_batch_whose_callers_all_went_away_is_not_run() -> None:
    rec = _Recorder()
    rec.gate.clear()
    batcher: MicroBatcher[int, int] = MicroBatcher(rec.run, size_max=10, name="test-all-gone")
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.01)
    gone = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 4)]
    await asyncio.sleep(0.01)
    for g in gone:
        g.cancel()
    await asyncio.sleep(0)
    rec.gate.set()
    assert await first == 0
    assert batcher._task is not None
    await batcher._task
    assert rec.batches == [[0]]


async def test_skipped_callers_do_not_count_against_the_batch_size() -> None:
    rec = _Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(rec.run, size_max=2, name="test-abandoned-size")
    first, later = await _queue_behind_a_held_batch(batcher, rec)
    await first
    await asyncio.gather(later[0], later[2])
    assert rec.batches == [[0], [2, 6]]  # 2 and 6 together: the gone 4 took no place


async def test_a_batcher_told_to_keep_abandoned_items_runs_them() -> None:
    # Gifting's SENT flip: the coins are spent, so the flip finishes the gift whoever still waits.
    rec = _Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(rec.run, size_max=10, name="test-keep", skip_abandoned=False)
    first, later = await _queue_behind_a_held_batch(batcher, rec)
    await first
    await asyncio.gather(later[0], later[2])
    assert rec.batches == [[0], [2, 4, 6]]
