"""A payment callback is answered OK only for what the wallet recorded: a delivery of a recorded
event id is a duplicate only when it is that event (its purchase, type, amount and currency), and
an error that recorded nothing is never answered as a duplicate."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from livegifts.wallet.v1 import wallet_pb2
from services.common import signing
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.metrics import PROVIDER_EVENT_IDS_REUSED
from services.wallet.payments import dev_event_payload
from services.wallet.storage import common, payment_events
from services.wallet.usecases import Wallet
from tests.support.callbacks import unseen_at_first
from tests.support.wallet import SECRET


async def _purchase(w: Wallet, key: str) -> wallet_pb2.Purchase:
    return await w.create_purchase(
        wallet_pb2.CreatePurchaseRequest(
            user_id="u",
            package_id="us-usd-70",
            currency_code="USD",
            payment_method=wallet_pb2.PAYMENT_METHOD_CARD,
            idempotency_key=key,
        )
    )


def _callback(
    event_id: str, event_type: str, p: wallet_pb2.Purchase, amount: int | None = None, currency: str = "USD"
) -> wallet_pb2.HandlePaymentEventRequest:
    amount = p.price.amount_minor if amount is None else amount
    payload = dev_event_payload(event_id, event_type, p.purchase_id, amount, currency)
    return wallet_pb2.HandlePaymentEventRequest(
        provider="dev", payload=payload, signature=signing.sign(SECRET, payload)
    )


async def _events(w: Wallet) -> int:
    async with w.db.unit_of_work(readonly=True) as uow:
        return (await uow.conn.execute(select(func.count()).select_from(payment_events))).scalar_one()


async def _outbox_rows(w: Wallet) -> int:
    async with w.db.unit_of_work(readonly=True) as uow:
        return (await uow.conn.execute(select(func.count()).select_from(common.outbox))).scalar_one()


async def test_a_refund_under_the_event_id_of_the_success_is_refused_not_answered_as_a_duplicate(
    wallet: Wallet,
) -> None:
    # Was: duplicate=true with the purchase SUCCEEDED, so the provider stopped sending a refund
    # that was never applied (the money back with the buyer, the coins too).
    p = await _purchase(wallet, "buy-1")
    paid = await wallet.handle_payment_event(_callback("evt_1", "payment.succeeded", p))
    reused_before = PROVIDER_EVENT_IDS_REUSED._value.get()
    for _ in range(2):  # refused on every retry
        with pytest.raises(FailedPrecondition) as refused:
            await wallet.handle_payment_event(_callback("evt_1", "charge.refunded", p))
        assert refused.value.reason == "PROVIDER_EVENT_ID_REUSED"
        assert refused.value.metadata == {
            "provider_event_id": "evt_1",
            "purchase_id": p.purchase_id,
            "event_type": "payment.succeeded",
        }
    assert PROVIDER_EVENT_IDS_REUSED._value.get() == reused_before + 2
    assert (await wallet.get_purchase(p.purchase_id)).status == wallet_pb2.PURCHASE_STATUS_SUCCEEDED
    assert (await wallet.get_balance("u")).coins == 70 and await _events(wallet) == 1
    # The id stays the success's: its retry is a duplicate.
    again = await wallet.handle_payment_event(_callback("evt_1", "payment.succeeded", p))
    assert again.duplicate and again.purchase == paid.purchase
    # The refund under an id of its own applies.
    refunded = await wallet.handle_payment_event(_callback("evt_2", "charge.refunded", p))
    assert (refunded.duplicate, refunded.purchase.status) == (False, wallet_pb2.PURCHASE_STATUS_REFUNDED)
    assert (await wallet.get_balance("u")).coins == 0


@pytest.mark.parametrize(("amount", "currency"), [(1, "USD"), (99, "EUR")])
async def test_a_recorded_event_id_sent_with_another_amount_or_currency_is_refused_not_a_duplicate(
    wallet: Wallet,
    amount: int,
    currency: str,
) -> None:
    # Was: duplicate=true, an OK for an amount nothing applied; now refused as the first
    # delivery would have been, with what the callback must carry.
    p = await _purchase(wallet, "buy-1")
    await wallet.handle_payment_event(_callback("evt_1", "payment.succeeded", p))
    with pytest.raises(InvalidArgument) as refused:
        await wallet.handle_payment_event(_callback("evt_1", "payment.succeeded", p, amount, currency))
    assert refused.value.reason == "AMOUNT_MISMATCH"
    assert refused.value.metadata == {"expected_amount_minor": "99", "expected_currency_code": "USD"}
    assert (await wallet.handle_payment_event(_callback("evt_1", "payment.succeeded", p))).duplicate


async def test_a_concurrent_delivery_of_the_id_as_another_type_is_refused_not_a_duplicate(
    wallet: Wallet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The race on PostgreSQL: the look-up saw no record, the insert hit the one a concurrent
    # delivery committed meanwhile (IntegrityError). Was: answered a duplicate whatever its type.
    p = await _purchase(wallet, "buy-1")
    await wallet.handle_payment_event(_callback("evt_1", "payment.succeeded", p))
    looks: list[int] = []
    monkeypatch.setattr(Wallet, "_event_recorded_for", unseen_at_first(Wallet._event_recorded_for, looks))
    with pytest.raises(FailedPrecondition) as refused:
        await wallet.handle_payment_event(_callback("evt_1", "charge.refunded", p))
    assert refused.value.reason == "PROVIDER_EVENT_ID_REUSED" and len(looks) == 2
    assert (await wallet.get_purchase(p.purchase_id)).status == wallet_pb2.PURCHASE_STATUS_SUCCEEDED


async def test_an_integrity_error_that_recorded_no_event_is_not_answered_ok(
    wallet: Wallet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Was: any IntegrityError was taken for a concurrent delivery's event id and answered
    # duplicate=true, although nothing was recorded: the provider stopped, the coins never came.
    p = await _purchase(wallet, "buy-1")
    add = wallet.outbox.add

    async def failing_add(*args: Any, **kwargs: Any) -> None:
        raise IntegrityError("INSERT INTO outbox", {}, Exception("UNIQUE constraint failed: outbox.event_id"))

    monkeypatch.setattr(wallet.outbox, "add", failing_add)
    with pytest.raises(IntegrityError):
        await wallet.handle_payment_event(_callback("evt_1", "payment.succeeded", p))
    assert (await wallet.get_purchase(p.purchase_id)).status == wallet_pb2.PURCHASE_STATUS_PENDING
    assert await _events(wallet) == 0
    monkeypatch.setattr(wallet.outbox, "add", add)
    retried = await wallet.handle_payment_event(_callback("evt_1", "payment.succeeded", p))  # the provider's retry
    assert (retried.duplicate, retried.purchase.status) == (False, wallet_pb2.PURCHASE_STATUS_SUCCEEDED)
    assert (await wallet.get_balance("u")).coins == 70


async def test_a_success_under_a_new_event_id_once_one_was_applied_is_a_duplicate_that_records_nothing(
    wallet: Wallet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Was: INVALID_TRANSITION on every retry, though it is the provider's own callback of the
    # success a look-up applied under another id (payout answers PAID after PAID as a duplicate).
    caplog.set_level(logging.INFO, logger="services.wallet.usecases")
    p = await _purchase(wallet, "buy-1")
    await wallet.handle_payment_event(_callback("evt_lookup", "payment.succeeded", p))
    outbox_before = await _outbox_rows(wallet)
    for _ in range(2):  # the callback and its retry
        again = await wallet.handle_payment_event(_callback("evt_webhook", "payment.succeeded", p))
        assert (again.duplicate, again.purchase.status) == (True, wallet_pb2.PURCHASE_STATUS_SUCCEEDED)
    assert (await wallet.get_balance("u")).coins == 70
    assert await _events(wallet) == 1 and await _outbox_rows(wallet) == outbox_before
    # Nothing recorded, but not silent: a second charge at the provider would look just like it.
    repeats = [r for r in caplog.records if "reported again under another event id" in r.getMessage()]
    assert [(r.purchase_id, r.provider_event_id) for r in repeats] == [(p.purchase_id, "evt_webhook")] * 2
    with pytest.raises(InvalidArgument) as refused:  # another amount is no repeat of it
        await wallet.handle_payment_event(_callback("evt_other", "payment.succeeded", p, 98))
    assert refused.value.reason == "AMOUNT_MISMATCH"
    # A failed purchase's success still credits it.
    f = await _purchase(wallet, "buy-2")
    await wallet.handle_payment_event(_callback("evt_declined", "payment.failed", f))
    paid = await wallet.handle_payment_event(_callback("evt_paid", "payment.succeeded", f))
    assert (paid.duplicate, paid.purchase.status) == (False, wallet_pb2.PURCHASE_STATUS_SUCCEEDED)
    assert (await wallet.get_balance("u")).coins == 140


def _repeated(outcome: str) -> float:
    return REGISTRY.get_sample_value("livegifts_provider_outcomes_repeated_total", {"outcome": outcome}) or 0.0


async def test_a_success_reported_again_under_another_event_id_is_counted_and_its_own_redelivery_is_not(
    wallet: Wallet,
) -> None:
    # Answered as a duplicate and only logged at INFO, a second charge at the provider for the one
    # purchase looked like the look-up/webhook pair it usually is: nothing to graph or alert on.
    before = _repeated("SUCCEEDED")
    p = await _purchase(wallet, "buy-1")
    await wallet.handle_payment_event(_callback("evt_lookup", "payment.succeeded", p))
    assert (await wallet.handle_payment_event(_callback("evt_lookup", "payment.succeeded", p))).duplicate
    assert _repeated("SUCCEEDED") == before, "the applied event delivered again is no repeated outcome"
    assert (await wallet.handle_payment_event(_callback("evt_webhook", "payment.succeeded", p))).duplicate
    assert _repeated("SUCCEEDED") == before + 1
    # A failure reported after it changes nothing and is counted as a late failure, not here.
    await wallet.handle_payment_event(_callback("evt_declined", "payment.failed", p))
    assert _repeated("SUCCEEDED") == before + 1
