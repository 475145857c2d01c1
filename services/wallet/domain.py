"""Wallet rules: pure functions and values, no I/O."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from enum import StrEnum

from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, check
from services.common.timeutil import US_PER_DAY

ISSUED = "system:issued"  # coins created by purchases (goes negative as coins are issued)
REVERSED = "system:reversed"  # coins taken back by refunds and chargebacks


def user_account(user_id: str) -> str:
    """The ledger account of a user's coins."""
    return f"user:{user_id}"


def spent_account(reason: str) -> str:
    """The system account that receives coins spent for `reason`."""
    return f"system:spent:{reason}"


class SpendReason(StrEnum):
    """Why coins were spent."""

    GIFT = "GIFT"
    TIP = "TIP"
    UNLOCK = "UNLOCK"


class PurchaseStatus(StrEnum):
    """Lifecycle of a purchase."""

    PENDING = "PENDING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    REFUNDED = "REFUNDED"
    CHARGED_BACK = "CHARGED_BACK"


# Allowed transitions; anything else is INVALID_TRANSITION. A failed payment can still succeed:
# providers report a declined attempt, then a later one (another card, a retried capture) that
# took the money, for the same checkout. The money arrived, so the coins are credited then. A
# success is never undone by a failure report: only a refund or chargeback reverses it.
TRANSITIONS: dict[PurchaseStatus, set[PurchaseStatus]] = {
    PurchaseStatus.PENDING: {PurchaseStatus.SUCCEEDED, PurchaseStatus.FAILED},
    PurchaseStatus.SUCCEEDED: {PurchaseStatus.REFUNDED, PurchaseStatus.CHARGED_BACK},
    PurchaseStatus.FAILED: {PurchaseStatus.SUCCEEDED},
    PurchaseStatus.REFUNDED: set(),
    PurchaseStatus.CHARGED_BACK: set(),
}


# Failure reports that arrive once the purchase already has an outcome: recorded by their event
# id (so a retry is a duplicate) and answered OK, changing nothing. Providers send the failure of
# a declined attempt after, or beside, a later one's outcome (a second card that paid, then its
# refund), and retry for days any callback that got an error; a failure has no effect on a
# purchase that is not PENDING, whatever order it arrives in. Everything else outside
# TRANSITIONS stays INVALID_TRANSITION but a success after one was applied (SUCCESS_APPLIED, a
# duplicate): a refund or chargeback of a purchase never credited may be early (its retry applies
# once the success lands) or wrong; a second reversal under a new event id reports money moving
# twice, which an operator must see.
NO_EFFECT: dict[PurchaseStatus, set[PurchaseStatus]] = {
    PurchaseStatus.PENDING: set(),
    PurchaseStatus.SUCCEEDED: {PurchaseStatus.FAILED},
    PurchaseStatus.FAILED: {PurchaseStatus.FAILED},
    PurchaseStatus.REFUNDED: {PurchaseStatus.FAILED},
    PurchaseStatus.CHARGED_BACK: {PurchaseStatus.FAILED},
}


check(
    all(not (NO_EFFECT[s] & TRANSITIONS[s]) for s in PurchaseStatus),
    "a report either changes a purchase or changes nothing",
)


# The statuses a purchase has only once a success was applied: SUCCEEDED and what a success leads
# to (its refund or chargeback), none of them reachable otherwise. A success reported for one of
# them under a new event id, with the purchase's amount and currency, is that success again, as
# the provider's own callback arriving after the reconciler's look-up applied it (a provider's
# look-up does not give the id of the webhook event it will send): answered as a duplicate, as
# payout answers a PAID withdrawal's PAID under another event id. A success after FAILED is not
# among them: it is the move that credits the purchase.
SUCCESS_APPLIED: frozenset[PurchaseStatus] = frozenset(
    {PurchaseStatus.SUCCEEDED} | TRANSITIONS[PurchaseStatus.SUCCEEDED]
)
check(
    all(
        (target not in SUCCESS_APPLIED) or (source in SUCCESS_APPLIED or target is PurchaseStatus.SUCCEEDED)
        for source, targets in TRANSITIONS.items()
        for target in targets
    )
    and all(TRANSITIONS[s] <= SUCCESS_APPLIED for s in SUCCESS_APPLIED)
    and all(PurchaseStatus.SUCCEEDED not in TRANSITIONS[s] | NO_EFFECT[s] for s in SUCCESS_APPLIED),
    "SUCCESS_APPLIED holds the statuses reached only through a success, which a success no longer moves",
)


def repeats_the_success(current: PurchaseStatus, target: PurchaseStatus) -> bool:
    """True if a report of `target` on a `current` purchase is its applied success reported again."""
    return target is PurchaseStatus.SUCCEEDED and current in SUCCESS_APPLIED


def has_no_effect(current: PurchaseStatus, target: PurchaseStatus) -> bool:
    """True if a report of `target` is accepted but changes nothing on a `current` purchase."""
    return target in NO_EFFECT[current]


def check_transition(current: PurchaseStatus, target: PurchaseStatus) -> None:
    """Raise FAILED_PRECONDITION/INVALID_TRANSITION unless current -> target is allowed."""
    if target not in TRANSITIONS[current]:
        raise FailedPrecondition(
            f"a {current.value} purchase cannot become {target.value}",
            "INVALID_TRANSITION",
            current=current.value,
        )


# The kinds of journal entries, as ListTransactions shows them (wallet.proto, README "Balance and
# history"): spelled out for the docs, and held here to the kinds the wallet writes.
ENTRY_KINDS = ("PURCHASE", "SPEND_GIFT", "SPEND_TIP", "SPEND_UNLOCK", "REVERSAL_REFUNDED", "REVERSAL_CHARGED_BACK")
check(
    set(ENTRY_KINDS)
    == {"PURCHASE"}
    | {f"SPEND_{r.value}" for r in SpendReason}
    | {f"REVERSAL_{s.value}" for s in TRANSITIONS[PurchaseStatus.SUCCEEDED]},
    "ENTRY_KINDS lists every kind of entry the wallet writes",
)


@dataclass(frozen=True)
class Posting:
    """One leg of a journal entry."""

    account_id: str
    amount: int


def balanced(postings: list[Posting]) -> bool:
    """Double entry: the legs of an entry sum to zero."""
    return sum(p.amount for p in postings) == 0


def purchase_postings(user_id: str, coins: int) -> list[Posting]:
    """Coins issued to a user by a succeeded purchase."""
    return [Posting(ISSUED, -coins), Posting(user_account(user_id), coins)]


def spend_postings(user_id: str, amount: int, reason: SpendReason) -> list[Posting]:
    """Coins leaving a user for a gift, tip or unlock."""
    return [Posting(user_account(user_id), -amount), Posting(spent_account(reason.value), amount)]


def reversal_postings(user_id: str, coins: int) -> list[Posting]:
    """Coins taken back from a user by a refund or chargeback (the balance may go negative)."""
    return [Posting(user_account(user_id), -coins), Posting(REVERSED, coins)]


_BIRTH_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def parse_birth_date(value: str, today: dt.date) -> dt.date | None:
    """A YYYY-MM-DD date or None; INVALID_ARGUMENT if malformed or after `today` (the UTC date of
    the wallet's clock, `utc_date`, as every age and period here)."""
    if not value:
        return None
    # The form the message names, and only it: Python 3.11's fromisoformat also takes "20000102"
    # and ISO week dates ("2000-W01-1"), which a caller sending them did not mean as this.
    if not _BIRTH_DATE.fullmatch(value):
        raise InvalidArgument("birth_date must be YYYY-MM-DD", "INVALID_BIRTH_DATE")
    try:
        born = dt.date.fromisoformat(value)
    except ValueError:
        raise InvalidArgument("birth_date must be YYYY-MM-DD", "INVALID_BIRTH_DATE") from None
    if born > today:
        raise InvalidArgument("birth_date is in the future", "INVALID_BIRTH_DATE")
    return born


def age_years(born: dt.date, today: dt.date) -> int:
    """Completed years between `born` and `today`."""
    return today.year - born.year - ((today.month, today.day) < (born.month, born.day))


def parse_region_ages(spec: str) -> dict[str, int]:
    """'KR=19,XX=21' -> {'KR': 19, 'XX': 21}."""
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        region, _, age = item.partition("=")
        if not region.strip() or not age.strip().isdigit() or not 0 <= int(age) <= 30:
            raise ValueError(f"bad region age {item!r}: want REGION=years, years 0..30 (e.g. KR=19)")
        out[region.strip().upper()] = int(age)
    return out


@dataclass(frozen=True)
class Restrictions:
    """What limits a user's wallet."""

    birth_date: dt.date | None
    is_minor: bool
    blocked: bool
    region: str


def check_may_transact(r: Restrictions | None, adult_age: int, region_ages: dict[str, int], today: dt.date) -> None:
    """ACCOUNT_BLOCKED or UNDERAGE unless the user may buy and spend coins."""
    if r is None:
        return
    if r.blocked:
        raise FailedPrecondition("the account is blocked", "ACCOUNT_BLOCKED")
    required = region_ages.get(r.region.upper(), adult_age)
    if r.is_minor or (r.birth_date is not None and age_years(r.birth_date, today) < required):
        raise FailedPrecondition(f"users under {required} may not buy or spend coins", "UNDERAGE")


# ---- currencies, packages and promotions -------------------------------------------------

# ISO 4217 currencies the wallet sells in -> digits of their minor unit (JPY has none).
CURRENCY_MINOR_UNITS: dict[str, int] = {"USD": 2, "GBP": 2, "EUR": 2, "JPY": 0}
PACKAGE_COINS_MAX = 1_000_000_000  # explicit cap so no package can overflow a balance
PRICE_MINOR_MAX = 100_000_000_000
DISCOUNT_BPS_MAX = 9_000  # at most 90% off: a promotion never gives coins away
BPS = 10_000
TIME_US_MAX = 253_402_300_799_000_000  # 9999-12-31T23:59:59Z


def check_currency(code: str) -> str:
    """The upper-cased currency code, or INVALID_ARGUMENT/UNKNOWN_CURRENCY."""
    upper = code.upper()
    if upper not in CURRENCY_MINOR_UNITS:
        raise InvalidArgument(
            f"currency must be one of {', '.join(sorted(CURRENCY_MINOR_UNITS))}", "UNKNOWN_CURRENCY", currency=code[:8]
        )
    return upper


def check_region(code: str) -> str:
    """The upper-cased region code, or INVALID_ARGUMENT/INVALID_REGION."""
    if not (2 <= len(code) <= 8 and code.isascii() and code.isalnum()):
        raise InvalidArgument("region must be a 2..8 letter code", "INVALID_REGION")
    return code.upper()


CHANNELS = ("APP", "WEB")  # in-app (the store takes a cut) or web checkout


def check_channel(channel: str) -> str:
    """APP (the default) or WEB, or INVALID_ARGUMENT/INVALID_CHANNEL."""
    upper = (channel or "APP").upper()
    if upper not in CHANNELS:
        raise InvalidArgument("channel must be APP or WEB", "INVALID_CHANNEL")
    return upper


@dataclass(frozen=True)
class Offer:
    """What a buyer gets and pays for a package right now."""

    coins: int
    bonus_coins: int
    list_price_minor: int
    price_minor: int
    promotion_id: str


@dataclass(frozen=True)
class PromotionTerms:
    """A promotion's effect and validity window ([starts_at_us, ends_at_us))."""

    promotion_id: str
    bonus_coins: int
    discount_bps: int
    starts_at_us: int
    ends_at_us: int
    active: bool

    def running(self, now_us: int) -> bool:
        """Active and inside its window."""
        return self.active and self.starts_at_us <= now_us < self.ends_at_us


def discounted_price(list_price_minor: int, discount_bps: int) -> int:
    """The price after a discount, rounded up to a whole minor unit (never below 1)."""
    off = list_price_minor * discount_bps // BPS  # the discount rounds down, so the price rounds up
    return max(1, list_price_minor - off)


def offer(coins: int, list_price_minor: int, promotions: list[PromotionTerms], now_us: int) -> Offer:
    """Apply the running promotion that started last (ties: the lowest id); none -> list terms."""
    running = sorted((p for p in promotions if p.running(now_us)), key=lambda p: (-p.starts_at_us, p.promotion_id))
    if not running:
        return Offer(coins, 0, list_price_minor, list_price_minor, "")
    p = running[0]
    return Offer(
        coins, p.bonus_coins, list_price_minor, discounted_price(list_price_minor, p.discount_bps), p.promotion_id
    )


def check_promotion(bonus_coins: int, discount_bps: int, starts_at_us: int, ends_at_us: int) -> None:
    """INVALID_ARGUMENT unless the promotion gives something, within limits, for a real window."""
    if not 0 <= bonus_coins <= PACKAGE_COINS_MAX:
        raise InvalidArgument(f"bonus_coins must be 0..{PACKAGE_COINS_MAX}", "INVALID_PROMOTION", field="bonus_coins")
    if not 0 <= discount_bps <= DISCOUNT_BPS_MAX:
        raise InvalidArgument(f"discount_bps must be 0..{DISCOUNT_BPS_MAX}", "INVALID_PROMOTION", field="discount_bps")
    if bonus_coins == 0 and discount_bps == 0:
        raise InvalidArgument("a promotion needs bonus coins or a discount", "INVALID_PROMOTION")
    if not (0 <= starts_at_us <= TIME_US_MAX and 0 <= ends_at_us <= TIME_US_MAX):
        raise InvalidArgument("starts_at and ends_at must lie in years 1970..9999", "INVALID_PROMOTION")
    if ends_at_us <= starts_at_us:
        raise InvalidArgument("ends_at must be after starts_at", "INVALID_PROMOTION", field="ends_at")


# ---- spending limits ----------------------------------------------------------------------


class Period(StrEnum):
    """Spending-limit periods, in UTC."""

    DAY = "DAY"
    WEEK = "WEEK"
    MONTH = "MONTH"


SPENDING_LIMIT_MAX = 1_000_000_000_000  # coins; bounds `spent + amount` far below int64


_EPOCH_DATE = dt.date(1970, 1, 1)


def utc_date(at_us: int) -> dt.date:
    """The UTC date an instant falls in: the one day every age and period of the wallet uses.

    Integer days, not a float of seconds, so the last microsecond of a day is never rounded
    into the next.
    """
    return _EPOCH_DATE + dt.timedelta(days=at_us // US_PER_DAY)


def period_keys(at_us: int) -> dict[Period, str]:
    """The UTC day, ISO week and month an instant falls in, as counter keys."""
    day = utc_date(at_us)
    iso = day.isocalendar()
    return {
        Period.DAY: day.isoformat(),
        Period.WEEK: f"{iso.year}-W{iso.week:02d}",
        Period.MONTH: f"{day.year}-{day.month:02d}",
    }


def period_resets_at_us(period: Period, at_us: int) -> int:
    """The instant the period `at_us` falls in ends (UTC midnight: the next day, Monday, first of
    the month), when its counter starts again from 0."""
    day = utc_date(at_us)
    if period is Period.DAY:
        end = day + dt.timedelta(days=1)
    elif period is Period.WEEK:
        end = day + dt.timedelta(days=7 - day.weekday())  # ISO weeks start on Monday
    else:
        end = dt.date(day.year + day.month // 12, day.month % 12 + 1, 1)
    return (end - _EPOCH_DATE).days * US_PER_DAY


# The longest each period lasts: at_us less this is in the previous period or an earlier one.
_PERIOD_SPAN_US = {Period.DAY: US_PER_DAY, Period.WEEK: 7 * US_PER_DAY, Period.MONTH: 31 * US_PER_DAY}


def stale_period_keys(at_us: int) -> dict[Period, str]:
    """Counter keys below which no spend can still count: those before the previous period.

    The previous period's counter is kept: a replica whose clock runs a little behind (or a
    batch that read the clock just before midnight) still spends in it, and finding it gone
    would count that period again from zero.
    """
    return {p: period_keys(at_us - span)[p] for p, span in _PERIOD_SPAN_US.items()}


@dataclass(frozen=True)
class LimitState:
    """One setter's cap for one period: None means no cap; a raise waits until pending_at_us."""

    limit: int | None
    pending_limit: int | None = None
    pending_at_us: int | None = None

    @property
    def has_pending(self) -> bool:
        """True while a raise is cooling off."""
        return self.pending_at_us is not None

    def resolved(self, now_us: int) -> LimitState:
        """The state with a due raise applied."""
        if self.pending_at_us is not None and self.pending_at_us <= now_us:
            return LimitState(self.pending_limit)
        return self


def _looser(a: int | None, b: int | None) -> bool:
    """True if cap `a` allows more than cap `b` (None = no cap)."""
    if a is None:
        return b is not None
    return b is not None and a > b


def change_limit(state: LimitState, requested: int | None, now_us: int, cooloff_us: int) -> LimitState:
    """A lower (or equal) cap applies at once; a higher one, or none, after the cooling-off period."""
    if requested is not None:
        check_limit_value(requested)
    current = state.resolved(now_us)
    if _looser(requested, current.limit):
        return LimitState(current.limit, requested, now_us + cooloff_us)
    return LimitState(requested)


def check_limit_value(value: int, field: str = "") -> None:
    """INVALID_ARGUMENT unless 1..SPENDING_LIMIT_MAX; its metadata names `field` when given."""
    if not 1 <= value <= SPENDING_LIMIT_MAX:
        where = {"field": field} if field else {}
        raise InvalidArgument(f"a limit must be 0 (none) or 1..{SPENDING_LIMIT_MAX}", "INVALID_LIMIT", **where)


def effective_limit(states: list[LimitState], now_us: int) -> int | None:
    """The tightest cap in force among the setters' caps (None = no cap)."""
    caps = [s.resolved(now_us).limit for s in states]
    present = [c for c in caps if c is not None]
    return min(present) if present else None


def tightest_cap(caps: dict[Period, int | None]) -> tuple[Period, int] | None:
    """The period with the lowest cap in force and that cap (the first in day, week, month order
    on a tie), or None without any: no single spend above it can ever pass, whatever the counts."""
    capped = [(cap, i, p) for i, (p, cap) in enumerate(caps.items()) if cap is not None]
    if not capped:
        return None
    cap, _, period = min(capped)
    return period, cap


def _limit_refusal(period: Period, cap: int, spent_coins: int) -> tuple[str, dict[str, object]]:
    """What both refusals of a spend past a period's cap name: the cap, and the period's count so far."""
    where: dict[str, object] = {"period": period.value, "limit_coins": cap, "spent_coins": spent_coins}
    return f"the {period.value.lower()} spending limit of {cap} coins", where


def spending_limit_exceeded(period: Period, cap: int, spent_coins: int, resets_at_us: int) -> ResourceExhausted:
    """The refusal of a spend that would take the period's count past its cap, with what a client
    needs to say "N more, or after <time>": the period's count so far and when it starts again
    from 0 (resets_at_us)."""
    what, where = _limit_refusal(period, cap, spent_coins)
    return ResourceExhausted(
        f"this spend would pass {what}", "SPENDING_LIMIT_EXCEEDED", **where, resets_at_us=resets_at_us
    )


def spend_exceeds_limit(period: Period, cap: int, spent_coins: int) -> ResourceExhausted:
    """The refusal of a spend that alone passes the period's cap: it fits in no period, so no reset
    time is named (waiting does not help; a smaller spend, or a higher limit, does) and
    amount_exceeds_limit says so."""
    what, where = _limit_refusal(period, cap, spent_coins)
    return ResourceExhausted(
        f"this spend alone passes {what}", "SPENDING_LIMIT_EXCEEDED", **where, amount_exceeds_limit="true"
    )


def debt_repaid(balance_after_credit: int, coins: int) -> int:
    """How many of a purchase's `coins` went to repay a debt (a negative balance) when credited."""
    return min(coins, max(0, coins - balance_after_credit))


def reversal_spent(coins: int, balance_after: int, claimed_before: int, repaid_by_kept: int) -> int:
    """How many of a reversed purchase's `coins` had reached creators: what payout claws back.

    The user's debt after the reversal (a negative balance) is coins spent that no money the
    platform keeps pays for. Part of it was clawed back already and is still owed: the coins
    earlier reversals of this user claimed (`claimed_before`), less those that purchases the
    platform keeps have repaid since (`repaid_by_kept`, each purchase's `debt_repaid` when it
    was credited; the reversed purchase itself no longer counts, so the debt it repaid is owed
    again and claimed by no one twice). Only the rest of the debt is new: coins of this
    purchase that went to creators. Coins are fungible, so this is the reading kindest to
    creators: what the balance still holds is taken back first, and no coin is claimed twice.
    """
    check(coins > 0 and claimed_before >= 0 and repaid_by_kept >= 0, "reversal_spent: counts are not negative")
    outstanding = claimed_before - repaid_by_kept
    return min(coins, max(0, max(0, -balance_after) - outstanding))
