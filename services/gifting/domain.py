"""Gifting rules: pure, no I/O."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from enum import StrEnum
from unicodedata import normalize

from services.common.errors import FailedPrecondition, InvalidArgument, check, id_chars_max, is_text
from services.common.timeutil import US_PER_DAY, US_PER_HOUR


class GiftStatus(StrEnum):
    """Lifecycle of a gift: PENDING -> SENT or CANCELLED, never both."""

    PENDING = "PENDING"
    SENT = "SENT"
    CANCELLED = "CANCELLED"


# Not a gift: the status of a gift_events row that only holds an idempotency key, that of an
# unlock answered by the user's earlier unlock of the content under another key (nothing charged,
# nothing recorded but the key). Gifts, tips and unlocks share one key space (the unique key of
# gift_events), so the row keeps any other request from that key. Every reader of gift_events
# selects gifts by status (PENDING, SENT, CANCELLED), or by event id, which no caller is given
# for such a row: none counts or acts on it. So the row is an idempotency record, deleted after
# IDEMPOTENCY_RETENTION_DAYS (services/gifting/keyrows.py).
KEY_ONLY = "KEY_ONLY"


class StreamStatus(StrEnum):
    """A stream is live until it ends."""

    LIVE = "LIVE"
    ENDED = "ENDED"


class GiftKind(StrEnum):
    """What the coins paid for."""

    GIFT = "GIFT"
    TIP = "TIP"
    UNLOCK = "UNLOCK"


# The most coins one gift may cost: the wallet's SPEND_AMOUNT_MAX (its default), the cap of tips and
# content prices too. A dearer combo (286 Universes) could never be spent: refused before it is
# recorded, rather than recorded, refused by the wallet and cancelled on every retry.
GIFT_COINS_MAX = 10_000_000


def gift_cost(unit_price_coins: int, quantity: int, quantity_max: int) -> int:
    """Coins for `quantity` of a gift; INVALID_QUANTITY outside 1..quantity_max or above GIFT_COINS_MAX coins.

    Every refusal names `quantity_max`, the most of this gift one send may carry (QUANTITY_MAX, or
    fewer for a gift so dear that GIFT_COINS_MAX binds first): QUANTITY_MAX is a deployment's
    setting, so an app's combo picker can only learn its bound from the answer.
    """
    check(unit_price_coins > 0, "catalog prices are positive")
    most = min(quantity_max, GIFT_COINS_MAX // unit_price_coins)
    if quantity < 1:
        raise InvalidArgument("quantity must be >= 1", "INVALID_QUANTITY", quantity_max=most)
    if quantity > quantity_max:
        raise InvalidArgument(f"quantity must be <= {quantity_max}", "INVALID_QUANTITY", quantity_max=most)
    coins = unit_price_coins * quantity
    if coins > GIFT_COINS_MAX:
        raise InvalidArgument(
            f"at most {GIFT_COINS_MAX // unit_price_coins} of this gift fit in one send ({GIFT_COINS_MAX} coins)",
            "INVALID_QUANTITY",
            coins_max=GIFT_COINS_MAX,
            quantity_max=most,
        )
    return coins


def check_can_gift(stream_status: str, creator_id: str, sender_id: str) -> None:
    """STREAM_NOT_LIVE or SELF_GIFT unless the sender may gift this stream now."""
    if stream_status != StreamStatus.LIVE:
        raise FailedPrecondition("the stream is not live", "STREAM_NOT_LIVE")
    if creator_id == sender_id:
        raise FailedPrecondition("creators cannot send gifts to themselves", "SELF_GIFT")


GIFT_ID_MAX = id_chars_max("gift_id")  # errors.require_id holds a catalog gift to it
GIFT_NAME_MAX = 100
GIFT_PRICE_COINS_MAX = 1_000_000


def folded_gift_id(gift_id: str) -> str:
    """A gift id as an operator reads it: case-folded and NFKC-normalized, so "Rose", "ROSE", a
    full-width "ｒｏｓｅ" and a decomposed "é" fold to the id they look like. Two gifts whose ids
    fold alike would list as twins that a client or an operator cannot tell apart."""
    return normalize("NFKC", normalize("NFKC", gift_id).casefold())


def check_new_gift_id(gift_id: str, existing: list[str]) -> None:
    """FAILED_PRECONDITION/GIFT_ID_TAKEN when a new gift's id folds (`folded_gift_id`) to an
    existing gift's: the operator meant that gift (an UpsertGift under its exact id changes it)."""
    folded = folded_gift_id(gift_id)
    for other in existing:
        if other != gift_id and folded_gift_id(other) == folded:
            raise FailedPrecondition(
                f"gift id {gift_id!r} differs from the existing {other!r} only by case or Unicode form",
                "GIFT_ID_TAKEN",
                gift_id=other,
            )


LEADERBOARD_LIMIT_DEFAULT = 10
LEADERBOARD_LIMIT_MAX = 100
LEADERBOARD_WINDOW_DAYS = 7
STATS_WINDOW_DAYS_DEFAULT = 7
STATS_WINDOW_DAYS_MAX = 92  # a quarter of hourly rows at most per query
STATS_ROWS_MAX = 1_000  # rows per section of GetCreatorStats


class Scope(StrEnum):
    """Whose leaderboard: one stream's, or a creator's across streams, tips and unlocks."""

    STREAM = "STREAM"
    CREATOR = "CREATOR"


def tip_coins(coins: int, tip_coins_max: int) -> int:
    """A tip's coins; INVALID_TIP_AMOUNT outside 1..tip_coins_max."""
    if coins < 1 or coins > tip_coins_max:
        raise InvalidArgument(f"a tip is 1..{tip_coins_max} coins", "INVALID_TIP_AMOUNT", tip_coins_max=tip_coins_max)
    return coins


def title(text: str, chars_max: int, *, required: bool, too_long: str = "INVALID_TITLE") -> str:
    """A stream's or content's title: at most chars_max characters of text (`is_text`, else
    INVALID_TITLE: PostgreSQL cannot store a NUL, and no screen shows a bell)."""
    if required and not text:
        raise InvalidArgument(f"title is 1..{chars_max} characters", "INVALID_TITLE")
    if len(text) > chars_max:
        what = f"1..{chars_max}" if required else f"at most {chars_max}"
        raise InvalidArgument(f"title is {what} characters", too_long)
    if not is_text(text):
        raise InvalidArgument("a title must be text without control characters", "INVALID_TITLE")
    return text


def tip_message(message: str, chars_max: int) -> str:
    """A tip's message; MESSAGE_TOO_LONG above chars_max, INVALID_MESSAGE with control characters (`is_text`)."""
    if len(message) > chars_max:
        # The limit is a setting (TIP_MESSAGE_CHARS_MAX): named, as INVALID_TIP_AMOUNT names its own,
        # so an app can say how long a message may be without a copy of the deployment's settings.
        raise InvalidArgument(
            f"a tip message is at most {chars_max} characters",
            "MESSAGE_TOO_LONG",
            tip_message_chars_max=chars_max,
        )
    if not is_text(message):
        raise InvalidArgument("a tip message must be text without control characters", "INVALID_MESSAGE")
    return message


def leaderboard_limit(limit: int) -> int:
    """The page size: default when 0, INVALID_LIMIT outside 1..LEADERBOARD_LIMIT_MAX."""
    if limit == 0:
        return LEADERBOARD_LIMIT_DEFAULT
    if limit < 0 or limit > LEADERBOARD_LIMIT_MAX:
        raise InvalidArgument(f"limit must be 1..{LEADERBOARD_LIMIT_MAX}", "INVALID_LIMIT")
    return limit


def check_eligible(role: str, may_spend: bool, blocked: bool) -> None:
    """ACCOUNT_BLOCKED or UNDERAGE unless the wallet says this sender or creator may take part."""
    if blocked:
        raise FailedPrecondition(f"the {role}'s account is blocked", "ACCOUNT_BLOCKED", role=role)
    if not may_spend:
        # The wallet's may_spend is "adult and not blocked"; not blocked here, so the age failed.
        raise FailedPrecondition(f"the {role} is under the required age", "UNDERAGE", role=role)


def stats_window_us(from_us: int | None, to_us: int | None, now: int) -> tuple[int, int]:
    """[from, to) of a stats query: defaults to the last 7 days, at most 92 days."""
    to = to_us if to_us is not None else now
    start = from_us if from_us is not None else to - STATS_WINDOW_DAYS_DEFAULT * US_PER_DAY
    if start >= to:
        raise InvalidArgument("from must be before to", "INVALID_WINDOW")
    if to - start > STATS_WINDOW_DAYS_MAX * US_PER_DAY:
        raise InvalidArgument(f"the window is at most {STATS_WINDOW_DAYS_MAX} days", "INVALID_WINDOW")
    return start, to


def stats_hours(start_us: int, end_us: int) -> tuple[int, int]:
    """The hourly buckets [first, end) of the window [start, end): those whose hour starts in it.

    Stats are kept per UTC hour, so a window off the hour (a creator at UTC+5:30 asking day by
    day) cannot be cut exactly. Each hour goes to the window its start falls in: back-to-back
    windows never count an hour twice or leave one out, and a window ending now includes the
    hour under way when it reaches back to that hour's start. A window in which no hour starts
    (the last 30 minutes at 10:40) holds no bucket and answers nothing: stats are hourly."""
    return -(-start_us // US_PER_HOUR), -(-end_us // US_PER_HOUR)


@dataclass(frozen=True)
class SentCoins:
    """What the read models need of one gifting.gift.sent event."""

    kind: str
    stream_id: str
    creator_id: str
    sender_id: str
    gift_id: str
    coins: int
    occurred_at_us: int


@dataclass
class BatchTotals:
    """A batch of sent coins folded to one delta per read-model key."""

    all_time: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (scope, id, sender)
    daily: dict[tuple[str, str, int, str], int] = field(default_factory=dict)  # (scope, id, day, sender)
    hourly: dict[tuple[str, int, str, str, str], list[int]] = field(default_factory=dict)  # -> [coins, events]


def fold(events: list[SentCoins]) -> BatchTotals:
    """Fold a batch so the consumer writes once per key, not once per gift."""
    out = BatchTotals()
    for e in events:
        check(e.coins > 0, "sent coins are positive")
        day = e.occurred_at_us // US_PER_DAY
        scopes = [(Scope.CREATOR.value, e.creator_id)]
        if e.stream_id:
            scopes.append((Scope.STREAM.value, e.stream_id))
        for scope, scope_id in scopes:
            k = (scope, scope_id, e.sender_id)
            out.all_time[k] = out.all_time.get(k, 0) + e.coins
            d = (scope, scope_id, day, e.sender_id)
            out.daily[d] = out.daily.get(d, 0) + e.coins
        h = (e.creator_id, e.occurred_at_us // US_PER_HOUR, e.stream_id, e.kind, e.gift_id)
        acc = out.hourly.setdefault(h, [0, 0])
        acc[0] += e.coins
        acc[1] += 1
    return out


class ComboTracker:
    """Counts a sender's streak of one gift: the streak ends after a gap or another gift.

    One per feed, for as long as the feed lasts (an overlay watches a stream for its whole
    length, days for a 24/7 stream). It keeps only the streaks that can still go on: a sender's
    entry is dropped once their last gift is more than the window old, so it holds the senders
    of the last `window_us`, at most STREAKS_MAX. It kept every sender it had seen up to
    STREAKS_MAX (~2 MB), a feed's memory growing with its age to that much, times every feed
    of the replica (WATCHERS_MAX).
    """

    STREAKS_MAX = 10_000  # senders one feed tracks at once; beyond it the least recent streak is dropped

    def __init__(self, window_us: int) -> None:
        self.window_us = window_us
        # sender -> (gift_id, last_at_us, count), least recent gift first (moved to the end on each)
        self._last: OrderedDict[str, tuple[str, int, int]] = OrderedDict()

    def __len__(self) -> int:
        """Streaks tracked now."""
        return len(self._last)

    def add(self, sender_id: str, gift_id: str, quantity: int, at_us: int) -> int:
        """Record a gift and return the streak's quantity so far, this gift included."""
        last = self._last
        prev = last.get(sender_id)
        count = quantity
        if prev is not None and prev[0] == gift_id and 0 <= at_us - prev[1] <= self.window_us:
            count += prev[2]
        last[sender_id] = (gift_id, at_us, count)
        last.move_to_end(sender_id)
        # Streaks whose last gift is older than the window cannot go on. Feed order is sent order,
        # near enough time order that the front holds them; one out of order waits for the next.
        horizon = at_us - self.window_us
        while len(last) > 1:
            oldest = next(iter(last))
            if last[oldest][1] >= horizon and len(last) <= self.STREAKS_MAX:
                break
            del last[oldest]
        return count
