"""CreatePurchase answers a retry from its stored answer, even after the payment routes changed;
a failure reported after the purchase's outcome is recorded once and changes nothing.

The checkout session is a network call with a deadline (PROVIDER_TIMEOUT_S), made outside the
transaction that writes the purchase: a provider that hangs or fails answers UNAVAILABLE with
nothing written, and the wallet's other work goes on while one is slow.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from livegifts.wallet.v1 import wallet_pb2
from services.common import signing
from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.common.metrics import LATE_PAYMENT_FAILURES
from services.common.provider_calls import ProviderError
from services.wallet.payments import CheckoutSession, DevProvider, dev_event_payload
from services.wallet.storage import common, journal_entries, payment_events, purchases
from services.wallet.usecases import Wallet
from tests.support.wallet import SECRET, buy, spend


async def test_a_retried_purchase_is_answered_after_its_payment_method_lost_its_route(wallet: Wallet) -> None:
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


@pytest.mark.parametrize(
    ("method", "message"),
    [
        (0, "payment_method is required"),
        (99, "payment_method 99 is unknown: one of CARD, PAYPAL, APPLE_PAY, GOOGLE_PAY"),
    ],
)
async def test_a_purchase_without_a_known_payment_method_says_which_it_lacks(
    wallet: Wallet,
    method: int,
    message: str,
) -> None:
    # payment_method=99 (a newer client's method) was answered "payment_method is required".
    req = wallet_pb2.CreatePurchaseRequest(
        user_id="u", package_id="us-usd-70", currency_code="USD", payment_method=method, idempotency_key="buy-1"
    )
    with pytest.raises(InvalidArgument) as refused:
        await wallet.create_purchase(req)
    assert (refused.value.reason, refused.value.message) == ("INVALID_PAYMENT_METHOD", message)


async def _counts(w: Wallet) -> tuple[int, int, int]:
    """(payment events recorded, ledger entries, outbox rows)."""
    async with w.db.unit_of_work(readonly=True) as uow:
        return tuple(  # type: ignore[return-value]
            [
                (await uow.conn.execute(select(func.count()).select_from(t))).scalar_one()
                for t in (payment_events, journal_entries, common.outbox)
            ]
        )


async def test_a_failure_reported_after_the_success_is_recorded_once_counted_once_and_posts_nothing(
    wallet: Wallet,
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


# ---- a payment provider that is slow, hangs or fails -----------------------------------------

DEADLINE_S = 0.2  # PROVIDER_TIMEOUT_S in these tests: a checkout that hangs ends this soon
GUARD_S = 30.0  # only so that a deadlock fails the test instead of hanging it; never reached


class StuckProvider(DevProvider):
    """The development provider whose checkouts, while `stuck`, hang (`hang`: until `gate` is set)
    or fail (`fail`); `opened` lists the sessions it opened, and `arrived` is set once `expected`
    calls have started."""

    def __init__(self, how: str = "hang", expected: int = 1) -> None:
        super().__init__(SECRET, 300)
        self.how = how
        self.stuck = True
        self.gate = asyncio.Event()
        self.expected = expected
        self.entered = 0
        self.arrived = asyncio.Event()
        self.opened: list[str] = []

    async def create_checkout(
        self, purchase_id: str, amount_minor: int, currency_code: str, method: str
    ) -> CheckoutSession:
        self.entered += 1
        if self.entered >= self.expected:
            self.arrived.set()
        if self.stuck:
            if self.how == "fail":
                raise ProviderError("503 from the provider")
            await self.gate.wait()
        session = await super().create_checkout(purchase_id, amount_minor, currency_code, method)
        self.opened.append(session.session_id)
        return session


def stuck_provider(w: Wallet, how: str = "hang", expected: int = 1) -> StuckProvider:
    """Route every method of `w` to a StuckProvider, with the short deadline."""
    provider = StuckProvider(how, expected)
    w.payments.providers["dev"] = provider
    w.settings = w.settings.model_copy(update={"provider_timeout_s": DEADLINE_S})
    return provider


def purchase_request(user: str, key: str) -> wallet_pb2.CreatePurchaseRequest:
    """`user` buys the 70-coin US package by card, under `key`."""
    return wallet_pb2.CreatePurchaseRequest(
        user_id=user,
        package_id="us-usd-70",
        currency_code="USD",
        payment_method=wallet_pb2.PAYMENT_METHOD_CARD,
        idempotency_key=key,
    )


async def _rows(w: Wallet) -> tuple[int, int, int]:
    """(purchases, CreatePurchase's idempotency records, outbox rows)."""
    keys = select(func.count()).select_from(common.idempotency).where(common.idempotency.c.scope == "CreatePurchase")
    async with w.db.unit_of_work(readonly=True) as uow:
        return tuple(  # type: ignore[return-value]
            [
                (await uow.conn.execute(q)).scalar_one()
                for q in (
                    select(func.count()).select_from(purchases),
                    keys,
                    select(func.count()).select_from(common.outbox),
                )
            ]
        )


def checkout_failures(outcome: str) -> float:
    labels = {"provider": "dev", "call": "create_checkout", "outcome": outcome}
    return REGISTRY.get_sample_value("livegifts_provider_call_failures_total", labels) or 0.0


async def until_arrived(provider: StuckProvider, *tasks: asyncio.Task[wallet_pb2.Purchase]) -> None:
    """Wait until the checkouts the provider expects have started, or one of `tasks` ended first."""
    arrived = asyncio.create_task(provider.arrived.wait())
    try:
        await asyncio.wait({arrived, *tasks}, timeout=GUARD_S, return_when=asyncio.FIRST_COMPLETED)
    finally:
        arrived.cancel()


@pytest.mark.parametrize("how,outcome", [("hang", "timeout"), ("fail", "error")])
async def test_a_checkout_that_hangs_or_fails_answers_unavailable_and_writes_nothing(
    wallet: Wallet,
    how: str,
    outcome: str,
) -> None:
    provider = stuck_provider(wallet, how)
    before, counted = await _rows(wallet), checkout_failures(outcome)

    with pytest.raises(Unavailable) as refused:
        await wallet.create_purchase(purchase_request("u", "buy-1"))
    assert refused.value.reason == "PAYMENT_PROVIDER_UNAVAILABLE"
    assert await _rows(wallet) == before  # no purchase, the key not taken, no event
    assert checkout_failures(outcome) == counted + 1

    provider.stuck = False  # the retry with the same key, once the provider answers
    created = await wallet.create_purchase(purchase_request("u", "buy-1"))
    assert created.status == wallet_pb2.PURCHASE_STATUS_PENDING
    assert created.checkout.session_id == f"cs_dev_{created.purchase_id}" == provider.opened[-1]
    assert await wallet.create_purchase(purchase_request("u", "buy-1")) == created


async def test_spends_go_on_while_a_checkout_waits_for_the_provider(wallet: Wallet) -> None:
    await buy(wallet, "viewer")  # 70 coins, bought while the provider answers
    provider = stuck_provider(wallet)
    wallet.settings = wallet.settings.model_copy(update={"provider_timeout_s": 60.0})  # the gate opens first
    buying = asyncio.create_task(wallet.create_purchase(purchase_request("buyer", "buy-1")))
    await until_arrived(provider, buying)
    assert not buying.done(), "CreatePurchase ended before the provider answered"

    # The purchase waiting for the provider holds no pooled connection (so no transaction, and
    # not SQLite's write lock): a spend, a write on the same event loop, commits meanwhile.
    assert wallet.db.engine.pool.checkedout() == 0
    async with asyncio.timeout(GUARD_S):
        await spend(wallet, "viewer", 30)
        assert (await wallet.get_balance("viewer")).coins == 40
    assert not buying.done()

    provider.gate.set()
    async with asyncio.timeout(GUARD_S):
        created = await buying
    assert provider.opened == [created.checkout.session_id] == [f"cs_dev_{created.purchase_id}"]
    async with wallet.db.unit_of_work(readonly=True) as uow:
        row = (await uow.conn.execute(select(purchases).where(purchases.c.user_id == "buyer"))).one()
    assert row.checkout_session_id == created.checkout.session_id  # written with its checkout


async def test_two_first_calls_with_one_key_make_one_purchase_and_answer_it_to_both(wallet: Wallet) -> None:
    provider = stuck_provider(wallet, expected=2)
    wallet.settings = wallet.settings.model_copy(update={"provider_timeout_s": 60.0})  # the gate opens first
    calls = [asyncio.create_task(wallet.create_purchase(purchase_request("buyer", "buy-1"))) for _ in range(2)]
    await until_arrived(provider, *calls)  # both asked the provider: neither had an answer to read
    assert provider.entered == 2 and not any(c.done() for c in calls)
    provider.gate.set()
    async with asyncio.timeout(GUARD_S):
        first, second = await asyncio.gather(*calls)

    assert first == second
    assert (await _rows(wallet))[:2] == (1, 1)  # one purchase, one idempotency record
    assert len(provider.opened) == 2  # the loser's session points to no purchase and is never handed out
    assert first.checkout.session_id in provider.opened


async def test_a_buyer_blocked_while_the_checkout_was_opened_gets_no_purchase(wallet: Wallet) -> None:
    provider = stuck_provider(wallet)
    wallet.settings = wallet.settings.model_copy(update={"provider_timeout_s": 60.0})  # the gate opens first
    buying = asyncio.create_task(wallet.create_purchase(purchase_request("buyer", "buy-1")))
    await until_arrived(provider, buying)
    assert not buying.done(), "CreatePurchase ended before the provider answered"
    await wallet.set_restrictions(
        wallet_pb2.SetAccountRestrictionsRequest(user_id="buyer", blocked=True, idempotency_key="block-1")
    )
    provider.gate.set()

    with pytest.raises(FailedPrecondition) as refused:
        async with asyncio.timeout(GUARD_S):
            await buying
    assert refused.value.reason == "ACCOUNT_BLOCKED"
    assert (await _rows(wallet))[:2] == (0, 0)


# ---- a success for a buyer restricted since the purchase was created -----------------------


@pytest.mark.parametrize(
    ("restriction", "reason"),
    [({"blocked": True}, "ACCOUNT_BLOCKED"), ({"birth_date": "2015-01-01"}, "UNDERAGE")],
)
async def test_a_success_for_a_buyer_restricted_since_checkout_is_credited_logged_and_counted_for_a_refund(
    wallet: Wallet,
    caplog: pytest.LogCaptureFixture,
    restriction: dict,  # type: ignore[type-arg]
    reason: str,
) -> None:
    # The money was taken, so the coins are credited (they cannot be spent); nothing said so, and
    # trust and safety never learned that a minor's or a blocked account's payment needs a refund.
    purchase = await wallet.create_purchase(purchase_request("u", uuid.uuid4().hex))
    await wallet.set_restrictions(
        wallet_pb2.SetAccountRestrictionsRequest(user_id="u", idempotency_key=uuid.uuid4().hex, **restriction)
    )
    counted = REGISTRY.get_sample_value("livegifts_purchases_credited_restricted_total", {"reason": reason}) or 0.0
    payload = dev_event_payload(uuid.uuid4().hex, "payment.succeeded", purchase.purchase_id, 99, "USD")
    request = wallet_pb2.HandlePaymentEventRequest(
        provider="dev", payload=payload, signature=signing.sign(SECRET, payload)
    )
    with caplog.at_level("WARNING", logger="services.wallet.usecases"):
        answer = await wallet.handle_payment_event(request)
        await wallet.handle_payment_event(request)  # the provider's retry: a duplicate, not flagged again
    assert answer.purchase.status == wallet_pb2.PURCHASE_STATUS_SUCCEEDED
    assert (await wallet.get_balance("u")).coins == 70
    flagged = [r for r in caplog.records if "may not buy now" in r.getMessage()]
    assert [(r.purchase_id, r.reason) for r in flagged] == [(purchase.purchase_id, reason)]  # type: ignore[attr-defined]
    assert REGISTRY.get_sample_value("livegifts_purchases_credited_restricted_total", {"reason": reason}) == counted + 1


async def test_a_success_for_a_buyer_who_may_buy_is_not_flagged(
    wallet: Wallet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="services.wallet.usecases"):
        await buy(wallet, "u")
    assert not [r for r in caplog.records if "may not buy now" in r.getMessage()]


# ---- purchases by outcome, for the chargeback rate -------------------------------------------


def outcomes(currency: str = "USD") -> dict[str, float]:
    """livegifts_purchase_outcomes_total of each outcome in `currency`, as this process has it now."""
    return {
        o: REGISTRY.get_sample_value("livegifts_purchase_outcomes_total", {"outcome": o, "currency_code": currency})
        or 0.0
        for o in ("SUCCEEDED", "FAILED", "REFUNDED", "CHARGED_BACK")
    }


async def test_each_purchase_outcome_is_counted_once_per_change_never_per_duplicate_or_late_report(
    wallet: Wallet,
) -> None:
    # Trust and safety had no count of purchases by outcome, so no chargeback rate.
    async def deliver(purchase: wallet_pb2.Purchase, event_type: str) -> None:
        payload = dev_event_payload(uuid.uuid4().hex, event_type, purchase.purchase_id, 99, "USD")
        request = wallet_pb2.HandlePaymentEventRequest(
            provider="dev", payload=payload, signature=signing.sign(SECRET, payload)
        )
        await wallet.handle_payment_event(request)
        assert (await wallet.handle_payment_event(request)).duplicate  # the provider's retry

    before = outcomes()
    kept, disputed, declined_then_paid = [
        await wallet.create_purchase(purchase_request("u", uuid.uuid4().hex)) for _ in range(3)
    ]
    await deliver(kept, "payment.succeeded")
    await deliver(kept, "payment.failed")  # a declined attempt reported late: changes nothing
    await deliver(disputed, "payment.succeeded")
    await deliver(disputed, "charge.dispute.lost")
    await deliver(declined_then_paid, "payment.failed")
    await deliver(declined_then_paid, "payment.succeeded")
    await deliver(declined_then_paid, "charge.refunded")
    after = outcomes()
    assert {o: after[o] - before[o] for o in after} == {
        "SUCCEEDED": 3,
        "FAILED": 1,
        "REFUNDED": 1,
        "CHARGED_BACK": 1,
    }


async def test_a_purchase_outcome_whose_transaction_rolls_back_is_not_counted_until_its_retry_commits(
    wallet: Wallet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    purchase = await wallet.create_purchase(purchase_request("u", uuid.uuid4().hex))
    payload = dev_event_payload(uuid.uuid4().hex, "payment.succeeded", purchase.purchase_id, 99, "USD")
    request = wallet_pb2.HandlePaymentEventRequest(
        provider="dev", payload=payload, signature=signing.sign(SECRET, payload)
    )
    before = outcomes()["SUCCEEDED"]
    add = wallet.outbox.add

    async def failing_add(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("the outbox write failed after the status changed")

    monkeypatch.setattr(wallet.outbox, "add", failing_add)
    with pytest.raises(RuntimeError):
        await wallet.handle_payment_event(request)
    assert outcomes()["SUCCEEDED"] == before  # rolled back: the purchase is still PENDING
    monkeypatch.setattr(wallet.outbox, "add", add)
    assert not (await wallet.handle_payment_event(request)).duplicate  # the provider's retry applies it
    assert outcomes()["SUCCEEDED"] == before + 1
