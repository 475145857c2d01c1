"""Where SendGift's time goes, measured by taking the saga apart (an ablation ladder).

`python -m bench.ablate [--levels 0,1,...] [--rounds 2]` builds one git worktree of HEAD per
level, applies the patches of `bench/ablations/` up to that level (level 0 is the suite as it
is; each level removes one more part of the gift path, cumulatively), and runs the same
`bench.run` phases in each (PostgreSQL, `--phases noop-c64,spread-c64,batch100-c4,noop-c64-end`
by default), the levels in turn, ascending in even rounds and descending in odd ones, so a drift
of this shared machine during the runs falls on every level alike. It prints, per level, the
median over the rounds of gifts/s, p99 and the CPU per gift of each process, and the ratio of
those gifts/s to the no-op gRPC ceiling pooled over every run (the median of each run's higher
no-op measurement: one run's ceiling alone moved by up to 2x on a shared host), and writes every
run's figures to `--out` (JSON).

The patches are measurement only, never a way to run the suite: they drop work the guarantees
need (from level 2 on the audit cannot pass, and it is reported, not enforced). What the
levels say is how far each part of the design is from the issue 8 target (bench/README.md,
"The ablation ladder"). The worktrees reuse this checkout's `.venv` and `gen/` and are removed
at the end. Needs PostgreSQL (`--postgres-url` or LIVEGIFTS_BENCH_POSTGRES_URL).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.run import DEFAULT_PG, EXIT_AUDIT_FAILED, ROOT

PATCHES = ROOT / "bench" / "ablations"
DEFAULT_PHASES = "noop-c64,spread-c64,batch100-c4,noop-c64-end"
RUN_TIMEOUT_S = 600.0


def patches() -> list[Path]:
    """The ladder's patches in order: `<level>-<what>.patch`, levels 1, 2, ... without gaps."""
    found = sorted(PATCHES.glob("*.patch"), key=lambda p: int(p.name.split("-", 1)[0]))
    levels = [int(p.name.split("-", 1)[0]) for p in found]
    if levels != list(range(1, len(found) + 1)):
        raise SystemExit(f"bench/ablations: patches must be numbered 1..N without gaps, found {levels}")
    return found


def label(level: int, ladder: list[Path]) -> str:
    """A level's name: what its last patch removes."""
    return "the suite as it is" if level == 0 else ladder[level - 1].stem.split("-", 1)[1].replace("-", " ")


def make_tree(level: int, ladder: list[Path], parent: Path) -> Path:
    """A worktree of HEAD with patches 1..level applied, using this checkout's venv and generated code."""
    tree = parent / f"level{level}"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), "HEAD"], cwd=ROOT, check=True, capture_output=True)
    for p in ladder[:level]:
        applied = subprocess.run(["git", "apply", str(p)], cwd=tree, capture_output=True, text=True)
        if applied.returncode != 0:
            raise SystemExit(f"{p.name} does not apply to HEAD (regenerate it, bench/README.md): {applied.stderr}")
    for shared in (".venv", "gen"):
        (tree / shared).symlink_to(ROOT / shared)
    env = _env(tree)
    where = subprocess.run(
        [sys.executable, "-c", "import services; print(services.__file__)"],
        cwd=tree,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not where.startswith(str(tree)):
        raise SystemExit(f"level {level} would run {where}, not its worktree's code")
    return tree


def _env(tree: Path) -> dict[str, str]:
    # The services are started as `python -m services.<svc>` and inherit this: the worktree's code
    # comes first, before the editable install of this checkout.
    return {**os.environ, "PYTHONPATH": str(tree)}


def run_level(tree: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One `bench.run` in a level's worktree: its PostgreSQL figures and whether the audit passed."""
    cmd = [
        sys.executable,
        "-m",
        "bench.run",
        "--backends",
        "postgres",
        "--postgres-url",
        args.postgres_url,
        "--phases",
        args.phases,
        "--out",
        str(out),
    ]
    if args.quick:
        cmd.append("--quick")
    log = out.with_suffix(".log")
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=tree, env=_env(tree), stdout=f, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S)
    if rc.returncode not in (0, EXIT_AUDIT_FAILED) or not out.exists():
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"bench.run failed in {tree} (exit {rc.returncode}):\n{tail}")
    pg = json.loads(out.read_text())["backends"]["postgres"]
    phases = {p["name"]: p for p in pg["load"]["phases"]}
    figures = {f["phase"]: f for f in pg["figures"]}
    return {
        "audit_passed": pg["audit"]["passed"],
        "noop_calls_per_s": max(pg["noop_measured"]["64"]),
        "phases": {
            name: {
                "gifts_per_s": f["gifts_per_s"],
                "vs_noop": f["vs_noop"],
                "p50_ms": f["p50_ms"],
                "p99_ms": f["p99_ms"],
                "errors": f["errors"],
                "cpu_ms_per_gift": phases[name]["cpu_ms_per_gift"],
                "machine_busy_fraction": phases[name]["machine_busy_fraction"],
            }
            for name, f in figures.items()
        },
    }


def pooled_ceiling(runs: dict[int, list[dict[str, Any]]]) -> float:
    """The no-op ceiling the levels are compared with: the median over every run of its higher measurement."""
    return statistics.median(r["noop_calls_per_s"] for rs in runs.values() for r in rs)


def summarize(levels: list[int], runs: dict[int, list[dict[str, Any]]], ladder: list[Path]) -> list[dict[str, Any]]:
    """Per level, the median over its runs of each figure that the table prints."""
    ceiling = pooled_ceiling(runs)
    rows = []
    for lv in levels:
        rs = runs[lv]

        def med(phase: str, key: str, rs: list[dict[str, Any]] = rs) -> float | None:
            vals = [r["phases"][phase][key] for r in rs if phase in r["phases"]]
            return statistics.median(vals) if vals else None

        def cpu(phase: str, rs: list[dict[str, Any]] = rs) -> dict[str, float]:
            have = [r["phases"][phase]["cpu_ms_per_gift"] for r in rs if phase in r["phases"]]
            procs = sorted({k for c in have for k in c if k != "noop"})
            return {k: round(statistics.median(c.get(k, 0.0) for c in have), 3) for k in procs} if have else {}

        single, batch = med("spread-c64", "gifts_per_s"), med("batch100-c4", "gifts_per_s")
        rows.append(
            {
                "level": lv,
                "removed": label(lv, ladder),
                "runs": len(rs),
                "audit_passed": all(r["audit_passed"] for r in rs),
                "spread_c64_gifts_per_s": single,
                "spread_c64_vs_own_run_noop": med("spread-c64", "vs_noop"),
                "spread_c64_vs_pooled_noop": single / ceiling if single else None,
                "pooled_noop_calls_per_s": ceiling,
                "spread_c64_p99_ms": med("spread-c64", "p99_ms"),
                "spread_c64_cpu_ms_per_gift": cpu("spread-c64"),
                "batch100_c4_gifts_per_s": batch,
                "batch100_vs_single": batch / single if batch and single else None,
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> None:
    """The ladder as a table (rich), cumulative: each level also lacks everything above it."""
    from rich.console import Console
    from rich.table import Table

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    ceiling = rows[0]["pooled_noop_calls_per_s"] if rows else 0.0
    t = Table(
        title="ablation ladder (PostgreSQL, medians over rounds; each level also lacks what the levels above it"
        f" removed; x no-op: / the pooled no-op ceiling at c64, {ceiling:.0f} calls/s)"
    )
    for col in (
        "level",
        "removed",
        "gifts/s c64",
        "x no-op",
        "p99 ms",
        "CPU ms/gift (all processes)",
        "batch100/single",
    ):
        t.add_column(col)
    for r in rows:
        c = r["spread_c64_cpu_ms_per_gift"]
        t.add_row(
            str(r["level"]),
            r["removed"] + ("" if r["audit_passed"] else " (audit fails)"),
            fmt(r["spread_c64_gifts_per_s"], ".0f"),
            fmt(r["spread_c64_vs_pooled_noop"], ".3f"),
            fmt(r["spread_c64_p99_ms"], ".0f"),
            f"{sum(c.values()):.2f}: " + " ".join(f"{k} {v:.2f}" for k, v in c.items() if v >= 0.005),
            fmt(r["batch100_vs_single"], ".2f"),
        )
    Console(width=200).print(t)


def main() -> None:
    """Build the worktrees, run the rounds, print the table, write the JSON, remove the worktrees."""
    ladder = patches()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--levels", default=",".join(str(i) for i in range(len(ladder) + 1)), help="comma-separated levels"
    )
    parser.add_argument("--rounds", type=int, default=2, help="runs per level (alternating order)")
    parser.add_argument("--postgres-url", default=os.environ.get("LIVEGIFTS_BENCH_POSTGRES_URL", DEFAULT_PG))
    parser.add_argument("--phases", default=DEFAULT_PHASES, help="bench.run phases (spread-c64 is the one compared)")
    parser.add_argument("--quick", action="store_true", help="bench.run's shorter phases")
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "ablate" / "ablation.json")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",") if x]
    if not levels or any(not 0 <= lv <= len(ladder) for lv in levels):
        parser.error(f"levels are 0..{len(ladder)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    for lv in levels:
        print(f"level {lv}: {label(lv, ladder)}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    runs: dict[int, list[dict[str, Any]]] = {lv: [] for lv in levels}
    with tempfile.TemporaryDirectory(prefix="livegifts-ablate-") as tmp:
        parent = Path(tmp)
        trees: dict[int, Path] = {}
        try:
            for lv in levels:
                trees[lv] = make_tree(lv, ladder, parent)
            total, done = len(levels) * args.rounds, 0
            for rnd in range(args.rounds):
                for lv in levels if rnd % 2 == 0 else list(reversed(levels)):
                    r = run_level(trees[lv], args, parent / f"level{lv}-round{rnd}.json")
                    runs[lv].append(r)
                    done += 1
                    s = r["phases"].get("spread-c64", {})
                    print(
                        f"[{done}/{total}] round {rnd + 1} level {lv}: spread-c64 "
                        f"{s.get('gifts_per_s', 0):.0f} gifts/s, x this run's no-op {s.get('vs_noop', 0):.3f}, "
                        f"audit {'passed' if r['audit_passed'] else 'failed'} ({time.monotonic() - started:.0f} s)",
                        flush=True,
                    )
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
            subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True)
    rows = summarize(levels, runs, ladder)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    args.out.write_text(
        json.dumps({"head": head, "args": vars(args) | {"out": str(args.out)}, "summary": rows, "runs": runs}, indent=1)
    )
    table(rows)
    print(f"wrote {args.out} ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
