"""A spend batch PostgreSQL aborts (deadlock, serialization failure) is run again, and counted.

The lock order leaves no known deadlock, so the retry is a safety net an operator must see
fire: `livegifts_transaction_retries_total{operation="wallet_spend",reason}` and a log line.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy.exc import DBAPIError

from livegifts.wallet.v1 import wallet_pb2
from services.wallet.usecases import Wallet
from tests.support.wallet import buy

REPO = Path(__file__).resolve().parents[2]


class _PgError(Exception):
    """What asyncpg raises: the SQLSTATE in `sqlstate`."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"SQLSTATE {sqlstate}")
        self.sqlstate = sqlstate


def _retries(reason: str) -> float:
    labels = {"operation": "wallet_spend", "reason": reason}
    return REGISTRY.get_sample_value("livegifts_transaction_retries_total", labels) or 0.0


@pytest.mark.parametrize(("sqlstate", "reason"), [("40P01", "deadlock"), ("40001", "serialization")])
async def test_a_spend_batch_the_database_aborted_once_is_retried_counted_and_logged(
    wallet: Wallet,
    sqlstate: str,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    user = f"u-{uuid.uuid4().hex}"
    await buy(wallet, user)
    real = wallet.spending._transaction
    calls = 0

    async def aborted_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise DBAPIError("UPDATE accounts ...", {}, _PgError(sqlstate))
        return await real(*args, **kwargs)

    wallet.spending._transaction = aborted_once  # type: ignore[method-assign]
    before = _retries(reason)
    with caplog.at_level(logging.WARNING, logger="services.wallet.spending"):
        spent = await wallet.spend(
            wallet_pb2.SpendRequest(
                user_id=user,
                amount=5,
                reason=wallet_pb2.SPEND_REASON_GIFT,
                reference_id="g",
                idempotency_key=uuid.uuid4().hex,
            )
        )
    assert spent.amount == 5 and calls == 2
    assert _retries(reason) == before + 1
    assert [r.__dict__.get("reason") for r in caplog.records if r.getMessage() == "spend batch retried"] == [reason]


def test_spend_retries_are_exported_at_zero_from_the_start(tmp_path: Path) -> None:
    # A series that first appears at 1 shows no increase() in Prometheus, so the first retry in a
    # pod's life would be missed. A fresh process: in this one other tests have made the series.
    code = f"""
from prometheus_client import REGISTRY
from services.common.db import Database
from services.wallet.spending import SpendBatch
db = Database("sqlite+aiosqlite:///{tmp_path / "w.db"}", pool_size=1, pool_timeout_s=1, application_name="t")
SpendBatch(db, 100, 18, {{}}, lambda: 0)
for reason in ("deadlock", "serialization"):
    labels = {{"operation": "wallet_spend", "reason": reason}}
    assert REGISTRY.get_sample_value("livegifts_transaction_retries_total", labels) == 0.0, reason
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "gen")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
