"""`livegifts buy` against the running suite: any region's packages, and no secret made up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import Deployment
from tests.integration.helpers import uid


def _buy(deployment: Deployment, var: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LIVEGIFTS_WALLET_PAYMENT_WEBHOOK_SECRET"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "buy",
            *args,
            "--wallet-addr",
            deployment.wallet_addr,
            "--var",
            str(var),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "COLUMNS": "200"},
    )


@pytest.mark.parametrize(("package", "coins"), [("gb-gbp-660", 660), ("jp-jpy-700", 700), ("us-usd-web-700", 700)])
def test_buy_finds_a_package_of_any_region_and_channel(
    deployment: Deployment, tmp_path: Path, package: str, coins: int
) -> None:
    if not deployment.webhook_secret:
        pytest.skip("the deployment's webhook secret is not known")
    user = uid("buyer")
    out = _buy(deployment, tmp_path, user, package, "--webhook-secret", deployment.webhook_secret)
    assert out.returncode == 0, out.stdout + out.stderr
    assert ": SUCCEEDED;" in out.stdout and "PURCHASE_STATUS_" not in out.stdout  # as `withdrawals` prints
    assert f"{user} has {coins} coins" in out.stdout


def test_buy_without_a_secret_says_where_it_looked_and_makes_none(deployment: Deployment, tmp_path: Path) -> None:
    out = _buy(deployment, tmp_path, uid("buyer"), "us-usd-700")
    flat = " ".join(out.stderr.split())
    assert out.returncode == 1 and out.stdout == "", out.stdout + out.stderr
    assert f"no {tmp_path / 'dev-webhook-secret'}" in flat and "Traceback" not in out.stdout + out.stderr
    assert not (tmp_path / "dev-webhook-secret").exists()


def test_buy_of_an_unknown_package_names_its_region_s_packages(deployment: Deployment, tmp_path: Path) -> None:
    out = _buy(deployment, tmp_path, uid("buyer"), "gb-gbp-1", "--webhook-secret", deployment.webhook_secret or "x")
    flat = " ".join(out.stderr.split())
    assert out.returncode == 1 and out.stdout == "", out.stdout + out.stderr
    assert "unknown package gb-gbp-1" in flat and "packages of region GB:" in flat and "gb-gbp-660" in flat


def test_buy_with_json_prints_the_purchase_the_wallet_credited_and_the_balance(
    deployment: Deployment, tmp_path: Path
) -> None:
    import json

    if not deployment.webhook_secret:
        pytest.skip("the deployment's webhook secret is not known")
    user = uid("buyer")
    out = _buy(deployment, tmp_path, user, "gb-gbp-660", "--webhook-secret", deployment.webhook_secret, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    answer = json.loads(out.stdout)
    purchase = answer["purchase"]
    assert purchase["user_id"] == user and purchase["package_id"] == "gb-gbp-660", purchase
    assert (purchase["status"], purchase["payment_method"], purchase["region"]) == ("SUCCEEDED", "CARD", "GB")
    assert purchase["price"]["currency_code"] == "GBP" and purchase["created_at"].endswith("Z"), purchase
    assert answer["balance"] == {"user_id": user, "coins": 660, "debt_coins": 0}, answer
