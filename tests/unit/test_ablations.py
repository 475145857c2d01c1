"""bench/ablate.py: the ladder's patches still apply to this tree, in order, and its summary."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import ablate

ROOT = ablate.ROOT


def _touched(patch: Path) -> list[str]:
    return [ln[len("+++ b/") :] for ln in patch.read_text().splitlines() if ln.startswith("+++ b/")]


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_every_patch_applies_on_top_of_the_ones_before(tmp_path: Path) -> None:
    ladder = ablate.patches()
    assert len(ladder) >= 6
    files = sorted({f for p in ladder for f in _touched(p)})
    assert "services/gifting/usecases.py" in files
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, tmp_path / f)
    for p in ladder:
        # Outside a repository `git apply` patches the files under its working directory.
        done = subprocess.run(["git", "apply", str(p)], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, f"{p.name} no longer applies (regenerate it, bench/README.md): {done.stderr}"
    # Each patch marks what it removes; the last one leaves SendGift without a database.
    usecases = (tmp_path / "services/gifting/usecases.py").read_text()
    assert usecases.count("ABLATION") >= 4
    assert "return _no_db_receipt(req)" in usecases
    assert "ABLATION" not in (ROOT / "services/gifting/usecases.py").read_text()


# Each service's wiring, built as app.serve builds it (no database or NATS is reached), held
# against services/common/consumers.py: app.serve refuses to start a service whose subscriptions
# differ from its entry there, and a patch that applies can still leave its level unable to start.
_WIRING_CHECK = """
import asyncio, importlib, os, sys
from pathlib import Path

import services
from services.cli.suite import SuiteConfig
from services.common.app import Runtime
from services.common.bus import Bus
from services.common.config import load_settings
from services.common.consumers import unlisted
from services.common.db import Database
from services.common.outbox import Outbox

assert services.__file__.startswith(sys.argv[1]), services.__file__

async def main() -> None:
    config = SuiteConfig(var_dir=Path.cwd() / "var")  # the test's tmp_path: nothing left in /tmp
    for svc in ("wallet", "gifting", "payout"):
        os.environ.update(config.env_for(svc))
        spec = importlib.import_module(f"services.{svc}.__main__").SPEC
        settings = load_settings(spec.settings_cls)
        db = Database(settings.database_url, pool_size=1, pool_timeout_s=1.0, application_name=svc)
        bus, outbox = Bus(settings, svc), Outbox(spec.tables.outbox)
        runtime = Runtime(svc, settings, db, bus, spec.tables, outbox, asyncio.Event())
        wiring = await spec.wire(runtime)
        print(unlisted(svc, {sub.durable: sub.stream for sub in wiring.subscriptions}) or f"{svc} ok")
        if wiring.close is not None:
            await wiring.close()
        await db.dispose()

asyncio.run(main())
"""


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_every_level_wires_the_consumers_services_common_consumers_lists(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "services", tree / "services", ignore=shutil.ignore_patterns("__pycache__"))
    for f in sorted({f for p in ablate.patches() for f in _touched(p)}):  # bench/run.py
        if not (tree / f).exists():  # services/ is there already
            (tree / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / f, tree / f)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    for level, p in enumerate([None, *ablate.patches()]):
        if p is not None:
            done = subprocess.run(["git", "apply", str(p)], cwd=tree, capture_output=True, text=True)
            assert done.returncode == 0, f"{p.name} no longer applies: {done.stderr}"
        wired = subprocess.run(
            [sys.executable, "-c", _WIRING_CHECK, str(tree)], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert wired.returncode == 0, f"level {level}: {wired.stderr[-3000:]}"
        assert wired.stdout.split("\n")[:3] == ["wallet ok", "gifting ok", "payout ok"], (
            f"level {level}: {wired.stdout}"
        )


def test_levels_are_named_by_their_patch() -> None:
    ladder = ablate.patches()
    assert ablate.label(0, ladder) == "the suite as it is"
    assert ablate.label(1, ladder) == "no read models"
    assert ablate.label(len(ladder), ladder) == "no database"


def _run(gifts: float, batch: float, wallet_cpu: float, noop: float, audit: bool = True) -> dict:
    return {
        "audit_passed": audit,
        "noop_calls_per_s": noop,
        "phases": {
            "spread-c64": {
                "gifts_per_s": gifts,
                "vs_noop": gifts / noop,
                "p50_ms": 100.0,
                "p99_ms": 64_000 / gifts,
                "errors": 0,
                "cpu_ms_per_gift": {"gifting": 1.0, "wallet": wallet_cpu, "noop": 0.0},
                "machine_busy_fraction": 0.9,
            },
            "batch100-c4": {
                "gifts_per_s": batch,
                "vs_noop": batch / noop,
                "p50_ms": 200.0,
                "p99_ms": 300.0,
                "errors": 0,
                "cpu_ms_per_gift": {"gifting": 0.3},
                "machine_busy_fraction": 0.9,
            },
        },
    }


def test_summary_takes_medians_against_the_pooled_ceiling_and_reports_a_failed_audit() -> None:
    ladder = ablate.patches()
    runs = {
        0: [_run(300, 1500, 0.8, noop=1000), _run(500, 1500, 0.6, noop=2000), _run(400, 1600, 0.7, noop=3000)],
        2: [_run(800, 2400, 0.5, noop=2500, audit=False), _run(600, 2400, 0.5, noop=1500)],
    }
    rows = ablate.summarize([0, 2], runs, ladder)
    assert [r["level"] for r in rows] == [0, 2]
    first, second = rows
    assert first["spread_c64_gifts_per_s"] == 400
    assert first["pooled_noop_calls_per_s"] == 2000  # the median of all five runs' ceilings
    assert first["spread_c64_vs_pooled_noop"] == pytest.approx(400 / 2000)
    assert first["spread_c64_vs_own_run_noop"] == pytest.approx(0.25)  # 300/1000, 500/2000, 400/3000
    assert second["spread_c64_vs_pooled_noop"] == pytest.approx(700 / 2000)
    assert first["spread_c64_cpu_ms_per_gift"] == {"gifting": 1.0, "wallet": 0.7}  # the no-op server left out
    assert first["batch100_vs_single"] == pytest.approx(1500 / 400)
    assert first["audit_passed"] is True
    assert second["spread_c64_gifts_per_s"] == 700
    assert second["audit_passed"] is False
    assert second["removed"] == "no payout consumer"
