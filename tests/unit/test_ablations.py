"""bench/ablate.py: the ladder's patches still apply to this tree, in order, and its summary."""

from __future__ import annotations

import shutil
import subprocess
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
