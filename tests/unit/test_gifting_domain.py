"""Gifting rules: tip and title text, key digests, eligibility, leaderboard folding, combos, stats windows."""

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from livegifts.gifting.v1 import gifting_pb2
from services.common.errors import FailedPrecondition, InvalidArgument
from services.gifting import domain
from services.gifting.usecases import _digest

DAY = domain.US_PER_DAY


def sent(sender: str, coins: int, at_us: int = 0, stream: str = "s1", gift: str = "rose") -> domain.SentCoins:
    return domain.SentCoins("GIFT", stream, "c1", sender, gift, coins, at_us)


def test_a_tip_must_be_between_one_coin_and_the_maximum() -> None:
    assert domain.tip_coins(1, 100) == 1
    assert domain.tip_coins(100, 100) == 100
    for bad in (0, -1, 101):
        with pytest.raises(InvalidArgument) as exc:
            domain.tip_coins(bad, 100)
        assert exc.value.reason == "INVALID_TIP_AMOUNT"


def test_a_tip_message_is_short_printable_text() -> None:
    assert domain.tip_message("", 5) == ""
    assert domain.tip_message("héllo", 5) == "héllo"
    with pytest.raises(InvalidArgument, match="at most 5") as exc:
        domain.tip_message("toolong", 5)
    assert exc.value.reason == "MESSAGE_TOO_LONG"
    with pytest.raises(InvalidArgument) as exc:
        domain.tip_message("a\nb", 5)
    assert exc.value.reason == "INVALID_MESSAGE"
    # Emoji joined by zero-width joiners (a family, a rainbow flag) are text, as are bidi marks.
    for text in ("👨\u200d👩\u200d👧", "🏳️\u200d🌈", "\u200fשלום"):
        assert domain.tip_message(text, 10) == text
    for text in ("a\x00b", "\x1b[31m", "\ud800"):
        with pytest.raises(InvalidArgument) as exc:
            domain.tip_message(text, 10)
        assert exc.value.reason == "INVALID_MESSAGE"


def test_a_too_long_tip_message_names_the_limit_an_app_must_show() -> None:
    """TIP_MESSAGE_CHARS_MAX is a deployment's setting: the refusal carries it, as
    INVALID_TIP_AMOUNT carries tip_coins_max, so an app need not hold a copy of the settings."""
    with pytest.raises(InvalidArgument) as exc:
        domain.tip_message("x" * 151, 150)
    assert exc.value.reason == "MESSAGE_TOO_LONG"
    assert exc.value.metadata == {"tip_message_chars_max": "150"}


@pytest.mark.parametrize(
    ("price", "quantity", "quantity_max", "most"),
    [
        (1, 0, 9_999, 9_999),  # too few: the bound is QUANTITY_MAX
        (1, -5, 9_999, 9_999),
        (1, 10_000, 9_999, 9_999),  # too many for QUANTITY_MAX
        (34_999, 286, 9_999, 285),  # a Universe: GIFT_COINS_MAX binds first (285 x 34,999 fit)
        (34_999, 0, 9_999, 285),
    ],
)
def test_a_refused_quantity_names_the_most_of_this_gift_one_send_may_carry(
    price: int, quantity: int, quantity_max: int, most: int
) -> None:
    """A combo picker needs the bound, which is a setting (QUANTITY_MAX) or the coins cap over
    the gift's price: every INVALID_QUANTITY names it as `quantity_max`."""
    with pytest.raises(InvalidArgument) as exc:
        domain.gift_cost(price, quantity, quantity_max)
    assert exc.value.reason == "INVALID_QUANTITY"
    assert exc.value.metadata["quantity_max"] == str(most)
    assert domain.gift_cost(price, most, quantity_max) == price * most  # the bound itself is sent


def test_a_title_is_text_of_a_bounded_length() -> None:
    assert domain.title("", 5, required=False) == ""
    assert domain.title("👨\u200d👩\u200d👧", 5, required=True) == "👨\u200d👩\u200d👧"
    refused = [
        ("", {"required": True}, "INVALID_TITLE"),
        ("toolong", {"required": True}, "INVALID_TITLE"),
        ("toolong", {"required": False, "too_long": "TITLE_TOO_LONG"}, "TITLE_TOO_LONG"),
        ("a\x00b", {"required": False, "too_long": "TITLE_TOO_LONG"}, "INVALID_TITLE"),
        ("a\tb", {"required": True}, "INVALID_TITLE"),
    ]
    for text, how, reason in refused:
        with pytest.raises(InvalidArgument) as exc:
            domain.title(text, 5, **how)  # type: ignore[arg-type]
        assert exc.value.reason == reason, text


def test_a_blocked_account_is_reported_before_its_age() -> None:
    domain.check_eligible("sender", may_spend=True, blocked=False)
    with pytest.raises(FailedPrecondition) as exc:
        domain.check_eligible("creator", may_spend=False, blocked=True)
    assert (exc.value.reason, exc.value.metadata["role"]) == ("ACCOUNT_BLOCKED", "creator")
    with pytest.raises(FailedPrecondition) as exc:
        domain.check_eligible("sender", may_spend=False, blocked=False)
    assert exc.value.reason == "UNDERAGE"


def test_the_leaderboard_limit_defaults_to_ten_and_is_capped() -> None:
    assert domain.leaderboard_limit(0) == 10
    assert domain.leaderboard_limit(100) == 100
    for bad in (-1, 101):
        with pytest.raises(InvalidArgument):
            domain.leaderboard_limit(bad)


def test_a_batch_folds_to_one_delta_per_sender_per_scope() -> None:
    totals = domain.fold([sent("a", 5), sent("a", 7), sent("b", 1), sent("a", 2, at_us=DAY + 1)])
    assert totals.all_time == {
        ("CREATOR", "c1", "a"): 14,
        ("CREATOR", "c1", "b"): 1,
        ("STREAM", "s1", "a"): 14,
        ("STREAM", "s1", "b"): 1,
    }
    assert totals.daily[("STREAM", "s1", 0, "a")] == 12
    assert totals.daily[("STREAM", "s1", 1, "a")] == 2
    assert totals.hourly[("c1", 0, "s1", "GIFT", "rose")] == [13, 3]


def test_an_unlock_counts_for_the_creator_but_for_no_stream() -> None:
    totals = domain.fold([domain.SentCoins("UNLOCK", "", "c1", "a", "content-1", 9, 0)])
    assert totals.all_time == {("CREATOR", "c1", "a"): 9}


@given(st.lists(st.tuples(st.sampled_from("abcde"), st.integers(1, 10_000), st.integers(0, 30 * DAY)), max_size=200))
def test_folding_loses_and_invents_no_coins(items: list[tuple[str, int, int]]) -> None:
    totals = domain.fold([sent(s, c, at) for s, c, at in items])
    coins = sum(c for _, c, _ in items)
    for scope in ("CREATOR", "STREAM"):
        assert sum(v for k, v in totals.all_time.items() if k[0] == scope) == coins
        assert sum(v for k, v in totals.daily.items() if k[0] == scope) == coins
    assert sum(v[0] for v in totals.hourly.values()) == coins
    assert sum(v[1] for v in totals.hourly.values()) == len(items)


def test_a_combo_streak_counts_one_senders_same_gift_until_a_gap_or_another_gift() -> None:
    combos = domain.ComboTracker(window_us=10)
    assert [combos.add("a", "rose", 1, t) for t in (0, 5, 9)] == [1, 2, 3]
    assert combos.add("b", "rose", 2, 9) == 2  # another sender has a streak of their own
    assert combos.add("a", "rose", 5, 15) == 8
    assert combos.add("a", "rose", 1, 100) == 1  # the gap ended the streak
    assert combos.add("a", "panda", 1, 101) == 1  # another gift too


def test_a_feeds_combo_tracker_holds_the_senders_of_the_last_window_not_every_sender_it_saw() -> None:
    # A feed lasts as long as its stream (days, for an overlay): each new sender used to stay
    # until STREAKS_MAX of them, whatever their streak's age.
    combos = domain.ComboTracker(window_us=10)
    largest = 0
    for i in range(3 * domain.ComboTracker.STREAKS_MAX):  # a new sender every 3 µs
        assert combos.add(f"viewer-{i}", "rose", 1, 3 * i) == 1
        largest = max(largest, len(combos))
    assert largest <= 10 // 3 + 1  # those whose last gift is within the window, this one included
    combos.add("a", "rose", 1, 100_000)
    combos.add("b", "rose", 1, 100_005)
    assert combos.add("a", "rose", 1, 100_010) == 2  # a live streak survives the others' pruning


def test_a_combo_tracker_drops_the_least_recent_streak_beyond_its_maximum() -> None:
    combos = domain.ComboTracker(window_us=1_000_000)
    n = domain.ComboTracker.STREAKS_MAX
    combos.add("first", "rose", 1, 0)
    combos.add("second", "rose", 1, 0)
    combos.add("first", "rose", 1, 1)  # now more recent than "second"
    for i in range(n - 1):
        combos.add(f"viewer-{i}", "rose", 1, 2)
    assert len(combos) == n
    assert combos.add("first", "rose", 1, 3) == 3  # kept: "second" went first
    assert combos.add("second", "rose", 1, 3) == 1


@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from(["rose", "panda"]), st.integers(1, 5)), max_size=60))
def test_pruning_streaks_changes_no_combo_count(gifts: list[tuple[str, str, int]]) -> None:
    window = 10
    combos = domain.ComboTracker(window_us=window)
    kept: dict[str, tuple[str, int, int]] = {}  # every sender's last gift, never pruned
    for i, (sender, gift, quantity) in enumerate(gifts):
        at = 4 * i
        prev = kept.get(sender)
        want = quantity + (prev[2] if prev and prev[0] == gift and at - prev[1] <= window else 0)
        kept[sender] = (gift, at, want)
        assert combos.add(sender, gift, quantity, at) == want


def test_a_stats_window_defaults_to_seven_days_and_is_at_most_a_quarter() -> None:
    assert domain.stats_window_us(None, None, 100 * DAY) == (93 * DAY, 100 * DAY)
    assert domain.stats_window_us(5, 10, 0) == (5, 10)
    for start, end in ((10, 10), (0, 93 * DAY)):
        with pytest.raises(InvalidArgument) as exc:
            domain.stats_window_us(start, end, 0)
        assert exc.value.reason == "INVALID_WINDOW"


def test_no_two_requests_share_a_key_digest_and_older_digests_still_match() -> None:
    def tip(sender: str, coins: int, message: str) -> str:
        return _digest(gifting_pb2.SendTipRequest(stream_id="s", sender_id=sender, coins=coins, message=message))

    def gift(sender: str, gift_id: str) -> str:
        return _digest(gifting_pb2.SendGiftRequest(stream_id="s", sender_id=sender, gift_id=gift_id, quantity=1))

    assert tip("a", 1, "5|x") != tip("a|1", 5, "x")  # the same text once joined with "|"
    assert gift("a|b", "c") != gift("a", "b|c")
    assert tip("a", 1, "x\\|y") != tip("a", 1, "x|y")
    # Requests without "|" or "\" hash as they did when recorded (a retry across the upgrade matches).
    assert gift("v1", "rose") == hashlib.sha256(b"s|v1|rose|1").hexdigest()
    assert tip("v1", 5, "hi there") == hashlib.sha256(b"TIP|s|v1|5|hi there").hexdigest()
