"""Wallet use cases: one transaction each (state change + idempotency record + outbox row)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, and_, case, func, insert, literal, select, text, update
from sqlalchemy.exc import IntegrityError

from livegifts.common.v1 import common_pb2
from livegifts.wallet.v1 import events_pb2, wallet_pb2
from services.common import faults, late_lookups, provider_calls, signing
from services.common.batching import MicroBatcher
from services.common.db import Database, UnitOfWork, insert_ignore
from services.common.errors import (
    INT64_MAX,
    Aborted,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    check,
    require_id,
    require_key,
    require_positive,
    status_for,
)
from services.common.idempotency import IdempotentCall, answers_retry
from services.common.loops import ItemFailures, run_every
from services.common.metrics import (
    LATE_PAYMENT_FAILURES,
    PROVIDER_OUTCOMES_REPEATED,
    PURCHASE_OUTCOMES,
    PURCHASES_CREDITED_RESTRICTED,
    PURCHASES_RECONCILED,
    PURCHASES_SUCCEEDED_AFTER_FAILURE,
)
from services.common.outbox import Outbox, new_event_id
from services.common.telemetry import background_span, change_fields
from services.common.timeutil import now_us, to_timestamp
from services.wallet import domain
from services.wallet.config import WalletSettings
from services.wallet.domain import LimitState, Period, Posting, PromotionTerms, PurchaseStatus
from services.wallet.payments import PaymentProvider, PaymentRouter, ProviderEvent
from services.wallet.spending import CANCELLED, SPENT, SpendBatch, recorded_spends, restrictions_of, users_of
from services.wallet.storage import (
    PENDING_PURCHASES,
    REVERSAL_ENTRIES,
    accounts,
    coin_packages,
    common,
    journal_entries,
    payment_events,
    postings,
    promotions,
    purchases,
    spend_counters,
    spending_limits,
    spends,
    users,
)

log = logging.getLogger(__name__)

PAGE_SIZE_DEFAULT = 50
# Purchases whose coins were credited: kept (SUCCEEDED) or credited and then reversed.
_CREDITED = (
    PurchaseStatus.SUCCEEDED.value,
    PurchaseStatus.REFUNDED.value,
    PurchaseStatus.CHARGED_BACK.value,
)
_REVERSED = (PurchaseStatus.REFUNDED.value, PurchaseStatus.CHARGED_BACK.value)


PAGE_SIZE_MAX = 500
SPEND_MANY_ITEMS_MAX = 500  # items of one SpendMany call
RESTRICTIONS_MANY_IDS_MAX = 500  # ids of one GetAccountRestrictionsMany call
GROUP_COMMIT_SIZE_MAX = 200  # concurrent Spend calls one group-committed transaction takes at most
PROMOTIONS_LIST_MAX = 500
USER, OPERATOR = "USER", "OPERATOR"
_SETTERS = {
    wallet_pb2.LIMIT_SETTER_UNSPECIFIED: USER,
    wallet_pb2.LIMIT_SETTER_USER: USER,
    wallet_pb2.LIMIT_SETTER_OPERATOR: OPERATOR,
}
_PERIOD_FIELDS = {Period.DAY: "daily", Period.WEEK: "weekly", Period.MONTH: "monthly"}

_METHODS = {
    wallet_pb2.PAYMENT_METHOD_CARD: "CARD",
    wallet_pb2.PAYMENT_METHOD_PAYPAL: "PAYPAL",
    wallet_pb2.PAYMENT_METHOD_APPLE_PAY: "APPLE_PAY",
    wallet_pb2.PAYMENT_METHOD_GOOGLE_PAY: "GOOGLE_PAY",
}
_METHOD_ENUM = {v: k for k, v in _METHODS.items()}
_STATUS_ENUM = {s: getattr(wallet_pb2, f"PURCHASE_STATUS_{s.value}") for s in PurchaseStatus}
# The calls the wallet makes to a payment provider (provider_calls), each one's failures counted.
PROVIDER_CALLS = ("create_checkout", "status")
# What came of a late purchase's look-up at its provider (`reconcile_once`): its outcome applied
# (succeeded, failed), or not. Exported at 0 from the start, so increase() sees the first one.
RECONCILE_OUTCOMES = (
    "succeeded",
    "failed",
    "duplicate",
    "settled_meanwhile",
    "still_pending",
    "provider_error",
    "refused",
    "error",
)
for _outcome in RECONCILE_OUTCOMES:
    PURCHASES_RECONCILED.labels(outcome=_outcome)

# Exported at 0 from the start, so that increase() sees the first late failure in a pod's life:
# one per status a purchase can have when a failure report comes after its outcome.
for _status in PurchaseStatus:
    if _status is not PurchaseStatus.PENDING:
        LATE_PAYMENT_FAILURES.labels(status=_status.value)
RESTRICTION_REASONS = ("ACCOUNT_BLOCKED", "UNDERAGE")  # check_may_transact's reasons
for _reason in RESTRICTION_REASONS:
    PURCHASES_CREDITED_RESTRICTED.labels(reason=_reason)
# Every status a callback can move a purchase to, in every currency a package can be sold in
# (check_currency): 16 series, so the chargeback-rate alert sees the first chargeback of a pod.
PURCHASE_OUTCOME_LABELS = tuple(
    (status.value, currency)
    for status in PurchaseStatus
    if status is not PurchaseStatus.PENDING
    for currency in sorted(domain.CURRENCY_MINOR_UNITS)
)
for _outcome, _currency in PURCHASE_OUTCOME_LABELS:
    PURCHASE_OUTCOMES.labels(outcome=_outcome, currency_code=_currency)
# The one outcome a provider reporting it again is counted for (`repeats_the_success`).
PROVIDER_OUTCOMES_REPEATED.labels(outcome=PurchaseStatus.SUCCEEDED.value)


@dataclass(frozen=True)
class _Applied:
    """What applying a provider's report answered, and whether it moved the purchase's status.

    `changed` is False for a duplicate and for a report accepted without effect (a failure after
    an outcome, a failure after a failure): the reconciler counts those settled by another hand.
    """

    answer: wallet_pb2.HandlePaymentEventResponse
    changed: bool


@dataclass
class Wallet:
    """The wallet's use cases over its database, outbox and payment providers."""

    db: Database
    outbox: Outbox
    payments: PaymentRouter
    settings: WalletSettings
    # Microseconds since the epoch; tests inject a clock to cross days and cooling-off periods.
    clock: Callable[[], int] = field(default=now_us)
    # Where the reconciler's next round starts (created at, purchase id): purchases the provider
    # still calls unpaid do not keep it from the later ones.
    _reconcile_cursor: late_lookups.RoundCursor = field(default_factory=late_lookups.RoundCursor)
    _reconcile_failures: ItemFailures = field(
        default_factory=lambda: ItemFailures(log, "a late purchase could not be reconciled; asked again next round")
    )

    def __post_init__(self) -> None:
        self.region_ages = domain.parse_region_ages(self.settings.adult_age_by_region)
        self.spending = SpendBatch(
            self.db, self.settings.spend_amount_max, self.settings.adult_age_years, self.region_ages, self.clock
        )
        self._spend_batcher: MicroBatcher[wallet_pb2.SpendRequest, Any] = MicroBatcher(
            lambda reqs: self.spending.run(reqs, settle_refusals=False), GROUP_COMMIT_SIZE_MAX, "wallet_spend"
        )
        for name in self.payments.providers:
            provider_calls.export_failures_at_zero(name, PROVIDER_CALLS)

    def _today(self) -> dt.date:
        """Today in UTC by the wallet's clock, as the spend batch reads it (never the pod's time zone)."""
        return domain.utc_date(self.clock())

    # ---- shared steps ------------------------------------------------------------------

    async def _post(self, uow: UnitOfWork, kind: str, reference_id: str, legs: list[Posting]) -> tuple[str, int]:
        """Write a balanced journal entry; apply the user leg to the user's balance row.

        Returns (entry_id, user balance after). Purchases and reversals only: spends are written
        in batches by services/wallet/spending.py under row locks.
        """
        check(domain.balanced(legs), f"unbalanced entry {kind}: {legs}")
        entry_id = uuid.uuid4().hex
        ts = now_us()
        balance_after = 0
        rows = []
        for leg in legs:
            after = None
            if leg.account_id.startswith("user:"):
                after = await self._apply_user_leg(uow, leg, kind, ts)
                balance_after = after
            rows.append(
                {
                    "entry_id": entry_id,
                    "account_id": leg.account_id,
                    "amount": leg.amount,
                    "balance_after": after,
                    "created_at_us": ts,
                }
            )
        await uow.conn.execute(
            insert(journal_entries).values(entry_id=entry_id, kind=kind, reference_id=reference_id, created_at_us=ts)
        )
        await uow.conn.execute(insert(postings), rows)
        return entry_id, balance_after

    async def _apply_user_leg(self, uow: UnitOfWork, leg: Posting, kind: str, ts: int) -> int:
        # Purchases and reversals only: spends are written in batches by services/wallet/spending.py.
        a = accounts.c
        row = (
            await uow.conn.execute(
                update(accounts)
                .where(a.account_id == leg.account_id)
                .values(balance=a.balance + leg.amount, updated_at_us=ts)
                .returning(a.balance)
            )
        ).first()
        check(row is not None, f"account {leg.account_id} must exist before a {kind} posting")
        return int(row.balance)  # type: ignore[union-attr]

    async def _ensure_account(self, uow: UnitOfWork, user_id: str) -> None:
        """Create the user's coin account on first use (the unique key makes races harmless)."""
        acc = domain.user_account(user_id)
        await uow.conn.execute(
            insert_ignore(self.db.dialect, accounts).values(
                account_id=acc, user_id=user_id, balance=0, updated_at_us=now_us()
            )
        )

    async def _restrictions(self, uow: UnitOfWork, user_id: str) -> domain.Restrictions | None:
        row = (await uow.conn.execute(select(users).where(users.c.user_id == user_id))).first()
        return None if row is None else restrictions_of(row)

    async def _check_may_transact(self, uow: UnitOfWork, user_id: str) -> None:
        r = await self._restrictions(uow, user_id)
        domain.check_may_transact(r, self.settings.adult_age_years, self.region_ages, self._today())

    # ---- packages and purchases --------------------------------------------------------

    async def list_packages(self, req: wallet_pb2.ListCoinPackagesRequest) -> wallet_pb2.ListCoinPackagesResponse:
        """Active packages of a region (and currency), fewest coins first, at the price paid now."""
        region = domain.check_region(req.region or self.settings.default_region)
        channel = domain.check_channel(req.channel)
        q = select(coin_packages).where(
            coin_packages.c.region == region, coin_packages.c.channel == channel, coin_packages.c.active.is_(True)
        )
        if req.currency_code:
            q = q.where(coin_packages.c.currency_code == domain.check_currency(req.currency_code))
        now = self.clock()
        async with self.db.unit_of_work(readonly=True) as uow:
            rows = (await uow.conn.execute(q.order_by(coin_packages.c.coins, coin_packages.c.package_id))).all()
            promos = await self._running_promotions(uow, [r.package_id for r in rows], now)
        return wallet_pb2.ListCoinPackagesResponse(
            packages=[
                _package_pb(r, domain.offer(r.coins, r.price_minor, promos.get(r.package_id, []), now), promos)
                for r in rows
            ]
        )

    async def _running_promotions(
        self, uow: UnitOfWork, package_ids: list[str], now: int
    ) -> dict[str, list[PromotionTerms]]:
        """Promotions of these packages whose window contains `now`."""
        if not package_ids:
            return {}
        p = promotions.c
        rows = (
            await uow.conn.execute(
                select(promotions).where(
                    p.package_id.in_(package_ids), p.active.is_(True), p.starts_at_us <= now, p.ends_at_us > now
                )
            )
        ).all()
        out: dict[str, list[PromotionTerms]] = {}
        for r in rows:
            out.setdefault(r.package_id, []).append(_terms(r))
        return out

    @answers_retry(common.idempotency, "CreatePurchase", wallet_pb2.Purchase)
    async def create_purchase(
        self, req: wallet_pb2.CreatePurchaseRequest, *, idem: IdempotentCall[wallet_pb2.Purchase]
    ) -> wallet_pb2.Purchase:
        """A PENDING purchase with the price frozen now and a checkout session the provider opened for it.

        Choices: A) open the checkout inside the transaction that writes the purchase (as before):
        a slow or hung provider then holds that transaction, a pooled connection and, on SQLite,
        the write lock every spend waits for; B) price the purchase, open the checkout outside any
        transaction (with PROVIDER_TIMEOUT_S), then write the purchase and its idempotency record
        in one transaction. B. A purchase row never lacks its checkout, since it is written only
        with the session in hand. What B adds is a session no purchase points to, when the write
        does not follow (a concurrent first call with the same key committed first and its answer
        is returned, the buyer was blocked meanwhile, the database failed): its redirect URL is
        never returned to anyone, so it is never paid, and the provider expires it. A provider
        that fails or does not answer in time answers UNAVAILABLE / PAYMENT_PROVIDER_UNAVAILABLE
        with nothing written; retry with the same key.
        """
        require_id(req.user_id, "user_id")
        require_id(req.package_id, "package_id")
        require_key(req.idempotency_key)
        method = _METHODS.get(req.payment_method)
        if method is None:
            raise InvalidArgument(
                f"payment_method {req.payment_method} is unknown: one of {', '.join(_METHODS.values())}"
                if req.payment_method
                else "payment_method is required",
                "INVALID_PAYMENT_METHOD",
            )
        if not req.currency_code:
            raise InvalidArgument("currency_code is required", "MISSING_FIELD", field="currency_code")
        currency = domain.check_currency(req.currency_code)
        region = domain.check_region(req.region) if req.region else ""
        # A retry of a purchase that was created is answered from its record, before the
        # provider is asked (it may be down) and before the route is resolved: a method that has
        # since lost its route (PAYMENT_ROUTES changed) still returns the purchase it created.
        stored = await idem.stored()
        if stored is not None:
            return stored
        provider = self.payments.for_method(method)
        async with self.db.unit_of_work(readonly=True) as uow:
            pkg = (
                await uow.conn.execute(select(coin_packages).where(coin_packages.c.package_id == req.package_id))
            ).first()
            if pkg is None or not pkg.active:
                raise NotFound("unknown coin package", "UNKNOWN_PACKAGE", package_id=req.package_id)
            if pkg.currency_code != currency:
                raise InvalidArgument(f"package {pkg.package_id} is sold in {pkg.currency_code}", "CURRENCY_MISMATCH")
            if region and region != pkg.region:
                raise InvalidArgument(f"package {pkg.package_id} is sold in {pkg.region}", "REGION_MISMATCH")
            await self._check_may_transact(uow, req.user_id)
            ts = self.clock()
            # The price and coins are frozen here, and the checkout is opened for that price: a
            # promotion (or the package) ending later, even before the purchase is written,
            # changes nothing for it.
            promos = await self._running_promotions(uow, [pkg.package_id], ts)
            deal = domain.offer(pkg.coins, pkg.price_minor, promos.get(pkg.package_id, []), ts)
        purchase_id = uuid.uuid4().hex
        session = await provider_calls.required(
            provider.name,
            "create_checkout",
            provider.create_checkout(purchase_id, deal.price_minor, pkg.currency_code, method),
            self.settings.provider_timeout_s,
            reason="PAYMENT_PROVIDER_UNAVAILABLE",
            message="the payment provider cannot open a checkout now, retry with the same key",
            purchase_id=purchase_id,
        )

        async def work(uow: UnitOfWork) -> wallet_pb2.Purchase:
            # The buyer again, in the transaction that writes: a block or an age recorded while
            # the provider was asked stops the purchase (its checkout is never handed out).
            await self._check_may_transact(uow, req.user_id)
            row = {
                "purchase_id": purchase_id,
                "user_id": req.user_id,
                "package_id": pkg.package_id,
                "coins": deal.coins + deal.bonus_coins,
                "bonus_coins": deal.bonus_coins,
                "promotion_id": deal.promotion_id,
                "region": pkg.region,
                "currency_code": pkg.currency_code,
                "amount_minor": deal.price_minor,
                "payment_method": method,
                "provider": session.provider,
                "checkout_session_id": session.session_id,
                "status": PurchaseStatus.PENDING.value,
                "created_at_us": ts,
                "updated_at_us": ts,
            }
            await uow.conn.execute(insert(purchases).values(**row))
            await self._ensure_account(uow, req.user_id)
            out = _purchase_pb(row)
            out.checkout.redirect_url = session.redirect_url
            return out

        return await idem.run(work)

    async def get_purchase(self, purchase_id: str) -> wallet_pb2.Purchase:
        """One purchase by id."""
        require_id(purchase_id, "purchase_id")
        async with self.db.unit_of_work(readonly=True) as uow:
            row = (await uow.conn.execute(select(purchases).where(purchases.c.purchase_id == purchase_id))).first()
        if row is None:
            raise NotFound("unknown purchase", "UNKNOWN_PURCHASE")
        return _purchase_pb(row._asdict())

    async def handle_payment_event(
        self, req: wallet_pb2.HandlePaymentEventRequest
    ) -> wallet_pb2.HandlePaymentEventResponse:
        """Verify a provider callback and apply it once: credit, fail, or reverse the purchase."""
        provider = self.payments.by_name(req.provider)
        event = provider.parse_callback(req.payload, req.signature)
        answer = (await self._apply_reported(provider, event)).answer
        if not answer.duplicate:  # committed; the provider has no answer yet and will send it again
            if event.target is PurchaseStatus.SUCCEEDED:
                faults.point("wallet.after_purchase_commit_before_answer")
            elif event.target in (PurchaseStatus.REFUNDED, PurchaseStatus.CHARGED_BACK):
                faults.point("wallet.after_reversal_commit_before_answer")
        return answer

    async def _apply_reported(self, provider: PaymentProvider, event: ProviderEvent) -> _Applied:
        """Apply what a provider reported (a verified callback, or a look-up's answer) once, by its event id."""
        try:
            return await self._apply_payment_event(provider, event)
        except IntegrityError:
            # A concurrent delivery of the same provider event id committed first: a duplicate,
            # unless that delivery named another purchase.
            async with self.db.unit_of_work(readonly=True) as uow:
                first = await self._event_recorded_for(uow, provider, event)
            if first is None:
                # Not this event id's unique key: nothing was recorded, so an OK would tell the
                # provider the event was applied and stop its retries. Let the error answer.
                raise
            _refuse_another_event(provider, event, first)
            return _Applied(
                wallet_pb2.HandlePaymentEventResponse(
                    provider_event_id=event.provider_event_id,
                    purchase=await self.get_purchase(event.purchase_id),
                    duplicate=True,
                ),
                changed=False,
            )

    async def reconciler(self, stop: Any) -> None:
        """Background loop: look up at the provider the purchases whose callback is late."""
        if self.settings.purchase_reconcile_after_s <= 0:
            await stop.wait()  # turned off
            return
        await run_every(
            stop,
            self.settings.purchase_reconcile_interval_s,
            lambda: self.reconcile_once(stop=stop),
            "late purchases settled",
        )

    async def reconcile_once(self, now: int | None = None, stop: asyncio.Event | None = None) -> int:
        """Ask the provider about up to a batch of purchases PENDING for longer than
        `purchase_reconcile_after_s` and apply each outcome it reports as its callback would be
        applied (once by the provider's event id, the amount and currency checked, the status's
        state machine); returns how many it settled.

        Choices: A) wait for the callback only: a provider retries it for a limited time, and
        when every delivery fails (the wallet down for hours, a bug fixed later, a misconfigured
        endpoint) the buyer's money is taken and no coins are credited, silently; B) look the
        payment up, as every provider's API allows (payout's reconciler does for withdrawals).
        B, through the callback's own path, so a look-up cannot do what a callback could not, and
        the callback arriving after it is a duplicate. The checkout the buyer never paid stays
        PENDING and is asked about again each round (`still_pending`).

        Each look-up has PROVIDER_TIMEOUT_S; one that times out or raises is logged with the
        purchase id, counted (outcome `provider_error`) and asked again in a later round; the
        rest of the round goes on. So it does after any other error of one purchase (outcome
        `error`), but the database unavailable, which ends the round at that purchase
        (`RoundCursor.item_failed`). Once `stop` is set (a SIGTERM) no further purchase of the
        round is looked up (`BatchCursor.stopped`): a round of PURCHASE_RECONCILE_BATCH_SIZE_MAX
        look-ups, up to PROVIDER_TIMEOUT_S each, outlasted the shutdown grace against a slow
        provider.
        """
        p = purchases.c
        cutoff = (self.clock() if now is None else now) - int(self.settings.purchase_reconcile_after_s * 1_000_000)
        batch = self.settings.purchase_reconcile_batch_size_max
        async with self.db.unit_of_work(readonly=True) as uow:
            rows = (
                await uow.conn.execute(
                    select(
                        p.purchase_id,
                        p.provider,
                        p.checkout_session_id,
                        p.amount_minor,
                        p.currency_code,
                        p.created_at_us,
                    )
                    .where(
                        # The predicate of ix_purchases_pending (migration 0014), as text so that
                        # PostgreSQL plans on the partial index whatever it does with parameters.
                        text(PENDING_PURCHASES),
                        p.created_at_us <= cutoff,
                        self._reconcile_cursor.after(p.created_at_us, p.purchase_id),
                    )
                    .order_by(p.created_at_us, p.purchase_id)
                    .limit(batch)
                )
            ).all()
        keys = [(r.created_at_us, r.purchase_id) for r in rows]
        self._reconcile_cursor.advance(keys, batch)
        settled = 0
        for i, row in enumerate(rows):
            if self._reconcile_cursor.stopped(stop, i):
                break
            # A trace per purchase: its look-up at the provider, the outcome applied and its events.
            with background_span("reconcile purchase", **{"purchase.id": row.purchase_id}):
                try:
                    outcome = await self._reconcile_purchase(row)
                except Exception as exc:  # noqa: BLE001 - one purchase's error; the database's ends the round
                    self._reconcile_cursor.item_failed(exc, i, self._reconcile_failures, purchase_id=row.purchase_id)
                    outcome = "error"
            PURCHASES_RECONCILED.labels(outcome=outcome).inc()
            if outcome in ("succeeded", "failed"):
                settled += 1
                log.info(
                    "late purchase settled from the provider's record",
                    extra={"purchase_id": row.purchase_id, "outcome": outcome},
                )
        return settled

    async def _reconcile_purchase(self, row: Any) -> str:
        """Look one late purchase up at its provider and apply the answer; the outcome's label."""
        provider = self.payments.providers.get(row.provider)
        if provider is None:  # an adapter this build no longer has: nothing can be asked
            log.warning(
                "a late purchase's provider is not configured; it cannot be looked up",
                extra={"purchase_id": row.purchase_id, "provider": row.provider},
            )
            return "refused"
        looked = await late_lookups.look_up(
            provider.name,
            provider.status(row.purchase_id, row.checkout_session_id, row.amount_minor, row.currency_code),
            self.settings.provider_timeout_s,
            log,
            "the payment provider could not be asked about a late purchase; asked again next round",
            purchase_id=row.purchase_id,
        )
        if not looked.answered:
            return "provider_error"
        event = looked.value
        if event is None:
            return "still_pending"
        if event.purchase_id != row.purchase_id:  # a provider bug: applying it would move another purchase
            log.warning(
                "the provider's outcome of a late purchase was refused: it names another purchase",
                extra={"purchase_id": row.purchase_id, "named_purchase_id": event.purchase_id},
            )
            return "refused"
        try:
            done = await self._apply_reported(provider, event)
        except DomainError as exc:
            if (await self.get_purchase(row.purchase_id)).status != wallet_pb2.PURCHASE_STATUS_PENDING:
                # A callback (under another event id) settled it meanwhile: the status's
                # compare-and-set refused the second outcome, or the answer was refused against
                # the one applied (the same success is a duplicate, not this).
                return "settled_meanwhile"
            # Not applied (amount or currency differ, a refund of an unpaid purchase, an event id
            # recorded for another purchase): still PENDING, asked again next round.
            log.warning(
                "the provider's outcome of a late purchase was refused",
                extra={
                    "purchase_id": row.purchase_id,
                    "reason": exc.reason,
                    "provider_event_id": event.provider_event_id,
                    "event_type": event.event_type,
                },
            )
            return "refused"
        if done.answer.duplicate:
            return "duplicate"
        if not done.changed:
            # Accepted without effect (a failure reported after a callback credited or failed
            # it meanwhile, the status then FAILED either way): nothing of this answer was
            # applied, so it settled nothing.
            return "settled_meanwhile"
        return event.target.value.lower()

    async def _apply_payment_event(self, provider: PaymentProvider, event) -> _Applied:  # type: ignore[no-untyped-def]
        async with self.db.unit_of_work() as uow:
            # The purchase is read before the event look-up: PostgreSQL (READ COMMITTED) takes a
            # snapshot per statement, and the other order could see a concurrent delivery's new
            # status but not its event row, and refuse a duplicate as INVALID_TRANSITION.
            row = (
                await uow.conn.execute(select(purchases).where(purchases.c.purchase_id == event.purchase_id))
            ).first()
            seen = await self._event_recorded_for(uow, provider, event)
            if row is None:
                raise NotFound("callback for an unknown purchase", "UNKNOWN_PURCHASE")
            if seen is not None:
                _refuse_another_event(provider, event, seen)  # another purchase's, or another type's
            # Checked before a duplicate is answered: every event recorded for this purchase
            # carried its amount and currency, so a delivery of a recorded id with others is not
            # the event that was applied, and an OK would acknowledge what nothing applied.
            if event.amount_minor != row.amount_minor or event.currency_code != row.currency_code:
                # A partial refund, say, which is not modelled: refused on every retry, so money
                # and coins disagree until an operator settles it with the provider.
                log.warning(
                    "payment callback refused: its amount or currency differs from the purchase",
                    extra={
                        "purchase_id": row.purchase_id,
                        "provider_event_id": event.provider_event_id,
                        "event_type": event.event_type,
                        "amount_minor": event.amount_minor,
                        "currency_code": event.currency_code,
                        "purchase_amount_minor": row.amount_minor,
                        "purchase_currency_code": row.currency_code,
                    },
                )
                # The purchase's own price in the answer: the provider (or whoever reads its
                # delivery log) sees what a callback must carry, without asking an operator.
                raise InvalidArgument(
                    "callback amount or currency differs from the purchase",
                    "AMOUNT_MISMATCH",
                    expected_amount_minor=row.amount_minor,
                    expected_currency_code=row.currency_code,
                )
            if seen is not None:
                # Read again: `row` may predate the delivery that recorded this event.
                now_row = (
                    await uow.conn.execute(select(purchases).where(purchases.c.purchase_id == event.purchase_id))
                ).one()
                return _Applied(
                    wallet_pb2.HandlePaymentEventResponse(
                        provider_event_id=event.provider_event_id,
                        purchase=_purchase_pb(now_row._asdict()),
                        duplicate=True,
                    ),
                    changed=False,
                )
            if row.provider != provider.name:
                raise InvalidArgument("the purchase was paid through another provider", "PROVIDER_MISMATCH")
            current = PurchaseStatus(row.status)
            if domain.repeats_the_success(current, event.target):
                # The success applied, reported again under another event id (the provider's own
                # callback after the reconciler's look-up): a duplicate, nothing recorded or
                # credited, as payout answers a PAID withdrawal's PAID; its amount was checked above.
                # Logged and counted: were it a second charge at the provider for the one purchase
                # (money taken twice), this line is what finance would find it by. Each delivery
                # counts (nothing is recorded, so a retry of this report is not told apart).
                PROVIDER_OUTCOMES_REPEATED.labels(outcome=event.target.value).inc()
                log.info(
                    "a purchase's success reported again under another event id: answered as a duplicate",
                    extra={
                        "purchase_id": row.purchase_id,
                        "provider": provider.name,
                        "provider_event_id": event.provider_event_id,
                        "status": current.value,
                    },
                )
                answer = wallet_pb2.HandlePaymentEventResponse(
                    provider_event_id=event.provider_event_id, purchase=_purchase_pb(row._asdict()), duplicate=True
                )
                return _Applied(answer, changed=False)
            ts = now_us()
            if domain.has_no_effect(current, event.target):
                answer = await self._record_without_effect(uow, provider, event, row, current, ts)
                return _Applied(answer, changed=False)
            domain.check_transition(current, event.target)
            await self._record_payment_event(uow, provider, event, row.purchase_id, ts)
            # Compare-and-set on the status: a concurrent callback for the same purchase loses.
            changed = await uow.conn.execute(
                update(purchases)
                .where(purchases.c.purchase_id == row.purchase_id, purchases.c.status == current.value)
                .values(status=event.target.value, updated_at_us=ts)
            )
            if changed.rowcount != 1:
                raise Aborted("the purchase changed concurrently, retry", "CONFLICT")
            # Once committed, and only here: the compare-and-set above lets one callback move the
            # purchase, so a duplicate or a concurrent delivery never counts it twice.
            uow.after_commit(PURCHASE_OUTCOMES.labels(outcome=event.target.value, currency_code=row.currency_code).inc)
            if event.target is PurchaseStatus.SUCCEEDED:
                if current is PurchaseStatus.FAILED:
                    log.warning(
                        "purchase succeeded after it had failed; crediting it",
                        extra={"purchase_id": row.purchase_id, "provider_event_id": event.provider_event_id},
                    )
                    uow.after_commit(PURCHASES_SUCCEEDED_AFTER_FAILURE.inc)
                await self._ensure_account(uow, row.user_id)
                await self._flag_restricted_buyer(uow, row, event)
                _entry, after = await self._post(
                    uow, "PURCHASE", row.purchase_id, domain.purchase_postings(row.user_id, row.coins)
                )
                # Kept for a later reversal: coins that repaid a debt reached no creator.
                await uow.conn.execute(
                    update(purchases)
                    .where(purchases.c.purchase_id == row.purchase_id)
                    .values(debt_repaid_coins=domain.debt_repaid(after, row.coins))
                )
                eid = new_event_id()
                await self.outbox.add(
                    uow,
                    "wallet.purchase.completed",
                    eid,
                    events_pb2.PurchaseCompleted(
                        event_id=eid,
                        purchase_id=row.purchase_id,
                        user_id=row.user_id,
                        coins=row.coins,
                        price=common_pb2.Money(currency_code=row.currency_code, amount_minor=row.amount_minor),
                        occurred_at=to_timestamp(ts),
                    ),
                )
            elif event.target in (PurchaseStatus.REFUNDED, PurchaseStatus.CHARGED_BACK):
                _entry, after = await self._post(
                    uow,
                    f"REVERSAL_{event.target.value}",
                    row.purchase_id,
                    domain.reversal_postings(row.user_id, row.coins),
                )
                claimed, repaid = await self._reversal_history(uow, row)
                already_spent = domain.reversal_spent(row.coins, after, claimed, repaid)
                # The reversal's time, read once the posting holds the user's account row: a spend
                # in `after` committed before it (its gift recorded before that), and one not in
                # it waits for this commit. Payout claws back only gifts recorded before this time;
                # `ts`, read before this transaction waited for its rows (PostgreSQL), could come
                # before spends it counts as already spent, whose coins then stayed out of reach.
                reversed_at = now_us()
                await uow.conn.execute(
                    update(purchases)
                    .where(purchases.c.purchase_id == row.purchase_id)
                    .values(coins_claimed=already_spent)
                )
                eid = new_event_id()
                await self.outbox.add(
                    uow,
                    "wallet.purchase.reversed",
                    eid,
                    events_pb2.PurchaseReversed(
                        event_id=eid,
                        purchase_id=row.purchase_id,
                        user_id=row.user_id,
                        coins=row.coins,
                        kind=event.target.value,
                        occurred_at=to_timestamp(reversed_at),
                        price=common_pb2.Money(currency_code=row.currency_code, amount_minor=row.amount_minor),
                        coins_already_spent=already_spent,
                        balance_after=after,
                    ),
                )
            await uow.commit()
            out = {**row._asdict(), "status": event.target.value, "updated_at_us": ts}
            answer = wallet_pb2.HandlePaymentEventResponse(
                provider_event_id=event.provider_event_id, purchase=_purchase_pb(out), duplicate=False
            )
            return _Applied(answer, changed=True)

    async def _flag_restricted_buyer(self, uow: UnitOfWork, row: Any, event: ProviderEvent) -> None:
        """Log and count a success credited to a buyer who may not buy now (blocked or under age).

        Choices: A) refuse the callback: the provider retries it for days while the money is
        taken and no coins show; B) credit it, as the money arrived, and tell trust and safety,
        who refund it (the refund takes the coins back). B: the coins cannot be spent while the
        restriction stands (every spend checks it), and without this nothing said that money was
        taken from a minor or a blocked account since its purchase was created.
        """
        try:
            await self._check_may_transact(uow, row.user_id)
        except FailedPrecondition as exc:
            reason = exc.reason
            fields = {
                "purchase_id": row.purchase_id,
                "user_id": row.user_id,
                "reason": reason,
                "provider_event_id": event.provider_event_id,
                "amount_minor": row.amount_minor,
                "currency_code": row.currency_code,
            }

            def flag() -> None:
                # Once committed: a retried or rolled-back callback is not flagged twice.
                log.warning("purchase credited to a buyer who may not buy now; refund it", extra=fields)
                PURCHASES_CREDITED_RESTRICTED.labels(reason=reason).inc()

            uow.after_commit(flag)

    async def _event_recorded_for(
        self, uow: UnitOfWork, provider: PaymentProvider, event: ProviderEvent
    ) -> signing.RecordedEvent | None:
        """The purchase and event type this provider event id was recorded with, or None if it is new."""
        e = payment_events.c
        row = (
            await uow.conn.execute(
                select(e.purchase_id, e.event_type).where(
                    e.provider == provider.name, e.provider_event_id == event.provider_event_id
                )
            )
        ).first()
        return None if row is None else signing.RecordedEvent(row.purchase_id, row.event_type)

    async def _record_payment_event(
        self, uow: UnitOfWork, provider: PaymentProvider, event: ProviderEvent, purchase_id: str, ts: int
    ) -> None:
        """Record a provider event by its id; the unique key makes a concurrent second delivery fail."""
        await uow.conn.execute(
            insert(payment_events).values(
                provider=provider.name,
                provider_event_id=event.provider_event_id,
                purchase_id=purchase_id,
                event_type=event.event_type,
                received_at_us=ts,
            )
        )

    async def _record_without_effect(
        self,
        uow: UnitOfWork,
        provider: PaymentProvider,
        event: ProviderEvent,
        row: Any,
        current: PurchaseStatus,
        ts: int,
    ) -> wallet_pb2.HandlePaymentEventResponse:
        """Accept a report that changes nothing (a failure after an outcome): record it, answer OK.

        Choices for the answer: A) `duplicate=True`, as for a retry; B) `duplicate=False` and the
        purchase as it stands. B: the proto says `duplicate` is an event applied before, and keeping
        it for retries lets the provider's first delivery be told from its retries; the purchase's
        status and its unchanged `updated_at` say that nothing changed.
        No compare-and-set on the status: once a purchase is not PENDING a failure changes nothing
        in any status it can move to, so a concurrent callback cannot make this answer wrong.
        """
        await self._record_payment_event(uow, provider, event, row.purchase_id, ts)
        await uow.commit()
        log.info(
            "payment failure reported for a purchase that already had an outcome; recorded, nothing changed",
            extra={
                "purchase_id": row.purchase_id,
                "provider_event_id": event.provider_event_id,
                "status": current.value,
            },
        )
        LATE_PAYMENT_FAILURES.labels(status=current.value).inc()
        return wallet_pb2.HandlePaymentEventResponse(
            provider_event_id=event.provider_event_id, purchase=_purchase_pb(row._asdict()), duplicate=False
        )

    async def _reversal_history(self, uow: UnitOfWork, reversed_row: Any) -> tuple[int, int]:
        """(coins the user's earlier reversals claimed, coins of debt the purchases kept have repaid).

        Read after the reversal's own posting, which locks the user's account row: a concurrent
        credit or reversal of this user has committed by then, or waits for this one.
        """
        p = purchases.c
        rows = (
            await uow.conn.execute(
                select(p.purchase_id, p.user_id, p.status, p.coins, p.debt_repaid_coins, p.coins_claimed).where(
                    p.user_id == reversed_row.user_id,
                    p.purchase_id != reversed_row.purchase_id,
                    p.status.in_(_CREDITED),
                )
            )
        ).all()
        claimed = repaid = 0
        for r in rows:
            if r.status == PurchaseStatus.SUCCEEDED.value:
                if r.debt_repaid_coins is not None:
                    repaid += int(r.debt_repaid_coins)
                    continue
                value = domain.debt_repaid(await self._balance_after(uow, r, "PURCHASE"), r.coins)
                repaid += value
                column = "debt_repaid_coins"
            elif r.coins_claimed is not None:
                claimed += int(r.coins_claimed)
                continue
            else:
                # Reversed before wallet migration 0007: what the event said then (the balance it
                # left, less what that balance could still take back).
                after = await self._balance_after(uow, r, f"REVERSAL_{r.status}")
                value = r.coins - min(max(after + r.coins, 0), r.coins)
                claimed += value
                column = "coins_claimed"
            # Kept, so that the ledger is read for this purchase once only.
            await uow.conn.execute(update(purchases).where(p.purchase_id == r.purchase_id).values({column: value}))
        return claimed, repaid

    async def _balance_after(self, uow: UnitOfWork, row: Any, kind: str) -> int:
        """The user's balance after the purchase's ledger entry of `kind` (rows older than migrations 0006/0007)."""
        p, j = postings.c, journal_entries.c
        after = (
            await uow.conn.execute(
                select(p.balance_after)
                .join(journal_entries, j.entry_id == p.entry_id)
                .where(
                    p.account_id == domain.user_account(row.user_id),
                    j.kind == kind,
                    j.reference_id == row.purchase_id,
                )
            )
        ).scalar_one()
        return int(after)

    # ---- balances and spending ---------------------------------------------------------

    async def get_balance(self, user_id: str) -> wallet_pb2.Balance:
        """O(1): one row; a user never credited (no account row yet) has 0 coins."""
        require_id(user_id, "user_id")
        async with self.db.unit_of_work(readonly=True) as uow:
            bal = (
                await uow.conn.execute(select(accounts.c.balance).where(accounts.c.user_id == user_id))
            ).scalar_one_or_none()
        if bal is None:
            bal = 0
        return wallet_pb2.Balance(user_id=user_id, coins=int(bal), debt_coins=max(0, -int(bal)))

    async def list_transactions(self, req: wallet_pb2.ListTransactionsRequest) -> wallet_pb2.ListTransactionsResponse:
        """A user's postings, newest first, with an opaque cursor."""
        require_id(req.user_id, "user_id")
        size = req.page_size or PAGE_SIZE_DEFAULT
        if not 1 <= size <= PAGE_SIZE_MAX:
            raise InvalidArgument(f"page_size must be 1..{PAGE_SIZE_MAX}", "INVALID_PAGE_SIZE")
        before = None
        if req.page_token:
            # Only the form next_page_token has (a posting id in ASCII digits): int() alone also
            # takes " 5", "+7", "5_0" and other scripts' digits, tokens we never gave that would
            # still set where the page starts.
            token = req.page_token
            if not (token.isascii() and token.isdigit() and len(token) <= len(str(INT64_MAX))):
                raise InvalidArgument("page_token is not valid", "INVALID_PAGE_TOKEN")
            before = int(token)
            if not 0 < before <= INT64_MAX or token != str(before):  # a bigint column; "05" is no token we gave
                raise InvalidArgument("page_token is not valid", "INVALID_PAGE_TOKEN")
        p, j = postings.c, journal_entries.c
        q = (
            select(p.id, p.entry_id, p.amount, p.balance_after, p.created_at_us, j.kind, j.reference_id)
            .join(journal_entries, j.entry_id == p.entry_id)
            .where(p.account_id == domain.user_account(req.user_id))
        )
        if before is not None:
            q = q.where(p.id < before)
        async with self.db.unit_of_work(readonly=True) as uow:
            rows = (await uow.conn.execute(q.order_by(p.id.desc()).limit(size + 1))).all()
        out = wallet_pb2.ListTransactionsResponse(
            transactions=[
                wallet_pb2.Transaction(
                    entry_id=r.entry_id,
                    kind=r.kind,
                    amount=r.amount,
                    balance_after=r.balance_after or 0,
                    reference_id=r.reference_id,
                    created_at=to_timestamp(r.created_at_us),
                )
                for r in rows[:size]
            ]
        )
        if len(rows) > size:
            out.next_page_token = str(rows[size - 1].id)
        return out

    async def spend(self, req: wallet_pb2.SpendRequest) -> wallet_pb2.SpendResponse:
        """Debit coins once per key; never overdraws; a cancelled key is refused with ABORTED.

        With group commit, concurrent calls share one transaction (services/wallet/spending.py);
        each still gets its own answer.
        """
        if self.settings.group_commit:
            outcome = await self._spend_batcher.submit(req)
        else:
            outcome = (await self.spending.run([req], settle_refusals=False))[0]
        if isinstance(outcome, DomainError):
            raise outcome
        return outcome

    async def spend_many(self, req: wallet_pb2.SpendManyRequest) -> wallet_pb2.SpendManyResponse:
        """Many spends in one transaction, each with its own key and result (see SpendMany in wallet.proto)."""
        if not 1 <= len(req.spends) <= SPEND_MANY_ITEMS_MAX:
            raise InvalidArgument(f"spends must hold 1..{SPEND_MANY_ITEMS_MAX} items", "INVALID_BATCH_SIZE")
        outcomes = await self.spending.run(list(req.spends), settle_refusals=req.settle_refusals)
        results = []
        for o in outcomes:
            if isinstance(o, DomainError):
                settled = o.metadata.get("settled") == "true"
                results.append(
                    wallet_pb2.SpendManyResult(
                        error=wallet_pb2.SpendItemError(
                            code=status_for(o).value[0],
                            reason=o.reason,
                            message=o.message,
                            settled=settled,
                            metadata={k: v for k, v in o.metadata.items() if k != "settled"},
                        )
                    )
                )
            else:
                results.append(wallet_pb2.SpendManyResult(spent=o))
        return wallet_pb2.SpendManyResponse(results=results)

    async def cancel_spend(self, req: wallet_pb2.CancelSpendRequest) -> wallet_pb2.CancelSpendResponse:
        """Settle a spend for good: report it if it happened, else record that it never may."""
        key = require_key(req.idempotency_key)
        for _ in range(2):
            try:
                async with self.db.unit_of_work() as uow:
                    row = (await uow.conn.execute(recorded_spends(self.db.dialect), {"keys": [key]})).first()
                    if row is not None:
                        if row.status == SPENT:
                            return wallet_pb2.CancelSpendResponse(
                                outcome=wallet_pb2.CancelSpendResponse.OUTCOME_SPENT,
                                spend=wallet_pb2.SpendResponse(
                                    spend_id=row.entry_id, amount=row.amount, balance_after=row.balance_after
                                ),
                            )
                        return wallet_pb2.CancelSpendResponse(outcome=wallet_pb2.CancelSpendResponse.OUTCOME_CANCELLED)
                    await uow.conn.execute(
                        insert(spends).values(idempotency_key=key, status=CANCELLED, created_at_us=now_us())
                    )
                    await uow.commit()
                    return wallet_pb2.CancelSpendResponse(outcome=wallet_pb2.CancelSpendResponse.OUTCOME_CANCELLED)
            except IntegrityError:
                continue  # a concurrent Spend or CancelSpend claimed the key: read what it decided
        raise Aborted("the spend is being settled concurrently, retry", "CONFLICT")

    # ---- spending limits ---------------------------------------------------------------

    async def _limit_states(self, uow: UnitOfWork, user_id: str) -> dict[tuple[str, Period], LimitState]:
        rows = (await uow.conn.execute(select(spending_limits).where(spending_limits.c.user_id == user_id))).all()
        return {
            (r.setter, Period(r.period)): LimitState(r.limit_coins, r.pending_limit_coins, r.pending_at_us)
            for r in rows
        }

    @answers_retry(common.idempotency, "SetSpendingLimits", wallet_pb2.SpendingLimits)
    async def set_spending_limits(
        self,
        req: wallet_pb2.SetSpendingLimitsRequest,
        operator: str = "",
        *,
        idem: IdempotentCall[wallet_pb2.SpendingLimits],
    ) -> wallet_pb2.SpendingLimits:
        """Change a user's or an operator's caps: lower at once, higher after the cooling-off period.

        `operator` is who set an operator's caps (the token's x-operator), logged with the change:
        a guardian's or support's cap on a user is a decision someone must be able to trace.
        """
        require_id(req.user_id, "user_id")
        setter = _SETTERS.get(req.set_by)
        if setter is None:
            raise InvalidArgument("set_by must be USER or OPERATOR", "INVALID_SETTER")
        requested: dict[Period, int | None] = {}
        for period, name in _PERIOD_FIELDS.items():
            if req.HasField(name):
                value = getattr(req, name)
                if value < 0:
                    raise InvalidArgument(f"{name} must be 0 (no limit) or more", "INVALID_LIMIT", field=name)
                if value > 0:
                    domain.check_limit_value(value, name)
                requested[period] = value or None
        if not requested:
            raise InvalidArgument("set at least one of daily, weekly, monthly", "MISSING_FIELD", field="daily")
        cooloff_us = self.settings.spending_limit_cooloff_s * 1_000_000

        async def work(uow: UnitOfWork) -> wallet_pb2.SpendingLimits:
            now = self.clock()
            sl = spending_limits.c
            for period, value in requested.items():
                key = {"user_id": req.user_id, "setter": setter, "period": period.value}
                await uow.conn.execute(
                    insert_ignore(self.db.dialect, spending_limits).values(**key, limit_coins=None, updated_at_us=now)
                )
                row = (
                    await uow.conn.execute(
                        select(spending_limits)
                        .where(sl.user_id == req.user_id, sl.setter == setter, sl.period == period.value)
                        .with_for_update()
                    )
                ).one()
                state = LimitState(row.limit_coins, row.pending_limit_coins, row.pending_at_us)
                new = domain.change_limit(state, value, now, cooloff_us)
                await uow.conn.execute(
                    update(spending_limits)
                    .where(sl.user_id == req.user_id, sl.setter == setter, sl.period == period.value)
                    .values(
                        limit_coins=new.limit,
                        pending_limit_coins=new.pending_limit,
                        pending_at_us=new.pending_at_us,
                        updated_at_us=now,
                    )
                )
            if setter == OPERATOR:
                # One field per period set (0: the cap removed), e.g. weekly_limit_coins=500.
                changed = {f"{_PERIOD_FIELDS[p]}_limit_coins": v or 0 for p, v in requested.items()}
                uow.after_commit(
                    lambda: log.info(
                        "spending limits set by an operator",
                        extra={"operator": operator, "user_id": req.user_id, **changed},
                    )
                )
            return await self._limits_pb(uow, req.user_id, now)

        return await idem.run(work)

    async def get_spending_limits(self, user_id: str) -> wallet_pb2.SpendingLimits:
        """A user's caps in force, pending raises and what was spent in each current period."""
        require_id(user_id, "user_id")
        async with self.db.unit_of_work(readonly=True) as uow:
            return await self._limits_pb(uow, user_id, self.clock())

    async def _limits_pb(self, uow: UnitOfWork, user_id: str, now: int) -> wallet_pb2.SpendingLimits:
        states = await self._limit_states(uow, user_id)
        keys = domain.period_keys(now)
        c = spend_counters.c
        spent = {
            r.period: int(r.spent_coins)
            for r in (
                await uow.conn.execute(
                    select(c.period, c.period_key, c.spent_coins).where(
                        c.user_id == user_id, c.period_key.in_(list(keys.values()))
                    )
                )
            ).all()
            if keys.get(Period(r.period)) == r.period_key
        }
        out = wallet_pb2.SpendingLimits(user_id=user_id)
        for period in Period:
            user = states.get((USER, period), LimitState(None)).resolved(now)
            oper = states.get((OPERATOR, period), LimitState(None)).resolved(now)
            item = wallet_pb2.PeriodLimit(
                period=period.value,
                limit_coins=domain.effective_limit([user, oper], now) or 0,
                spent_coins=spent.get(period.value, 0),
                user_limit_coins=user.limit or 0,
                operator_limit_coins=oper.limit or 0,
            )
            pending = next((st for st in (user, oper) if st.has_pending), None)
            if pending is not None:
                item.raise_pending = True
                item.pending_limit_coins = pending.pending_limit or 0
                item.pending_effective_at.CopyFrom(to_timestamp(pending.pending_at_us))
            out.periods.append(item)
        return out

    # ---- operator: packages and promotions ---------------------------------------------

    @answers_retry(common.idempotency, "UpsertCoinPackage", wallet_pb2.CoinPackage)
    async def upsert_package(
        self, req: wallet_pb2.UpsertCoinPackageRequest, operator: str, *, idem: IdempotentCall[wallet_pb2.CoinPackage]
    ) -> wallet_pb2.CoinPackage:
        """Create or change a coin package (operator); purchases already made keep their frozen price."""
        require_id(req.package_id, "package_id")
        region = domain.check_region(req.region)
        currency = domain.check_currency(req.currency_code)
        require_positive(req.coins, "coins", domain.PACKAGE_COINS_MAX)
        require_positive(req.price_minor, "price_minor", domain.PRICE_MINOR_MAX)
        values = {
            "region": region,
            "currency_code": currency,
            "coins": req.coins,
            "price_minor": req.price_minor,
            "active": req.active,
            "channel": domain.check_channel(req.channel),
        }

        async def work(uow: UnitOfWork) -> wallet_pb2.CoinPackage:
            # Insert-or-nothing, then update: two racing upserts of one package cannot collide.
            created = await uow.conn.execute(
                insert_ignore(self.db.dialect, coin_packages).values(package_id=req.package_id, **values)
            )
            before = None
            if created.rowcount != 1:
                # Held (PostgreSQL) until the commit: the trail line's previous values are the ones replaced.
                before = (
                    await uow.conn.execute(
                        select(coin_packages).where(coin_packages.c.package_id == req.package_id).with_for_update()
                    )
                ).one()
            # Only in the package's own currency: a price in minor units means another amount in
            # another currency (199 cents are not 199 yen), and the id names its price list
            # (`us-usd-70`). Checked by the update itself, so a racing upsert cannot slip past it.
            changed = await uow.conn.execute(
                update(coin_packages)
                .where(coin_packages.c.package_id == req.package_id, coin_packages.c.currency_code == currency)
                .values(**values)
            )
            if changed.rowcount != 1:
                held = (
                    await uow.conn.execute(
                        select(coin_packages.c.currency_code).where(coin_packages.c.package_id == req.package_id)
                    )
                ).scalar_one()
                raise FailedPrecondition(
                    f"package {req.package_id} is sold in {held}: its currency cannot change, add a new package",
                    "PACKAGE_CURRENCY_FIXED",
                    currency_code=held,
                )
            row = (
                await uow.conn.execute(select(coin_packages).where(coin_packages.c.package_id == req.package_id))
            ).one()
            # Who changed a price, and what it was, is part of the audit trail (the token's x-operator header).
            trail = change_fields(None if before is None else _package_fields(before), _package_fields(row))
            trail |= {"operator": operator, "package_id": req.package_id}
            uow.after_commit(lambda: log.info("coin package upserted", extra=trail))
            return _package_pb(row)

        return await idem.run(work)

    @answers_retry(common.idempotency, "UpsertPromotion", wallet_pb2.Promotion)
    async def upsert_promotion(
        self, req: wallet_pb2.UpsertPromotionRequest, operator: str, *, idem: IdempotentCall[wallet_pb2.Promotion]
    ) -> wallet_pb2.Promotion:
        """Create or change a promotion of one package (operator)."""
        p = req.promotion
        require_id(p.promotion_id, "promotion.promotion_id")
        require_id(p.package_id, "promotion.package_id")
        if not (p.HasField("starts_at") and p.HasField("ends_at")):
            raise InvalidArgument("starts_at and ends_at are required", "MISSING_FIELD", field="promotion.ends_at")
        # Not Timestamp.ToMicroseconds(): it raises ValueError on out-of-range input; the domain
        # check below turns any such value into INVALID_PROMOTION instead.
        starts_us = p.starts_at.seconds * 1_000_000 + p.starts_at.nanos // 1000
        ends_us = p.ends_at.seconds * 1_000_000 + p.ends_at.nanos // 1000
        domain.check_promotion(p.bonus_coins, p.discount_bps, starts_us, ends_us)
        values = {
            "package_id": p.package_id,
            "bonus_coins": p.bonus_coins,
            "discount_bps": p.discount_bps,
            "starts_at_us": starts_us,
            "ends_at_us": ends_us,
            "active": p.active,
            "updated_by": operator[:128],
        }

        async def work(uow: UnitOfWork) -> wallet_pb2.Promotion:
            pkg = (
                await uow.conn.execute(
                    select(coin_packages.c.package_id).where(coin_packages.c.package_id == p.package_id)
                )
            ).first()
            if pkg is None:
                raise NotFound("unknown coin package", "UNKNOWN_PACKAGE", package_id=p.package_id)
            ts = now_us()
            created = await uow.conn.execute(
                insert_ignore(self.db.dialect, promotions).values(
                    promotion_id=p.promotion_id, **values, updated_at_us=ts
                )
            )
            before = None
            if created.rowcount != 1:
                before = (
                    await uow.conn.execute(
                        select(promotions).where(promotions.c.promotion_id == p.promotion_id).with_for_update()
                    )
                ).one()
            await uow.conn.execute(
                update(promotions).where(promotions.c.promotion_id == p.promotion_id).values(**values, updated_at_us=ts)
            )
            row = (await uow.conn.execute(select(promotions).where(promotions.c.promotion_id == p.promotion_id))).one()
            trail = change_fields(None if before is None else _promotion_fields(before), _promotion_fields(row))
            trail |= {"operator": operator, "promotion_id": p.promotion_id}
            uow.after_commit(lambda: log.info("promotion upserted", extra=trail))
            return _promotion_pb(row)

        return await idem.run(work)

    async def list_promotions(self, req: wallet_pb2.ListPromotionsRequest) -> wallet_pb2.ListPromotionsResponse:
        """Promotions (of one package, or all), newest start first, at most PROMOTIONS_LIST_MAX."""
        q = select(promotions)
        if req.package_id:
            q = q.where(promotions.c.package_id == require_id(req.package_id, "package_id"))
        q = q.order_by(promotions.c.starts_at_us.desc(), promotions.c.promotion_id).limit(PROMOTIONS_LIST_MAX)
        async with self.db.unit_of_work(readonly=True) as uow:
            rows = (await uow.conn.execute(q)).all()
        return wallet_pb2.ListPromotionsResponse(promotions=[_promotion_pb(r) for r in rows])

    # ---- restrictions ------------------------------------------------------------------

    @answers_retry(common.idempotency, "SetAccountRestrictions", wallet_pb2.AccountRestrictions)
    async def set_restrictions(
        self,
        req: wallet_pb2.SetAccountRestrictionsRequest,
        operator: str = "",
        *,
        idem: IdempotentCall[wallet_pb2.AccountRestrictions],
    ) -> wallet_pb2.AccountRestrictions:
        """Record age and block status (an operator's or the identity service's word), once per key.

        `operator` is who made the change (the token's x-operator when the call sent the token,
        which the servicer checks; "" for an internal caller without it), logged with what
        changed, so T&S can trace every block, unblock and age sent with a token to someone. The birth date itself
        is not logged (personal data; the users row keeps it), only that it was set.

        Only the fields the request sets change: blocking or unblocking a user never clears the
        age that keeps a minor from spending, and recording an age never lifts a block. A retry
        with the same key answers as the first call did and changes nothing, so a late retry of
        an older request cannot undo a newer one made under another key.
        """
        require_id(req.user_id, "user_id")
        require_key(req.idempotency_key)
        changes: dict[str, Any] = {}
        if req.HasField("birth_date"):
            born = domain.parse_birth_date(req.birth_date, self._today())
            changes["birth_date"] = born.isoformat() if born else None
        if req.HasField("is_minor"):
            changes["is_minor"] = req.is_minor
        if req.HasField("blocked"):
            changes["blocked"] = req.blocked
        if req.HasField("region"):
            changes["region"] = domain.check_region(req.region or self.settings.default_region)

        # What changed, for the log: blocked, is_minor and region with their values, the birth
        # date only as set (True) or cleared (False).
        logged: dict[str, Any] = {"operator": operator, "user_id": req.user_id}
        logged |= {k: v for k, v in changes.items() if k != "birth_date"}
        if "birth_date" in changes:
            logged["birth_date_set"] = changes["birth_date"] is not None

        async def work(uow: UnitOfWork) -> wallet_pb2.AccountRestrictions:
            ts = now_us()
            new_user = {
                "birth_date": None,
                "is_minor": False,
                "blocked": False,
                "region": self.settings.default_region.upper(),
                **changes,
                "updated_at_us": ts,
            }
            # Insert-if-missing then update: two first calls for a new user cannot both insert.
            await uow.conn.execute(insert_ignore(self.db.dialect, users).values(user_id=req.user_id, **new_user))
            await self._ensure_account(uow, req.user_id)
            # The user's coin account is held before the change, as every spend batch holds it
            # from before its restrictions check to its commit (spending.py): a spend in flight
            # lands before this call answers, and one after it reads the change. Without it, a
            # block answered while a spend that had read "not blocked" still committed coins
            # after (PostgreSQL; SQLite has one writer). A recipient's account is not held by a
            # spend: a gift to a creator blocked meanwhile may still land (payout's withdrawal
            # checks stop its diamonds).
            ac = accounts.c
            await uow.conn.execute(
                select(ac.account_id).where(ac.account_id == domain.user_account(req.user_id)).with_for_update()
            )
            await uow.conn.execute(
                update(users).where(users.c.user_id == req.user_id).values(**changes, updated_at_us=ts)
            )
            # The answer is read in this transaction, after its own update (which holds the row
            # on PostgreSQL): the stored answer is what this call left, not a later call's state.
            r = await self._restrictions(uow, req.user_id)
            check(r is not None, "the users row exists after its insert-if-missing")
            uow.after_commit(lambda: log.info("account restrictions set", extra=logged))
            return self._restrictions_pb(req.user_id, r, self._today())

        return await idem.run(work)

    async def get_restrictions(self, user_id: str) -> wallet_pb2.AccountRestrictions:
        """A user's restrictions and whether they may spend now."""
        require_id(user_id, "user_id")
        async with self.db.unit_of_work(readonly=True) as uow:
            r = await self._restrictions(uow, user_id)
        return self._restrictions_pb(user_id, r, self._today())

    async def get_restrictions_many(
        self, req: wallet_pb2.GetAccountRestrictionsManyRequest
    ) -> wallet_pb2.GetAccountRestrictionsManyResponse:
        """Each listed user's restrictions, in request order, from one read (see wallet.proto)."""
        if not 1 <= len(req.user_ids) <= RESTRICTIONS_MANY_IDS_MAX:
            raise InvalidArgument(f"user_ids must hold 1..{RESTRICTIONS_MANY_IDS_MAX} ids", "INVALID_BATCH_SIZE")
        for user_id in req.user_ids:
            require_id(user_id, "user_ids")
        async with self.db.unit_of_work(readonly=True) as uow:
            rows = await uow.conn.execute(users_of(self.db.dialect), {"ids": sorted(set(req.user_ids))})
            found = {r.user_id: restrictions_of(r) for r in rows}
        today = self._today()
        return wallet_pb2.GetAccountRestrictionsManyResponse(
            restrictions=[self._restrictions_pb(u, found.get(u), today) for u in req.user_ids]
        )

    def _restrictions_pb(
        self, user_id: str, r: domain.Restrictions | None, today: dt.date
    ) -> wallet_pb2.AccountRestrictions:
        """The answer for one user: a user the wallet has no row for may spend, in the default region."""
        out = wallet_pb2.AccountRestrictions(user_id=user_id, region=self.settings.default_region, may_spend=True)
        if r is not None:
            out.birth_date = r.birth_date.isoformat() if r.birth_date else ""
            out.is_minor = r.is_minor
            out.blocked = r.blocked
            out.region = r.region
            try:
                domain.check_may_transact(r, self.settings.adult_age_years, self.region_ages, today)
            except FailedPrecondition:
                out.may_spend = False
        return out

    # ---- audit -------------------------------------------------------------------------

    async def audit(self) -> wallet_pb2.WalletAudit:
        """The totals the suite's invariants need, computed from the ledger itself, the
        purchases' own coins to compare the ledger's issued and reversed coins with, and what the
        reversals claimed back from creators, to compare payout's clawbacks with."""
        p = postings.c
        async with self.db.unit_of_work(readonly=True, snapshot=True) as uow:
            c = uow.conn
            by_account = dict(
                (
                    await c.execute(
                        select(p.account_id, func.sum(p.amount))
                        .where(~p.account_id.like("user:%"))
                        .group_by(p.account_id)
                    )
                ).all()
            )
            user_sum = (await c.execute(select(func.coalesce(func.sum(accounts.c.balance), 0)))).scalar_one()
            ledger_sum = (await c.execute(select(func.coalesce(func.sum(p.amount), 0)))).scalar_one()
            unbalanced = (
                await c.execute(
                    select(func.count()).select_from(
                        select(p.entry_id).group_by(p.entry_id).having(func.sum(p.amount) != 0).subquery()
                    )
                )
            ).scalar_one()
            sums = select(p.account_id, func.sum(p.amount).label("s")).group_by(p.account_id).subquery()
            mismatch = (
                await c.execute(
                    select(func.count())
                    .select_from(accounts.outerjoin(sums, sums.c.account_id == accounts.c.account_id))
                    .where(accounts.c.balance != func.coalesce(sums.c.s, 0))
                )
            ).scalar_one()
            # A balance goes below zero only by reversals (a spend never overdraws), and by at most
            # the coins they took back: a debt deeper than every coin reversed from the user is
            # one no reversal explains, even for a user with a reversal.
            reversed_coins = (
                select(purchases.c.user_id, func.sum(purchases.c.coins).label("coins"))
                .where(purchases.c.status.in_(_REVERSED))
                .group_by(purchases.c.user_id)
                .subquery()
            )
            negative = (
                await c.execute(
                    select(func.count())
                    .select_from(accounts.outerjoin(reversed_coins, reversed_coins.c.user_id == accounts.c.user_id))
                    .where(
                        accounts.c.balance < 0,
                        accounts.c.balance < -func.coalesce(reversed_coins.c.coins, 0),
                    )
                )
            ).scalar_one()
            spend_counts = (
                await c.execute(
                    select(
                        func.coalesce(func.sum(case((spends.c.status == SPENT, 1), else_=0)), 0),
                        func.coalesce(func.sum(case((spends.c.status == CANCELLED, 1), else_=0)), 0),
                    )
                )
            ).one()
            # The spends' own rows against what their entries posted to system:spent: a spend
            # posted twice, or for more than its row, leaves every entry balanced.
            spent_posted = (
                select(p.entry_id, func.sum(p.amount).label("coins"))
                .where(p.account_id.like("system:spent:%"))
                .group_by(p.entry_id)
                .subquery()
            )
            spent_rows_coins, posting_mismatch = (
                await c.execute(
                    select(
                        func.coalesce(func.sum(spends.c.amount), 0),
                        func.coalesce(
                            func.sum(case((func.coalesce(spent_posted.c.coins, 0) != spends.c.amount, 1), else_=0)), 0
                        ),
                    )
                    .select_from(spends.outerjoin(spent_posted, spent_posted.c.entry_id == spends.c.entry_id))
                    .where(spends.c.status == SPENT)
                )
            ).one()
            # The purchases' own coins, credited and reversed, and what the reversals' events told
            # payout to claw back (their `coins_already_spent`), in one read of the purchases. Each
            # reversal records it (`coins_claimed`, migration 0007; SUM skips a NULL); one reversed
            # before that and not read since (`_reversal_history` fills it in lazily) is computed
            # as its event was then, by legacy_claims_select().
            pu = purchases.c
            is_reversed = pu.status.in_(_REVERSED)
            credited, reversed_, recorded_claims = (
                await c.execute(
                    select(
                        func.coalesce(func.sum(pu.coins), 0),
                        func.coalesce(func.sum(case((is_reversed, pu.coins), else_=0)), 0),
                        func.coalesce(func.sum(case((is_reversed, pu.coins_claimed), else_=0)), 0),
                    ).where(pu.status.in_(_CREDITED))
                )
            ).one()
            legacy_claims = (await c.execute(legacy_claims_select())).scalar_one()
            pending = await self.outbox.pending(uow)
            first_pending, last = await self.outbox.marks(uow)
        spent_by_reason = {
            acc.removeprefix("system:spent:"): int(v)
            for acc, v in by_account.items()
            if acc.startswith("system:spent:")
        }
        return wallet_pb2.WalletAudit(
            coins_issued=-int(by_account.get(domain.ISSUED, 0)),
            coins_in_user_balances=int(user_sum),
            coins_spent=sum(spent_by_reason.values()),
            coins_reversed=int(by_account.get(domain.REVERSED, 0)),
            ledger_sum=int(ledger_sum),
            unbalanced_entries=int(unbalanced),
            negative_balances_without_reversal=int(negative),
            spends=int(spend_counts[0]),
            spends_cancelled=int(spend_counts[1]),
            postings_mismatch=int(mismatch),
            outbox_pending=pending,
            coins_spent_by_reason=spent_by_reason,
            coins_of_credited_purchases=int(credited),
            coins_of_reversed_purchases=int(reversed_),
            outbox_first_pending_id=first_pending,
            outbox_last_id=last,
            coins_of_spent_rows=int(spent_rows_coins),
            spends_posting_mismatch=int(posting_mismatch),
            coins_claimed_by_reversals=int(recorded_claims) + int(legacy_claims),
        )


def legacy_claims_select() -> Select[tuple[int]]:
    """What the reversals from before wallet migration 0007 (`coins_claimed` NULL) claimed, summed:
    the coins each took that the balance before it could not cover, from the balance its ledger
    entry left. Each entry is found by its purchase in the reversals' own index (migration 0013),
    not in the whole journal (one entry per spend): the index's predicate, as text, stands in the
    WHERE beside the join on the purchase's status, which it does not change.
    """
    p, j, po = purchases.c, journal_entries.c, postings.c
    covered = po.balance_after + p.coins  # what the balance before the reversal held, clamped below
    return (
        select(
            func.coalesce(func.sum(p.coins - case((covered < 0, 0), (covered > p.coins, p.coins), else_=covered)), 0)
        )
        .select_from(purchases)
        .join(
            journal_entries,
            and_(j.reference_id == p.purchase_id, text(REVERSAL_ENTRIES), j.kind == literal("REVERSAL_") + p.status),
        )
        .join(
            postings,
            and_(po.entry_id == j.entry_id, po.account_id == literal(domain.user_account("")) + p.user_id),
        )
        .where(p.status.in_(_REVERSED), p.coins_claimed.is_(None))
    )


def _package_fields(r: Any) -> dict[str, Any]:
    """A coin_packages row as its trail line shows it."""
    keys = ("region", "currency_code", "channel", "coins", "price_minor", "active")
    return {k: getattr(r, k) for k in keys}


def _promotion_fields(r: Any) -> dict[str, Any]:
    """A promotions row as its trail line shows it."""
    keys = ("package_id", "bonus_coins", "discount_bps", "starts_at_us", "ends_at_us", "active")
    return {k: getattr(r, k) for k in keys}


def _terms(r) -> PromotionTerms:  # type: ignore[no-untyped-def]
    return PromotionTerms(r.promotion_id, r.bonus_coins, r.discount_bps, r.starts_at_us, r.ends_at_us, r.active)


def _package_pb(r, deal: domain.Offer | None = None, promos: dict | None = None) -> wallet_pb2.CoinPackage:  # type: ignore[no-untyped-def,type-arg]
    deal = deal or domain.Offer(r.coins, 0, r.price_minor, r.price_minor, "")
    out = wallet_pb2.CoinPackage(
        package_id=r.package_id,
        region=r.region,
        coins=r.coins,
        price=common_pb2.Money(currency_code=r.currency_code, amount_minor=deal.price_minor),
        active=r.active,
        list_price=common_pb2.Money(currency_code=r.currency_code, amount_minor=deal.list_price_minor),
        bonus_coins=deal.bonus_coins,
        total_coins=deal.coins + deal.bonus_coins,
        promotion_id=deal.promotion_id,
        currency_minor_units=domain.CURRENCY_MINOR_UNITS.get(r.currency_code, 2),
        channel=r.channel,
    )
    if deal.promotion_id and promos:
        ends = next(p.ends_at_us for p in promos[r.package_id] if p.promotion_id == deal.promotion_id)
        out.promotion_ends_at.CopyFrom(to_timestamp(ends))
    return out


def _promotion_pb(r) -> wallet_pb2.Promotion:  # type: ignore[no-untyped-def]
    return wallet_pb2.Promotion(
        promotion_id=r.promotion_id,
        package_id=r.package_id,
        bonus_coins=r.bonus_coins,
        discount_bps=r.discount_bps,
        starts_at=to_timestamp(r.starts_at_us),
        ends_at=to_timestamp(r.ends_at_us),
        active=r.active,
    )


def _refuse_another_event(provider: PaymentProvider, event: ProviderEvent, first: signing.RecordedEvent) -> None:
    """PROVIDER_EVENT_ID_REUSED unless `event` is the one its id was recorded with (then a duplicate)."""
    signing.refuse_another_event(
        provider.name, event.provider_event_id, "purchase", first, event.purchase_id, event.event_type
    )


def _purchase_pb(r: dict) -> wallet_pb2.Purchase:  # type: ignore[type-arg]
    return wallet_pb2.Purchase(
        purchase_id=r["purchase_id"],
        user_id=r["user_id"],
        package_id=r["package_id"],
        coins=r["coins"],
        price=common_pb2.Money(currency_code=r["currency_code"], amount_minor=r["amount_minor"]),
        payment_method=_METHOD_ENUM.get(r["payment_method"], wallet_pb2.PAYMENT_METHOD_UNSPECIFIED),
        status=_STATUS_ENUM[PurchaseStatus(r["status"])],
        checkout=wallet_pb2.CheckoutSession(provider=r["provider"], session_id=r["checkout_session_id"]),
        created_at=to_timestamp(r["created_at_us"]),
        updated_at=to_timestamp(r["updated_at_us"]),
        bonus_coins=r.get("bonus_coins") or 0,
        promotion_id=r.get("promotion_id") or "",
        region=r.get("region") or "",
    )
