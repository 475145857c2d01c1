"""CreatePurchase answers a retry from its stored answer, even after the payment routes changed;
a failure reported after the purchase's outcome is recorded once and changes nothing."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select

from livegifts.wallet.v1 import wallet_pb2
from services.common import signing
from services.common.errors import FailedPrecondition
from services.common.metrics import LATE_PAYMENT_FAILURES
from services.wallet.payments import dev_event_payload
from services.wallet.storage import common, journal_entries, payment_events
from services.wallet.usecases import Wallet
from tests.unit.test_wallet_reversals import (
    SECRET,
    buy,
    wallet,  # noqa: F401 - wallet is the fixture
)


async def test_a_retried_purchase_is_answered_after_its_payment_method_lost_its_route(wallet: Wallet) -> None:  # noqa: F811
    req = wallet_pb2.CreatePurchaseRequest(
        user_id="u",
        package_id="us-usd-70",
        currency_code="USD",
        payment_method=wallet_pb2.PAYMENT_METHOD_PAYPAL,
        idempotency_key="buy-1",
    )
    created = await wallet.create_purchase(req)
    wallet.payments.routes.pop("PAYPAL")  # PAYMENT_ROUTES without PayPal, after a restart
    assert await wallet.create_purchase(req) == created
    other = wallet_pb2.CreatePurchaseRequest()
    other.CopyFrom(req)
    other.idempotency_key = "buy-2"
    with pytest.raises(FailedPrecondition) as refused:
        await wallet.create_purchase(other)
    assert refused.value.reason == "PAYMENT_METHOD_UNAVAILABLE"


async def _counts(w: Wallet) -> tuple[int, int, int]:
    """(payment events recorded, ledger entries, outbox rows)."""
    async with w.db.unit_of_work(readonly=True) as uow:
        return tuple(  # type: ignore[return-value]
            [
                (await uow.conn.execute(select(func.count()).select_from(t))).scalar_one()
                for t in (payment_events, journal_entries, common.outbox)
            ]
        )


async def test_a_failure_reported_after_the_success_is_recorded_once_counted_once_and_posts_nothing(  # noqa: F811
    wallet: Wallet,  # noqa: F811
) -> None:
    purchase = await buy(wallet, "u")
    payload = dev_event_payload(
        uuid.uuid4().hex, "payment.failed", purchase.purchase_id, purchase.price.amount_minor, "USD"
    )
    late = wallet_pb2.HandlePaymentEventRequest(
        provider="dev", payload=payload, signature=signing.sign(SECRET, payload)
    )
    events, entries, outbox = await _counts(wallet)
    counted = LATE_PAYMENT_FAILURES.labels(status="SUCCEEDED")._value.get()
    first = await wallet.handle_payment_event(late)
    retry = await wallet.handle_payment_event(late)
    assert (first.duplicate, retry.duplicate) == (False, True)
    assert first.purchase.status == retry.purchase.status == wallet_pb2.PURCHASE_STATUS_SUCCEEDED
    assert await _counts(wallet) == (events + 1, entries, outbox)
    assert LATE_PAYMENT_FAILURES.labels(status="SUCCEEDED")._value.get() == counted + 1
    assert (await wallet.get_balance("u")).coins == 70
