"""How long a durable write waits on this machine's disk, measured beside the load.

Every commit the suite answers after (SQLite `synchronous=FULL`, PostgreSQL's WAL flush,
JetStream's `sync_interval: always`) waits for an fsync of the disk they all share. When the
disk stalls, every step of the saga waits together, and those waits land in SendGift's p99
(bench/README.md, section 26). The probe makes that visible per phase: a thread writes 8 KiB
and calls `fdatasync` every `interval_s` on a file on the same disk, and records how long each
took. It adds ~40 small fsyncs a second to the thousands the suite makes.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from bench.stats import percentiles

INTERVAL_S = 0.025
BLOCK = b"\0" * 8192
SLOW_MS = 20.0  # an fsync above this is counted as a stall (a quiet disk here takes ~0.2-0.3 ms)


class FsyncProbe:
    """Times write + fdatasync of one block every `interval_s`, in a thread, until stopped."""

    def __init__(self, path: Path, interval_s: float = INTERVAL_S) -> None:
        self.path = path
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []  # (monotonic start, seconds taken)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fsync-probe", daemon=True)

    def start(self) -> None:
        """Begin probing (the file is created, or emptied)."""
        self._thread.start()

    def stop(self) -> None:
        """Stop probing and remove the file."""
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)

    def _run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while not self._stop.is_set():
                t0 = time.monotonic()
                os.pwrite(fd, BLOCK, 0)
                os.fdatasync(fd)
                self.samples.append((t0, time.monotonic() - t0))  # list.append is atomic under the GIL
                self._stop.wait(self.interval_s)
        finally:
            os.close(fd)

    def window(self, start: float, end: float) -> dict[str, Any]:
        """The fsyncs begun in [start, end) (monotonic seconds): count, p50, p99, max and stalls."""
        return summarize([s for t, s in list(self.samples) if start <= t < end])


def summarize(seconds: list[float]) -> dict[str, Any]:
    """Milliseconds: p50 / p99 / max (nearest rank) and how many took over SLOW_MS."""
    ms = [s * 1000 for s in seconds]
    p = percentiles(ms)
    out: dict[str, Any] = {"n": len(ms)}
    for name in ("p50", "p99", "max"):
        out[f"{name}_ms"] = None if p[name] is None else round(p[name], 3)
    out["slow"] = sum(1 for x in ms if x > SLOW_MS)
    return out
