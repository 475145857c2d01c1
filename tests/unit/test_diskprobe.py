"""The bench's fsync probe: what it reports for a window, and that it starts, measures and cleans up."""

from __future__ import annotations

import time
from pathlib import Path

from bench.diskprobe import SLOW_MS, FsyncProbe, summarize


def test_a_window_is_summarized_in_milliseconds_with_its_stalls() -> None:
    seconds = [0.0002] * 97 + [0.005, 0.060, 0.300]
    got = summarize(seconds)
    assert got == {"n": 100, "p50_ms": 0.2, "p99_ms": 60.0, "max_ms": 300.0, "slow": 2}
    assert SLOW_MS < 60.0
    assert summarize([]) == {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None, "slow": 0}


def test_the_probe_times_real_fsyncs_only_inside_the_window_and_removes_its_file(tmp_path: Path) -> None:
    path = tmp_path / "probe.bin"
    probe = FsyncProbe(path, interval_s=0.005)
    probe.start()
    try:
        deadline = time.monotonic() + 5
        while len(probe.samples) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert path.stat().st_size == 8192
    finally:
        probe.stop()
    assert not path.exists()
    first, last = probe.samples[0][0], probe.samples[-1][0]
    everything = probe.window(first, last + 1)
    assert everything["n"] == len(probe.samples) >= 5
    assert 0 < everything["p50_ms"] <= everything["max_ms"]
    assert probe.window(last + 1, last + 2)["n"] == 0, "nothing begun after the last sample"
    FsyncProbe(tmp_path / "never.bin").stop()  # a probe never started stops quietly
