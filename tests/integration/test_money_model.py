"""A model of the suite's money rules, driven against a real running suite (nats-server + the
three services), once on SQLite and once on PostgreSQL: random sequences of purchases, gifts,
tips, unlocks, batches, retries, races, reversals, stream ends, withdrawals and provider
callbacks, checked against what each user's coins and each creator's diamonds must be.

The model's rules are written from the contract (../shared/ARCHITECTURE.md, README "Gifting",
"The wallet", "Payout"), not from the services' code:

- a purchase credits its package's coins once, however often its callback comes; a failed one
  credits nothing; a refund or chargeback takes them all back (the balance may go negative, which
  blocks spending), and reports as already spent the part of the new debt no earlier reversal
  claimed (README "Reversals"), also when the reversed purchase had only repaid a debt;
- a gift, tip or unlock charges its coins once per key, or is refused and changes nothing
  (STREAM_NOT_LIVE, INSUFFICIENT_COINS, also for a user who never bought); a retry
  of the same request answers the first receipt (a refused one is checked again); another request
  under a recorded key is IDEMPOTENCY_KEY_REUSED; a second unlock of the same content charges
  nothing; a SendGifts batch answers item by item, in request order, each as SendGift would;
- copies of one gift sent at once under one key (some through SendGifts) answer one receipt or
  the refusal, or ABORTED (retry), and a retry afterwards has the final word; two unlocks of the
  same content at once charge once; a chargeback racing a gift of the same user must fit one order;
- each coin received earns its creator 5000 bp (the policy this test sets) in 1/10000 diamonds,
  remainders kept; a reversal claws back the reversing user's newest earnings first, up to what
  it reports as spent (README "Clawback"). Once a reversal has raced its gifts' credits, which
  creator loses what is no longer exact, so from then on the example holds clawbacks to the model
  in sum over its creators, and each creator's buckets to each other;
- a withdrawal holds diamonds (INSUFFICIENT_DIAMONDS beyond what is available, BALANCE_NEGATIVE
  while negative), is approved at once below the review threshold, else approved or rejected
  (released) by an operator; its key again with another request is IDEMPOTENCY_KEY_REUSED; a
  claimed one can no longer be rejected; the provider's PAID takes the diamonds for good, FAILED
  releases them; a callback for one never submitted is refused, a duplicate changes nothing, a
  contradicting one is refused.

Invariants: after every step each user's balance (and debt) is exactly the model's; each
retried key answers its first receipt and charges nothing more; a refused call changes nothing
(balances, and for payout calls the creator's earnings, re-read at once). Before a reversal or a
withdrawal, and at the end of every example, each creator's earnings (coins received, lifetime
diamonds and remainder, clawed back and its remainder, available, held, withdrawn) must reach the
model's within a bounded wait (the gift and reversal events flow through NATS); at the end of
every example the cross-service audit (`livegifts audit --detail --wait`, the same functions in
process) passes.

One suite per backend; examples are kept apart by fresh user, creator and stream ids, not by
restarting processes. The PostgreSQL leg (conftest: LIVEGIFTS_TEST_POSTGRES_URL, its own databases
created and dropped, the leg skipped saying why when unset or unreachable) is where the racing
rules race for real: row locks and concurrent transactions, where SQLite has one writer. The
payout provider's automatic callback is off, so the test sends the PAID / FAILED callbacks itself.
The policy is set once: 50% share, 200 diamonds = $1, minimum 10 cents, no fee, review from 50
cents.

Bounded for CI: derandomized (the same examples every run), LIVEGIFTS_MONEY_MODEL_EXAMPLES
examples of at most LIVEGIFTS_MONEY_MODEL_STEPS steps (default 30); without the former, 10 on
SQLite and 8 on PostgreSQL (DEFAULT_EXAMPLES), about 20 s and 25 s. To hunt longer locally
(pytest-timeout stops a test at 300 s: raise it with -o timeout=N; -k postgres or -k sqlite for
one leg), e.g.:

    LIVEGIFTS_MONEY_MODEL_EXAMPLES=100 LIVEGIFTS_MONEY_MODEL_STEPS=50 LIVEGIFTS_MONEY_MODEL_SEED=7 \\
        LIVEGIFTS_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/postgres \\
        .venv/bin/pytest -q -s -o timeout=900 tests/integration/test_money_model.py -k postgres

LIVEGIFTS_MONEY_MODEL_SEED set: random examples from that seed instead of the derandomized ones.
Shrinking replays sequences against the real suite and takes minutes, so it is off unless
LIVEGIFTS_MONEY_MODEL_SHRINK=1; a failure prints its steps either way. With -s the test prints
what the examples exercised (refusals, races, reversals, withdrawals by outcome).
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    INITIALIZE_RULE_MARKER,
    RULE_MARKER,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from livegifts.gifting.v1 import gifting_pb2, gifting_pb2_grpc
from livegifts.payout.v1 import payout_pb2, payout_pb2_grpc
from livegifts.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from services.cli.audit import OK, collect, wait_until_settled
from services.cli.suite import Suite
from services.common import signing
from services.payout.providers import dev_payout_payload
from tests.integration.conftest import BACKENDS, OPERATOR_TOKEN, WEBHOOK_SECRET, running_suite
from tests.integration.helpers import reason_of, signed_callback, uid

T = TypeVar("T")
# Examples per run by default, per backend: each costs 1 to 2 s, and the PostgreSQL leg also
# creates its databases and migrates them, so each leg stays within CI's budget (20 s, 25 s).
DEFAULT_EXAMPLES = {"sqlite": 10, "postgres": 8}
EXAMPLES = os.environ.get("LIVEGIFTS_MONEY_MODEL_EXAMPLES")
STEPS = int(os.environ.get("LIVEGIFTS_MONEY_MODEL_STEPS", "30"))
SEED = os.environ.get("LIVEGIFTS_MONEY_MODEL_SEED")
SHRINK = os.environ.get("LIVEGIFTS_MONEY_MODEL_SHRINK", "") == "1"
SETTLE_S = 20.0  # how long the asynchronous flow (gift and reversal events) may take to settle
SHARE_BP = 5000
PACKAGES = {"us-usd-70": 70, "us-usd-350": 350, "us-usd-700": 700}
GIFTS = {"rose": 1, "finger-heart": 5, "lollipop": 10, "sun-cream": 50}
CONTENT_PRICE = 30
DIAMONDS_PER_DOLLAR = 200  # 200 diamonds = 100 cents: 2 diamonds a cent
MIN_MINOR, REVIEW_FROM_MINOR = 10, 50
OP = (("authorization", f"Bearer {OPERATOR_TOKEN}"), ("x-operator", "money-model"))
W, G, P = wallet_pb2, gifting_pb2, payout_pb2


@dataclass
class Purchase:
    pb: wallet_pb2.Purchase
    user: str
    coins: int
    status: str = "SUCCEEDED"  # or REFUNDED / CHARGED_BACK
    debt_repaid: int = 0  # of its coins, how many repaid a debt when credited
    claimed: int = 0  # once reversed: the coins its reversal reported as already spent
    callbacks: list[wallet_pb2.HandlePaymentEventRequest] = field(default_factory=list)


@dataclass
class Earning:
    event_id: str
    sender: str
    creator: str
    coins: int
    clawed: int = 0
    occurred_us: int | None = None  # payout's occurred_at, read once credited (orders clawbacks)


@dataclass
class CreatorModel:
    stream_id: str
    live: bool
    method_id: str
    content_id: str
    held: int = 0
    withdrawn: int = 0


@dataclass
class Withdrawal:
    pb: payout_pb2.Withdrawal
    creator: str
    diamonds: int
    status: str  # PENDING_REVIEW, APPROVED (or PROCESSING), PAID, FAILED, REJECTED
    key: str
    request: payout_pb2.RequestWithdrawalRequest
    callback: payout_pb2.HandlePayoutEventRequest | None = None


@dataclass
class KeyRecord:
    """What the first call under a key asked for and answered."""

    kind: str  # gift, tip, unlock
    request: Any
    receipt: Any | None  # None: refused (or cancelled) the last time it was tried


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def money_suite(backend: str, tmp_path: Path) -> Iterator[Suite]:
    """A suite of this test's own on each backend (it sets the payout policy), with the payout
    provider's callbacks left to the test."""
    if os.environ.get("LIVEGIFTS_TEST_TARGET_WALLET"):
        pytest.skip("sets the payout policy and sends the payout callbacks: needs a suite of its own")
    extra = {
        "payout": {
            "LIVEGIFTS_PAYOUT_DEV_PROVIDER_AUTO_CALLBACK": "false",
            # A reversal that raced its gifts' credits is settled within the model's wait.
            "LIVEGIFTS_PAYOUT_CLAWBACK_SETTLE_INTERVAL_S": "0.5",
        }
    }
    with running_suite(backend, tmp_path / "suite", "lgmodel", extra) as suite:
        yield suite


class Stubs:
    """The three services' stubs on channels of the test's event loop."""

    def __init__(self, suite: Suite) -> None:
        self.channels = [grpc.aio.insecure_channel(suite.addr(s)) for s in ("wallet", "gifting", "payout")]
        self.wallet = wallet_pb2_grpc.WalletServiceStub(self.channels[0])
        self.gifting = gifting_pb2_grpc.GiftingServiceStub(self.channels[1])
        self.payout = payout_pb2_grpc.PayoutServiceStub(self.channels[2])


async def answer(call: Awaitable[T]) -> T | tuple[grpc.StatusCode, str]:
    """The answer of a call, or (code, reason) when it failed."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), reason_of(exc) or ""


def item_outcome(result: Any) -> Any:
    """A batch item's receipt, or (code, reason) as the single call would have failed."""
    if result.WhichOneof("outcome") == "receipt":
        return result.receipt
    code = next(c for c in grpc.StatusCode if c.value[0] == result.error.code)
    return code, result.error.reason


INSUFFICIENT = (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_COINS")
NOT_LIVE = (grpc.StatusCode.FAILED_PRECONDITION, "STREAM_NOT_LIVE")
REUSED = (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")


class MoneyModel(RuleBasedStateMachine):
    """The suite against the model; `loop` and `stubs` are set by the test before it runs."""

    loop: asyncio.AbstractEventLoop
    stubs: Stubs
    suite: Suite
    seen: Counter[str]  # what the examples exercised, printed at the end (pytest -s)

    def saw(self, what: str) -> None:
        self.seen[what] += 1

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)  # type: ignore[arg-type]

    @initialize()
    def setup(self) -> None:
        self.users = [uid("mm-user") for _ in range(3)]
        self.coins = {u: 0 for u in self.users}
        self.purchases: list[Purchase] = []
        self.earnings: list[Earning] = []
        self.keys: dict[str, KeyRecord] = {}
        self.unlocked: dict[tuple[str, str], Any] = {}  # (user, content) -> first unlock receipt
        self.withdrawals: list[Withdrawal] = []
        self.creators: dict[str, CreatorModel] = {}
        self.loose = False  # a reversal raced its gifts' credits: clawbacks held to the model in sum
        self.observed_clawed: dict[str, int] = {}  # then: each creator's clawed units, as read
        self.stream_owner: dict[str, str] = {}  # every stream of the example, ended ones too
        self.accounts: set[str] = set()  # users the wallet has an account for (their first purchase made it)
        for _ in range(2):
            creator = uid("mm-creator")
            self.creators[creator] = self.run(self._new_creator(creator))
            self.stream_owner[self.creators[creator].stream_id] = creator
        # Two of the three users start with coins; the third has no account until it buys.
        for user in self.users[:2]:
            self.run(self._buy(user, "us-usd-700", replay=False))

    async def _new_creator(self, creator: str) -> CreatorModel:
        s = self.stubs
        stream = await s.gifting.StartStream(
            G.StartStreamRequest(creator_id=creator, title="model", idempotency_key=uid("start"))
        )
        method = await s.payout.AddPayoutMethod(
            P.AddPayoutMethodRequest(
                creator_id=creator,
                kind=P.PAYOUT_METHOD_KIND_PAYPAL,
                paypal_email=f"{creator}@example.com",
                idempotency_key=uid("pm"),
            )
        )
        await s.payout.VerifyPayoutMethod(
            P.VerifyPayoutMethodRequest(method_id=method.method_id, verified=True, idempotency_key=uid("v")),
            metadata=OP,
        )
        content = await s.gifting.CreateContent(
            G.CreateContentRequest(
                creator_id=creator, title="model", price_coins=CONTENT_PRICE, idempotency_key=uid("c")
            )
        )
        return CreatorModel(stream.stream_id, True, method.method_id, content.content_id)

    # ---- helpers -----------------------------------------------------------------------------

    def pick(self, items: list[T], i: int) -> T:
        return items[i % len(items)]

    def creator_of_stream(self, stream_id: str) -> str:
        return self.stream_owner[stream_id]

    def charge(self, kind: str, key: str, request: Any, receipt: Any, creator: str, sender: str, coins: int) -> None:
        """A call the model expects to have charged: check its receipt, apply it."""
        assert receipt.coins == coins, (kind, receipt, coins)
        assert receipt.status == G.GIFT_STATUS_SENT, (kind, receipt)
        self.coins[sender] -= coins
        assert receipt.sender_balance == self.coins[sender], (kind, receipt, self.coins[sender])
        self.keys[key] = KeyRecord(kind, request, receipt)
        self.earnings.append(Earning(receipt.gift_event_id, sender, creator, coins))

    def expect_outcome(
        self, kind: str, key: str, request: Any, got: Any, creator: str, sender: str, coins: int, live: bool
    ) -> None:
        """Apply what a first (or cancelled-key) gift or tip must do: the model decides, `got` must agree."""
        if not live:
            assert got == NOT_LIVE, (kind, request, got)
            self.saw(f"{kind} refused: stream ended")
            return
        if self.coins[sender] < coins:
            assert got == self.short(sender), (kind, request, got, self.coins[sender])
            self.saw(f"{kind} refused: {got[1]}")
            # The wallet refused it: the key is recorded (cancelled), a retry is checked again.
            self.keys[key] = KeyRecord(kind, request, None)
            return
        assert not isinstance(got, tuple), (kind, request, got, self.coins[sender])
        self.charge(kind, key, request, got, creator, sender, coins)
        self.saw(f"{kind} charged")

    def short(self, user: str) -> tuple[grpc.StatusCode, str]:
        """How a spend beyond the user's coins is refused (a user never credited has 0 coins)."""
        return INSUFFICIENT

    async def _settle_earnings(self) -> None:
        """Wait for every creator's earnings to reach the model, then note when each gift occurred.

        Once a reversal raced its gifts' credits (`loose`), which creator lost what is no longer
        exact (README "Clawback": what it cannot take yet is taken from the earnings as they
        arrive), so the clawbacks are held to the model in sum over the example's creators, and
        each creator's own clawed units are read back and must square with its other buckets."""
        deadline = time.monotonic() + SETTLE_S
        fixed = ("coins_received", "diamonds_lifetime", "remainder_units", "diamonds_held", "diamonds_withdrawn")
        while True:
            got = {c: await self._earnings(c) for c in self.creators}
            late = time.monotonic() > deadline
            settled = True  # exact: got == want says it all
            if self.loose:
                clawed = {c: g["diamonds_clawed_back"] * 10_000 + g["clawback_remainder_units"] for c, g in got.items()}
                want_total = sum(e.clawed for e in self.earnings) * SHARE_BP
                settled = sum(clawed.values()) == want_total and all(
                    {k: got[c][k] for k in fixed} == {k: self.expected_earnings(c)[k] for k in fixed} for c in got
                )
                if settled or late:
                    assert sum(clawed.values()) == want_total, (got, want_total)
                    self.observed_clawed = clawed
            want = {c: self.expected_earnings(c) for c in self.creators}
            # Loose, got == want alone also holds while a reversal's clawback is still on its way
            # (want then uses the clawed units read back before it): only a settled sum ends the wait.
            if (settled and got == want) or late:
                assert got == want, (got, want)
                break
            await asyncio.sleep(0.05)
        for creator in self.creators:
            unknown = {e.event_id: e for e in self.earnings if e.creator == creator and e.occurred_us is None}
            token = ""
            while unknown:
                page = await self.stubs.payout.ListEarnings(
                    P.ListEarningsRequest(creator_id=creator, page_token=token, page_size=500)
                )
                for entry in page.entries:
                    if entry.event_id in unknown:
                        unknown.pop(entry.event_id).occurred_us = entry.occurred_at.ToMicroseconds()
                token = page.next_page_token
                if not token:
                    break
            assert not unknown, f"credited but not listed: {sorted(unknown)}"

    async def _earnings(self, creator: str) -> dict[str, int]:
        """The creator's earnings as the model keeps them: all 0 before the first credit, and
        answered then too (README "Earnings": a creator is never NOT_FOUND)."""
        got = await answer(self.stubs.payout.GetEarnings(P.GetEarningsRequest(creator_id=creator)))
        assert not isinstance(got, tuple), (creator, got)
        return self.earnings_view(got)

    def earnings_view(self, e: payout_pb2.Earnings) -> dict[str, int]:
        return {
            "coins_received": e.coins_received,
            "diamonds_lifetime": e.diamonds_lifetime,
            "remainder_units": e.remainder_units,
            "diamonds_clawed_back": e.diamonds_clawed_back,
            "clawback_remainder_units": e.clawback_remainder_units,
            "diamonds_available": e.diamonds_available,
            "diamonds_held": e.diamonds_held,
            "diamonds_withdrawn": e.diamonds_withdrawn,
            "withdrawals_held": int(e.withdrawals_held),
        }

    def expected_earnings(self, creator: str) -> dict[str, int]:
        rows = [e for e in self.earnings if e.creator == creator]
        coins = sum(e.coins for e in rows)
        units = coins * SHARE_BP
        if self.loose:
            clawed_units = self.observed_clawed.get(creator, 0)
        else:
            clawed_units = sum(e.clawed for e in rows) * SHARE_BP
        m = self.creators[creator]
        available = units // 10_000 - clawed_units // 10_000 - m.held - m.withdrawn
        return {
            "coins_received": coins,
            "diamonds_lifetime": units // 10_000,
            "remainder_units": units % 10_000,
            "diamonds_clawed_back": clawed_units // 10_000,
            "clawback_remainder_units": clawed_units % 10_000,
            "diamonds_available": available,
            "diamonds_held": m.held,
            "diamonds_withdrawn": m.withdrawn,
            "withdrawals_held": int(available < 0),
        }

    def available(self, creator: str) -> int:
        return self.expected_earnings(creator)["diamonds_available"]

    async def _creator_unchanged(self, creator: str) -> None:
        assert await self._earnings(creator) == self.expected_earnings(creator), creator

    # ---- purchases and reversals -------------------------------------------------------------

    @rule(u=st.integers(0, 99), package=st.sampled_from(sorted(PACKAGES)), replay=st.booleans())
    def buy(self, u: int, package: str, replay: bool) -> None:
        self.run(self._buy(self.pick(self.users, u), package, replay))

    async def _buy(self, user: str, package: str, replay: bool) -> None:
        if True:
            w = self.stubs.wallet
            key = uid("buy")
            request = W.CreatePurchaseRequest(
                user_id=user,
                package_id=package,
                currency_code="USD",
                payment_method=W.PAYMENT_METHOD_CARD,
                idempotency_key=key,
            )
            pending = await w.CreatePurchase(request)
            self.accounts.add(user)
            assert pending.status == W.PURCHASE_STATUS_PENDING and pending.coins == PACKAGES[package]
            assert await w.CreatePurchase(request) == pending  # a retried key: the same purchase
            callback = signed_callback(WEBHOOK_SECRET, "payment.succeeded", pending)
            done = await w.HandlePaymentEvent(callback)
            assert done.purchase.status == W.PURCHASE_STATUS_SUCCEEDED and not done.duplicate
            after = self.coins[user] + pending.coins
            # Of its coins, those that went to a debt (a negative balance) when credited.
            repaid = min(pending.coins, max(0, pending.coins - after))
            self.coins[user] = after
            self.purchases.append(
                Purchase(done.purchase, user, pending.coins, debt_repaid=repaid, callbacks=[callback])
            )
            if replay:  # the provider sends it again: once only
                again = await w.HandlePaymentEvent(callback)
                assert again.duplicate and again.purchase.status == W.PURCHASE_STATUS_SUCCEEDED

    @rule(u=st.integers(0, 99))
    def failed_purchase(self, u: int) -> None:
        """A payment that fails: nothing credited, now or when the failure is sent again."""
        user = self.pick(self.users, u)

        async def go() -> None:
            w = self.stubs.wallet
            pending = await w.CreatePurchase(
                W.CreatePurchaseRequest(
                    user_id=user,
                    package_id="us-usd-70",
                    currency_code="USD",
                    payment_method=W.PAYMENT_METHOD_CARD,
                    idempotency_key=uid("buy"),
                )
            )
            self.accounts.add(user)
            callback = signed_callback(WEBHOOK_SECRET, "payment.failed", pending)
            for _ in range(2):
                done = await w.HandlePaymentEvent(callback)
                assert done.purchase.status == W.PURCHASE_STATUS_FAILED

        self.run(go())

    @precondition(lambda self: any(p.status == "SUCCEEDED" for p in self.purchases))
    @rule(i=st.integers(0, 99), chargeback=st.booleans(), replay=st.booleans(), racing=st.booleans())
    def reverse(self, i: int, chargeback: bool, replay: bool, racing: bool) -> None:
        """A refund or chargeback of a credited purchase, often after some of its coins were gifted;
        `racing`: at once, while the credits of the gifts before it may still be on their way."""
        p = self.pick([p for p in self.purchases if p.status == "SUCCEEDED"], i)

        async def go() -> None:
            if racing:
                self.loose = True
                self.saw("reversal racing its gifts' credits")
            else:
                # The gifts before it have been credited (so the model knows when each occurred).
                await self._settle_earnings()
            kind, event_type = (
                ("CHARGED_BACK", "charge.dispute.lost") if chargeback else ("REFUNDED", "charge.refunded")
            )
            callback = signed_callback(WEBHOOK_SECRET, event_type, p.pb)
            done = await self.stubs.wallet.HandlePaymentEvent(callback)
            assert W.PurchaseStatus.Name(done.purchase.status) == f"PURCHASE_STATUS_{kind}", done
            self.model_reversal(p, kind)
            if replay:
                again = await self.stubs.wallet.HandlePaymentEvent(callback)
                assert again.duplicate, again
            # A success arriving after the reversal changes nothing either.
            late = await answer(
                self.stubs.wallet.HandlePaymentEvent(signed_callback(WEBHOOK_SECRET, "payment.succeeded", p.pb))
            )
            assert isinstance(late, tuple) or late.purchase.status == done.purchase.status, late

        self.run(go())

    def model_reversal(self, p: Purchase, kind: str) -> None:
        """What a refund or chargeback of `p` does to the model (README "Reversals", "Clawback")."""
        after = self.coins[p.user] - p.coins
        self.coins[p.user] = after
        mine = [q for q in self.purchases if q.user == p.user and q is not p]
        claimed_before = sum(q.claimed for q in mine if q.status != "SUCCEEDED")
        repaid_by_kept = sum(q.debt_repaid for q in mine if q.status == "SUCCEEDED")
        outstanding = claimed_before - repaid_by_kept
        spent = min(p.coins, max(0, max(0, -after) - outstanding))
        p.status, p.claimed = kind, spent
        self.saw("reversal clawing back" if spent else "reversal of unspent coins")
        if after < 0:
            self.saw("reversal into debt")
        # Clawback: the user's newest earnings first, each at its share, up to `spent`.
        rows = sorted(
            (e for e in self.earnings if e.sender == p.user and e.clawed < e.coins),
            key=lambda e: (e.occurred_us or 0, e.event_id),
            reverse=True,
        )
        left = spent
        for e in rows:
            take = min(left, e.coins - e.clawed)
            e.clawed += take
            left -= take

    @rule(u=st.integers(0, 99), package=st.sampled_from(sorted(PACKAGES)), chargeback=st.booleans())
    def repay_then_reverse(self, u: int, package: str, chargeback: bool) -> None:
        """A user in debt buys (repaying the debt first), then that purchase is reversed too: the
        debt it repaid is owed again, and no coin is claimed from creators twice."""
        # Guards, not preconditions, here and below: whether they hold may depend on a race's
        # outcome, and hypothesis needs the same draws to lead to the same rules.
        if not any(c < 0 for c in self.coins.values()):
            return
        user = self.pick(sorted(u for u, c in self.coins.items() if c < 0), u)

        async def go() -> None:
            await self._buy(user, package, replay=False)
            if not self.loose:
                await self._settle_earnings()
            p = self.purchases[-1]
            kind, event_type = (
                ("CHARGED_BACK", "charge.dispute.lost") if chargeback else ("REFUNDED", "charge.refunded")
            )
            done = await self.stubs.wallet.HandlePaymentEvent(signed_callback(WEBHOOK_SECRET, event_type, p.pb))
            assert W.PurchaseStatus.Name(done.purchase.status) == f"PURCHASE_STATUS_{kind}", done
            self.model_reversal(p, kind)
            self.saw("repaid a debt, then reversed")

        self.run(go())

    @precondition(lambda self: any(p.status == "SUCCEEDED" for p in self.purchases))
    @rule(i=st.integers(0, 99), c=st.integers(0, 99), gift=st.sampled_from(sorted(GIFTS)), qty=st.integers(1, 12))
    def reverse_while_gifting(self, i: int, c: int, gift: str, qty: int) -> None:
        """A chargeback and a gift of the same user at once: either order may win, but the answers
        must fit one of them, and the books follow that one."""
        p = self.pick([p for p in self.purchases if p.status == "SUCCEEDED"], i)
        user, creator = p.user, self.pick(sorted(self.creators), c)
        m = self.creators[creator]
        cost = GIFTS[gift] * qty
        key = uid("gift")
        request = G.SendGiftRequest(
            stream_id=m.stream_id, sender_id=user, gift_id=gift, quantity=qty, idempotency_key=key
        )
        callback = signed_callback(WEBHOOK_SECRET, "charge.dispute.lost", p.pb)

        async def go() -> tuple[Any, Any]:
            return await asyncio.gather(
                self.stubs.wallet.HandlePaymentEvent(callback), answer(self.stubs.gifting.SendGift(request))
            )

        self.loose = True  # the gift's credit may come after the reversal
        before = self.coins[user]
        done, got = self.run(go())
        assert done.purchase.status == W.PURCHASE_STATUS_CHARGED_BACK, done
        if not m.live:
            self.model_reversal(p, "CHARGED_BACK")
            self.expect_outcome("gift", key, request, got, creator, user, cost, m.live)
            return
        if not isinstance(got, tuple) and got.sender_balance == before - cost:
            self.saw("race: gift before the chargeback")
            self.expect_outcome("gift", key, request, got, creator, user, cost, m.live)
            self.model_reversal(p, "CHARGED_BACK")
        else:
            # The chargeback first: the gift is judged on what it left.
            self.saw("race: chargeback before the gift")
            assert isinstance(got, tuple) or got.sender_balance == before - p.coins - cost, (got, before, p.coins)
            self.model_reversal(p, "CHARGED_BACK")
            self.expect_outcome("gift", key, request, got, creator, user, cost, m.live)

    # ---- gifts, tips, unlocks ----------------------------------------------------------------

    @rule(u=st.integers(0, 99), c=st.integers(0, 99), gift=st.sampled_from(sorted(GIFTS)), qty=st.integers(1, 12))
    def gift(self, u: int, c: int, gift: str, qty: int) -> None:
        user, creator = self.pick(self.users, u), self.pick(sorted(self.creators), c)
        m = self.creators[creator]
        key = uid("gift")
        request = G.SendGiftRequest(
            stream_id=m.stream_id, sender_id=user, gift_id=gift, quantity=qty, idempotency_key=key
        )
        got = self.run(answer(self.stubs.gifting.SendGift(request)))
        self.expect_outcome("gift", key, request, got, creator, user, GIFTS[gift] * qty, m.live)

    @rule(u=st.integers(0, 99), c=st.integers(0, 99), coins=st.integers(1, 120), beyond=st.booleans())
    def tip(self, u: int, c: int, coins: int, beyond: bool) -> None:
        """A tip; with `beyond`, one coin more than the user holds."""
        user, creator = self.pick(self.users, u), self.pick(sorted(self.creators), c)
        if beyond:
            coins = max(1, self.coins[user] + 1)
        m = self.creators[creator]
        key = uid("tip")
        request = G.SendTipRequest(
            stream_id=m.stream_id, sender_id=user, coins=coins, message="hi", idempotency_key=key
        )
        got = self.run(answer(self.stubs.gifting.SendTip(request)))
        self.expect_outcome("tip", key, request, got, creator, user, coins, m.live)

    @rule(u=st.integers(0, 99), c=st.integers(0, 99))
    def unlock(self, u: int, c: int) -> None:
        user, creator = self.pick(self.users, u), self.pick(sorted(self.creators), c)
        content = self.creators[creator].content_id
        key = uid("unlock")
        request = G.UnlockContentRequest(user_id=user, content_id=content, idempotency_key=key)
        got = self.run(answer(self.stubs.gifting.UnlockContent(request)))
        first = self.unlocked.get((user, content))
        if first is not None:
            assert not isinstance(got, tuple), got
            assert got.already_unlocked and got.gift_event_id == first.gift_event_id, (got, first)
            self.saw("unlock again: nothing charged")
            self.keys[key] = KeyRecord("unlock", request, got)
            return
        if self.coins[user] < CONTENT_PRICE:
            assert got == self.short(user), (got, self.coins[user])
            self.keys[key] = KeyRecord("unlock", request, None)
            return
        assert not isinstance(got, tuple) and not got.already_unlocked, got
        self.charge("unlock", key, request, got, creator, user, CONTENT_PRICE)
        self.unlocked[(user, content)] = got
        self.saw("unlock charged")

    @rule(
        items=st.lists(
            st.tuples(st.integers(0, 99), st.integers(0, 99), st.sampled_from(sorted(GIFTS)), st.integers(1, 12)),
            min_size=1,
            max_size=5,
        ),
        retry=st.booleans(),
    )
    def send_gifts(self, items: list[tuple[int, int, str, int]], retry: bool) -> None:
        """A batch: each item answered as SendGift would, in request order; optionally sent twice."""
        reqs, meta = [], []
        for u, c, gift, qty in items:
            user, creator = self.pick(self.users, u), self.pick(sorted(self.creators), c)
            m = self.creators[creator]
            key = uid("batch")
            reqs.append(
                G.SendGiftRequest(
                    stream_id=m.stream_id, sender_id=user, gift_id=gift, quantity=qty, idempotency_key=key
                )
            )
            meta.append((creator, user, GIFTS[gift] * qty, m.live))
        batch = G.SendGiftsRequest(gifts=reqs)
        got = self.run(self.stubs.gifting.SendGifts(batch))
        assert len(got.results) == len(reqs)
        for req, result, (creator, user, coins, live) in zip(reqs, got.results, meta, strict=True):
            self.expect_outcome("gift", req.idempotency_key, req, item_outcome(result), creator, user, coins, live)
        if retry:  # the same batch again: every charged item answers its receipt, nothing is charged twice
            again = self.run(self.stubs.gifting.SendGifts(batch))
            for req, first, second, (creator, user, coins, live) in zip(
                reqs, got.results, again.results, meta, strict=True
            ):
                if first.WhichOneof("outcome") == "receipt":
                    assert second.receipt == first.receipt, (first, second)
                else:
                    # A refused item is checked again: the model decides once more.
                    outcome = item_outcome(second)
                    self.expect_outcome("gift", req.idempotency_key, req, outcome, creator, user, coins, live)

    @rule(
        u=st.integers(0, 99),
        c=st.integers(0, 99),
        gift=st.sampled_from(sorted(GIFTS)),
        qty=st.integers(1, 12),
        copies=st.integers(2, 4),
        batched=st.booleans(),
    )
    def racing_retries(self, u: int, c: int, gift: str, qty: int, copies: int, batched: bool) -> None:
        """The same gift sent several times at once under one key (a client retrying after a timeout,
        some copies through SendGifts): every copy answers the same, and it is charged at most once."""
        user, creator = self.pick(self.users, u), self.pick(sorted(self.creators), c)
        m = self.creators[creator]
        key = uid("race")
        request = G.SendGiftRequest(
            stream_id=m.stream_id, sender_id=user, gift_id=gift, quantity=qty, idempotency_key=key
        )

        async def one(i: int) -> Any:
            if batched and i % 2:
                return item_outcome(
                    (await self.stubs.gifting.SendGifts(G.SendGiftsRequest(gifts=[request]))).results[0]
                )
            return await answer(self.stubs.gifting.SendGift(request))

        async def go() -> list[Any]:
            return list(await asyncio.gather(*(one(i) for i in range(copies))))

        got = self.run(go())
        coins = GIFTS[gift] * qty
        charged = [g for g in got if not isinstance(g, tuple)]
        # One charge at most: every copy that answered a receipt answers the same one.
        assert all(g == charged[0] for g in charged), got
        # The others are the model's refusal, or told to retry (ABORTED: a copy raced the first
        # one's cancellation); never refused for good beside a charge.
        refusal = NOT_LIVE if not m.live else self.short(user) if self.coins[user] < coins else None
        for g in got:
            if isinstance(g, tuple):
                assert g[0] == grpc.StatusCode.ABORTED or (refusal is not None and g == refusal and not charged), got
                if g[0] == grpc.StatusCode.ABORTED:
                    self.saw(f"racing retry told to retry: {g[1]}{' beside a charge' if charged else ''}")
        # A retry once the race is over has the final word: the receipt again, or the refusal.
        final = self.run(answer(self.stubs.gifting.SendGift(request)))
        if charged:
            assert final == charged[0], (got, final)
            self.saw("racing retries charged once")
        self.expect_outcome("gift", key, request, final, creator, user, coins, m.live)

    @rule(u=st.integers(0, 99), c=st.integers(0, 99))
    def racing_unlocks(self, u: int, c: int) -> None:
        """Two unlocks of the same content at once under different keys: charged once, the other already_unlocked."""
        user, creator = self.pick(self.users, u), self.pick(sorted(self.creators), c)
        content = self.creators[creator].content_id
        reqs = [
            G.UnlockContentRequest(user_id=user, content_id=content, idempotency_key=uid("unlock")) for _ in range(2)
        ]

        async def go() -> list[Any]:
            return list(await asyncio.gather(*(answer(self.stubs.gifting.UnlockContent(r)) for r in reqs)))

        got = self.run(go())
        for n, g in enumerate(got):
            if isinstance(g, tuple) and g[0] == grpc.StatusCode.ABORTED:
                # Told to retry (it raced the other's claim being cancelled): the retry has the final word.
                self.saw(f"racing unlock told to retry: {g[1]}")
                got[n] = self.run(answer(self.stubs.gifting.UnlockContent(reqs[n])))
        first = self.unlocked.get((user, content))
        if first is None and self.coins[user] >= CONTENT_PRICE:
            assert all(not isinstance(g, tuple) for g in got), got
            fresh = [g for g in got if not g.already_unlocked]
            assert len(fresh) == 1, got
            assert all(g.gift_event_id == fresh[0].gift_event_id for g in got), got
            req = reqs[got.index(fresh[0])]
            self.charge("unlock", req.idempotency_key, req, fresh[0], creator, user, CONTENT_PRICE)
            self.unlocked[(user, content)] = fresh[0]
            for r, g in zip(reqs, got, strict=True):
                if g.already_unlocked:
                    self.keys[r.idempotency_key] = KeyRecord("unlock", r, g)
            self.saw("racing unlocks charged once")
        elif first is not None:
            assert all(not isinstance(g, tuple) and g.already_unlocked for g in got), got
            for r, g in zip(reqs, got, strict=True):
                self.keys[r.idempotency_key] = KeyRecord("unlock", r, g)
        else:
            assert all(g == self.short(user) for g in got), got
            for r in reqs:
                self.keys[r.idempotency_key] = KeyRecord("unlock", r, None)

    @precondition(lambda self: bool(self.keys))
    @rule(i=st.integers(0, 999))
    def retry_key(self, i: int) -> None:
        """The same request under a key again: its first receipt, nothing charged; a refused one is checked again."""
        key = self.pick(sorted(self.keys), i)
        rec = self.keys[key]
        g = self.stubs.gifting
        call = {"gift": g.SendGift, "tip": g.SendTip, "unlock": g.UnlockContent}[rec.kind]
        got = self.run(answer(call(rec.request)))
        if rec.receipt is not None:
            assert got == rec.receipt, (key, got, rec.receipt)
            self.saw("retry answered its receipt")
            return
        self.saw("retry of a refused key")
        if rec.kind == "unlock":
            content = rec.request.content_id
            creator = next(c for c, m in self.creators.items() if m.content_id == content)
            first = self.unlocked.get((rec.request.user_id, content))
            if first is not None:
                assert not isinstance(got, tuple) and got.already_unlocked, got
                self.keys[key] = KeyRecord("unlock", rec.request, got)
            elif self.coins[rec.request.user_id] < CONTENT_PRICE:
                assert got == self.short(rec.request.user_id), got
            else:
                assert not isinstance(got, tuple), got
                self.charge("unlock", key, rec.request, got, creator, rec.request.user_id, CONTENT_PRICE)
                self.unlocked[(rec.request.user_id, content)] = got
            return
        creator = self.creator_of_stream(rec.request.stream_id)
        stream_live = self.creators[creator].live and self.creators[creator].stream_id == rec.request.stream_id
        coins = rec.request.coins if rec.kind == "tip" else GIFTS[rec.request.gift_id] * rec.request.quantity
        self.expect_outcome(rec.kind, key, rec.request, got, creator, rec.request.sender_id, coins, stream_live)

    @precondition(lambda self: bool(self.keys))
    @rule(i=st.integers(0, 999))
    def reuse_key(self, i: int) -> None:
        """Another request under a recorded key: IDEMPOTENCY_KEY_REUSED, nothing charged."""
        key = self.pick(sorted(self.keys), i)
        rec = self.keys[key]
        user = rec.request.user_id if rec.kind == "unlock" else rec.request.sender_id
        creator = self.pick(sorted(self.creators), i)
        stream = self.creators[creator].stream_id
        other = G.SendTipRequest(stream_id=stream, sender_id=user, coins=1, message="other", idempotency_key=key)
        got = self.run(answer(self.stubs.gifting.SendTip(other)))
        assert got == REUSED, (key, rec, got)
        self.saw("key reused")

    @rule(c=st.integers(0, 99), again=st.booleans())
    def end_stream(self, c: int, again: bool) -> None:
        """End a creator's stream; with `again` the creator goes live on a new one at once (gifts to
        the ended one stay refused: old keys and retries still aim at it)."""
        creator = self.pick(sorted(self.creators), c)
        m = self.creators[creator]
        end = G.EndStreamRequest(stream_id=m.stream_id, idempotency_key=uid("end"))
        ended = self.run(self.stubs.gifting.EndStream(end))
        assert ended.status == G.STREAM_STATUS_ENDED
        assert self.run(self.stubs.gifting.EndStream(end)) == ended  # a retry: the same answer
        m.live = False
        if again:
            self._go_live(creator)

    @precondition(lambda self: any(not m.live for m in self.creators.values()))
    @rule(c=st.integers(0, 99))
    def go_live_again(self, c: int) -> None:
        self._go_live(self.pick(sorted(k for k, m in self.creators.items() if not m.live), c))

    def _go_live(self, creator: str) -> None:
        stream = self.run(
            self.stubs.gifting.StartStream(
                G.StartStreamRequest(creator_id=creator, title="again", idempotency_key=uid("s"))
            )
        )
        self.creators[creator].stream_id, self.creators[creator].live = stream.stream_id, True
        self.stream_owner[stream.stream_id] = creator

    # ---- withdrawals -------------------------------------------------------------------------

    @rule(c=st.integers(0, 99), amount=st.sampled_from(["min", "some", "review", "all", "beyond"]))
    def request_withdrawal(self, c: int, amount: str) -> None:
        creator = self.pick(sorted(self.creators), c)
        m = self.creators[creator]

        async def go() -> None:
            await self._settle_earnings()
            available = self.available(creator)
            minimum = MIN_MINOR * 2
            diamonds = {
                "min": minimum,
                "some": max(minimum, (available // 4) // 2 * 2),
                "review": REVIEW_FROM_MINOR * 2,
                "all": max(minimum, available // 2 * 2),
                "beyond": max(minimum, available // 2 * 2 + 2),
            }[amount]
            key = uid("wd")
            request = P.RequestWithdrawalRequest(
                creator_id=creator, diamonds=diamonds, method_id=m.method_id, idempotency_key=key
            )
            got = await answer(self.stubs.payout.RequestWithdrawal(request))
            if available < 0:
                assert got == (grpc.StatusCode.FAILED_PRECONDITION, "BALANCE_NEGATIVE"), (got, available)
                self.saw("withdrawal refused: BALANCE_NEGATIVE")
            elif diamonds > available:
                assert got == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_DIAMONDS"), (got, available)
                self.saw("withdrawal refused: INSUFFICIENT_DIAMONDS")
            else:
                assert not isinstance(got, tuple), (got, available, diamonds)
                gross = diamonds * 100 // DIAMONDS_PER_DOLLAR
                assert (got.diamonds, got.gross.amount_minor, got.net.amount_minor) == (diamonds, gross, gross), got
                status = "PENDING_REVIEW" if gross >= REVIEW_FROM_MINOR else "APPROVED"
                assert got.status in (
                    (P.WITHDRAWAL_STATUS_PENDING_REVIEW,)
                    if status == "PENDING_REVIEW"
                    else (P.WITHDRAWAL_STATUS_APPROVED, P.WITHDRAWAL_STATUS_PROCESSING)
                ), got
                m.held += diamonds
                self.saw(f"withdrawal {status}")
                self.withdrawals.append(Withdrawal(got, creator, diamonds, status, key, request))
                retried = await self.stubs.payout.RequestWithdrawal(request)  # a retry: the same one, held once
                assert retried.withdrawal_id == got.withdrawal_id
                other = P.RequestWithdrawalRequest()
                other.CopyFrom(request)
                other.diamonds += 2  # the key again with another request: refused, nothing held
                reused = await answer(self.stubs.payout.RequestWithdrawal(other))
                assert reused == REUSED, reused
            await self._creator_unchanged(creator)

        self.run(go())

    def _in(self, *statuses: str) -> list[Withdrawal]:
        return [w for w in self.withdrawals if w.status in statuses]

    @rule(i=st.integers(0, 99), approve=st.booleans())
    def review(self, i: int, approve: bool) -> None:
        if not self._in("PENDING_REVIEW"):  # a guard (see repay_then_reverse)
            return
        wd = self.pick(self._in("PENDING_REVIEW"), i)
        m = self.creators[wd.creator]

        async def go() -> None:
            await self._settle_earnings()  # no credit in flight: what follows is exact
            p = self.stubs.payout
            if approve:
                got = await answer(
                    p.ApproveWithdrawal(
                        P.ApproveWithdrawalRequest(withdrawal_id=wd.pb.withdrawal_id, idempotency_key=uid("ap")),
                        metadata=OP,
                    )
                )
                if self.available(wd.creator) < 0:
                    assert got == (grpc.StatusCode.FAILED_PRECONDITION, "BALANCE_NEGATIVE"), got
                else:
                    assert not isinstance(got, tuple) and got.status in (
                        P.WITHDRAWAL_STATUS_APPROVED,
                        P.WITHDRAWAL_STATUS_PROCESSING,
                    ), got
                    wd.status = "APPROVED"
                    self.saw("withdrawal approved")
            else:
                got = await answer(
                    p.RejectWithdrawal(
                        P.RejectWithdrawalRequest(
                            withdrawal_id=wd.pb.withdrawal_id, reason="model says no", idempotency_key=uid("rj")
                        ),
                        metadata=OP,
                    )
                )
                assert not isinstance(got, tuple) and got.status == P.WITHDRAWAL_STATUS_REJECTED, got
                wd.status = "REJECTED"
                self.saw("withdrawal rejected")
                m.held -= wd.diamonds
            await self._creator_unchanged(wd.creator)

        self.run(go())

    @rule(i=st.integers(0, 99), paid=st.booleans(), replay=st.booleans())
    def provider_callback(self, i: int, paid: bool, replay: bool) -> None:
        """The payout provider's PAID or FAILED for a submitted withdrawal (refused before it is submitted)."""
        if not self._in("APPROVED"):  # a guard (see repay_then_reverse)
            return
        wd = self.pick(self._in("APPROVED"), i)
        m = self.creators[wd.creator]

        async def go() -> None:
            await self._settle_earnings()
            p = self.stubs.payout
            get = P.GetWithdrawalRequest(withdrawal_id=wd.pb.withdrawal_id)
            deadline = time.monotonic() + (5.0 if self.available(wd.creator) >= 0 else 0.5)
            current = await p.GetWithdrawal(get)
            while current.status == P.WITHDRAWAL_STATUS_APPROVED and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                current = await p.GetWithdrawal(get)
            event_type = "payout.paid" if paid else "payout.failed"
            payload = dev_payout_payload(
                uid("pevt"), event_type, wd.pb.withdrawal_id, wd.pb.net.amount_minor, "USD", "" if paid else "closed"
            )
            callback = P.HandlePayoutEventRequest(
                provider="dev", payload=payload, signature=signing.sign(WEBHOOK_SECRET.encode(), payload)
            )
            if current.status == P.WITHDRAWAL_STATUS_APPROVED:
                # Not yet claimed by the dispatcher (held while the creator is negative, say).
                assert self.available(wd.creator) < 0, ("never submitted", current)
                got = await answer(p.HandlePayoutEvent(callback))
                assert got == (grpc.StatusCode.FAILED_PRECONDITION, "WITHDRAWAL_NOT_SUBMITTED"), got
                self.saw("payout callback refused: not submitted")
                await self._creator_unchanged(wd.creator)
                return
            assert current.status == P.WITHDRAWAL_STATUS_PROCESSING, current
            # A claimed withdrawal may no longer be rejected.
            rejected = await answer(
                p.RejectWithdrawal(
                    P.RejectWithdrawalRequest(
                        withdrawal_id=wd.pb.withdrawal_id, reason="late", idempotency_key=uid("rj")
                    ),
                    metadata=OP,
                )
            )
            assert rejected == (grpc.StatusCode.FAILED_PRECONDITION, "INVALID_WITHDRAWAL_TRANSITION"), rejected
            done = await p.HandlePayoutEvent(callback)
            assert not done.duplicate
            wd.status, wd.callback = ("PAID" if paid else "FAILED"), callback
            self.saw(f"withdrawal {wd.status}")
            m.held -= wd.diamonds
            if paid:
                m.withdrawn += wd.diamonds
            assert done.withdrawal.status == (P.WITHDRAWAL_STATUS_PAID if paid else P.WITHDRAWAL_STATUS_FAILED)
            if replay:
                again = await p.HandlePayoutEvent(callback)
                assert again.duplicate and again.withdrawal.status == done.withdrawal.status, again
            await self._creator_unchanged(wd.creator)

        self.run(go())

    @rule(i=st.integers(0, 99), same=st.booleans())
    def late_payout_callback(self, i: int, same: bool) -> None:
        """A settled withdrawal's callback again (a duplicate), or the other outcome (refused): nothing changes."""
        if not self._in("PAID", "FAILED"):  # a guard (see repay_then_reverse)
            return
        wd = self.pick(self._in("PAID", "FAILED"), i)
        assert wd.callback is not None

        async def go() -> None:
            await self._settle_earnings()
            p = self.stubs.payout
            if same:
                again = await p.HandlePayoutEvent(wd.callback)
                assert again.duplicate, again
                self.saw("payout callback duplicate")
            else:
                other = "payout.failed" if wd.status == "PAID" else "payout.paid"
                payload = dev_payout_payload(uid("pevt"), other, wd.pb.withdrawal_id, wd.pb.net.amount_minor, "USD")
                got = await answer(
                    p.HandlePayoutEvent(
                        P.HandlePayoutEventRequest(
                            provider="dev", payload=payload, signature=signing.sign(WEBHOOK_SECRET.encode(), payload)
                        )
                    )
                )
                assert got == (grpc.StatusCode.FAILED_PRECONDITION, "INVALID_WITHDRAWAL_TRANSITION"), got
                self.saw("payout callback contradicting refused")
            await self._creator_unchanged(wd.creator)

        self.run(go())

    # ---- invariants --------------------------------------------------------------------------

    def check_balances(self) -> None:
        async def go() -> None:
            for user in self.users:
                b = await answer(self.stubs.wallet.GetBalance(W.GetBalanceRequest(user_id=user)))
                want = self.coins[user]
                assert not isinstance(b, tuple), (user, b, want)  # a user never credited has 0 coins
                assert (b.coins, b.debt_coins) == (want, max(0, -want)), (user, b, want)

        self.run(go())

    @invariant()
    def check_after_step(self) -> None:
        if hasattr(self, "users"):
            self.check_balances()

    def teardown(self) -> None:
        if not hasattr(self, "users"):
            return
        self.check_balances()
        self.run(self._settle_earnings())
        # The cross-service audit, as `livegifts audit --detail --wait` reads it.
        report = _audit(self.suite)
        assert all(c.status == OK for c in report), report


def _logged(cls: type[MoneyModel]) -> type[MoneyModel]:
    """Print each failing step with the steps before it, as it happens: races make some
    preconditions depend on the suite's answers, so hypothesis may be unable to replay a failure
    to report it (FlakyStrategyDefinition), and this is then the only account of it."""
    for name, fn in list(vars(cls).items()):
        marked = any(hasattr(fn, m) for m in (RULE_MARKER, INITIALIZE_RULE_MARKER))
        if not callable(fn) or not (marked or name == "teardown"):
            continue

        def wrapper(self: MoneyModel, *args: Any, __fn: Any = fn, __name: str = name, **kwargs: Any) -> Any:
            steps = self.__dict__.setdefault("steps", [])
            steps.append(f"{__name}({', '.join(f'{k}={v!r}' for k, v in sorted(kwargs.items()))})")
            try:
                return __fn(self, *args, **kwargs)
            except Exception:
                print("money model step failed; steps:\n  " + "\n  ".join(steps), file=sys.stderr)
                print(traceback.format_exc(), file=sys.stderr)
                raise

        logged = functools.wraps(fn)(wrapper)
        # Hypothesis calls the function its rule (or initialize) marker holds, not the class
        # attribute: the marker must name the wrapper too, or no rule is ever logged.
        for marker in (RULE_MARKER, INITIALIZE_RULE_MARKER):
            if hasattr(fn, marker):
                setattr(logged, marker, replace(getattr(fn, marker), function=logged))
        setattr(cls, name, logged)
    return cls


_logged(MoneyModel)


def _audit(suite: Suite) -> list[Any]:
    def fetch(ids=None):  # type: ignore[no-untyped-def]
        return collect(suite.addr("wallet"), suite.addr("gifting"), suite.addr("payout"), 30.0, True, ids)

    return wait_until_settled(fetch, 30.0)


def test_the_money_rules_hold_against_a_model(backend: str, money_suite: Suite) -> None:
    loop = asyncio.new_event_loop()
    # The current loop too: a stub call built outside a coroutine (`self.run(answer(stub(req)))`)
    # binds to asyncio's current loop, and pytest-asyncio leaves none set after its own tests:
    # "There is no current event loop" in whichever rule first built one there (CI, racing_unlocks).
    asyncio.set_event_loop(loop)
    try:

        async def connect() -> Stubs:
            stubs = Stubs(money_suite)
            await stubs.payout.SetPolicy(
                P.SetPolicyRequest(
                    creator_share_bp=SHARE_BP,
                    fee_bp=0,
                    currencies=[
                        P.CurrencyTerms(
                            currency_code="USD",
                            diamonds=DIAMONDS_PER_DOLLAR,
                            amount_minor=100,
                            withdrawal_min_minor=MIN_MINOR,
                            daily_max_minor=100_000_000,
                            fee_fixed_minor=0,
                            auto_approve_below_minor=REVIEW_FROM_MINOR,
                        )
                    ],
                    idempotency_key=uid("policy"),
                ),
                metadata=OP,
            )
            return stubs

        stubs = loop.run_until_complete(connect())

        class Machine(MoneyModel):
            pass

        Machine.loop, Machine.stubs, Machine.suite, Machine.seen = loop, stubs, money_suite, Counter()
        config = settings(
            max_examples=int(EXAMPLES) if EXAMPLES else DEFAULT_EXAMPLES[backend],
            stateful_step_count=STEPS,
            deadline=None,
            derandomize=SEED is None,
            database=None,
            suppress_health_check=list(HealthCheck),
            # Shrinking replays many sequences against the real suite (minutes): only when asked.
            phases=[Phase.explicit, Phase.generate] + ([Phase.shrink] if SHRINK else []),
            report_multiple_bugs=False,
        )
        if SEED is not None:
            seed(int(SEED))(Machine)

        async def close() -> None:
            await asyncio.gather(*(c.close() for c in stubs.channels))

        try:
            run_state_machine_as_test(Machine, settings=config)
        finally:
            loop.run_until_complete(close())
            print("money model exercised:", dict(sorted(Machine.seen.items())))
    finally:
        asyncio.set_event_loop(None)
        loop.close()
