"""A spend batch PostgreSQL aborts (deadlock, serialization failure) is run again, and counted.

The lock order leaves no known deadlock, so the retry is a safety net an operator must see
fire: `livegifts_transaction_retries_total{operation="wallet_spend",reason}` and a log line.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy.exc import DBAPIError

from livegifts.wallet.v1 import wallet_pb2
from services.wallet.usecases import Wallet
from tests.unit.test_wallet_reversals import buy, wallet  # noqa: F401 - wallet is the fixture


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
    wallet: Wallet,  # noqa: F811
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
