"""The garbage collector under load: start-up objects frozen, a larger young generation, pauses measured.

CPython's cyclic collector stops the event loop while it runs. With the default thresholds a
service under load made a full (generation 2) collection every ~2.5 s: the objects of calls in
flight live through many young collections, get promoted, and count toward the next full one.
Each full collection walked every object of the process, ~120,000 (modules, functions, types,
compiled statements), and stopped gifting's event loop for 40-80 ms, which every call in flight
waited out: a sixth of SendGift's p99 at c64 went with them (bench/README.md section 26).

`tune_gc` runs once, after start-up built everything the process keeps: it collects, then
freezes the survivors (`gc.freeze()`: the collector ignores them from then on; they are still
freed by reference counting when dropped, and only a reference cycle through one of them would
stay uncollected), and raises the young generation's threshold so that a call's short-lived
objects are mostly gone before a collection sees them.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from services.common.metrics import GC_PAUSE

GEN0_THRESHOLD = 20_000  # the default of every service's GC_GEN0_THRESHOLD (CPython's own: 700)

_started: list[float] = []


def _observe(phase: str, info: dict[str, Any]) -> None:
    """gc callback: each collection's pause into livegifts_gc_pause_seconds{generation}."""
    if phase == "start":
        _started.append(time.perf_counter())
    elif _started:
        GC_PAUSE.labels(str(info["generation"])).observe(time.perf_counter() - _started.pop())


def observe_pauses() -> None:
    """Measure every collection of this process (once; calling again changes nothing)."""
    if _observe not in gc.callbacks:
        gc.callbacks.append(_observe)


def tune_gc(*, freeze: bool, gen0_threshold: int) -> None:
    """Collect, freeze what start-up left (if `freeze`), and set the young generation's threshold."""
    gc.collect()
    if freeze:
        gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)
