"""Rotating a webhook secret on our side: *_WEBHOOK_SECRET_PREVIOUS keeps the old one accepted.

A suite of its own (SQLite), started with a previous secret beside the current one on the wallet
and payout: callbacks signed with either verify, any other is UNAUTHENTICATED.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from livegifts.payout.v1 import payout_pb2, payout_pb2_grpc
from livegifts.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from services.cli.suite import Suite
from services.common import signing
from services.payout.providers import dev_payout_payload
from tests.integration.conftest import WEBHOOK_SECRET, suite_config
from tests.integration.helpers import expect_error, signed_callback, uid

PREVIOUS = "the-secret-before-the-rotation"


@pytest.fixture(scope="module")
def rotating(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    var = tmp_path_factory.mktemp("rotating")
    extra = {
        "wallet": {"LIVEGIFTS_WALLET_PAYMENT_WEBHOOK_SECRET_PREVIOUS": PREVIOUS},
        "payout": {"LIVEGIFTS_PAYOUT_PAYOUT_WEBHOOK_SECRET_PREVIOUS": PREVIOUS},
    }
    suite = Suite(suite_config(var, {}, extra))
    try:
        suite.start()
        yield suite
    finally:
        suite.stop()


async def test_callbacks_signed_with_the_previous_or_the_current_secret_are_applied(rotating: Suite) -> None:
    async with (
        grpc.aio.insecure_channel(rotating.addr("wallet")) as wc,
        grpc.aio.insecure_channel(rotating.addr("payout")) as pc,
    ):
        wallet, payout = wallet_pb2_grpc.WalletServiceStub(wc), payout_pb2_grpc.PayoutServiceStub(pc)
        for secret in (PREVIOUS, WEBHOOK_SECRET):
            purchase = await wallet.CreatePurchase(
                wallet_pb2.CreatePurchaseRequest(
                    user_id=uid("u"),
                    package_id="us-usd-700",
                    currency_code="USD",
                    payment_method=wallet_pb2.PAYMENT_METHOD_CARD,
                    idempotency_key=uid("buy"),
                )
            )
            await expect_error(
                wallet.HandlePaymentEvent(signed_callback("a-third-secret-nobody-has", "payment.succeeded", purchase)),
                grpc.StatusCode.UNAUTHENTICATED,
                "SIGNATURE_INVALID",
            )
            answer = await wallet.HandlePaymentEvent(signed_callback(secret, "payment.succeeded", purchase))
            assert answer.purchase.status == wallet_pb2.PURCHASE_STATUS_SUCCEEDED
            # Payout verifies the signature before it looks the withdrawal up: NOT_FOUND is past it.
            body = dev_payout_payload(uid("evt"), "payout.paid", "wd_unknown", 100, "USD")
            for key, code in (
                (secret, grpc.StatusCode.NOT_FOUND),
                ("a-third-secret-nobody-has", grpc.StatusCode.UNAUTHENTICATED),
            ):
                await expect_error(
                    payout.HandlePayoutEvent(
                        payout_pb2.HandlePayoutEventRequest(
                            provider="dev", payload=body, signature=signing.sign(key.encode(), body)
                        )
                    ),
                    code,
                )
