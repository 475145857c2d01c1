"""The wallet's reconciler: a purchase PENDING past PURCHASE_RECONCILE_AFTER_S is looked up at its
payment provider, and what the provider reports goes through the callback's own path.

A provider retries a callback for a limited time only; when every delivery fails the buyer's money
is taken and no coins are credited, silently. The look-up credits it once (a later callback of the
same event is a duplicate), fails it, leaves it while the buyer has not paid, and asks again next
round when the provider cannot answer.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import exc as sa_exc
from sqlalchemy import update

from livegifts.wallet.v1 import wallet_pb2
from services.common import signing
from services.common.db import Database
from services.common.migrate import upgrade_head
from services.common.outbox import Outbox
from services.common.provider_calls import ProviderError
from services.common.timeutil import now_us
from services.wallet.config import WalletSettings
from services.wallet.payments import (
    EVENT_TYPES,
    DevProvider,
    PaymentRouter,
    ProviderEvent,
    dev_event_payload,
    dev_payment_event_id,
    parse_routes,
)
from services.wallet.storage import common, purchases
from services.wallet.usecases import Wallet

SECRET = b"reconcile-test-secret"
MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "wallet" / "migrations"
PENDING, SUCCEEDED, FAILED = (
    wallet_pb2.PURCHASE_STATUS_PENDING,
    wallet_pb2.PURCHASE_STATUS_SUCCEEDED,
    wallet_pb2.PURCHASE_STATUS_FAILED,
)


class StandIn(DevProvider):
    """The development provider whose look-ups answer what a test sets per purchase in `report`:
    an event type (under the event id `evt_<purchase id>`), None (not paid yet), "down" (the call
    raises) or "hang" (it never answers); `asked` lists the purchases looked up."""

    def __init__(self) -> None:
        super().__init__(SECRET, 300)
        self.report: dict[str, str | None] = {}
        self.asked: list[str] = []
        self.amount_minor_delta = 0

    async def status(
        self, purchase_id: str, session_id: str, amount_minor: int, currency_code: str
    ) -> ProviderEvent | None:
        self.asked.append(purchase_id)
        what = self.report.get(purchase_id)
        if what == "down":
            raise ProviderError("503 from the provider")
        if what == "hang":
            await asyncio.sleep(3600)
        if what is None:
            return None
        return ProviderEvent(
            f"evt_{purchase_id}",
            what,
            EVENT_TYPES[what],
            purchase_id,
            amount_minor + self.amount_minor_delta,
            currency_code,
        )


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[Wallet, StandIn]]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'wallet.db'}"
    await upgrade_head(MIGRATIONS, url)
    cfg = WalletSettings(
        database_url=url,
        nats_url="nats://127.0.0.1:1",
        payment_webhook_secret=SECRET.decode(),
        # Long enough for a whole fsync'd callback inside a look-up (callback_before_the_look_up) on
        # a loaded machine: at 0.2 s it timed out now and then. A hanging provider waits it out once.
        provider_timeout_s=2.0,
    )
    db = Database(url, pool_size=2, pool_timeout_s=5, application_name="reconcile")
    provider = StandIn()
    try:
        yield (
            Wallet(db, Outbox(common.outbox), PaymentRouter([provider], parse_routes(cfg.payment_routes)), cfg),
            provider,
        )
    finally:
        await db.dispose()


def reconciled(outcome: str) -> float:
    return REGISTRY.get_sample_value("livegifts_purchases_reconciled_total", {"outcome": outcome}) or 0.0


def status_failures(outcome: str) -> float:
    labels = {"provider": "dev", "call": "status", "outcome": outcome}
    return REGISTRY.get_sample_value("livegifts_provider_call_failures_total", labels) or 0.0


def late(w: Wallet) -> int:
    """A time (microseconds) by which a purchase created now is late."""
    return now_us() + int((w.settings.purchase_reconcile_after_s + 1) * 1_000_000)


async def unpaid(w: Wallet, user: str) -> wallet_pb2.Purchase:
    """A purchase whose callback never came."""
    return await w.create_purchase(
        wallet_pb2.CreatePurchaseRequest(
            user_id=user,
            package_id="us-usd-70",
            currency_code="USD",
            payment_method=wallet_pb2.PAYMENT_METHOD_CARD,
            idempotency_key=uuid.uuid4().hex,
        )
    )


async def callback(
    w: Wallet, p: wallet_pb2.Purchase, event_id: str, event_type: str
) -> wallet_pb2.HandlePaymentEventResponse:
    payload = dev_event_payload(event_id, event_type, p.purchase_id, p.price.amount_minor, p.price.currency_code)
    return await w.handle_payment_event(
        wallet_pb2.HandlePaymentEventRequest(provider="dev", payload=payload, signature=signing.sign(SECRET, payload))
    )


def callback_before_the_look_up(w: Wallet, provider: StandIn, p: wallet_pb2.Purchase, event_type: str) -> None:
    """The purchase's callback (`event_type` under the event id `evt_callback`) lands between the
    reconciler's read and its look-up at `provider`."""
    ask = provider.status

    async def callback_first(*args: object) -> ProviderEvent | None:
        await callback(w, p, "evt_callback", event_type)
        return await ask(*args)  # type: ignore[arg-type]

    provider.status = callback_first  # type: ignore[method-assign]


async def test_a_success_whose_callback_never_came_is_credited_once_and_its_late_callback_is_a_duplicate(
    env: tuple[Wallet, StandIn],
) -> None:
    w, provider = env
    p = await unpaid(w, "ann")
    provider.report[p.purchase_id] = "payment.succeeded"
    assert await w.reconcile_once() == 0  # not late yet: the provider is not asked
    assert provider.asked == []

    before = reconciled("succeeded")
    assert await w.reconcile_once(now=late(w)) == 1
    assert (await w.get_purchase(p.purchase_id)).status == SUCCEEDED
    assert (await w.get_balance("ann")).coins == 70
    assert reconciled("succeeded") == before + 1

    # The provider's callback of the same event arrives after all: applied once, not twice.
    answer = await callback(w, p, f"evt_{p.purchase_id}", "payment.succeeded")
    assert answer.duplicate
    assert (await w.get_balance("ann")).coins == 70
    assert await w.reconcile_once(now=late(w)) == 0  # nothing PENDING is left to ask about
    assert provider.asked == [p.purchase_id]


async def test_a_failure_whose_callback_never_came_fails_the_purchase_and_credits_nothing(
    env: tuple[Wallet, StandIn],
) -> None:
    w, provider = env
    p = await unpaid(w, "bob")
    provider.report[p.purchase_id] = "payment.failed"
    before = reconciled("failed")
    assert await w.reconcile_once(now=late(w)) == 1
    assert (await w.get_purchase(p.purchase_id)).status == FAILED
    assert (await w.get_balance("bob")).coins == 0
    assert reconciled("failed") == before + 1


async def test_a_checkout_not_paid_yet_stays_pending_and_is_asked_about_again(env: tuple[Wallet, StandIn]) -> None:
    w, provider = env
    p = await unpaid(w, "cid")
    before = reconciled("still_pending")
    assert await w.reconcile_once(now=late(w)) == 0
    assert await w.reconcile_once(now=late(w)) == 0
    assert (await w.get_purchase(p.purchase_id)).status == PENDING
    assert (await w.get_balance("cid")).coins == 0
    assert reconciled("still_pending") == before + 2
    assert provider.asked == [p.purchase_id, p.purchase_id]


@pytest.mark.parametrize(("how", "failure"), [("down", "error"), ("hang", "timeout")])
async def test_a_provider_that_cannot_answer_is_counted_and_asked_again_next_round(
    env: tuple[Wallet, StandIn], how: str, failure: str
) -> None:
    w, provider = env
    stuck, other = await unpaid(w, "dee"), await unpaid(w, "eve")
    provider.report[stuck.purchase_id] = how
    provider.report[other.purchase_id] = "payment.succeeded"
    counted, failures = reconciled("provider_error"), status_failures(failure)
    assert await w.reconcile_once(now=late(w)) == 1  # the rest of the round goes on
    assert (await w.get_purchase(stuck.purchase_id)).status == PENDING
    assert (await w.get_balance("eve")).coins == 70
    assert (reconciled("provider_error"), status_failures(failure)) == (counted + 1, failures + 1)

    provider.report[stuck.purchase_id] = "payment.succeeded"  # the provider is back
    assert await w.reconcile_once(now=late(w)) == 1
    assert (await w.get_balance("dee")).coins == 70


async def test_an_answer_whose_amount_differs_is_refused_and_the_purchase_stays_pending(
    env: tuple[Wallet, StandIn],
) -> None:
    w, provider = env
    p = await unpaid(w, "fay")
    provider.report[p.purchase_id] = "payment.succeeded"
    provider.amount_minor_delta = 1  # the callback's amount check applies to a look-up too
    before = reconciled("refused")
    assert await w.reconcile_once(now=late(w)) == 0
    assert (await w.get_purchase(p.purchase_id)).status == PENDING
    assert (await w.get_balance("fay")).coins == 0
    assert reconciled("refused") == before + 1


async def test_a_success_a_callback_applied_under_another_event_id_is_counted_a_duplicate(
    env: tuple[Wallet, StandIn],
) -> None:
    # Was: INVALID_TRANSITION (SUCCEEDED -> SUCCEEDED), counted settled_meanwhile; the same
    # success under another event id is a duplicate now, as payout counts a PAID after PAID.
    w, provider = env
    p = await unpaid(w, "gus")
    provider.report[p.purchase_id] = "payment.succeeded"
    callback_before_the_look_up(w, provider, p, "payment.succeeded")
    before = reconciled("duplicate"), reconciled("settled_meanwhile")
    assert await w.reconcile_once(now=late(w)) == 0
    assert (await w.get_balance("gus")).coins == 70
    assert (reconciled("duplicate"), reconciled("settled_meanwhile")) == (before[0] + 1, before[1])


async def test_an_answer_refused_for_a_purchase_a_callback_settled_meanwhile_is_counted_settled_meanwhile(
    env: tuple[Wallet, StandIn],
) -> None:
    w, provider = env
    p = await unpaid(w, "gil")
    provider.report[p.purchase_id] = "payment.succeeded"
    provider.amount_minor_delta = 1  # refused AMOUNT_MISMATCH, but the purchase no longer waits for it
    callback_before_the_look_up(w, provider, p, "payment.succeeded")
    before = reconciled("settled_meanwhile"), reconciled("refused")
    assert await w.reconcile_once(now=late(w)) == 0
    assert (await w.get_balance("gil")).coins == 70
    assert (reconciled("settled_meanwhile"), reconciled("refused")) == (before[0] + 1, before[1])


async def test_a_failure_looked_up_for_a_purchase_a_callback_credited_meanwhile_is_counted_settled_meanwhile(
    env: tuple[Wallet, StandIn],
) -> None:
    # Was: counted "failed" and logged "late purchase settled from the provider's record", though
    # the failure changed nothing (accepted without effect: the purchase stays SUCCEEDED).
    w, provider = env
    p = await unpaid(w, "hal")
    provider.report[p.purchase_id] = "payment.failed"  # a declined first card, looked up late
    callback_before_the_look_up(w, provider, p, "payment.succeeded")  # the second card's success
    before = reconciled("settled_meanwhile"), reconciled("failed")
    assert await w.reconcile_once(now=late(w)) == 0
    assert (await w.get_purchase(p.purchase_id)).status == SUCCEEDED
    assert (await w.get_balance("hal")).coins == 70
    assert (reconciled("settled_meanwhile"), reconciled("failed")) == (before[0] + 1, before[1])


async def test_a_failure_looked_up_for_a_purchase_a_callback_failed_meanwhile_is_counted_settled_meanwhile(
    env: tuple[Wallet, StandIn],
) -> None:
    # Was: counted "failed" (the purchase's status, FAILED, is the answer's) and logged "late
    # purchase settled from the provider's record", though the callback had failed it and the
    # look-up's failure, under another event id, was accepted without effect.
    w, provider = env
    p = await unpaid(w, "hank")
    provider.report[p.purchase_id] = "payment.failed"
    callback_before_the_look_up(w, provider, p, "payment.failed")  # the provider's own callback
    before = reconciled("settled_meanwhile"), reconciled("failed")
    assert await w.reconcile_once(now=late(w)) == 0
    assert (await w.get_purchase(p.purchase_id)).status == FAILED
    assert (reconciled("settled_meanwhile"), reconciled("failed")) == (before[0] + 1, before[1])


async def test_a_full_batch_of_unpaid_checkouts_does_not_keep_the_reconciler_from_later_ones(
    env: tuple[Wallet, StandIn],
) -> None:
    w, provider = env
    w.settings = w.settings.model_copy(update={"purchase_reconcile_batch_size_max": 2})
    first, second, third = [await unpaid(w, f"u{i}") for i in range(3)]
    # Created one after another, oldest first (the clock may not move between two creations).
    for i, p in enumerate((first, second, third)):
        async with w.db.unit_of_work() as uow:
            await uow.conn.execute(
                update(purchases).where(purchases.c.purchase_id == p.purchase_id).values(created_at_us=now_us() + i)
            )
            await uow.commit()
    provider.report[third.purchase_id] = "payment.succeeded"
    assert await w.reconcile_once(now=late(w)) == 0  # the two oldest, still unpaid
    assert await w.reconcile_once(now=late(w)) == 1  # the next round goes on after them
    assert provider.asked == [first.purchase_id, second.purchase_id, third.purchase_id]
    assert await w.reconcile_once(now=late(w)) == 0  # and then starts again from the oldest
    assert provider.asked[3:] == [first.purchase_id, second.purchase_id]


async def test_the_development_provider_reports_a_checkout_it_opened_as_paid_under_the_clis_event_id() -> None:
    dev = DevProvider(SECRET, 300, settles_checkouts=True)  # a dev suite's (`livegifts run`)
    event = await dev.status("p1", "cs_dev_p1", 700, "USD")
    assert event is not None
    assert (event.provider_event_id, event.event_type, event.amount_minor, event.currency_code) == (
        dev_payment_event_id("p1"),
        "payment.succeeded",
        700,
        "USD",
    )
    assert await dev.status("p1", "cs_other_p1", 700, "USD") is None  # not a checkout it opened


async def test_the_development_provider_as_deployed_makes_up_no_payment() -> None:
    # The manifests deploy this adapter with a real webhook secret: only a signed callback says
    # money arrived. A look-up that reported every checkout it opened as paid credited, after
    # PURCHASE_RECONCILE_AFTER_S, each checkout a buyer opened and never paid: free coins.
    settings = WalletSettings(
        database_url="sqlite+aiosqlite://", nats_url="nats://127.0.0.1:1", payment_webhook_secret="s" * 32
    )
    dev = DevProvider(SECRET, 300, settles_checkouts=settings.dev_provider_settles_checkouts)
    assert await dev.status("p1", "cs_dev_p1", 700, "USD") is None
    assert await DevProvider(SECRET, 300).status("p1", "cs_dev_p1", 700, "USD") is None


async def test_the_reconciler_is_off_at_zero(env: tuple[Wallet, StandIn]) -> None:
    w, provider = env
    # At 0 every PENDING purchase would be late at once: none is asked about.
    w.settings = w.settings.model_copy(update={"purchase_reconcile_after_s": 0.0})
    await unpaid(w, "hal")
    stop = asyncio.Event()
    running = asyncio.create_task(w.reconciler(stop))
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.wait_for(running, 5)
    assert provider.asked == []


async def _oldest_first(w: Wallet, users: list[str]) -> list[wallet_pb2.Purchase]:
    """Unpaid purchases of `users`, created one after another, oldest first."""
    made = [await unpaid(w, u) for u in users]
    for i, p in enumerate(made):
        async with w.db.unit_of_work() as uow:
            await uow.conn.execute(
                update(purchases).where(purchases.c.purchase_id == p.purchase_id).values(created_at_us=now_us() + i)
            )
            await uow.commit()
    return made


async def test_a_purchase_whose_outcome_always_fails_to_apply_keeps_no_other_from_being_settled(
    env: tuple[Wallet, StandIn], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Applying one purchase's outcome raised an error of its own (a bug, a constraint it breaks),
    # not a domain error: the round ended there, after the cursor had moved past its batch. The
    # same purchases came in the same batches each pass, so the one after it in its batch was
    # never looked up, however long it waited: a buyer who paid and never got the coins.
    w, provider = env
    w.settings = w.settings.model_copy(update={"purchase_reconcile_batch_size_max": 2})
    broken, paid, later = await _oldest_first(w, ["hal", "ida", "jon"])
    for p in (broken, paid, later):
        provider.report[p.purchase_id] = "payment.succeeded"
    apply = w._apply_reported

    async def fails_for_one(prov: object, event: ProviderEvent) -> object:
        if event.purchase_id == broken.purchase_id:
            raise ValueError("a bug met by this purchase's outcome")
        return await apply(prov, event)  # type: ignore[arg-type]

    monkeypatch.setattr(w, "_apply_reported", fails_for_one)
    errors = reconciled("error")
    with caplog.at_level(logging.WARNING):
        # A pass of two rounds, and the first of the next; none raises for the broken one.
        settled = [await w.reconcile_once(now=late(w)) for _ in range(3)]
    assert settled == [1, 1, 0], settled  # paid with the broken one, later, then the broken one alone
    assert (await w.get_balance("ida")).coins == 70
    assert (await w.get_balance("jon")).coins == 70
    assert (await w.get_purchase(broken.purchase_id)).status == PENDING
    assert reconciled("error") == errors + 2, "the broken one counted each time it was asked"
    lines = [r for r in caplog.records if r.getMessage().startswith("a late purchase could not be reconciled")]
    # Once: the next failures of the same purchase within 30 s are counted on its next line.
    assert [r.purchase_id for r in lines] == [broken.purchase_id]  # type: ignore[attr-defined]


async def test_a_round_the_database_fails_midway_starts_the_next_from_the_purchase_it_failed_at(
    env: tuple[Wallet, StandIn], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The database went while a round applied its batch's second outcome: the round ends (every
    # purchase would fail alike), but its cursor had moved past the batch, so the next round
    # began after it and the purchase it failed at waited for the next pass over every late one.
    w, provider = env
    w.settings = w.settings.model_copy(update={"purchase_reconcile_batch_size_max": 2})
    first, second, third = await _oldest_first(w, ["kim", "lou", "max"])
    for p in (first, second, third):
        provider.report[p.purchase_id] = "payment.succeeded"
    apply = w._apply_reported
    outage = [second.purchase_id]

    async def database_gone_once(prov: object, event: ProviderEvent) -> object:
        if event.purchase_id in outage:
            outage.clear()
            raise sa_exc.OperationalError("UPDATE purchases", {}, Exception("could not connect to server"))
        return await apply(prov, event)  # type: ignore[arg-type]

    monkeypatch.setattr(w, "_apply_reported", database_gone_once)
    with pytest.raises(sa_exc.OperationalError):
        await w.reconcile_once(now=late(w))
    assert await w.reconcile_once(now=late(w)) == 2  # the one it failed at, then the next
    assert provider.asked == [first.purchase_id, second.purchase_id, second.purchase_id, third.purchase_id]
    assert (await w.get_balance("lou")).coins == 70


async def test_a_reconciler_stopped_mid_round_asks_the_provider_about_no_purchase_after_the_one_in_hand(
    env: tuple[Wallet, StandIn],
) -> None:
    # A SIGTERM during a round: the loop finishes its round within the shutdown grace, and the
    # round went on looking up each late purchase of its batch, up to PROVIDER_TIMEOUT_S each
    # against a slow provider, and was cancelled in the middle of one. The look-up under way
    # finishes; the rest wait for the next round (the next process's), from the first left.
    w, provider = env
    first, *rest = await _oldest_first(w, ["ned", "oli", "pam"])
    for p in (first, *rest):
        provider.report[p.purchase_id] = "payment.succeeded"
    stop = asyncio.Event()
    ask = provider.status

    async def stopped_meanwhile(*args: object) -> ProviderEvent | None:
        stop.set()  # the SIGTERM lands while the first is looked up
        return await ask(*args)  # type: ignore[arg-type]

    provider.status = stopped_meanwhile  # type: ignore[method-assign]
    at = late(w)
    w.clock = lambda: at
    await asyncio.wait_for(w.reconciler(stop), 10)
    assert provider.asked == [first.purchase_id]
    assert (await w.get_purchase(first.purchase_id)).status == SUCCEEDED
    assert [(await w.get_purchase(p.purchase_id)).status for p in rest] == [PENDING, PENDING]
    assert await w.reconcile_once(now=at) == 2
    assert provider.asked == [p.purchase_id for p in (first, *rest)]
