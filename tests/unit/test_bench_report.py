"""The bench's own arithmetic: per-phase histogram deltas from /metrics, and the report's ratios and tables.

`make bench` is not part of `make test`, so what a skeptic reads in bench/RESULTS.md is checked
here on small made-up inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from rich.console import Console

from bench.loadgen import histogram_totals, phase_histograms
from bench.report import derive, table


def _exposition(path: Path, batches: list[int], gc_pauses: dict[str, list[float]], lags: tuple[float, ...] = ()) -> str:
    """A service's /metrics text with the histograms the bench reads, as a file:// URL."""
    reg = CollectorRegistry()
    items = Histogram("livegifts_batch_items", "", ["batcher"], registry=reg)
    pauses = Histogram("livegifts_gc_pause_seconds", "", ["generation"], registry=reg)
    lag = Histogram("livegifts_event_loop_lag_seconds", "", registry=reg)
    for s in lags:
        lag.observe(s)
    other = Histogram("livegifts_rpc_seconds", "", ["method", "code"], registry=reg)
    for n in batches:
        items.labels("gifting_begin").observe(n)
    for gen, seconds in gc_pauses.items():
        for s in seconds:
            pauses.labels(gen).observe(s)
    other.labels("SendGift", "OK").observe(0.01)  # not one the bench reads
    path.write_bytes(generate_latest(reg))
    return path.as_uri()


def test_a_phase_gets_the_batches_gc_pauses_and_loop_lag_observed_between_two_readings(tmp_path: Path) -> None:
    before = histogram_totals({"gifting": _exposition(tmp_path / "a", [1, 3], {"0": [0.001]}, (0.0001,))})
    after = histogram_totals(
        {
            "gifting": _exposition(
                tmp_path / "b", [1, 3, 8, 8, 14], {"0": [0.001, 0.003], "2": [0.040, 0.060]}, (0.0001, 0.002, 0.006)
            )
        }
    )
    batches, gc_pauses, lag = phase_histograms(before, after)
    assert batches == {"gifting/gifting_begin": {"batches": 3, "mean_items": 10.0}}
    assert gc_pauses == {"gifting/0": {"count": 1, "mean_ms": 3.0}, "gifting/2": {"count": 2, "mean_ms": 50.0}}
    assert lag == {"gifting": {"count": 2, "mean_ms": 4.0}}
    assert phase_histograms(after, after) == ({}, {}, {}), "nothing observed, nothing reported"


def _phase(name: str, op: str, conc: int, per_s: float, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "op": op,
        "concurrency": conc,
        "calls_per_s": per_s,
        "gifts_per_s": per_s if op != "noop" else 0.0,
        "latency_ms": {"gift": {"p50": 60.0, "p99": 120.0, "p999": 150.0}},
        "lag_ms": {"p50": 140.0, "p99": 260.0, "missing": 0},
        "errors": {},
        "cpu_ms_per_gift": {"gifting": 0.7, "wallet": 0.3, "payout": 0.1},
        **extra,
    }


def _results(phases: list[dict[str, Any]], **backend: Any) -> dict[str, Any]:
    """What bench/run.py hands to derive(): one PostgreSQL leg with these phases, audit passed."""
    return {
        "machine": {"nproc": 2, "cpu_model": "test", "memory_gib": 1, "python": "3", "loadavg_at_start": [0, 0, 0]},
        "backends": {
            "postgres": {
                "load": {"phases": phases},
                "audit": {"passed": True, "settle_s": 1.0, "checks": []},
                **backend,
            }
        },
    }


def test_ratios_use_the_higher_ceiling_and_the_table_shows_full_collections() -> None:
    results = _results(
        [
            _phase("noop-c64", "noop", 64, 4000.0),
            _phase(
                "spread-c64",
                "gift",
                64,
                1000.0,
                batches={"gifting/gifting_begin": {"batches": 100, "mean_items": 8.0}},
                gc_pauses={
                    "gifting/2": {"count": 2, "mean_ms": 55.0},
                    "wallet/0": {"count": 5, "mean_ms": 1},
                },
                disk_fsync={"n": 400, "p50_ms": 0.3, "p99_ms": 41.0, "max_ms": 90.5, "slow": 6},
                loop_lag={"gifting": {"count": 200, "mean_ms": 2.25}, "wallet": {"count": 200, "mean_ms": 0.5}},
            ),
            _phase("noop-c64-end", "noop", 64, 5000.0),
        ],
        db_ceiling_tx_per_s={"64": 2500.0},
    )
    derive(results)
    r = results["backends"]["postgres"]
    assert r["noop_measured"] == {"64": [4000.0, 5000.0]}
    assert r["targets"]["c64_vs_noop"] == {"value": 0.2, "target": ">= 0.4", "met": False}
    assert r["targets"]["c64_p99_ms"]["met"] is False
    console = Console(record=True, width=300)
    table(results, console)
    out = console.export_text()
    row = next(line for line in out.splitlines() if "spread-c64" in line and "8.0" in line)
    assert "2/0/0" in row, "gifting's two full collections, none in wallet or payout"
    assert "55.0/-/-" in row
    assert "0.3/41.0/90.5" in row and "6 of 400" in row, "the disk's fsync times in the phase"
    assert "2.25/0.50/-" in row, "how late gifting's and the wallet's timers fired; payout's were not read"


def test_first_time_gifters_are_compared_with_the_spread_phase_when_both_ran() -> None:
    def results(*names: str) -> dict[str, Any]:
        phases = [_phase("noop-c64", "noop", 64, 4000.0), _phase("spread-c64", "gift", 64, 1000.0)]
        phases += [_phase(n, "gift", 64, 800.0, latency_ms={"gift": {"p50": 70.0, "p99": 140.0}}) for n in names]
        return _results(phases)

    with_fresh = results("fresh-c64")
    derive(with_fresh)
    fresh = with_fresh["backends"]["postgres"]["comparisons"]["fresh_vs_spread"]
    assert fresh["value"] == 0.8 and fresh["p99_ms"] == [120.0, 140.0]
    console = Console(record=True, width=300)
    table(with_fresh, console)
    assert "postgres: fresh_vs_spread 0.800" in console.export_text()
    without = results("hot-c64")
    derive(without)
    assert without["backends"]["postgres"]["comparisons"] == {}, "no fresh phase, no comparison"


def test_a_traced_run_prints_where_the_calls_spent_their_time() -> None:
    def part(p50: float, p99: float) -> dict[str, Any]:
        return {"p50": p50, "p99": p99, "p999": p99, "max": p99}

    split = {
        "calls": 480,
        "total_ms": part(63.3, 123.7),
        "parts_ms": {
            "before_handler": part(18.6, 78.6),
            "step1": part(9.9, 31.7),
            "step2": part(18.7, 37.7),
            "step3": part(8.3, 23.1),
            "after_handler": part(1.5, 15.5),
        },
        "slowest": {
            "calls": 5,
            "total_ms": 130.1,
            "parts_ms": {"before_handler": 78.4, "step1": 16.1, "step2": 23.6, "step3": 8.3, "after_handler": 3.7},
        },
    }
    results = _results(
        [
            _phase("noop-c64", "noop", 64, 4000.0, call_split={"calls": 0}),
            _phase("spread-c64", "gift", 64, 1000.0, call_split=split),
        ]
    )
    derive(results)
    console = Console(record=True, width=300)
    table(results, console)
    out = console.export_text()
    assert "where a traced SendGift's time went" in out
    row = next(line for line in out.splitlines() if "spread-c64" in line and "480" in line)
    assert "63.3 / 123.7" in row and "18.6 / 78.6" in row and "1.5 / 15.5" in row
    assert "130.1 = 78.4 + 16.1 + 23.6 + 8.3 + 3.7" in row
    split_table = out.split("where a traced SendGift's time went")[1].split("issue 8 targets")[0]
    assert "spread-c64" in split_table and "noop-c64" not in split_table, "a phase without traced calls has no row"
    untraced = _phase("spread-c64", "gift", 64, 1000.0)
    results["backends"]["postgres"]["load"]["phases"] = [untraced]
    console = Console(record=True, width=300)
    table(results, console)
    assert "where a traced" not in console.export_text(), "no split table without --trace-calls"
