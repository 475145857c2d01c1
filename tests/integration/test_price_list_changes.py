"""An operator changes coin packages and promotions while purchases are open, on SQLite and PostgreSQL.

A purchase is priced and its coins frozen when it is created: the provider's callback must carry
that price (not the package's current one), and a success credits the coins of the purchase as
created, bonus included; a refund or chargeback takes back exactly those. A promotion's window is
[starts_at, ends_at): it applies at its start and no longer at its end; of overlapping ones, the
one that started last applies.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from livegifts.wallet.v1 import wallet_pb2
from services.common import signing
from services.wallet.payments import dev_event_payload
from services.wallet.usecases import Wallet
from tests.integration.helpers import domain_reason
from tests.support.wallet import SECRET, reversal_of, wallet_on

T0 = 1_800_000_000_000_000  # 2027-01-15, microseconds
OPERATOR = "ops-bob"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


@pytest.fixture
async def wallet(empty_database: str) -> AsyncIterator[Wallet]:
    async with wallet_on(empty_database, "price-list", clock=Clock()) as w:
        yield w


def _ts(us: int) -> Timestamp:
    return Timestamp(seconds=us // 1_000_000, nanos=us % 1_000_000 * 1000)


async def _package(
    w: Wallet, coins: int, price_minor: int, currency: str = "USD", key: str = ""
) -> wallet_pb2.CoinPackage:
    req = wallet_pb2.UpsertCoinPackageRequest(
        package_id="pk",
        region="US",
        currency_code=currency,
        coins=coins,
        price_minor=price_minor,
        active=True,
        idempotency_key=key or uuid.uuid4().hex,
    )
    return await w.upsert_package(req, OPERATOR)


async def _promotion(w: Wallet, pid: str, start: int, end: int, bonus: int = 0, discount: int = 0) -> None:
    promo = wallet_pb2.Promotion(
        promotion_id=pid,
        package_id="pk",
        bonus_coins=bonus,
        discount_bps=discount,
        starts_at=_ts(start),
        ends_at=_ts(end),
        active=True,
    )
    await w.upsert_promotion(
        wallet_pb2.UpsertPromotionRequest(promotion=promo, idempotency_key=uuid.uuid4().hex), OPERATOR
    )


async def _buy(w: Wallet, user: str = "v") -> wallet_pb2.Purchase:
    req = wallet_pb2.CreatePurchaseRequest(
        user_id=user,
        package_id="pk",
        currency_code="USD",
        payment_method=wallet_pb2.PAYMENT_METHOD_PAYPAL,
        idempotency_key=uuid.uuid4().hex,
    )
    return await w.create_purchase(req)


async def _pay(w: Wallet, purchase_id: str, amount_minor: int, event_type: str = "payment.succeeded") -> Any:
    payload = dev_event_payload(uuid.uuid4().hex, event_type, purchase_id, amount_minor, "USD")
    return await w.handle_payment_event(
        wallet_pb2.HandlePaymentEventRequest(provider="dev", payload=payload, signature=signing.sign(SECRET, payload))
    )


async def test_a_pending_purchase_keeps_the_price_and_coins_it_was_created_with(wallet: Wallet) -> None:
    clock: Clock = wallet.clock  # type: ignore[assignment]
    await _package(wallet, coins=100, price_minor=199)
    await _promotion(wallet, "bonus", T0 - 10, T0 + 1_000_000, bonus=20)
    purchase = await _buy(wallet)
    assert (purchase.coins, purchase.price.amount_minor) == (120, 199)

    # The operator reprices the package and ends the promotion while the buyer is at the provider.
    await _package(wallet, coins=50, price_minor=999)
    await _promotion(wallet, "bonus", T0 - 10, T0 + 1, bonus=5)
    clock.now = T0 + 2_000_000
    # A callback at the package's new price is not this purchase's: refused, nothing credited.
    assert await domain_reason(_pay(wallet, purchase.purchase_id, 999)) == "AMOUNT_MISMATCH"
    assert (await wallet.get_balance("v")).coins == 0
    done = await _pay(wallet, purchase.purchase_id, 199)
    assert done.purchase.coins == 120
    assert (await wallet.get_balance("v")).coins == 120

    # A refund takes back the coins of the purchase as created, bonus included.
    await _pay(wallet, purchase.purchase_id, 199, "charge.refunded")
    assert (await wallet.get_balance("v")).coins == 0
    assert (await reversal_of(wallet, purchase.purchase_id)).coins == 120


async def test_a_promotions_window_includes_its_start_and_excludes_its_end(wallet: Wallet) -> None:
    clock: Clock = wallet.clock  # type: ignore[assignment]
    await _package(wallet, coins=100, price_minor=199)
    await _promotion(wallet, "p", T0 + 10, T0 + 20, bonus=7)
    seen = {}
    for at in (T0 + 9, T0 + 10, T0 + 19, T0 + 20):
        clock.now = at
        listed = await wallet.list_packages(wallet_pb2.ListCoinPackagesRequest(region="US", currency_code="USD"))
        (pkg,) = [p for p in listed.packages if p.package_id == "pk"]
        seen[at - T0] = (pkg.total_coins, (await _buy(wallet)).coins)
    assert seen == {9: (100, 100), 10: (107, 107), 19: (107, 107), 20: (100, 100)}


async def test_of_overlapping_promotions_the_one_that_started_last_applies(wallet: Wallet) -> None:
    clock: Clock = wallet.clock  # type: ignore[assignment]
    await _package(wallet, coins=100, price_minor=1000)
    await _promotion(wallet, "long", T0, T0 + 100, bonus=50)
    await _promotion(wallet, "short", T0 + 10, T0 + 20, discount=1000)
    clock.now = T0 + 15
    p = await _buy(wallet)
    assert (p.coins, p.price.amount_minor) == (100, 900)
    clock.now = T0 + 25
    p = await _buy(wallet)
    assert (p.coins, p.price.amount_minor) == (150, 1000)


async def test_a_packages_currency_cannot_change_under_its_id(wallet: Wallet) -> None:
    await _package(wallet, coins=100, price_minor=199)
    assert await domain_reason(_package(wallet, coins=100, price_minor=199, currency="JPY")) == "PACKAGE_CURRENCY_FIXED"
    listed = await wallet.list_packages(wallet_pb2.ListCoinPackagesRequest(region="US", currency_code="USD"))
    assert "pk" in {p.package_id for p in listed.packages}
    # A reprice in its own currency goes through.
    assert (await _package(wallet, coins=100, price_minor=299)).list_price.amount_minor == 299


@pytest.mark.parametrize(
    ("coins", "price", "reason"),
    [
        (0, 199, "AMOUNT_NOT_POSITIVE"),
        (-1, 199, "AMOUNT_NOT_POSITIVE"),
        (100, 0, "AMOUNT_NOT_POSITIVE"),
        (100, -1, "AMOUNT_NOT_POSITIVE"),
        (2**63 - 1, 199, "AMOUNT_TOO_LARGE"),
        (100, 2**63 - 1, "AMOUNT_TOO_LARGE"),
    ],
)
async def test_a_packages_bad_amounts_are_refused(wallet: Wallet, coins: int, price: int, reason: str) -> None:
    assert await domain_reason(_package(wallet, coins=coins, price_minor=price)) == reason


async def test_each_price_list_change_logs_who_changed_what_from_what(
    wallet: Wallet, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="services.wallet.usecases"):
        await _package(wallet, coins=100, price_minor=199)
        await _package(wallet, coins=100, price_minor=249)
        await _promotion(wallet, "p", T0, T0 + 10, bonus=5)
        await _promotion(wallet, "p", T0, T0 + 20, bonus=5)
    packages = [r.__dict__ for r in caplog.records if r.getMessage() == "coin package upserted"]
    fields = ("operator", "package_id", "added", "changed", "price_minor", "previous_price_minor", "currency_code")
    assert [tuple(line.get(f) for f in fields) for line in packages] == [
        (OPERATOR, "pk", True, "region,currency_code,channel,coins,price_minor,active", 199, None, "USD"),
        (OPERATOR, "pk", False, "price_minor", 249, 199, "USD"),
    ]
    promos = [r.__dict__ for r in caplog.records if r.getMessage() == "promotion upserted"]
    fields = ("operator", "promotion_id", "added", "changed", "ends_at_us", "previous_ends_at_us", "bonus_coins")
    assert [tuple(line.get(f) for f in fields) for line in promos] == [
        (OPERATOR, "p", True, "package_id,bonus_coins,discount_bps,starts_at_us,ends_at_us,active", T0 + 10, None, 5),
        (OPERATOR, "p", False, "ends_at_us", T0 + 20, T0 + 10, 5),
    ]
