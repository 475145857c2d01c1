"""Diamond arithmetic: exact, order-independent, nothing lost to rounding."""

from hypothesis import given
from hypothesis import strategies as st

from services.payout import domain

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
