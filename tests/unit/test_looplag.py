"""services/common/looplag.py: a blocked event loop shows as lag; an idle one as none.

The probe's clock and sleep are injected where a threshold would otherwise depend on the
machine: each scripted wake-up comes exactly as late as the script says, so what the probe
records can be required exactly. One test blocks a real loop, with bounds only from below
(a busy machine can only make the wake-up later).
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from services.common import looplag
from services.common.looplag import watch_loop_lag
from services.common.metrics import LOOP_LAG

INTERVAL_S = 0.01


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


class _ScriptedLoop:
    """The probe's clock and sleep: each sleep ends `interval + late` later by the clock, late as scripted."""

    def __init__(self, late_s: list[float], stop: asyncio.Event) -> None:
        self.now_s = 1000.0
        self.late_s = list(late_s)
        self.stop = stop
        self.asked_s: list[float] = []

    def perf_counter(self) -> float:
        return self.now_s

    async def sleep(self, seconds: float) -> None:
        self.asked_s.append(seconds)
        self.now_s += seconds + self.late_s.pop(0)
        if not self.late_s:
            self.stop.set()  # the script is done: this is the probe's last wake-up
        await asyncio.sleep(0)


async def _scripted(late_s: list[float], monkeypatch: pytest.MonkeyPatch) -> tuple[float, float, float]:
    """Run the probe over scripted wake-ups; what it observed."""
    stop = asyncio.Event()
    fake = _ScriptedLoop(late_s, stop)
    monkeypatch.setattr(looplag, "time", SimpleNamespace(perf_counter=fake.perf_counter))
    monkeypatch.setattr(looplag, "asyncio", SimpleNamespace(sleep=fake.sleep))
    before = _lag()
    await asyncio.wait_for(watch_loop_lag(stop, INTERVAL_S), 5)
    after = _lag()
    assert fake.asked_s == [INTERVAL_S] * len(late_s)
    return after[0] - before[0], after[1] - before[1], after[2] - before[2]


async def test_a_blocked_loop_shows_as_lag(monkeypatch: pytest.MonkeyPatch) -> None:
    # One wake-up waited 80 ms behind a long synchronous step; the others came on time.
    count, total, slow = await _scripted([0.0, 0.0, 0.08, 0.0, 0.0], monkeypatch)
    assert (count, slow) == (5, 1)
    assert total == pytest.approx(0.08)


async def test_an_idle_loop_shows_next_to_no_lag(monkeypatch: pytest.MonkeyPatch) -> None:
    # On time, a microsecond late (timer resolution), and early (a clock step): none shows as slow.
    count, total, slow = await _scripted([0.0] * 8 + [1e-6, -0.002], monkeypatch)
    assert (count, slow) == (10, 0)
    assert total == pytest.approx(1e-6, abs=1e-9)  # an early wake-up counts as zero, never negative


async def test_a_real_loop_held_by_a_synchronous_step_shows_that_much_lag() -> None:
    before = _lag()
    stop = asyncio.Event()
    probe = asyncio.create_task(watch_loop_lag(stop, INTERVAL_S))
    await asyncio.sleep(0.05)
    # Holds the loop for 200 ms: the probe's next wake-up (due within 10 ms) comes >= 190 ms late.
    asyncio.get_running_loop().call_soon(time.sleep, 0.2)
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(probe, 5)
    _count, total, slow = (a - b for a, b in zip(_lag(), before, strict=True))
    assert slow >= 1
    assert total >= 0.15


async def test_interval_zero_turns_the_probe_off() -> None:
    before = _lag()
    await asyncio.wait_for(watch_loop_lag(asyncio.Event(), 0), 1)
    assert _lag() == before
