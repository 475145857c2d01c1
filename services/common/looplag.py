"""Event-loop lag: how late a timer fires in this process, the wait every call in it shares.

A service runs every call, batch, relay and consumer on one event loop. When the loop is busy,
work that is ready (a call gRPC has just accepted, a batch's commit that just returned) waits
for the callbacks ahead of it; under load that queueing, not the database, is most of SendGift's
tail (bench/README.md section 28: a third of a call at p50 and most of the slowest 1% at c64 was
spent before gifting's handler ran). `watch_loop_lag` sleeps `interval_s` again and again and
records by how much each wake-up came late in `livegifts_event_loop_lag_seconds`: near zero on a
loop with time to spare, milliseconds when it is saturated (then replicas with CPU of their own
help, a faster database does not).

Choices: A) time every callback (needs a patched loop, costs every callback); B) a timer that
measures its own lateness (this: one wake-up per interval, what any ready callback would wait
at a random moment); C) asyncio's debug mode (slow-callback warnings only, and costly).
"""

from __future__ import annotations

import asyncio
import time

from services.common.metrics import LOOP_LAG


async def watch_loop_lag(stop: asyncio.Event, interval_s: float) -> None:
    """Until `stop`: sleep `interval_s`, observe how late the wake-up came. 0 turns it off."""
    if interval_s <= 0:
        return
    while not stop.is_set():
        asked = time.perf_counter() + interval_s
        await asyncio.sleep(interval_s)
        LOOP_LAG.observe(max(0.0, time.perf_counter() - asked))
