"""Spending limits at a period's boundary, against a real SQLite file.

The first spend of a new day (week, month) drops old counters. It must keep the previous
period's: a replica whose clock runs a little behind, or a batch that read the clock just
before midnight, still spends in that period, and finding its counter gone would count the
day again from zero, a second daily cap.
"""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from livegifts.wallet.v1 import wallet_pb2
from services.common.errors import DomainError
from services.wallet import domain
from services.wallet.domain import Period
from services.wallet.usecases import Wallet
from tests.support.wallet import buy

MIDNIGHT_US = int(dt.datetime(2031, 3, 1, tzinfo=dt.UTC).timestamp() * 1_000_000)  # a new day and month


def gift(user: str, coins: int) -> wallet_pb2.SpendRequest:
    return wallet_pb2.SpendRequest(
        user_id=user,
        amount=coins,
        reason=wallet_pb2.SPEND_REASON_GIFT,
        reference_id="g",
        idempotency_key=uuid.uuid4().hex,
    )


async def _capped(w: Wallet, user: str, purchases: int, **limits: int) -> None:
    """`user` buys `purchases` packages of 70 coins, then sets spending `limits` (daily, weekly, monthly)."""
    for _ in range(purchases):
        await buy(w, user)
    await w.set_spending_limits(
        wallet_pb2.SetSpendingLimitsRequest(user_id=user, idempotency_key=uuid.uuid4().hex, **limits)
    )


async def test_a_spend_just_behind_midnight_still_counts_against_that_days_cap(wallet: Wallet) -> None:
    user = "viewer"
    await _capped(wallet, user, 4, daily=100)  # 280 coins
    at = {"us": MIDNIGHT_US - 200_000}
    wallet.spending.clock = lambda: at["us"]
    assert not isinstance((await wallet.spending.run([gift(user, 50)], settle_refusals=False))[0], DomainError)
    at["us"] = MIDNIGHT_US + 100_000  # one replica's first spend of the new day
    assert not isinstance((await wallet.spending.run([gift(user, 50)], settle_refusals=False))[0], DomainError)
    at["us"] = MIDNIGHT_US - 150_000  # another, 0.25 s behind it, still in the old day
    late = (await wallet.spending.run([gift(user, 60)], settle_refusals=False))[0]
    assert isinstance(late, DomainError) and late.reason == "SPENDING_LIMIT_EXCEEDED"  # 50 + 60 > 100 that day


def test_stale_counter_keys_are_those_before_the_previous_period() -> None:
    stale = domain.stale_period_keys(MIDNIGHT_US + 1)  # 2031-03-01, a Saturday
    assert stale == {Period.DAY: "2031-02-28", Period.WEEK: "2031-W08", Period.MONTH: "2031-01"}
    now = domain.period_keys(MIDNIGHT_US + 1)
    previous = domain.period_keys(MIDNIGHT_US - 1)
    for p in Period:  # the previous period's key is never below the stale bound: it is kept
        assert stale[p] <= previous[p] < now[p] or previous[p] == now[p]


async def test_a_spend_is_recorded_at_the_instant_whose_periods_counted_it(wallet: Wallet) -> None:
    # The batch read the clock twice: once for the journal and the spend's row, once (later, after
    # claiming the keys) for the periods it counts in. A spend straddling midnight was listed on
    # one day and counted against the next day's cap.
    user = "viewer"
    await buy(wallet, user)
    wallet.spending.clock = lambda: MIDNIGHT_US - 1  # the last microsecond of 2031-02-28
    assert not isinstance((await wallet.spending.run([gift(user, 5)], settle_refusals=False))[0], DomainError)
    listed = (await wallet.list_transactions(wallet_pb2.ListTransactionsRequest(user_id=user))).transactions[0]
    assert listed.kind == "SPEND_GIFT"
    assert listed.created_at.ToMicroseconds() == MIDNIGHT_US - 1
    assert domain.period_keys(listed.created_at.ToMicroseconds())[Period.DAY] == "2031-02-28"


async def test_buying_spending_and_may_spend_agree_on_the_day_a_user_comes_of_age(wallet: Wallet) -> None:
    # Spends took the day from the wallet's clock, purchases and may_spend from the wall clock:
    # with the clock at an 18th birthday, the spend passed and the purchase was refused.
    user = "teen"
    await wallet.set_restrictions(
        wallet_pb2.SetAccountRestrictionsRequest(user_id=user, birth_date="2013-03-01", idempotency_key="born")
    )
    at = {"us": MIDNIGHT_US - 1}  # 2031-02-28T23:59:59.999999Z: 17
    wallet.clock = wallet.spending.clock = lambda: at["us"]
    assert not (await wallet.get_restrictions(user)).may_spend
    with pytest.raises(DomainError) as refused:
        await buy(wallet, user)
    assert refused.value.reason == "UNDERAGE"
    at["us"] = MIDNIGHT_US  # 2031-03-01T00:00Z: 18 today
    assert (await wallet.get_restrictions(user)).may_spend
    many = await wallet.get_restrictions_many(wallet_pb2.GetAccountRestrictionsManyRequest(user_ids=[user]))
    assert many.restrictions[0].may_spend
    await buy(wallet, user)
    assert not isinstance((await wallet.spending.run([gift(user, 5)], settle_refusals=False))[0], DomainError)


@pytest.mark.parametrize("value", [-1, domain.SPENDING_LIMIT_MAX + 1])
async def test_a_limit_out_of_range_names_its_field(wallet: Wallet, value: int) -> None:
    """README's reasons table: INVALID_LIMIT at SetSpendingLimits carries `field`, too big or negative."""
    req = wallet_pb2.SetSpendingLimitsRequest(user_id="u1", weekly=value, idempotency_key=uuid.uuid4().hex)
    with pytest.raises(DomainError) as err:
        await wallet.set_spending_limits(req)
    assert (err.value.reason, err.value.metadata) == ("INVALID_LIMIT", {"field": "weekly"})


async def test_a_user_who_never_bought_has_0_coins_and_is_refused_as_short_of_them(wallet: Wallet) -> None:
    """Not NOT_FOUND, which a client takes for a bad id: 0 coins, and INSUFFICIENT_COINS to spend."""
    balance = await wallet.get_balance("newcomer")
    assert (balance.coins, balance.debt_coins) == (0, 0)
    (refused,) = await wallet.spending.run([gift("newcomer", 5)], settle_refusals=False)
    assert isinstance(refused, DomainError)
    assert (refused.reason, refused.metadata) == ("INSUFFICIENT_COINS", {"balance": "0", "required": "5"})


async def test_an_operators_cap_on_a_user_is_logged_with_who_set_it_once(
    wallet: Wallet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # README says x-operator is recorded for operator-set limits; the wallet dropped it, so a
    # guardian's or support's cap on a user could not be traced to anyone.
    req = wallet_pb2.SetSpendingLimitsRequest(
        user_id="viewer", weekly=500, set_by=wallet_pb2.LIMIT_SETTER_OPERATOR, idempotency_key=uuid.uuid4().hex
    )
    with caplog.at_level("INFO", logger="services.wallet.usecases"):
        await wallet.set_spending_limits(req, "support-7")
        await wallet.set_spending_limits(req, "support-7")  # a retry: answered from its record, not logged again
        await wallet.set_spending_limits(
            wallet_pb2.SetSpendingLimitsRequest(user_id="viewer", daily=50, idempotency_key=uuid.uuid4().hex)
        )  # the user's own cap names no operator
    logged = [r for r in caplog.records if r.getMessage() == "spending limits set by an operator"]
    assert [(r.operator, r.user_id, r.weekly_limit_coins) for r in logged] == [  # type: ignore[attr-defined]
        ("support-7", "viewer", 500)
    ]
    assert not hasattr(logged[0], "daily_limit_coins")  # only the periods the request set


WEDNESDAY_NOON_US = int(dt.datetime(2031, 3, 5, 12, tzinfo=dt.UTC).timestamp() * 1_000_000)


def _at(y: int, m: int, d: int) -> int:
    return int(dt.datetime(y, m, d, tzinfo=dt.UTC).timestamp() * 1_000_000)


async def test_a_spend_over_the_daily_cap_says_what_was_spent_today_and_when_the_day_resets(wallet: Wallet) -> None:
    # The refusal named the period and the cap only: an app could not say "40 more today" or "after midnight UTC".
    user = "viewer"
    await _capped(wallet, user, 2, daily=100)  # 140 coins
    wallet.spending.clock = lambda: WEDNESDAY_NOON_US
    await wallet.spend(gift(user, 60))
    with pytest.raises(DomainError) as refused:
        await wallet.spend(gift(user, 50))
    assert (refused.value.reason, refused.value.metadata) == (
        "SPENDING_LIMIT_EXCEEDED",
        {"period": "DAY", "limit_coins": "100", "spent_coins": "60", "resets_at_us": str(_at(2031, 3, 6))},
    )


async def test_a_spendmany_item_over_the_weekly_cap_counts_the_batchs_earlier_items_and_resets_on_monday(
    wallet: Wallet,
) -> None:
    user = "viewer"
    await _capped(wallet, user, 2, weekly=100)
    wallet.spending.clock = lambda: WEDNESDAY_NOON_US
    await wallet.spend(gift(user, 60))
    answer = await wallet.spend_many(wallet_pb2.SpendManyRequest(spends=[gift(user, 30), gift(user, 20)]))
    ok, over = answer.results
    assert ok.spent.amount == 30
    assert (over.error.reason, dict(over.error.metadata)) == (
        "SPENDING_LIMIT_EXCEEDED",
        {"period": "WEEK", "limit_coins": "100", "spent_coins": "90", "resets_at_us": str(_at(2031, 3, 10))},
    )


@pytest.mark.parametrize(
    ("at_us", "resets"),
    [
        (MIDNIGHT_US - 1, {Period.DAY: (2031, 3, 1), Period.WEEK: (2031, 3, 3), Period.MONTH: (2031, 3, 1)}),
        (MIDNIGHT_US, {Period.DAY: (2031, 3, 2), Period.WEEK: (2031, 3, 3), Period.MONTH: (2031, 4, 1)}),
        (_at(2031, 3, 3), {Period.DAY: (2031, 3, 4), Period.WEEK: (2031, 3, 10), Period.MONTH: (2031, 4, 1)}),  # Monday
        (_at(2031, 12, 31) + 5, {Period.DAY: (2032, 1, 1), Period.WEEK: (2032, 1, 5), Period.MONTH: (2032, 1, 1)}),
    ],
)
def test_a_period_resets_at_the_utc_midnight_that_starts_the_next_one(at_us: int, resets: dict) -> None:  # type: ignore[type-arg]
    for period, (y, m, d) in resets.items():
        end = domain.period_resets_at_us(period, at_us)
        assert end == _at(y, m, d), period
        # The counter key changes exactly there: the instant before is still this period.
        assert (
            domain.period_keys(end - 1)[period] == domain.period_keys(at_us)[period] != domain.period_keys(end)[period]
        )


async def test_a_spend_alone_over_a_cap_says_so_and_names_no_reset_that_waiting_would_reach(wallet: Wallet) -> None:
    # It carried resets_at_us, telling an app to wait for the next day: a spend of 150 under a cap
    # of 100 fits in no day, so the answer says the amount alone passes the limit, and names none.
    user = "viewer"
    await _capped(wallet, user, 3, daily=100)  # 210 coins
    wallet.spending.clock = lambda: WEDNESDAY_NOON_US
    await wallet.spend(gift(user, 10))
    alone = {"period": "DAY", "limit_coins": "100", "spent_coins": "10", "amount_exceeds_limit": "true"}
    with pytest.raises(DomainError) as refused:
        await wallet.spend(gift(user, 150))
    assert (refused.value.reason, refused.value.metadata) == ("SPENDING_LIMIT_EXCEEDED", alone)
    (item,) = (await wallet.spend_many(wallet_pb2.SpendManyRequest(spends=[gift(user, 150)]))).results
    assert (item.error.reason, dict(item.error.metadata)) == ("SPENDING_LIMIT_EXCEEDED", alone)
    await wallet.spend(gift(user, 90))  # the cap itself still fits, counted as before


async def test_a_spend_alone_over_a_later_periods_lower_cap_names_that_cap_not_the_day(wallet: Wallet) -> None:
    # Today's count passes the daily cap, which resets at midnight; but the weekly cap is below the
    # amount, so waiting for midnight would not help: the answer names the cap the amount passes.
    user = "viewer"
    for _ in range(3):
        await buy(wallet, user)
    for limits in ({"daily": 100}, {"weekly": 50}):
        await wallet.set_spending_limits(
            wallet_pb2.SetSpendingLimitsRequest(user_id=user, idempotency_key=uuid.uuid4().hex, **limits)
        )
    wallet.spending.clock = lambda: WEDNESDAY_NOON_US
    await wallet.spend(gift(user, 50))
    with pytest.raises(DomainError) as refused:
        await wallet.spend(gift(user, 60))
    assert (refused.value.reason, refused.value.metadata) == (
        "SPENDING_LIMIT_EXCEEDED",
        {"period": "WEEK", "limit_coins": "50", "spent_coins": "50", "amount_exceeds_limit": "true"},
    )


def test_the_tightest_cap_is_the_lowest_in_force_the_earlier_period_on_a_tie() -> None:
    assert domain.tightest_cap({Period.DAY: None, Period.WEEK: None, Period.MONTH: None}) is None
    assert domain.tightest_cap({Period.DAY: 100, Period.WEEK: 50, Period.MONTH: None}) == (Period.WEEK, 50)
    assert domain.tightest_cap({Period.DAY: 70, Period.WEEK: 70, Period.MONTH: 70}) == (Period.DAY, 70)


async def test_every_refused_spend_is_counted_by_reason_and_role_for_trust_and_safety(wallet: Wallet) -> None:
    """Gifting spends in SpendMany batches, which answer OK whatever their items' fate, so a burst
    against a cap or a blocked creator still being gifted showed in no status code or metric."""
    from prometheus_client import REGISTRY

    def counted(reason: str, role: str) -> float:
        return REGISTRY.get_sample_value("livegifts_spends_refused_total", {"reason": reason, "role": role}) or 0.0

    user, broke, creator = "capped-viewer", "broke-viewer", "blocked-creator"
    await _capped(wallet, user, 1, daily=30)  # 70 coins
    await wallet.set_restrictions(
        wallet_pb2.SetAccountRestrictionsRequest(user_id=creator, blocked=True, idempotency_key=uuid.uuid4().hex)
    )
    labels = [
        ("SPENDING_LIMIT_EXCEEDED", "sender"),
        ("INSUFFICIENT_COINS", "sender"),
        ("ACCOUNT_BLOCKED", "recipient"),
    ]
    before = {lr: counted(*lr) for lr in labels}
    to_blocked = gift(user, 1)
    to_blocked.recipient_user_id = creator
    batch = [gift(user, 20), gift(user, 20), gift(broke, 5), to_blocked]
    outcomes = await wallet.spending.run(batch, settle_refusals=True)
    reasons = [getattr(o, "reason", None) for o in outcomes]
    assert reasons == [None, "SPENDING_LIMIT_EXCEEDED", "INSUFFICIENT_COINS", "ACCOUNT_BLOCKED"], reasons
    assert {lr: counted(*lr) - before[lr] for lr in labels} == dict.fromkeys(labels, 1.0)
    # A retry of a refused (now cancelled) key is answered from its record: not counted again.
    await wallet.spending.run([batch[1]], settle_refusals=True)
    assert counted("SPENDING_LIMIT_EXCEEDED", "sender") - before[labels[0]] == 1.0
