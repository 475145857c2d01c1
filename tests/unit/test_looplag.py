"""services/common/looplag.py: a blocked event loop shows as lag; an idle one as next to none."""

from __future__ import annotations

import asyncio
import time

from services.common.looplag import watch_loop_lag
from services.common.metrics import LOOP_LAG


def _lag() -> tuple[float, float, float]:
    """(count, sum, observations above 25 ms) of livegifts_event_loop_lag_seconds so far."""
    values = {}
    for metric in LOOP_LAG.collect():
        for s in metric.samples:
            if s.name.endswith("_bucket"):
                values[("le", s.labels["le"])] = s.value
            else:
                values[s.name.rsplit("_", 1)[1]] = s.value
    return values["count"], values["sum"], values["count"] - values[("le", "0.025")]


async def _watch(block_s: float) -> tuple[float, float, float]:
    """Probe every 10 ms for ~0.2 s, blocking the loop for `block_s` once; what the probe observed."""
    before = _lag()
    stop = asyncio.Event()
    probe = asyncio.create_task(watch_loop_lag(stop, 0.01))
    await asyncio.sleep(0.05)
    asyncio.get_running_loop().call_soon(time.sleep, block_s)  # holds the loop, as a long synchronous step would
    await asyncio.sleep(0.15)
    stop.set()
    await asyncio.wait_for(probe, 1)
    after = _lag()
    return after[0] - before[0], after[1] - before[1], after[2] - before[2]


async def test_a_blocked_loop_shows_as_lag() -> None:
    count, total, slow = await _watch(0.08)
    assert count >= 5  # it kept probing before and after the block
    assert slow >= 1  # the wake-up that waited behind the 80 ms block was late by > 25 ms
    assert total >= 0.06


async def test_an_idle_loop_shows_next_to_no_lag() -> None:
    count, total, _ = await _watch(0.0)
    assert count >= 10
    assert total / count < 0.005  # mean lateness: timer resolution, not blocking


async def test_interval_zero_turns_the_probe_off() -> None:
    before = _lag()
    await asyncio.wait_for(watch_loop_lag(asyncio.Event(), 0), 1)
    assert _lag() == before
