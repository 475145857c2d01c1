"""Stateful properties of the wallet's use cases against a real SQLite file (no NATS: the outbox is a table).

Random sequences of purchases, signed callbacks (duplicated, replayed out of order), spends,
replays, cancels, limit changes and the passing of time are run against a model; after every step
the books must balance, every balance must equal the model and the sum of its postings, and no
balance may be negative without a reversal behind it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from sqlalchemy import event as sa_event

from livegifts.wallet.v1 import wallet_pb2
from services.common import signing
from services.common.db import Database
from services.common.errors import DomainError
from services.common.migrate import upgrade_head
from services.common.outbox import Outbox
from services.wallet import domain
from services.wallet.config import WalletSettings
from services.wallet.domain import LimitState, Period, PurchaseStatus
from services.wallet.payments import DevProvider, PaymentRouter, dev_event_payload, parse_routes
from services.wallet.storage import common
from services.wallet.usecases import Wallet

SECRET = b"property-test-secret"
MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "wallet" / "migrations"
BASE_US = 1_795_305_600_000_000  # 2026-11-22T00:00:00Z
COOLOFF_S = 3600
USERS = ["ann", "bob", "cy"]
PACKAGES = {"us-usd-70": ("USD", 70, 99), "us-usd-350": ("USD", 350, 499), "jp-jpy-70": ("JPY", 70, 160)}
EVENT_TYPES = {
    "payment.succeeded": PurchaseStatus.SUCCEEDED,
    "payment.failed": PurchaseStatus.FAILED,
    "charge.refunded": PurchaseStatus.REFUNDED,
    "charge.dispute.lost": PurchaseStatus.CHARGED_BACK,
}
REASONS = [wallet_pb2.SPEND_REASON_GIFT, wallet_pb2.SPEND_REASON_TIP, wallet_pb2.SPEND_REASON_UNLOCK]
_template: dict[str, Path] = {}  # "dir": this run's pytest tmp dir; "db": the migrated template in it


def _no_fsync(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=OFF")
    cursor.close()


def template_db() -> Path:
    """A migrated wallet database, made once per run (in the test's tmp dir) and copied for every example."""
    if "db" not in _template:
        path = _template["dir"] / "wallet-template.db"
        asyncio.run(upgrade_head(MIGRATIONS, f"sqlite+aiosqlite:///{path}"))
        _template["db"] = path
    return _template["db"]


class WalletMachine(RuleBasedStateMachine):
    """The wallet against a model of balances, purchases, spends and limits."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="wallet-prop-", dir=_template["dir"]))
        shutil.copy(template_db(), self.dir / "wallet.db")
        url = f"sqlite+aiosqlite:///{self.dir / 'wallet.db'}"
        cfg = WalletSettings(
            database_url=url,
            nats_url="nats://127.0.0.1:1",
            payment_webhook_secret=SECRET.decode(),
            spending_limit_cooloff_s=COOLOFF_S,
        )
        self.db = Database(url, pool_size=2, pool_timeout_s=5, application_name="prop")
        # Durability is not under test here: skip the fsync per commit so the run stays short.
        sa_event.listen(self.db.engine.sync_engine, "connect", _no_fsync)
        router = PaymentRouter([DevProvider(SECRET, 300)], parse_routes(cfg.payment_routes))
        self.now = BASE_US
        self.wallet = Wallet(self.db, Outbox(common.outbox), router, cfg, clock=lambda: self.now)
        # The model.
        self.balance: dict[str, int] = {}
        self.reversed_users: set[str] = set()
        self.purchases: list[dict] = []  # type: ignore[type-arg]
        self.callbacks: list[tuple[wallet_pb2.HandlePaymentEventRequest, str]] = []
        self.applied_events: set[str] = set()
        self.spends: list[tuple[wallet_pb2.SpendRequest, str | None]] = []  # request, spend id if charged
        self.cancelled: set[str] = set()
        self.limits: dict[tuple[str, str, Period], LimitState] = {}
        self.counters: dict[tuple[str, Period, str], int] = {}

    def run(self, coro):  # type: ignore[no-untyped-def]
        """Run one use case to completion on this machine's loop."""
        return self.loop.run_until_complete(coro)

    def call(self, coro):  # type: ignore[no-untyped-def]
        """(answer, None) or (None, reason of the domain error)."""
        try:
            return self.run(coro), None
        except DomainError as exc:
            return None, exc.reason

    def teardown(self) -> None:
        self.run(self.db.dispose())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @initialize()
    def start(self) -> None:
        self.now = BASE_US

    # ---- purchases and callbacks -------------------------------------------------------

    @rule(user=st.sampled_from(USERS), package=st.sampled_from(sorted(PACKAGES)))
    def create_purchase(self, user: str, package: str) -> None:
        currency, coins, price = PACKAGES[package]
        p = self.run(
            self.wallet.create_purchase(
                wallet_pb2.CreatePurchaseRequest(
                    user_id=user,
                    package_id=package,
                    currency_code=currency,
                    payment_method=wallet_pb2.PAYMENT_METHOD_PAYPAL,
                    idempotency_key=uuid.uuid4().hex,
                )
            )
        )
        assert (p.status, p.coins, p.price.amount_minor) == (wallet_pb2.PURCHASE_STATUS_PENDING, coins, price)
        self.balance.setdefault(user, 0)
        self.purchases.append({"p": p, "status": PurchaseStatus.PENDING})

    def _expect_callback(
        self, req: wallet_pb2.HandlePaymentEventRequest, event_id: str, target: PurchaseStatus, i: int
    ):  # type: ignore[no-untyped-def]
        model = self.purchases[i]
        answer, reason = self.call(self.wallet.handle_payment_event(req))
        event(f"callback: {reason or ('duplicate' if answer.duplicate else target.value)}")
        if event_id in self.applied_events:
            assert reason is None and answer.duplicate, "a replayed event must be a no-op"
            return
        if target not in domain.TRANSITIONS[model["status"]]:
            assert reason == "INVALID_TRANSITION", reason
            return
        assert reason is None and not answer.duplicate
        self.applied_events.add(event_id)
        model["status"] = target
        user, coins = model["p"].user_id, model["p"].coins
        if target is PurchaseStatus.SUCCEEDED:
            self.balance[user] += coins
        elif target in (PurchaseStatus.REFUNDED, PurchaseStatus.CHARGED_BACK):
            self.balance[user] -= coins
            self.reversed_users.add(user)

    @rule(pick=st.integers(0, 10_000), event_type=st.sampled_from(sorted(EVENT_TYPES)))
    def callback(self, pick: int, event_type: str) -> None:
        if not self.purchases:
            return
        i = pick % len(self.purchases)
        p = self.purchases[i]["p"]
        event_id = uuid.uuid4().hex
        payload = dev_event_payload(event_id, event_type, p.purchase_id, p.price.amount_minor, p.price.currency_code)
        req = wallet_pb2.HandlePaymentEventRequest(
            provider="dev", payload=payload, signature=signing.sign(SECRET, payload)
        )
        self.callbacks.append((req, event_id))
        self._expect_callback(req, event_id, EVENT_TYPES[event_type], i)

    @rule(pick=st.integers(0, 10_000))
    def replay_callback(self, pick: int) -> None:
        """A provider re-sends an old callback: a no-op if it took effect, else judged anew (reordering)."""
        if not self.callbacks:
            return
        req, event_id = self.callbacks[pick % len(self.callbacks)]
        body = json.loads(req.payload)
        i = next(k for k, m in enumerate(self.purchases) if m["p"].purchase_id == body["purchase_id"])
        self._expect_callback(req, event_id, EVENT_TYPES[body["type"]], i)

    @rule(pick=st.integers(0, 10_000))
    def forged_callback(self, pick: int) -> None:
        if not self.purchases:
            return
        p = self.purchases[pick % len(self.purchases)]["p"]
        payload = dev_event_payload("forged", "payment.succeeded", p.purchase_id, p.price.amount_minor, "USD")
        req = wallet_pb2.HandlePaymentEventRequest(
            provider="dev", payload=payload, signature=signing.sign(b"x", payload)
        )
        assert self.call(self.wallet.handle_payment_event(req))[1] == "SIGNATURE_INVALID"

    # ---- spends ------------------------------------------------------------------------

    def _cap(self, user: str, period: Period) -> int | None:
        states = [st for (u, _setter, p), st in self.limits.items() if u == user and p is period]
        return domain.effective_limit(states, self.now)

    def _expect_spend(self, req: wallet_pb2.SpendRequest, previous: str | None) -> str | None:
        answer, reason = self.call(self.wallet.spend(req))
        event(f"spend: {reason or 'charged'}")
        key = req.idempotency_key
        if key in self.cancelled:
            assert reason == "SPEND_CANCELLED", reason
            return None
        if previous is not None:
            assert reason is None and answer.spend_id == previous, "a replayed spend must return the first answer"
            return previous
        user, amount = req.user_id, req.amount
        keys = domain.period_keys(self.now)
        over = [
            p
            for p in Period
            if (cap := self._cap(user, p)) is not None and self.counters.get((user, p, keys[p]), 0) + amount > cap
        ]
        if over:
            assert reason == "SPENDING_LIMIT_EXCEEDED", reason
            return None
        if user not in self.balance:
            assert reason == "ACCOUNT_NOT_FOUND", reason
            return None
        if self.balance[user] < amount:
            assert reason == "INSUFFICIENT_COINS", reason
            return None
        assert reason is None, reason
        assert answer.balance_after == self.balance[user] - amount
        self.balance[user] -= amount
        for p in Period:
            self.counters[(user, p, keys[p])] = self.counters.get((user, p, keys[p]), 0) + amount
        return answer.spend_id

    @rule(user=st.sampled_from(USERS), amount=st.integers(1, 400), reason=st.sampled_from(REASONS))
    def spend(self, user: str, amount: int, reason: int) -> None:
        req = wallet_pb2.SpendRequest(
            user_id=user, amount=amount, reason=reason, reference_id="ref", idempotency_key=uuid.uuid4().hex
        )
        self.spends.append((req, self._expect_spend(req, None)))

    @rule(pick=st.integers(0, 10_000))
    def replay_spend(self, pick: int) -> None:
        if not self.spends:
            return
        i = pick % len(self.spends)
        req, previous = self.spends[i]
        self.spends[i] = (req, self._expect_spend(req, previous))

    @rule(pick=st.integers(0, 10_000), fresh=st.booleans())
    def cancel_spend(self, pick: int, fresh: bool) -> None:
        if fresh or not self.spends:
            key = uuid.uuid4().hex
            previous = None
        else:
            req, previous = self.spends[pick % len(self.spends)]
            key = req.idempotency_key
        answer = self.run(self.wallet.cancel_spend(wallet_pb2.CancelSpendRequest(idempotency_key=key)))
        if previous is not None:
            assert answer.outcome == wallet_pb2.CancelSpendResponse.OUTCOME_SPENT
            assert answer.spend.spend_id == previous
        else:
            assert answer.outcome == wallet_pb2.CancelSpendResponse.OUTCOME_CANCELLED
            self.cancelled.add(key)

    # ---- limits and time ---------------------------------------------------------------

    @rule(
        user=st.sampled_from(USERS),
        period=st.sampled_from(list(Period)),
        value=st.sampled_from([0, 50, 200, 600, 2000]),
        operator=st.booleans(),
    )
    def set_limit(self, user: str, period: Period, value: int, operator: bool) -> None:
        field = {Period.DAY: "daily", Period.WEEK: "weekly", Period.MONTH: "monthly"}[period]
        req = wallet_pb2.SetSpendingLimitsRequest(
            user_id=user,
            set_by=wallet_pb2.LIMIT_SETTER_OPERATOR if operator else wallet_pb2.LIMIT_SETTER_USER,
            idempotency_key=uuid.uuid4().hex,
            **{field: value},
        )
        out = self.run(self.wallet.set_spending_limits(req))
        setter = "OPERATOR" if operator else "USER"
        state = self.limits.get((user, setter, period), LimitState(None))
        self.limits[(user, setter, period)] = domain.change_limit(state, value or None, self.now, COOLOFF_S * 1_000_000)
        shown = next(p for p in out.periods if p.period == period.value)
        assert shown.limit_coins == (self._cap(user, period) or 0)

    @rule(seconds=st.sampled_from([60, COOLOFF_S, 86_400, 7 * 86_400]))
    def advance_time(self, seconds: int) -> None:
        self.now += seconds * 1_000_000

    # ---- invariants --------------------------------------------------------------------

    @invariant()
    def books_balance_and_match_the_model(self) -> None:
        audit = self.run(self.wallet.audit())
        assert audit.ledger_sum == 0
        assert audit.unbalanced_entries == 0
        assert audit.postings_mismatch == 0
        assert audit.negative_balances_without_reversal == 0
        assert audit.coins_issued == audit.coins_in_user_balances + audit.coins_spent + audit.coins_reversed
        assert audit.coins_in_user_balances == sum(self.balance.values())
        for user, coins in self.balance.items():
            assert self.run(self.wallet.get_balance(user)).coins == coins
            if coins < 0:
                assert user in self.reversed_users, "a negative balance needs a reversal behind it"

    @invariant()
    def no_period_passes_its_cap(self) -> None:
        for user in USERS:
            limits = self.run(self.wallet.get_spending_limits(user))
            keys = domain.period_keys(self.now)
            for p in limits.periods:
                assert p.spent_coins == self.counters.get((user, Period(p.period), keys[Period(p.period)]), 0)


@pytest.mark.timeout(120)
def test_random_wallet_histories_keep_the_books_balanced_and_match_the_model(tmp_path: Path) -> None:
    # Every file of the run (the template and each example's copy) lives under pytest's tmp_path,
    # which pytest removes by its retention policy; the template is not reused after the test.
    _template["dir"] = tmp_path
    try:
        run_state_machine_as_test(
            WalletMachine,
            settings=settings(
                max_examples=15,
                stateful_step_count=25,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
    finally:
        _template.clear()
