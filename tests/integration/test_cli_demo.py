"""`livegifts demo` (what `make demo` runs) against the running suite: the README's first story.

The demo buys coins through the development provider's signed callback, starts a stream, sends
four combos and waits for payout to credit the creator's share. No test ran it before, so a
catalog, package or policy change could break the README's walk-through unseen.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import Deployment


def test_the_demo_buys_sends_and_finds_the_creator_s_diamonds(deployment: Deployment, tmp_path: Path) -> None:
    if not deployment.webhook_secret:
        pytest.skip("the deployment's webhook secret is not known")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "demo",
            "--wallet-addr",
            deployment.wallet_addr,
            "--gifting-addr",
            deployment.gifting_addr,
            "--payout-addr",
            deployment.payout_addr,
            "--webhook-secret",
            deployment.webhook_secret,
            "--var",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    sent = [int(c) for c in re.findall(r"^3\. sent \d+ x [\w-]+ = (\d+) coins", out.stdout, re.M)]
    assert len(sent) == 4, out.stdout
    earned = re.search(r"^4\. \S+ earned (\d+) diamonds = ([\d.]+)% of (\d+) coins", out.stdout, re.M)
    assert earned is not None, out.stdout
    diamonds, share, total = int(earned[1]), float(earned[2]), int(earned[3])
    assert total == sum(sent) > 0, out.stdout
    assert diamonds == total * round(share * 100) // 10_000 and diamonds > 0, out.stdout
    assert "OK" in out.stdout
