"""Turn the raw measurements into ratios against the ceilings, a rich table and a PNG chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.callsplit import PARTS
from bench.diskprobe import SLOW_MS

# issue 8's targets, checked on PostgreSQL (the figures for SQLite are shown beside them).
TARGET_C64_VS_NOOP = 0.4
TARGET_P99_MS = 100.0
TARGET_HOT_VS_SPREAD = 0.9
TARGET_LAG_P99_MS = 1000.0
TARGET_BATCH_VS_SINGLE = 5.0


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _nearest(by_conc: dict[int, float], c: int) -> float | None:
    """The ceiling measured at concurrency c, else at the nearest one measured; None if none was."""
    if not by_conc:
        return None
    return by_conc.get(c) or by_conc[min(by_conc, key=lambda k: abs(k - c))]


def derive(results: dict[str, Any]) -> None:
    """Add, per backend, `figures` (each beside its ceiling) and `targets` (met or not).

    A run with `--phases` may leave out any phase: a figure whose ceiling was not measured shows
    None, and a target whose phases were not run is left out rather than guessed.
    """
    for r in results["backends"].values():
        by = {p["name"]: p for p in r["load"]["phases"]}
        # A ceiling measured more than once (before and after the gift phases) counts at its
        # highest: the stricter ratio. All its measurements are kept to show the drift.
        noops: dict[int, list[float]] = {}
        for p in by.values():
            if p["op"] == "noop":
                noops.setdefault(p["concurrency"], []).append(p["calls_per_s"])
        noop = {c: max(v) for c, v in noops.items()}
        r["noop_measured"] = {str(c): v for c, v in noops.items()}
        db = {int(k): v for k, v in r.get("db_ceiling_tx_per_s", {}).items()}
        rows = []
        for name, p in by.items():
            if p["op"] == "noop":
                continue
            c = p["concurrency"]
            lat = p["latency_ms"].get({"gift": "gift", "mix": "gift", "batch": "batch"}[p["op"]], {})
            noop_c = _nearest(noop, c)
            db_c = _nearest(db, c)
            cpu = p.get("cpu_ms_per_gift", {})
            rows.append(
                {
                    "phase": name,
                    "concurrency": c,
                    "gifts_per_s": p["gifts_per_s"],
                    "calls_per_s": p["calls_per_s"],
                    "noop_calls_per_s": noop_c,
                    "vs_noop": _ratio(p["calls_per_s"], noop_c),
                    "db_tx_per_s": db_c,
                    "gifts_vs_db_tx": _ratio(p["gifts_per_s"], db_c),
                    "p50_ms": lat.get("p50"),
                    "p99_ms": lat.get("p99"),
                    "p999_ms": lat.get("p999"),
                    "lag_p50_ms": p["lag_ms"]["p50"],
                    "lag_p99_ms": p["lag_ms"]["p99"],
                    "lag_missing": p["lag_ms"]["missing"],
                    "errors": sum(p["errors"].values()),
                    "cpu_ms_per_gift": {s: cpu.get(s) for s in ("gifting", "wallet", "payout")},
                    "batch_items": {k: v["mean_items"] for k, v in p.get("batches", {}).items()},
                    "gc_pauses": p.get("gc_pauses", {}),
                    "loop_lag": p.get("loop_lag", {}),
                    "disk_fsync": p.get("disk_fsync", {}),
                }
            )
        r["figures"] = rows
        r["targets"] = _targets({x["phase"]: x for x in rows})
        r["comparisons"] = _comparisons({x["phase"]: x for x in rows})


def _targets(f: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """issue 8's targets that the phases run can decide; one whose phases are missing is left out."""
    out: dict[str, dict[str, Any]] = {}
    spread = f.get("spread-c64")
    if spread is None:
        return out
    single = spread["gifts_per_s"]
    out["c64_vs_noop"] = {
        "value": spread["vs_noop"],
        "target": f">= {TARGET_C64_VS_NOOP}",
        "met": (spread["vs_noop"] or 0) >= TARGET_C64_VS_NOOP,
    }
    out["c64_p99_ms"] = {
        "value": spread["p99_ms"],
        "target": f"<= {TARGET_P99_MS}",
        "met": (spread["p99_ms"] or 1e9) <= TARGET_P99_MS,
    }
    if "hot-c64" in f:
        hot_vs_spread = _ratio(f["hot-c64"]["gifts_per_s"], single)
        lag_p99 = [f[n]["lag_p99_ms"] for n in ("spread-c64", "hot-c64")]
        out["hot_vs_spread"] = {
            "value": hot_vs_spread,
            "target": f">= {TARGET_HOT_VS_SPREAD}",
            "met": (hot_vs_spread or 0) >= TARGET_HOT_VS_SPREAD,
        }
        out["lag_p99_ms_spread_hot"] = {
            "value": lag_p99,
            "target": f"<= {TARGET_LAG_P99_MS} both",
            "met": all(x is not None and x <= TARGET_LAG_P99_MS for x in lag_p99),
        }
    batches = [x["gifts_per_s"] for x in f.values() if x["phase"].startswith("batch")]
    if batches:
        batch_vs_single = _ratio(max(batches), single)
        out["batch100_vs_single"] = {
            "value": batch_vs_single,
            "target": f">= {TARGET_BATCH_VS_SINGLE}",
            "met": (batch_vs_single or 0) >= TARGET_BATCH_VS_SINGLE,
        }
    return out


def _comparisons(f: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Figures set beside spread-c64 that no target names (bench/README.md says why each is there)."""
    spread, fresh = f.get("spread-c64"), f.get("fresh-c64")
    if spread is None or fresh is None:
        return {}
    return {
        "fresh_vs_spread": {
            "value": _ratio(fresh["gifts_per_s"], spread["gifts_per_s"]),
            "p99_ms": [spread["p99_ms"], fresh["p99_ms"]],
            "what": "gifts/s when every gift comes from a viewer who never gifted before, / spread-c64",
        }
    }


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def table(results: dict[str, Any], console: Console | None = None) -> None:
    """Print every figure beside its ceiling, per backend, then the targets."""
    console = console or Console(width=200)
    m = results["machine"]
    console.print(
        f"machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, Python {m['python']},"
        f" load average at start {tuple(round(x, 2) for x in m['loadavg_at_start'])}"
    )
    for backend, r in results["backends"].items():
        t = Table(title=f"{backend}: SendGift saga vs this machine's ceilings (same run)")
        for col in (
            "phase",
            "conc",
            "gifts/s",
            "calls/s",
            "no-op gRPC/s",
            "x no-op",
            "DB tx/s",
            "gifts / DB tx",
            "p50 ms",
            "p99 ms",
            "p999 ms",
            "lag p50 ms",
            "lag p99 ms",
            "errors",
            "CPU ms/gift g/w/p",
        ):
            t.add_column(col, justify="right" if col != "phase" else "left")
        for x in r["figures"]:
            t.add_row(
                x["phase"],
                str(x["concurrency"]),
                _fmt(x["gifts_per_s"]),
                _fmt(x["calls_per_s"]),
                _fmt(x["noop_calls_per_s"], 0),
                _fmt(x["vs_noop"], 3),
                _fmt(x["db_tx_per_s"], 0),
                _fmt(x["gifts_vs_db_tx"], 2),
                _fmt(x["p50_ms"]),
                _fmt(x["p99_ms"]),
                _fmt(x["p999_ms"]),
                _fmt(x["lag_p50_ms"], 0),
                _fmt(x["lag_p99_ms"], 0),
                str(x["errors"]),
                "/".join(_fmt(v) for v in x.get("cpu_ms_per_gift", {}).values()) or "-",
            )
        console.print(t)
        _batch_table(backend, r["figures"], console)
        _split_table(backend, r["load"]["phases"], console)
        for c, v in r.get("noop_measured", {}).items():
            if len(v) > 1:
                console.print(
                    f"{backend}: no-op ceiling at c{c} measured {len(v)} times (before and after the gift phases):"
                    f" {', '.join(_fmt(x, 0) for x in v)} calls/s; the ratios use the highest"
                )
        tt = Table(title=f"{backend}: issue 8 targets (they are set for PostgreSQL)")
        for col in ("target", "measured", "wanted", "met"):
            tt.add_column(col)
        for name, v in r["targets"].items():
            val = v["value"]
            shown = ", ".join(_fmt(x, 2) for x in val) if isinstance(val, list) else _fmt(val, 3)
            tt.add_row(name, shown, v["target"], "yes" if v["met"] else "NO")
        console.print(tt)
        if not r["targets"]:
            console.print(f"{backend}: no target can be decided from the phases run")
        for name, v in r.get("comparisons", {}).items():
            p99 = ", ".join(_fmt(x) for x in v["p99_ms"])
            console.print(f"{backend}: {name} {_fmt(v['value'], 3)} ({v['what']}; p99 ms {p99})")
        a = r["audit"]
        console.print(f"{backend} audit after the load: {'PASSED' if a['passed'] else 'FAILED'} ({a['settle_s']:.1f}s)")
        for c in a["checks"]:
            console.print(f"  {c['status']:>9}  {c['name']}: {c['detail']}")


# The services whose figures are shown as "g/w/p", in that order.
_SERVICES = ("gifting", "wallet", "payout")
# The batches shown (service/name of livegifts_batch_items and livegifts_consumer_batch_size), in order.
_BATCHES = {
    "gifting/gifting_begin": "step 1 tx",
    "gifting/gifting_spend": "SpendMany",
    "gifting/gifting_sent": "step 3 tx",
    "gifting/gifting-leaderboards": "read models",
    "payout/payout-gift-sent": "payout credit",
}


def _batch_table(backend: str, figures: list[dict[str, Any]], console: Console) -> None:
    """Mean calls per shared transaction (group commit) and events per consumer batch, per phase."""
    if not any(x.get("batch_items") for x in figures):
        return
    t = Table(
        title=f"{backend}: mean items per batch (services' livegifts_batch_items / consumer batch histograms), "
        "full garbage collections (livegifts_gc_pause_seconds, generation 2), how late the event loops' timers "
        "fired (livegifts_event_loop_lag_seconds), and the disk's fsync times (bench/diskprobe.py) in the phase"
    )
    t.add_column("phase")
    for label in _BATCHES.values():
        t.add_column(label, justify="right")
    t.add_column("full GCs g/w/p", justify="right")
    t.add_column("mean full GC ms g/w/p", justify="right")
    t.add_column("mean loop lag ms g/w/p", justify="right")
    t.add_column("fsync p50/p99/max ms", justify="right")
    t.add_column(f"fsyncs > {SLOW_MS:.0f} ms", justify="right")
    for x in figures:
        full = [x.get("gc_pauses", {}).get(f"{svc}/2") for svc in _SERVICES]
        t.add_row(
            x["phase"],
            *(_fmt(x.get("batch_items", {}).get(k)) for k in _BATCHES),
            "/".join(str(g["count"]) if g else "0" for g in full),
            "/".join(_fmt(g["mean_ms"]) if g else "-" for g in full),
            "/".join(_fmt(x.get("loop_lag", {}).get(svc, {}).get("mean_ms"), 2) for svc in _SERVICES),
            "/".join(_fmt(disk.get(k)) for k in ("p50_ms", "p99_ms", "max_ms"))
            if (disk := x.get("disk_fsync"))
            else "-",
            f"{disk['slow']} of {disk['n']}" if disk else "-",
        )
    console.print(t)


def _split_table(backend: str, phases: list[dict[str, Any]], console: Console) -> None:
    """Where traced SendGift calls spent their time (`--trace-calls`, bench/callsplit.py), per phase."""
    split = [(p["name"], p["call_split"]) for p in phases if p.get("call_split", {}).get("calls")]
    if not split:
        return
    t = Table(
        title=f"{backend}: where a traced SendGift's time went (bench/callsplit.py), p50 / p99 ms of each part, "
        "and each part's mean over the slowest 1% of the traced calls"
    )
    t.add_column("phase")
    t.add_column("traced", justify="right")
    t.add_column("client p50 / p99", justify="right")
    for label in PARTS.values():
        t.add_column(label, justify="right")
    t.add_column("slowest 1%: total = " + " + ".join(PARTS.values()), justify="right")
    for name, c in split:
        slow = c["slowest"]
        t.add_row(
            name,
            str(c["calls"]),
            f"{_fmt(c['total_ms']['p50'])} / {_fmt(c['total_ms']['p99'])}",
            *(f"{_fmt(c['parts_ms'][k]['p50'])} / {_fmt(c['parts_ms'][k]['p99'])}" for k in PARTS),
            f"{_fmt(slow['total_ms'])} = " + " + ".join(_fmt(slow["parts_ms"][k]) for k in PARTS),
        )
    console.print(t)


def chart(results: dict[str, Any], path: Path) -> None:
    """Throughput beside the no-op ceiling, and p50/p99 latency, per phase and backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(results["backends"])
    fig, axes = plt.subplots(len(backends), 2, figsize=(14, 4.5 * len(backends)), squeeze=False)
    for row, backend in enumerate(backends):
        figs = results["backends"][backend]["figures"]
        names = [x["phase"] for x in figs]
        xs = range(len(names))
        ax = axes[row][0]
        ax.bar([i - 0.2 for i in xs], [x["gifts_per_s"] for x in figs], width=0.4, label="gifts/s")
        ax.bar([i + 0.2 for i in xs], [x["noop_calls_per_s"] or 0 for x in figs], width=0.4, label="no-op gRPC calls/s")
        ax.plot(list(xs), [x["db_tx_per_s"] or 0 for x in figs], "k_", markersize=18, label="DB update tx/s")
        ax.set_yscale("log")
        ax.set_xticks(list(xs), names, rotation=30, ha="right")
        ax.set_title(f"{backend}: throughput vs ceilings")
        ax.legend(fontsize=8)
        ax = axes[row][1]
        ax.bar([i - 0.2 for i in xs], [x["p50_ms"] or 0 for x in figs], width=0.4, label="p50 ms")
        ax.bar([i + 0.2 for i in xs], [x["p99_ms"] or 0 for x in figs], width=0.4, label="p99 ms")
        ax.plot(list(xs), [x["lag_p99_ms"] or 0 for x in figs], "rx", label="diamonds lag p99 ms")
        ax.set_yscale("log")
        ax.set_xticks(list(xs), names, rotation=30, ha="right")
        ax.set_title(f"{backend}: call latency and diamonds lag")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
