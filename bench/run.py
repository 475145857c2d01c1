"""`make bench`: run the suite on each backend, drive it from a separate load process, measure
this machine's ceilings in the same run, audit, and report (bench/results.json, a table, a chart).

Per backend (SQLite embedded default, then PostgreSQL):
1. start nats-server (JetStream, sync_interval always) and the three services with
   services.cli.suite (the launcher `make run` and the tests use), plus bench/noop.py;
2. bench/loadgen.py in its own process: fund viewers, then the phases below;
3. bench/dbceiling.py in its own process: single-row UPDATE transactions/s on the same backend;
4. the audit (check_invariants after wait_until_settled): a failing audit fails the bench.
Everything started is stopped in `finally`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.callsplit import read_spans, send_gift_spans, split
from services.cli.audit import OK, collect, wait_until_settled
from services.cli.suite import Suite, SuiteConfig, free_port

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCIES = (1, 16, 64)
FRESH_GIFTS = 3_000  # gifts (and first-time viewers) of the fresh-c64 phase
AUDIT_SETTLE_S = 120.0  # a gift left PENDING by a timeout waits the sweeper's 30 s before it is settled
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
EXIT_AUDIT_FAILED = 1  # the exit code when an audit fails; results.json is written before


def phases(quick: bool) -> list[dict[str, Any]]:
    """The measured phases, in order. Each is bounded by a duration and by a count of calls."""
    d = 4.0 if quick else 10.0
    out: list[dict[str, Any]] = []
    for c in CONCURRENCIES:
        out.append({"name": f"noop-c{c}", "op": "noop", "concurrency": c, "duration_s": d / 2, "count_max": 200_000})
    for c in CONCURRENCIES:
        out.append({"name": f"spread-c{c}", "op": "gift", "concurrency": c, "duration_s": d, "count_max": 20_000})
    out.append({"name": "hot-c64", "op": "gift", "concurrency": 64, "duration_s": d, "count_max": 20_000, "hot": True})
    # Every gift from a viewer who never gifted before: one funded viewer per call, so the phase
    # is bounded by its count (the viewers are funded in setup, which this many purchases slows).
    fresh = 1_000 if quick else FRESH_GIFTS
    out.append(
        {"name": "fresh-c64", "op": "gift", "concurrency": 64, "duration_s": d, "count_max": fresh, "fresh": True}
    )
    out.append(
        {
            "name": "mix-c64",
            "op": "mix",
            "concurrency": 64,
            "duration_s": d,
            "count_max": 20_000,
            "mix": {"gift": 0.85, "tip": 0.10, "unlock": 0.05},
        }
    )
    for c in (1, 4):
        out.append(
            {
                "name": f"batch100-c{c}",
                "op": "batch",
                "concurrency": c,
                "batch_size": 100,
                "duration_s": d,
                "count_max": 400,
            }
        )
    # The no-op ceiling again at the end: this machine's speed drifts (a shared host), so the
    # ratios use the higher of the two and the report shows both.
    out.append({"name": "noop-c64-end", "op": "noop", "concurrency": 64, "duration_s": d / 2, "count_max": 200_000})
    return out


def _pg_exec(admin_url: str, sql: str) -> None:
    from tests.integration import pg

    pg._run(pg._execute(admin_url, sql))


def run_backend(backend: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Everything measured on one backend."""
    var_dir = work / backend
    shutil.rmtree(var_dir, ignore_errors=True)
    var_dir.mkdir(parents=True)
    urls: dict[str, str] = {}
    created: list[str] = []
    ceiling_url = f"sqlite+aiosqlite:///{var_dir / 'ceiling.db'}"
    if backend == "postgres":
        from tests.integration import pg

        for svc in ("wallet", "gifting", "payout", "ceiling"):
            name = f"lgbench_{uuid.uuid4().hex[:8]}_{svc}"
            _pg_exec(args.postgres_url, f'CREATE DATABASE "{name}"')
            created.append(name)
            urls[svc] = pg.database_url(args.postgres_url, name)
        ceiling_url = urls.pop("ceiling")
    services = ("wallet", "gifting", "payout")
    extra = {s: {f"LIVEGIFTS_{s.upper()}_{k}": v for k, v in args.service_env.items()} for s in services}
    if args.trace_calls:
        for s in services:  # spans to a file per service (bench/callsplit.py reads gifting's)
            extra[s] |= {
                f"LIVEGIFTS_{s.upper()}_OTEL_EXPORTER": "file",
                f"LIVEGIFTS_{s.upper()}_OTEL_FILE": str(var_dir / f"{s}.spans.jsonl"),
            }
    config = SuiteConfig(
        var_dir=var_dir,
        nats_port=free_port(),
        grpc_ports={s: 0 for s in services},
        metrics_ports={s: free_port() for s in services},  # scraped for batch sizes per phase
        database_urls=urls,
        webhook_secret="bench-" + uuid.uuid4().hex,
        operator_token="bench-" + uuid.uuid4().hex,
        extra_env=extra,
    )
    suite = Suite(config)
    noop: subprocess.Popen[str] | None = None
    out: dict[str, Any] = {"backend": backend}
    try:
        suite.start()
        noop = subprocess.Popen(
            [sys.executable, "-m", "bench.noop", "--port", "0"], stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        assert noop.stdout is not None
        ready = noop.stdout.readline().split()
        if ready[:1] != ["READY"]:
            raise RuntimeError(f"noop server did not start: {ready}")
        chosen = [p for p in phases(args.quick) if not args.phases or p["name"] in args.phases.split(",")]
        plan: dict[str, Any] = {
            "backend": backend,
            "seed": args.seed,
            "wallet": suite.addr("wallet"),
            "gifting": suite.addr("gifting"),
            "payout": suite.addr("payout"),
            "nats": config.nats_url,
            "noop": f"127.0.0.1:{ready[1]}",
            "secret": config.webhook_secret,
            "viewers": args.viewers,
            "creators": args.creators,
            "phases": chosen,
            # One funded viewer per gift of the fresh phases, used once.
            "fresh_viewers": sum(p["count_max"] for p in chosen if p.get("fresh")),
            "cpu_pids": {name: proc.pid for name, proc in suite.procs.items()} | {"noop": noop.pid},
            "metrics": {s: f"http://127.0.0.1:{config.metrics_ports[s]}/metrics" for s in services},
            # On the disk the databases and JetStream write (bench/diskprobe.py).
            "disk_probe_path": str(var_dir / "fsync-probe.bin"),
            "trace_every": args.trace_calls,
        }
        if args.profile:
            plan["profile"] = {
                "phase": args.profile_phase,
                "label": f"{args.profile}-{backend}",
                "dir": str(ROOT / "bench" / "profiles"),
                "py_spy": str(Path(sys.executable).parent / "py-spy"),
                "pids": {s: suite.procs[s].pid for s in ("gifting", "wallet", "payout")},
            }
        (var_dir / "plan.json").write_text(json.dumps(plan, indent=1))
        t0 = time.monotonic()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.loadgen",
                "--plan",
                str(var_dir / "plan.json"),
                "--out",
                str(var_dir / "load.json"),
            ],
            check=True,
            cwd=ROOT,
            timeout=args.load_timeout_s,
        )
        out["load"] = json.loads((var_dir / "load.json").read_text())
        out["load_s"] = time.monotonic() - t0
        ceiling = subprocess.run(
            [sys.executable, "-m", "bench.dbceiling", "--url", ceiling_url, "--duration-s", str(args.db_ceiling_s)],
            check=True,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        out["db_ceiling_tx_per_s"] = json.loads(ceiling.stdout)
        t0 = time.monotonic()

        def fetch(ids: Any = None) -> Any:
            return collect(suite.addr("wallet"), suite.addr("gifting"), suite.addr("payout"), 30, True, ids)

        report = wait_until_settled(fetch, AUDIT_SETTLE_S)
        out["audit"] = {
            "passed": all(c.status == OK for c in report),
            "settle_s": time.monotonic() - t0,
            "checks": [{"name": c.name, "status": c.status, "detail": c.detail} for c in report],
        }
        return out
    finally:
        if noop is not None and noop.poll() is None:
            noop.terminate()
            noop.wait(10)
        suite.stop()  # the services flush their spans as they stop
        for name in created:
            _pg_exec(args.postgres_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def split_calls(out: dict[str, Any], var_dir: Path, traced: bool) -> None:
    """Replace each phase's sampled calls with their split (`--trace-calls`; bench/callsplit.py).

    Run after the suite stopped, so gifting has flushed its spans; the raw samples stay out of
    results.json either way.
    """
    spans = send_gift_spans(read_spans(var_dir / "gifting.spans.jsonl")) if traced else {}
    for ph in out["load"]["phases"]:
        samples = ph.pop("traced", [])
        if traced:
            ph["call_split"] = split(samples, spans)


def machine() -> dict[str, Any]:
    """nproc, memory, CPU model, Python: what these numbers were measured on."""
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln),
        platform.processor(),
    )
    mem_kb = next(
        int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")
    )
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "cpu_model": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg(),
    }


def main() -> None:
    """Parse flags, run each backend, write the JSON, print the table, draw the chart."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--postgres-url", default=os.environ.get("LIVEGIFTS_BENCH_POSTGRES_URL", DEFAULT_PG))
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--viewers", type=int, default=300)
    parser.add_argument("--creators", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="shorter phases (a smoke run, not for RESULTS.md)")
    parser.add_argument("--phases", default="", help="comma-separated phase names to run (default: all)")
    parser.add_argument("--db-ceiling-s", type=float, default=4.0)
    parser.add_argument("--load-timeout-s", type=float, default=420.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument(
        "--profile", default="", help="label: py-spy record gifting, wallet and payout in --profile-phase"
    )
    parser.add_argument("--profile-phase", default="spread-c64")
    parser.add_argument(
        "--trace-calls",
        type=int,
        default=0,
        metavar="N",
        help="record spans and split one SendGift in N into its steps (bench/callsplit.py); 0: off",
    )
    parser.add_argument(
        "--service-env", default="", help="KEY=VALUE,... set on every service as LIVEGIFTS_<SVC>_KEY=VALUE"
    )
    args = parser.parse_args()
    args.service_env = dict(kv.split("=", 1) for kv in args.service_env.split(",") if kv)
    if args.trace_calls < 0:
        parser.error("--trace-calls must be 0 (off) or a positive N")
    work = ROOT / "var" / "bench"
    started = time.time()
    results: dict[str, Any] = {"machine": machine(), "seed": args.seed, "backends": {}}
    for backend in args.backends.split(","):
        print(f"== {backend}", flush=True)
        results["backends"][backend] = run_backend(backend, args, work)
        split_calls(results["backends"][backend], work / backend, bool(args.trace_calls))
    results["wall_s"] = time.time() - started
    from bench.report import chart, derive, table

    derive(results)
    args.out.write_text(json.dumps(results, indent=1))
    table(results)
    chart(results, args.out.with_suffix(".png"))
    failed = [b for b, r in results["backends"].items() if not r["audit"]["passed"]]
    for b in failed:
        for c in results["backends"][b]["audit"]["checks"]:
            if c["status"] != OK:
                print(f"audit {b}: {c['status']} {c['name']}: {c['detail']}")
    if failed:
        print(f"AUDIT FAILED on {', '.join(failed)}: the benchmark fails", file=sys.stderr)
        sys.exit(EXIT_AUDIT_FAILED)
    print(f"audit passed on {', '.join(results['backends'])}; {results['wall_s']:.0f}s in all")


if __name__ == "__main__":
    main()
