"""Diamond arithmetic: exact, order-independent, nothing lost to rounding."""

import dataclasses
import datetime as dt
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.payout import domain
from tests.support.payout import max_clawable

coins = st.integers(min_value=1, max_value=35_000 * 9_999)
shares = st.integers(min_value=0, max_value=10_000)


@given(st.lists(coins, min_size=1, max_size=200), shares, st.randoms())
def test_credits_in_any_order_and_batching_sum_to_the_exact_share(amounts, share_bp, rnd) -> None:  # type: ignore[no-untyped-def]
    units = [domain.units_for(c, share_bp) for c in amounts]
    rnd.shuffle(units)
    credited, acc = 0, 0
    i = 0
    while i < len(units):
        size = rnd.randint(1, 10)
        batch = sum(units[i : i + size])
        credited += domain.credit_delta(acc, batch)
        acc += batch
        i += size
    whole, remainder = domain.diamonds_from_units(sum(c * share_bp for c in amounts))
    assert credited == whole
    assert acc % domain.BP_DENOMINATOR == remainder
    assert credited * domain.BP_DENOMINATOR + remainder == sum(c * share_bp for c in amounts)


def test_half_of_an_odd_coin_is_kept_as_a_remainder() -> None:
    assert domain.diamonds_from_units(domain.units_for(7, 5_000)) == (3, 5_000)


def test_a_batch_is_summed_into_one_write_per_creator() -> None:
    batch = [domain.Earning("a", 1, 5_000), domain.Earning("b", 2, 10_000), domain.Earning("a", 3, 15_000)]
    assert domain.per_creator(batch) == {"a": (4, 20_000), "b": (2, 10_000)}


# ---- withdrawals, methods, clawback attribution ------------------------------------------

USD = domain.DEFAULT_TERMS


def test_gross_fee_and_net_are_exact_and_the_percentage_fee_rounds_down() -> None:
    a = domain.withdrawal_amounts(20_002, domain.CurrencyTerms("USD", 200, 100, 0, 10**9, 30, 0), fee_bp=250)
    assert a.gross_minor == 10_001
    assert a.fee_minor == 30 + 10_001 * 250 // 10_000  # 250.025 cents rounds down to 250
    assert a.net_minor == a.gross_minor - a.fee_minor


def test_diamonds_not_worth_whole_cents_are_refused_instead_of_rounded() -> None:
    with pytest.raises(InvalidArgument) as exc:
        domain.withdrawal_amounts(20_001, USD, 0)
    assert exc.value.reason == "DIAMONDS_NOT_WHOLE_CASH"


@given(st.integers(min_value=1, max_value=10**9).map(lambda n: n * 2), st.integers(0, 5_000), st.integers(0, 500))
def test_net_plus_fee_is_always_the_gross(diamonds, fee_bp, fixed) -> None:  # type: ignore[no-untyped-def]
    terms = domain.CurrencyTerms("USD", 200, 100, 0, 10**15, fixed, 0)
    a = domain.withdrawal_amounts(diamonds, terms, fee_bp)
    assert a.gross_minor * 200 == diamonds * 100
    assert a.net_minor + a.fee_minor == a.gross_minor
    assert a.fee_minor <= fixed + a.gross_minor * fee_bp / 10_000


def test_limits_name_their_reason() -> None:
    with pytest.raises(FailedPrecondition) as low:
        domain.check_withdrawal_limits(domain.withdrawal_amounts(19_998, USD, 0), USD)
    assert low.value.reason == "BELOW_MINIMUM_WITHDRAWAL"
    high = domain.withdrawal_amounts(200_002, USD, 0)
    domain.check_withdrawal_limits(high, USD)  # the daily maximum is the next check's
    assert domain.above_daily_maximum(high, USD)
    assert not domain.above_daily_maximum(domain.withdrawal_amounts(200_000, USD, 0), USD)
    assert isinstance(domain.daily_limit_reached(USD, 0, "2026-01-01"), ResourceExhausted)
    assert domain.daily_limit_reached(USD, 0, "2026-01-01").reason == "DAILY_WITHDRAWAL_LIMIT"


def test_a_withdrawal_below_the_minimum_says_the_minimum_in_cash_and_diamonds_and_its_fee() -> None:
    with pytest.raises(FailedPrecondition) as low:
        domain.check_withdrawal_limits(domain.withdrawal_amounts(19_998, USD, 0), USD)
    assert low.value.metadata == {
        "currency_code": "USD",
        "withdrawal_min_minor": "10000",
        "withdrawal_min_diamonds": "20000",
        "fee_minor": "0",
    }
    # Above the minimum, but a fixed fee of $150 takes the whole $150 gross.
    costly = domain.CurrencyTerms("USD", 200, 100, 10_000, 100_000, 15_000, 50_000)
    with pytest.raises(FailedPrecondition) as eaten:
        domain.check_withdrawal_limits(domain.withdrawal_amounts(30_000, costly, 0), costly)
    assert eaten.value.reason == "BELOW_MINIMUM_WITHDRAWAL"
    assert eaten.value.metadata["fee_minor"] == "15000"


def test_the_daily_limit_says_what_is_left_today_in_cash_and_in_whole_cash_diamonds() -> None:
    # $1,000 a day, $612.34 requested: $387.66 left, 77,532 diamonds at 200 = $1.
    refused = domain.daily_limit_reached(USD, 61_234, "2028-02-28")
    assert refused.metadata == {
        "currency_code": "USD",
        "daily_max_minor": "100000",
        "daily_left_minor": "38766",
        "daily_left_diamonds": "77532",
        "resets_at_us": str(_utc_midnight_us(2028, 2, 29)),  # the next UTC day (a leap day) starts again
    }
    assert domain.daily_limit_reached(USD, 100_000, "2028-02-28").metadata["daily_left_minor"] == "0"
    # A gross above the whole day's maximum: no reset helps, so none is named.
    whole = domain.daily_limit_reached(USD, 61_234, "2028-02-28", amount_exceeds_limit=True).metadata
    assert whole["amount_exceeds_limit"] == "true" and "resets_at_us" not in whole
    assert whole["daily_left_minor"] == "38766"
    assert domain.daily_limit_reached(USD, 100_000, "2028-02-28").metadata["daily_left_diamonds"] == "0"


def _utc_midnight_us(year: int, month: int, day: int) -> int:
    return int(dt.datetime(year, month, day, tzinfo=dt.UTC).timestamp()) * 1_000_000


@pytest.mark.parametrize(
    ("day", "ends"), [("2026-12-31", (2027, 1, 1)), ("2027-02-28", (2027, 3, 1)), ("1970-01-01", (1970, 1, 2))]
)
def test_a_withdrawal_day_resets_at_the_utc_midnight_that_ends_it(day: str, ends: tuple[int, int, int]) -> None:
    assert domain.day_resets_at_us(day) == _utc_midnight_us(*ends)


_DAYS_TO_9999 = (dt.date(9999, 12, 31) - dt.date(1970, 1, 1)).days
_US_PER_DAY = 86_400_000_000


@given(st.integers(1, _DAYS_TO_9999 - 1), st.integers(-1, 0))  # 9999-12-31 has no next midnight
def test_a_withdrawal_counts_on_the_utc_day_its_instant_is_in_and_resets_at_the_next_midnight(
    day: int, offset_us: int
) -> None:
    # The last microsecond of a day is in that day, midnight in the next: the daily maximum's
    # days partition time, and the reset named is the first midnight after the request. Seconds
    # as a float rounded 2514-05-30T23:59:59.999999 into the 31st.
    at_us = day * _US_PER_DAY + offset_us
    expected = dt.date(1970, 1, 1) + dt.timedelta(days=day + offset_us)
    assert domain.utc_day(at_us) == expected.isoformat()
    resets = domain.day_resets_at_us(domain.utc_day(at_us))
    assert resets - _US_PER_DAY <= at_us < resets


def test_the_withdrawal_day_of_the_last_microsecond_of_a_day_far_ahead_is_that_day() -> None:
    last_us = (dt.date(2514, 5, 31) - dt.date(1970, 1, 1)).days * _US_PER_DAY - 1
    assert domain.utc_day(last_us) == "2514-05-30"


@pytest.mark.parametrize(("diamonds", "amount_minor"), [(200, 100), (3, 7), (7, 3), (1, 1), (150, 100)])
@given(amount_minor_wanted=st.integers(min_value=0, max_value=10**9))
def test_diamonds_worth_a_cash_amount_are_whole_cash_and_the_closest_on_their_side(
    diamonds: int, amount_minor: int, amount_minor_wanted: int
) -> None:
    terms = domain.CurrencyTerms("USD", diamonds, amount_minor, 1, 10**12, 0, 0)
    at_least = domain.diamonds_worth_at_least(amount_minor_wanted, terms)
    at_most = domain.diamonds_worth_at_most(amount_minor_wanted, terms)
    for d in (at_least, at_most):
        assert d * amount_minor % diamonds == 0  # a withdrawal of whole minor units
    assert at_least * amount_minor // diamonds >= amount_minor_wanted
    assert at_most * amount_minor // diamonds <= amount_minor_wanted
    step = diamonds // math.gcd(diamonds, amount_minor)
    assert at_least - step < 0 or (at_least - step) * amount_minor // diamonds < amount_minor_wanted
    assert (at_most + step) * amount_minor // diamonds > amount_minor_wanted


@pytest.mark.parametrize(
    ("share", "fee", "reason"), [(-1, 0, "INVALID_SHARE"), (10_001, 0, "INVALID_SHARE"), (5_000, -1, "INVALID_FEE")]
)
def test_a_policy_outside_its_ranges_is_refused(share: int, fee: int, reason: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        domain.check_policy(share, fee, [USD])
    assert exc.value.reason == reason


@pytest.mark.parametrize("code", ["XYZ", "UDS", "XXX", "XTS", "XAU", "HRK", "usd", "US"])
def test_a_policy_currency_that_is_no_iso_4217_currency_in_use_is_refused(code: str) -> None:
    # Three capital letters were enough: a typo of a code became a currency no provider pays in.
    eur = dataclasses.replace(USD, currency_code="EUR")
    with pytest.raises(InvalidArgument) as exc:
        domain.check_policy(5_000, 0, [eur, dataclasses.replace(USD, currency_code=code)])
    assert exc.value.reason == "INVALID_CURRENCY"


@pytest.mark.parametrize("code", ["USD", "EUR", "GBP", "JPY", "CHF", "XOF", "ZWG"])
def test_a_policy_in_iso_4217_currencies_is_taken(code: str) -> None:
    domain.check_policy(5_000, 0, [dataclasses.replace(USD, currency_code=code)])


def test_every_currency_the_wallet_sells_in_is_an_iso_4217_currency() -> None:
    from services.common.currencies import ISO_4217_CURRENCIES
    from services.wallet.domain import CURRENCY_MINOR_UNITS

    assert set(CURRENCY_MINOR_UNITS) <= ISO_4217_CURRENCIES


def test_masks_keep_only_the_last_four_characters() -> None:
    iban, masked = domain.normalize_bank("de89 3704 0044 0532 0130 00", "", "", "A")
    assert iban == "DE89370400440532013000"
    assert "0532013" not in masked and masked.endswith("3000")
    email, masked_email = domain.normalize_paypal("Jane.Doe@Example.com")
    assert email == "jane.doe@example.com" and "Jane" not in masked_email and "ane.Doe" not in masked_email


@pytest.mark.parametrize(
    ("account", "masked"),
    [
        ("1234", "••34"),  # the shortest account taken: shown whole before
        ("12345", "•••45"),
        ("12345678", "••••5678"),
        ("12345678901234567", "••••••••4567"),
    ],
)
def test_a_short_account_number_is_never_shown_whole(account: str, masked: str) -> None:
    _, shown = domain.normalize_bank("", account, "011000015", "A Creator")
    assert shown == f"{masked} (routing 0015)"


def test_a_one_letter_paypal_name_is_not_shown_whole() -> None:
    assert domain.normalize_paypal("a@example.com")[1] == "•••@e•••.com"
    assert domain.normalize_paypal("ab@example.com")[1] == "a•••@e•••.com"


@pytest.mark.parametrize(
    ("email", "masked"),
    [
        ("Jane@JaneDoe.dev", "j•••@j•••.dev"),  # a domain of one's own is nearly the address
        ("jane.doe@mail.corp.example.co.uk", "j•••@m•••.uk"),
        ("jd@x.io", "j•••@•••.io"),  # a one-letter domain is not shown whole either
    ],
)
def test_a_paypal_mask_shows_only_the_first_letter_of_the_domain_and_its_top_level(email: str, masked: str) -> None:
    assert domain.normalize_paypal(email)[1] == masked


def test_a_reversal_takes_the_senders_newest_earnings_first_up_to_its_coins() -> None:
    rows = [
        domain.EarningRow("new", "a", 300, 5_000),
        domain.EarningRow("mid", "b", 500, 6_000),
        domain.EarningRow("old", "a", 900, 5_000),
    ]
    takes = domain.attribute_reversal(700, rows)
    assert [(t.event_id, t.coins, t.units) for t in takes] == [("new", 300, 1_500_000), ("mid", 400, 2_400_000)]


def test_a_reversal_larger_than_what_was_gifted_takes_only_what_was_gifted() -> None:
    takes = domain.attribute_reversal(700, [domain.EarningRow("only", "a", 100, 5_000)])
    assert sum(t.coins for t in takes) == 100


@pytest.mark.parametrize(
    ("iban", "account", "routing"),
    [
        ("DE89370400440532013000\n", "", ""),  # "$" of a match() also matches before a final newline
        ("", "12345678", "²" * 9),  # str.isdigit() takes superscripts; int() does not
        ("", "²²²²²", "011000015"),
        ("", "١٢٣٤٥", "011000015"),  # Arabic-Indic digits: no bank reads them
        ("", "12345678", "٠١١٠٠٠٠١٥"),
    ],
)
def test_a_bank_account_in_anything_but_ascii_digits_is_an_invalid_payout_method(
    iban: str, account: str, routing: str
) -> None:
    with pytest.raises(InvalidArgument) as exc:
        domain.normalize_bank(iban, account, routing, "A Creator")
    assert exc.value.reason == "INVALID_PAYOUT_METHOD"


@pytest.mark.parametrize("target", [domain.WithdrawalStatus.PAID, domain.WithdrawalStatus.FAILED])
def test_only_a_claimed_withdrawal_takes_a_providers_outcome(target: domain.WithdrawalStatus) -> None:
    S = domain.WithdrawalStatus
    for never_submitted in (S.PENDING_REVIEW, S.APPROVED):
        with pytest.raises(FailedPrecondition) as err:
            domain.check_provider_outcome(never_submitted, target)
        assert err.value.reason == "WITHDRAWAL_NOT_SUBMITTED"
        with pytest.raises(FailedPrecondition):  # nor may anything else move it there
            domain.check_transition(never_submitted, target)
    domain.check_provider_outcome(S.PROCESSING, target)  # claimed, with or without its provider_ref
    for settled in (S.PAID, S.FAILED, S.REJECTED):
        if settled is not target:
            with pytest.raises(FailedPrecondition) as err:
                domain.check_provider_outcome(settled, target)
            assert err.value.reason == "INVALID_WITHDRAWAL_TRANSITION"


@given(
    st.lists(st.tuples(st.integers(0, 20), st.integers(1, 50)), min_size=1, max_size=6),
    st.lists(st.tuples(st.integers(0, 20), st.integers(1, 50)), min_size=1, max_size=8),
    st.randoms(),
)
@settings(max_examples=1000)
def test_reversals_applied_in_any_order_claw_back_what_they_would_in_order(reversals, gifts, rnd) -> None:  # type: ignore[no-untyped-def]
    # Payout's clawback with its reversals and gifts' earnings consumed in any order: each
    # reversal takes what it may of gifts recorded before it (newest first), then stands in for
    # newer ones (stand_in_takes); the settler retries the open ones, oldest first.
    taken = [0] * len(reversals)
    clawed = [0] * len(gifts)
    arrived: set[int] = set()
    applied: set[int] = set()

    def claw(r: int) -> None:
        t, want = reversals[r]
        if want == taken[r]:
            return
        older = [(gifts[g][0], domain.EarningRow(str(g), "c", gifts[g][1] - clawed[g], 1)) for g in arrived]
        rows = [row for at, row in sorted(older, key=lambda x: -x[0]) if at <= t and row.coins_open]
        takes = domain.attribute_reversal(want - taken[r], rows) if rows else []
        left = want - taken[r] - sum(x.coins for x in takes)
        if left:
            newer = [(reversals[o][0], taken[o]) for o in range(len(reversals)) if reversals[o][0] > t]
            after = [(gifts[g][0], clawed[g]) for g in arrived if gifts[g][0] > t]
            later = [(at, row) for at, row in sorted(older, key=lambda x: -x[0]) if at > t and row.coins_open]
            takes += domain.stand_in_takes(left, t, newer, after, later)
        for x in takes:
            clawed[int(x.event_id)] += x.coins
            taken[r] += x.coins

    def settle() -> None:
        for r in sorted(applied, key=lambda i: reversals[i][0]):
            claw(r)

    steps = [("r", i) for i in range(len(reversals))] + [("g", i) for i in range(len(gifts))]
    rnd.shuffle(steps)
    for kind, i in steps:
        if kind == "g":
            arrived.add(i)
        else:
            for r in sorted((o for o in applied if reversals[o][0] < reversals[i][0]), key=lambda o: reversals[o][0]):
                claw(r)  # the sender's older shortfalls first
            applied.add(i)
            claw(i)
        assert all(0 <= c <= n for c, (_, n) in zip(clawed, gifts, strict=True))
        assert all(0 <= x <= w for x, (_, w) in zip(taken, reversals, strict=True))
        assert sum(clawed) == sum(taken)
        # Every clawed coin can still be given to a reversal at or after its gift.
        for tau in range(-1, 21):
            assert sum(c for c, (at, _) in zip(clawed, gifts, strict=True) if at > tau) <= sum(
                x for x, (t, _) in zip(taken, reversals, strict=True) if t > tau
            )
    settle()
    assert sum(clawed) == max_clawable(reversals, gifts)
