"""CreatePurchase answers a retry from its stored answer, even after the payment routes changed."""

from __future__ import annotations

import pytest

from livegifts.wallet.v1 import wallet_pb2
from services.common.errors import FailedPrecondition
from services.wallet.usecases import Wallet
from tests.unit.test_wallet_reversals import wallet  # noqa: F401 - wallet is the fixture


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
