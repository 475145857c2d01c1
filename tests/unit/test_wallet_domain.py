"""Wallet rules: balanced entries, purchase transitions, age and block checks."""

import datetime as dt
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.errors import FailedPrecondition, InvalidArgument, InvariantViolation
from services.common.timeutil import US_PER_DAY, now_us
from services.wallet import domain
from services.wallet.domain import PurchaseStatus, Restrictions, SpendReason


def test_every_kind_of_entry_is_balanced() -> None:
    assert domain.balanced(domain.purchase_postings("u", 700))
    assert domain.balanced(domain.spend_postings("u", 5, SpendReason.GIFT))
    assert domain.balanced(domain.reversal_postings("u", 700))
    assert not domain.balanced([domain.Posting("a", 1)])


@pytest.mark.parametrize(
    ("current", "target", "allowed"),
    [
        (PurchaseStatus.PENDING, PurchaseStatus.SUCCEEDED, True),
        (PurchaseStatus.PENDING, PurchaseStatus.FAILED, True),
        (PurchaseStatus.SUCCEEDED, PurchaseStatus.CHARGED_BACK, True),
        (PurchaseStatus.SUCCEEDED, PurchaseStatus.REFUNDED, True),
        (PurchaseStatus.FAILED, PurchaseStatus.REFUNDED, False),
        (PurchaseStatus.FAILED, PurchaseStatus.SUCCEEDED, True),  # a later attempt took the money
        (PurchaseStatus.SUCCEEDED, PurchaseStatus.FAILED, False),
        (PurchaseStatus.PENDING, PurchaseStatus.REFUNDED, False),
        (PurchaseStatus.REFUNDED, PurchaseStatus.SUCCEEDED, False),
        (PurchaseStatus.SUCCEEDED, PurchaseStatus.SUCCEEDED, False),
    ],
)
def test_purchase_transitions(current, target, allowed) -> None:  # type: ignore[no-untyped-def]
    if allowed:
        domain.check_transition(current, target)
    else:
        with pytest.raises(FailedPrecondition) as err:
            domain.check_transition(current, target)
        assert err.value.reason == "INVALID_TRANSITION"


@pytest.mark.parametrize(
    ("current", "target", "no_effect"),
    [
        (PurchaseStatus.SUCCEEDED, PurchaseStatus.FAILED, True),  # a declined attempt reported late
        (PurchaseStatus.REFUNDED, PurchaseStatus.FAILED, True),
        (PurchaseStatus.CHARGED_BACK, PurchaseStatus.FAILED, True),
        (PurchaseStatus.FAILED, PurchaseStatus.FAILED, True),  # a second card declined too
        (PurchaseStatus.PENDING, PurchaseStatus.FAILED, False),  # a transition: the purchase fails
        (PurchaseStatus.PENDING, PurchaseStatus.REFUNDED, False),  # early or wrong: stays an error
        (PurchaseStatus.FAILED, PurchaseStatus.CHARGED_BACK, False),
        (PurchaseStatus.SUCCEEDED, PurchaseStatus.SUCCEEDED, False),  # money taken twice?
        (PurchaseStatus.REFUNDED, PurchaseStatus.SUCCEEDED, False),
        (PurchaseStatus.REFUNDED, PurchaseStatus.CHARGED_BACK, False),  # reversed twice
    ],
)
def test_only_a_failure_after_an_outcome_is_accepted_without_effect(current, target, no_effect) -> None:  # type: ignore[no-untyped-def]
    assert domain.has_no_effect(current, target) is no_effect


def test_no_report_both_changes_a_purchase_and_changes_nothing() -> None:
    for current in PurchaseStatus:
        assert not domain.NO_EFFECT[current] & domain.TRANSITIONS[current], current


TODAY = dt.date(2026, 11, 22)


@pytest.mark.parametrize(
    ("born", "region", "reason"),
    [
        (dt.date(2008, 11, 22), "US", None),  # 18 today
        (dt.date(2008, 11, 23), "US", "UNDERAGE"),  # 18 tomorrow
        (dt.date(2008, 1, 1), "KR", "UNDERAGE"),  # 18, but Korea asks 19
        (dt.date(2007, 1, 1), "KR", None),
    ],
)
def test_age_gate_by_region(born, region, reason) -> None:  # type: ignore[no-untyped-def]
    r = Restrictions(birth_date=born, is_minor=False, blocked=False, region=region)
    if reason is None:
        domain.check_may_transact(r, 18, {"KR": 19}, TODAY)
    else:
        with pytest.raises(FailedPrecondition) as err:
            domain.check_may_transact(r, 18, {"KR": 19}, TODAY)
        assert err.value.reason == reason


def test_blocked_accounts_and_minor_flags_may_not_transact() -> None:
    with pytest.raises(FailedPrecondition, match="blocked"):
        domain.check_may_transact(Restrictions(None, False, True, "US"), 18, {}, TODAY)
    with pytest.raises(FailedPrecondition) as err:
        domain.check_may_transact(Restrictions(None, True, False, "US"), 18, {}, TODAY)
    assert err.value.reason == "UNDERAGE"
    domain.check_may_transact(None, 18, {}, TODAY)  # unknown users are not restricted


def test_birth_dates_are_validated() -> None:
    assert domain.parse_birth_date("", TODAY) is None
    assert domain.parse_birth_date("2000-02-29", TODAY) == dt.date(2000, 2, 29)
    # Python's fromisoformat takes the last four, which are not the YYYY-MM-DD the message names.
    for bad in ("22/11/2000", "2000-13-01", "2999-01-01", "20000102", "2000-W01-1", "2000-001", "２０００-01-02"):
        with pytest.raises(InvalidArgument):
            domain.parse_birth_date(bad, TODAY)


def test_a_birth_date_is_in_the_future_by_the_day_the_wallet_is_told_it_is() -> None:
    assert domain.parse_birth_date(TODAY.isoformat(), TODAY) == TODAY
    with pytest.raises(InvalidArgument):
        domain.parse_birth_date((TODAY + dt.timedelta(days=1)).isoformat(), TODAY)


# ---- currencies, promotions, limits, payment routing ---------------------------------------

H_US = 3_600_000_000


def test_only_known_currencies_and_well_formed_regions_are_accepted() -> None:
    assert domain.check_currency("jpy") == "JPY"
    assert domain.CURRENCY_MINOR_UNITS["JPY"] == 0 and domain.CURRENCY_MINOR_UNITS["GBP"] == 2
    for bad in ("", "XXX", "US$", "dollars"):
        with pytest.raises(InvalidArgument) as err:
            domain.check_currency(bad)
        assert err.value.reason == "UNKNOWN_CURRENCY"
    assert domain.check_region("gb") == "GB"
    for bad in ("", "U", "U S", "ÜS", "X" * 9):
        with pytest.raises(InvalidArgument):
            domain.check_region(bad)


def test_a_discount_never_rounds_the_price_down_to_nothing() -> None:
    assert domain.discounted_price(99, 1000) == 90  # 9.9 cents off rounds down to 9: the buyer pays 90
    assert domain.discounted_price(160, 2500) == 120
    assert domain.discounted_price(1, 9000) == 1


def test_the_promotion_that_started_last_applies_only_inside_its_window() -> None:
    old = domain.PromotionTerms("old", 10, 0, 0, 10 * H_US, True)
    new = domain.PromotionTerms("new", 0, 2000, 2 * H_US, 5 * H_US, True)
    off = domain.PromotionTerms("off", 999, 0, 0, 10 * H_US, False)
    assert domain.offer(700, 999, [old, new, off], H_US) == domain.Offer(700, 10, 999, 999, "old")
    assert domain.offer(700, 999, [old, new, off], 2 * H_US) == domain.Offer(700, 0, 999, 800, "new")
    assert domain.offer(700, 999, [old, new, off], 5 * H_US).promotion_id == "old"  # ends_at is exclusive
    assert domain.offer(700, 999, [old, new, off], 10 * H_US) == domain.Offer(700, 0, 999, 999, "")


@pytest.mark.parametrize(
    ("bonus", "bps", "start", "end"),
    [(0, 0, 0, 1), (-1, 0, 0, 1), (0, 9001, 0, 1), (5, 0, 2, 2), (domain.PACKAGE_COINS_MAX + 1, 0, 0, 1)],
)
def test_promotions_that_give_nothing_too_much_or_no_window_are_refused(bonus, bps, start, end) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument) as err:
        domain.check_promotion(bonus, bps, start, end)
    assert err.value.reason == "INVALID_PROMOTION"


@given(st.integers(1, domain.TIME_US_MAX // US_PER_DAY), st.integers(-1, 0))
def test_every_instant_of_a_utc_day_and_only_those_belong_to_it(day: int, offset_us: int) -> None:
    # The last microsecond of a day is in that day, midnight in the next: consecutive days
    # partition time, so no spend is counted in, or aged by, a day it was not in.
    at_us = day * US_PER_DAY + offset_us
    expected = dt.date(1970, 1, 1) + dt.timedelta(days=day + offset_us)
    assert domain.utc_date(at_us) == expected
    assert domain.period_keys(at_us)[domain.Period.DAY] == expected.isoformat()


def test_period_keys_follow_utc_days_iso_weeks_and_months() -> None:
    sunday_late = int(dt.datetime(2026, 11, 29, 23, 59, tzinfo=dt.UTC).timestamp() * 1_000_000)
    monday = sunday_late + 60_000_000
    assert domain.period_keys(sunday_late) == {
        domain.Period.DAY: "2026-11-29",
        domain.Period.WEEK: "2026-W48",
        domain.Period.MONTH: "2026-11",
    }
    assert domain.period_keys(monday) == {
        domain.Period.DAY: "2026-11-30",
        domain.Period.WEEK: "2026-W49",
        domain.Period.MONTH: "2026-11",
    }


# Leap days, ISO weeks that straddle a new year (week 53) and 31 December, drawn often: hypothesis
# would seldom land on them among 3 million days.
_BOUNDARY_DAYS = st.sampled_from(
    [dt.date(2028, 2, 28), dt.date(2028, 2, 29), dt.date(2100, 2, 28), dt.date(2026, 12, 31), dt.date(2026, 12, 28)]
)
_ANY_DAY = st.dates(dt.date(1970, 1, 2), dt.date(9999, 11, 30))


@given(st.one_of(_BOUNDARY_DAYS, _ANY_DAY), st.integers(0, US_PER_DAY - 1))
def test_each_period_resets_at_the_first_utc_midnight_its_key_changes_and_keeps_the_previous_counter(
    day: dt.date, into_day_us: int
) -> None:
    at_us = (day - dt.date(1970, 1, 1)).days * US_PER_DAY + into_day_us
    keys, stale = domain.period_keys(at_us), domain.stale_period_keys(at_us)
    for period in domain.Period:
        resets = domain.period_resets_at_us(period, at_us)
        # A UTC midnight after the instant, the first at which the period's key changes: the
        # `resets_at_us` a refusal names is when its counter starts again from 0, not later.
        assert resets % US_PER_DAY == 0 and at_us < resets
        assert domain.period_keys(resets - 1)[period] == keys[period] != domain.period_keys(resets)[period]
        starts = max(
            m * US_PER_DAY
            for m in range(at_us // US_PER_DAY - 31, at_us // US_PER_DAY + 1)
            if domain.period_keys(m * US_PER_DAY)[period] == keys[period]
            and domain.period_keys(m * US_PER_DAY - 1)[period] != keys[period]
        )
        # Counters below `stale` are dropped: never this period's, nor the previous one's (a
        # replica a little behind still spends there); keys sort as their periods do.
        previous = domain.period_keys(starts - 1)[period]
        assert stale[period] <= previous < keys[period]


def test_a_lower_limit_applies_at_once_and_a_higher_one_after_the_cooling_off_period() -> None:
    cool = 24 * H_US
    state = domain.change_limit(domain.LimitState(None), 500, 0, cool)
    assert state == domain.LimitState(500)  # first cap: lower than "none", at once
    lowered = domain.change_limit(state, 100, H_US, cool)
    assert lowered == domain.LimitState(100)
    raised = domain.change_limit(lowered, 1000, 2 * H_US, cool)
    assert raised.limit == 100 and raised.pending_limit == 1000 and raised.pending_at_us == 26 * H_US
    assert domain.effective_limit([raised], 26 * H_US - 1) == 100
    assert domain.effective_limit([raised], 26 * H_US) == 1000
    removed = domain.change_limit(lowered, None, 0, cool)  # removing a cap is a raise too
    assert removed.limit == 100 and removed.has_pending and removed.pending_limit is None
    assert domain.effective_limit([removed], cool) is None
    # Lowering while a raise is pending cancels the raise.
    assert domain.change_limit(raised, 50, 3 * H_US, cool) == domain.LimitState(50)


def test_the_tightest_of_the_user_and_operator_caps_binds() -> None:
    assert domain.effective_limit([domain.LimitState(300), domain.LimitState(200)], 0) == 200
    assert domain.effective_limit([domain.LimitState(None), domain.LimitState(200)], 0) == 200
    assert domain.effective_limit([], 0) is None
    with pytest.raises(InvalidArgument):
        domain.change_limit(domain.LimitState(None), domain.SPENDING_LIMIT_MAX + 1, 0, 0)


def test_a_reversal_claims_the_new_part_of_the_users_debt() -> None:
    # No earlier reversal: the coins the balance could not give back were spent.
    assert domain.reversal_spent(700, balance_after=0, claimed_before=0, repaid_by_kept=0) == 0
    assert domain.reversal_spent(700, balance_after=-500, claimed_before=0, repaid_by_kept=0) == 500
    assert domain.reversal_spent(700, balance_after=-700, claimed_before=0, repaid_by_kept=0) == 700
    assert domain.reversal_spent(700, balance_after=300, claimed_before=0, repaid_by_kept=0) == 0
    # 50 of the debt were claimed before and are still owed: only the other 700 are new.
    assert domain.reversal_spent(700, balance_after=-750, claimed_before=50, repaid_by_kept=0) == 700
    # ... and once a purchase the platform keeps has repaid them, the whole debt is new.
    assert domain.reversal_spent(700, balance_after=-300, claimed_before=50, repaid_by_kept=50) == 300


def test_coins_that_repaid_a_debt_when_credited() -> None:
    # Credited onto a balance of -100: 100 of the 700 repaid the debt (balance after 600).
    assert domain.debt_repaid(600, 700) == 100
    assert domain.debt_repaid(-50, 700) == 700  # a debt of 750: all of it went to the debt
    assert domain.debt_repaid(700, 700) == 0
    assert domain.debt_repaid(900, 700) == 0


def test_a_purchase_that_only_repaid_a_chargeback_debt_claws_nothing_back_when_refunded() -> None:
    # P0 (100 coins) gifted to X, P1 (100) gifted to Y: the balance is 0. P1 is charged back:
    # all 100 were spent, payout claws back Y's gift.
    assert domain.reversal_spent(100, balance_after=-100, claimed_before=0, repaid_by_kept=0) == 100
    # P2 (100) repays that debt, then is refunded: the debt is owed again, but it was claimed
    # (P1) and no purchase kept has repaid it, so X (paid for by P0, whose cash was kept) keeps it.
    assert domain.debt_repaid(0, 100) == 100
    assert domain.reversal_spent(100, balance_after=-100, claimed_before=100, repaid_by_kept=0) == 0


def test_a_debt_owed_again_and_paid_from_the_balance_is_not_claimed_twice() -> None:
    # P1 (70) charged back after 35 were spent: 35 claimed. P2 (70) repays those 35; 18 more are
    # spent; P3 (350) lands on a positive balance. Refunding P2 owes the 35 again, paid at once
    # from P3's coins in the balance (297 left): nothing new. Refunding P3 then leaves a debt of
    # 53, of which 35 were claimed already: 18 are new, the 18 spent since. 35 + 0 + 18 = 53 spent.
    assert domain.reversal_spent(70, balance_after=-35, claimed_before=0, repaid_by_kept=0) == 35
    assert domain.reversal_spent(70, balance_after=297, claimed_before=35, repaid_by_kept=0) == 0
    assert domain.reversal_spent(350, balance_after=-53, claimed_before=35, repaid_by_kept=0) == 18


def test_a_reversal_refuses_negative_counts() -> None:
    with pytest.raises(InvariantViolation):
        domain.reversal_spent(700, balance_after=0, claimed_before=-1, repaid_by_kept=0)


def test_payment_methods_are_routed_to_their_provider_and_unrouted_ones_are_refused() -> None:
    from services.common.errors import FailedPrecondition as FP
    from services.wallet.payments import DevProvider, PaymentRouter, parse_routes

    router = PaymentRouter([DevProvider(b"s", 300)], parse_routes("CARD=dev, paypal=dev"))
    assert router.for_method("PAYPAL").name == "dev"
    with pytest.raises(FP) as err:
        router.for_method("APPLE_PAY")
    assert err.value.reason == "PAYMENT_METHOD_UNAVAILABLE"
    with pytest.raises(InvalidArgument):
        router.by_name("stripe")
    with pytest.raises(ValueError):
        parse_routes("CASH=dev")
    with pytest.raises(ValueError):
        PaymentRouter([DevProvider(b"s", 300)], {"CARD": "stripe"})


def test_an_unknown_payment_provider_is_echoed_printable_and_cut_to_32_characters() -> None:
    from services.wallet.payments import DevProvider, PaymentRouter, parse_routes

    router = PaymentRouter([DevProvider(b"s", 300)], parse_routes("CARD=dev"))
    with pytest.raises(InvalidArgument) as err:
        router.by_name("\x1b]0;owned\x07\nstripe" + "x" * 100)
    assert err.value.reason == "UNKNOWN_PROVIDER"
    assert err.value.metadata["provider"] == "?]0;owned??stripe" + "x" * 15


def test_a_birth_date_is_in_the_future_by_the_utc_date_whatever_the_servers_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # At any hour one of these zones has another date than UTC: UTC+14 is a day ahead from 10:00
    # UTC, UTC-12 a day behind until 12:00 UTC. The wallet's today is utc_date of its clock.
    try:
        for zone in ("Pacific/Kiritimati", "Etc/GMT+12"):
            monkeypatch.setenv("TZ", zone)
            time.tzset()
            # The UTC date read before and after the wallet's clock: UTC midnight may pass between
            # two readings (CI at 23:59:59 UTC), and one reading against the other then failed.
            before = dt.datetime.now(dt.UTC).date()
            today = domain.utc_date(now_us())
            after = dt.datetime.now(dt.UTC).date()
            assert today in (before, after)
            with pytest.raises(InvalidArgument):
                domain.parse_birth_date((today + dt.timedelta(days=1)).isoformat(), today)
            assert domain.parse_birth_date(today.isoformat(), today) == today
    finally:
        monkeypatch.undo()  # TZ as it was (deleting it left a TZ the run had set unused by tzset)
        time.tzset()
