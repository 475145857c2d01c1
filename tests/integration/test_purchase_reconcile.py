"""A purchase whose callback never came is credited by the running wallet's reconciler, once.

The wallet (on each backend) looks its PENDING purchases up at the development provider after
PURCHASE_RECONCILE_AFTER_S (1 s here); that provider reports a checkout it opened as paid under
the event id `livegifts buy` signs its callback with, so the callback sent afterwards is a
duplicate and the buyer has the package's coins once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from bench.callsplit import read_spans
from livegifts.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from services.cli.suite import Suite
from services.common import signing
from services.wallet.payments import dev_event_payload, dev_payment_event_id
from tests.integration import pg
from tests.integration.conftest import BACKENDS, WEBHOOK_SECRET, suite_config
from tests.integration.helpers import expect_error, uid

SETTLED_WITHIN_S = 30.0  # the reconciler looks every 0.2 s once a purchase is 1 s old


@pytest.fixture(scope="module", params=BACKENDS)
def wallet_addr(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """nats-server and a wallet whose reconciler looks up purchases PENDING for over 1 s."""
    if os.environ.get("LIVEGIFTS_TEST_TARGET_WALLET"):
        pytest.skip("needs the wallet's reconciler settings: not run against an external deployment")
    databases: contextlib.AbstractContextManager[dict[str, str]] = (
        pg.service_databases("lgrecon") if request.param == "postgres" else contextlib.nullcontext({})
    )
    with databases as urls:
        fast = {
            "wallet": {
                "LIVEGIFTS_WALLET_PURCHASE_RECONCILE_AFTER_S": "1",
                "LIVEGIFTS_WALLET_PURCHASE_RECONCILE_INTERVAL_S": "0.2",
            }
        }
        suite = Suite(suite_config(tmp_path_factory.mktemp(f"reconcile-{request.param}"), urls, fast))
        try:
            suite.start_nats()
            suite.start_service("wallet")
            yield suite.addr("wallet")
        finally:
            suite.stop()


async def _card_checkout(wallet: wallet_pb2_grpc.WalletServiceStub, buyer: str) -> wallet_pb2.Purchase:
    """A card checkout of the 70-coin US package whose callback is never sent: it stays PENDING."""
    return await wallet.CreatePurchase(
        wallet_pb2.CreatePurchaseRequest(
            user_id=buyer,
            package_id="us-usd-70",
            currency_code="USD",
            payment_method=wallet_pb2.PAYMENT_METHOD_CARD,
            idempotency_key=uid("buy"),
        ),
        timeout=10,
    )


async def _credited_by_the_reconciler(
    wallet: wallet_pb2_grpc.WalletServiceStub, buyer: str, purchase: wallet_pb2.Purchase
) -> int:
    """Waits for the reconciler to settle `purchase` SUCCEEDED; the buyer's coins, the package's."""
    deadline = time.monotonic() + SETTLED_WITHIN_S
    got = purchase
    while got.status == wallet_pb2.PURCHASE_STATUS_PENDING and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        got = await wallet.GetPurchase(wallet_pb2.GetPurchaseRequest(purchase_id=purchase.purchase_id), timeout=10)
    assert got.status == wallet_pb2.PURCHASE_STATUS_SUCCEEDED
    coins = (await wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=buyer), timeout=10)).coins
    assert coins == purchase.coins > 0
    return coins


def _dev_callback(
    wallet: wallet_pb2_grpc.WalletServiceStub,
    purchase_id: str,
    event_id: str,
    event_type: str,
    amount_minor: int,
    currency_code: str,
) -> Any:
    """The development provider's signed callback of `purchase_id` (the call, to await or expect_error)."""
    payload = dev_event_payload(event_id, event_type, purchase_id, amount_minor, currency_code)
    return wallet.HandlePaymentEvent(
        wallet_pb2.HandlePaymentEventRequest(
            provider="dev", payload=payload, signature=signing.sign(WEBHOOK_SECRET.encode(), payload)
        ),
        timeout=10,
    )


async def test_a_purchase_whose_callback_never_came_is_credited_once_and_its_late_callback_is_a_duplicate(
    wallet_addr: str,
) -> None:
    async with grpc.aio.insecure_channel(wallet_addr) as ch:
        wallet = wallet_pb2_grpc.WalletServiceStub(ch)
        buyer = uid("buyer")
        purchase = await _card_checkout(wallet, buyer)
        assert purchase.status == wallet_pb2.PURCHASE_STATUS_PENDING
        # No callback: the provider gave up on it. The wallet asks the provider itself.
        coins = await _credited_by_the_reconciler(wallet, buyer, purchase)

        # The provider's callback of that payment (as `livegifts buy` sends it) comes after all.
        answer = await _dev_callback(
            wallet,
            purchase.purchase_id,
            dev_payment_event_id(purchase.purchase_id),
            "payment.succeeded",
            purchase.price.amount_minor,
            purchase.price.currency_code,
        )
        assert answer.duplicate
        assert (await wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=buyer), timeout=10)).coins == coins


REPLICA_PURCHASES = 12


async def test_two_replicas_looking_up_the_same_late_purchases_credit_each_once_even_with_one_killed(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Two wallets over one PostgreSQL database (replicas), both reconcilers asking about the same
    late purchases at once (the provider takes 0.3 s a look-up, a round is 0.2 s), the second
    SIGKILLed once the first purchase is credited: each buyer has the package's coins once, and
    each purchase was settled by one look-up (the others are duplicates of its event id)."""
    pg.admin_url_or_skip()
    if os.environ.get("LIVEGIFTS_TEST_TARGET_WALLET"):
        pytest.skip("needs the wallet's reconciler settings: not run against an external deployment")
    fast = {
        "wallet": {
            "LIVEGIFTS_WALLET_PURCHASE_RECONCILE_AFTER_S": "1",
            "LIVEGIFTS_WALLET_PURCHASE_RECONCILE_INTERVAL_S": "0.2",
            "LIVEGIFTS_WALLET_DEV_PROVIDER_LATENCY_S": "0.3",
        }
    }
    with pg.service_databases("lgrecon2") as urls:
        suite = Suite(suite_config(tmp_path_factory.mktemp("reconcile-replicas"), urls, fast))
        try:
            suite.start_nats()
            suite.start_service("wallet")
            suite.start_service("wallet", "wallet-2")
            async with grpc.aio.insecure_channel(suite.addr("wallet")) as ch:
                wallet = wallet_pb2_grpc.WalletServiceStub(ch)
                bought = {}
                for _ in range(REPLICA_PURCHASES):
                    buyer = uid("buyer")
                    bought[buyer] = await _card_checkout(wallet, buyer)
                deadline = time.monotonic() + SETTLED_WITHIN_S
                killed = False
                purchase_ids = {p.purchase_id for p in bought.values()}

                def asked_by_the_second() -> set[str]:
                    # Its traces: one `reconcile purchase` span per purchase it looked up (exported
                    # within 0.2 s of the look-up's end), whatever the outcome.
                    spans = read_spans(suite.config.var_dir / "wallet-2.spans.jsonl")
                    return {
                        s["attributes"]["purchase.id"] for s in spans if s["name"] == "reconcile purchase"
                    } & purchase_ids

                while True:
                    got = [
                        await wallet.GetPurchase(wallet_pb2.GetPurchaseRequest(purchase_id=p.purchase_id), timeout=10)
                        for p in bought.values()
                    ]
                    paid = sum(g.status == wallet_pb2.PURCHASE_STATUS_SUCCEEDED for g in got)
                    if paid and not killed and asked_by_the_second():
                        suite.kill("wallet-2")  # mid-way: the first's reconciler settles the rest
                        killed = True
                    if paid == len(got):
                        break
                    assert time.monotonic() < deadline, f"{paid} of {len(got)} purchases credited"
                    await asyncio.sleep(0.2)
                # Both replicas looked the purchases up: with the second asking none, one alone was tried.
                assert killed, "wallet-2's reconciler looked up none of the late purchases"
                for buyer, purchase in bought.items():
                    coins = (await wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=buyer), timeout=10)).coins
                    assert coins == purchase.coins > 0, f"{buyer}: {coins} coins for one purchase of {purchase.coins}"
            settled: Counter[str] = Counter()
            for name in ("wallet", "wallet-2"):
                for line in (suite.log_dir / f"{name}.log").read_text(errors="replace").splitlines():
                    if '"late purchase settled from the provider\'s record"' in line:
                        settled[json.loads(line)["purchase_id"]] += 1
            # One settled each, or none logged (the killed replica's, if it died before its line).
            assert max(settled.values()) == 1 and len(settled) >= REPLICA_PURCHASES - 1, settled
        finally:
            suite.stop()


async def test_the_providers_own_late_success_under_another_event_id_is_a_duplicate_not_refused(
    wallet_addr: str,
) -> None:
    """A real provider's look-up (a payment intent's status) does not give the id of the webhook
    event it will send: once the reconciler credited the purchase, the provider's own
    `payment.succeeded` arrives under an id of its own. Was: INVALID_TRANSITION on every retry
    (the provider disabling the endpoint, the refused-callbacks alert firing); payout answers a
    PAID withdrawal's PAID under another id as a duplicate. Another amount is still refused."""
    async with grpc.aio.insecure_channel(wallet_addr) as ch:
        wallet = wallet_pb2_grpc.WalletServiceStub(ch)
        buyer = uid("buyer")
        purchase = await _card_checkout(wallet, buyer)
        coins = await _credited_by_the_reconciler(wallet, buyer, purchase)

        def callback(event_id: str, event_type: str, amount_minor: int, currency_code: str = "USD") -> Any:
            return _dev_callback(wallet, purchase.purchase_id, event_id, event_type, amount_minor, currency_code)

        price = purchase.price.amount_minor
        own_id = uid("evt_provider")
        assert own_id != dev_payment_event_id(purchase.purchase_id)
        for _ in range(2):  # and its retries
            answer = await callback(own_id, "payment.succeeded", price)
            assert answer.duplicate and answer.purchase.status == wallet_pb2.PURCHASE_STATUS_SUCCEEDED
            assert (await wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=buyer), timeout=10)).coins == coins
        # Another amount or currency is no repeat of the success applied: still refused.
        for amount, currency in ((price + 1, "USD"), (price, "EUR")):
            other = callback(uid("evt_other"), "payment.succeeded", amount, currency)
            await expect_error(other, grpc.StatusCode.INVALID_ARGUMENT, "AMOUNT_MISMATCH")

        # Refunded, the success it undid comes late again under another id: a duplicate too.
        refund = await callback(uid("evt_refund"), "charge.refunded", price)
        assert refund.purchase.status == wallet_pb2.PURCHASE_STATUS_REFUNDED and not refund.duplicate
        late = await callback(uid("evt_provider"), "payment.succeeded", price)
        assert late.duplicate and late.purchase.status == wallet_pb2.PURCHASE_STATUS_REFUNDED
        assert (await wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=buyer), timeout=10)).coins == 0
