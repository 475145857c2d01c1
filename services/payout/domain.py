"""Payout rules: exact diamond arithmetic in integers, no I/O."""

from __future__ import annotations

import bisect
import datetime as dt
import enum
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from services.common.currencies import ISO_4217_CURRENCIES
from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, check
from services.common.timeutil import US_PER_DAY

BP_DENOMINATOR = 10_000  # basis points: 5000 = 50%
DEFAULT_CREATOR_SHARE_BP = 5_000
_EPOCH_DATE = dt.date(1970, 1, 1)


def check_share(share_bp: int) -> int:
    """A creator share in 0..100% (basis points)."""
    if not 0 <= share_bp <= BP_DENOMINATOR:
        raise InvalidArgument("creator share must be 0..10000 basis points", "INVALID_SHARE")
    return share_bp


def units_for(coins: int, share_bp: int) -> int:
    """The creator's share of `coins`, in 1/10000 diamond."""
    check(coins > 0 and 0 <= share_bp <= BP_DENOMINATOR, "coins > 0 and share in range")
    return coins * share_bp


def share_in_force(versions: list[tuple[int, int]], at_us: int) -> int:
    """The creator share of the newest policy version changed at or before `at_us`.

    `versions` are (changed_at_us, share_bp), oldest first; an instant before them all takes the oldest.
    """
    check(bool(versions), "at least one policy version")
    share_bp = versions[0][1]
    for changed_at_us, version_share_bp in versions:
        if changed_at_us > at_us:
            break
        share_bp = version_share_bp
    return share_bp


def diamonds_from_units(units: int) -> tuple[int, int]:
    """(whole diamonds, remainder units) of an accumulated share."""
    return divmod(units, BP_DENOMINATOR)


def credit_delta(units_before: int, units_added: int) -> int:
    """Diamonds newly whole when `units_added` join `units_before`: exact, order-independent."""
    return (units_before + units_added) // BP_DENOMINATOR - units_before // BP_DENOMINATOR


@dataclass(frozen=True)
class Earning:
    """One consumed event's contribution to a creator."""

    creator_id: str
    coins: int
    units: int


def per_creator(items: Iterable[Earning]) -> dict[str, tuple[int, int]]:
    """Sum a batch by creator: creator -> (coins, units), one write each."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for e in items:
        out[e.creator_id][0] += e.coins
        out[e.creator_id][1] += e.units
    return {k: (v[0], v[1]) for k, v in out.items()}


# ---- policy -------------------------------------------------------------------------------

FEE_BP_MAX = 5_000  # a fee above half of the gross is certainly a typo
CURRENCIES_MAX = 32
AMOUNT_MINOR_MAX = 10**12
# A withdrawal's failure_reason (an operator's rejection, the provider's words): shown to the
# creator, carried by its payout.withdrawal.* event (bus.EVENT_BYTES_MAX), a String(200) column.
REASON_CHARS_MAX = 200


@dataclass(frozen=True)
class CurrencyTerms:
    """One payout currency: cash value of diamonds, limits and fixed fee, all in minor units."""

    currency_code: str
    diamonds: int
    amount_minor: int
    withdrawal_min_minor: int
    daily_max_minor: int
    fee_fixed_minor: int
    auto_approve_below_minor: int


# DOMAIN.md: 200 diamonds = $1, $100 minimum, $1,000 a day; no fee by default; up to $500 auto-approved.
DEFAULT_TERMS = CurrencyTerms("USD", 200, 100, 10_000, 100_000, 0, 50_000)


def check_currency_code(code: str) -> str:
    """A code of ISO 4217's shape, three capital letters (check_policy also looks it up)."""
    if len(code) != 3 or not code.isascii() or not code.isalpha() or not code.isupper():
        raise InvalidArgument("currency_code must be three capital letters (ISO 4217)", "INVALID_CURRENCY")
    return code


def check_policy(share_bp: int, fee_bp: int, terms: list[CurrencyTerms]) -> None:
    """Reject a policy with a share outside 0..100%, a negative fee or a nonsensical currency."""
    check_share(share_bp)
    if not 0 <= fee_bp <= FEE_BP_MAX:
        raise InvalidArgument(f"fee_bp must be 0..{FEE_BP_MAX}", "INVALID_FEE")
    if not 1 <= len(terms) <= CURRENCIES_MAX:
        raise InvalidArgument(f"a policy needs 1..{CURRENCIES_MAX} currencies", "INVALID_CURRENCIES")
    if len({t.currency_code for t in terms}) != len(terms):
        raise InvalidArgument("a currency appears twice", "INVALID_CURRENCIES")
    for t in terms:
        if check_currency_code(t.currency_code) not in ISO_4217_CURRENCIES:
            raise InvalidArgument(f"{t.currency_code} is not an ISO 4217 currency in use", "INVALID_CURRENCY")
        if not (0 < t.diamonds <= AMOUNT_MINOR_MAX and 0 < t.amount_minor <= AMOUNT_MINOR_MAX):
            raise InvalidArgument("diamond cash value needs diamonds > 0 and amount_minor > 0", "INVALID_CASH_VALUE")
        if t.fee_fixed_minor < 0:
            raise InvalidArgument("fee_fixed_minor must be >= 0", "INVALID_FEE")
        for name in ("withdrawal_min_minor", "daily_max_minor", "auto_approve_below_minor"):
            if not 0 <= getattr(t, name) <= AMOUNT_MINOR_MAX:
                raise InvalidArgument(f"{name} must be 0..{AMOUNT_MINOR_MAX}", "INVALID_LIMIT")
        if t.withdrawal_min_minor > t.daily_max_minor:
            raise InvalidArgument("the minimum withdrawal exceeds the daily maximum", "INVALID_LIMIT")
        if t.withdrawal_min_minor <= t.fee_fixed_minor:
            raise InvalidArgument("the minimum withdrawal must exceed the fixed fee", "INVALID_LIMIT")


# ---- withdrawal amounts -------------------------------------------------------------------


@dataclass(frozen=True)
class Amounts:
    """Gross, fee and net of a withdrawal in minor units."""

    gross_minor: int
    fee_minor: int
    net_minor: int


def withdrawal_amounts(diamonds: int, terms: CurrencyTerms, fee_bp: int) -> Amounts:
    """Gross = diamonds at the cash value (must be whole minor units); fee = fixed + gross*fee_bp, rounded down.

    Rounding: a withdrawal whose diamonds are not worth a whole number of minor units is refused
    (INVALID_ARGUMENT, DIAMONDS_NOT_WHOLE_CASH) instead of rounding, so no diamond is ever paid out
    short; the percentage fee rounds down (in the creator's favour); net = gross - fee exactly.
    """
    check(diamonds > 0, "diamonds > 0")
    value = diamonds * terms.amount_minor
    if value % terms.diamonds:
        step = terms.diamonds // _gcd(terms.diamonds, terms.amount_minor)
        raise InvalidArgument(
            f"withdraw a multiple of {step} diamonds (whole {terms.currency_code} minor units)",
            "DIAMONDS_NOT_WHOLE_CASH",
            step=step,
        )
    gross = value // terms.diamonds
    fee = terms.fee_fixed_minor + gross * fee_bp // BP_DENOMINATOR
    check(0 <= fee, "fee >= 0")
    return Amounts(gross, fee, gross - fee)


def cash_value_minor(diamonds: int, terms: CurrencyTerms) -> int:
    """What `diamonds` are worth in minor units, rounded down (0 for a negative balance)."""
    return max(diamonds, 0) * terms.amount_minor // terms.diamonds


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def diamonds_worth_at_least(amount_minor: int, terms: CurrencyTerms) -> int:
    """The fewest diamonds a withdrawal may ask for (whole minor units) worth at least `amount_minor`."""
    step_diamonds, step_minor = _whole_cash_step(terms)
    return -(-max(amount_minor, 0) // step_minor) * step_diamonds


def diamonds_worth_at_most(amount_minor: int, terms: CurrencyTerms) -> int:
    """The most diamonds a withdrawal may ask for (whole minor units) worth at most `amount_minor`."""
    step_diamonds, step_minor = _whole_cash_step(terms)
    return max(amount_minor, 0) // step_minor * step_diamonds


def _whole_cash_step(terms: CurrencyTerms) -> tuple[int, int]:
    """(diamonds, minor units) of the smallest withdrawal worth whole minor units (2 and 1 at 200 = 100)."""
    g = _gcd(terms.diamonds, terms.amount_minor)
    return terms.diamonds // g, terms.amount_minor // g


def check_withdrawal_limits(amounts: Amounts, terms: CurrencyTerms) -> None:
    """Minimum and a positive net, before any state is read (the daily maximum: `above_daily_maximum`).

    The refusal's metadata lets a client say what would pass: the minimum in the currency's minor
    units and in diamonds (the fewest worth it), and the fee this request would have paid."""
    if amounts.gross_minor < terms.withdrawal_min_minor or amounts.net_minor <= 0:
        message = (
            f"the minimum withdrawal is {terms.withdrawal_min_minor} {terms.currency_code} minor units"
            if amounts.gross_minor < terms.withdrawal_min_minor
            else "the fee would take the whole withdrawal"
        )
        raise FailedPrecondition(
            message,
            "BELOW_MINIMUM_WITHDRAWAL",
            currency_code=terms.currency_code,
            withdrawal_min_minor=terms.withdrawal_min_minor,
            withdrawal_min_diamonds=diamonds_worth_at_least(terms.withdrawal_min_minor, terms),
            fee_minor=amounts.fee_minor,
        )


def above_daily_maximum(amounts: Amounts, terms: CurrencyTerms) -> bool:
    """True for a gross that no day could take, whatever was requested before it."""
    return amounts.gross_minor > terms.daily_max_minor


def utc_day(at_us: int) -> str:
    """The UTC day an instant (unix microseconds) falls in, as an ISO date: the day a withdrawal's
    gross is counted on (`daily_withdrawals.day`).

    Integer days, as the wallet's `utc_date`, not a float of seconds: a float rounds the last
    microsecond of a day into the next once the seconds need more bits than it has to spare."""
    return (_EPOCH_DATE + dt.timedelta(days=at_us // US_PER_DAY)).isoformat()


def day_resets_at_us(day: str) -> int:
    """The UTC midnight that ends `day` (an ISO date, the UTC day a withdrawal's gross is counted
    on): unix microseconds, when the next day's maximum starts again from 0."""
    return (dt.date.fromisoformat(day) + dt.timedelta(days=1) - _EPOCH_DATE).days * US_PER_DAY


def daily_limit_reached(
    terms: CurrencyTerms, day_gross_minor: int, day: str, *, amount_exceeds_limit: bool = False
) -> ResourceExhausted:
    """DAILY_WITHDRAWAL_LIMIT, with the maximum and what is left of it on `day` (UTC, today's),
    `day_gross_minor` (not failed or rejected) already requested: in minor units and as the most
    diamonds that fit; and when that day ends (`resets_at_us`), as the wallet's
    SPENDING_LIMIT_EXCEEDED says when its period does.

    With `amount_exceeds_limit` (a gross above the whole daily maximum: `above_daily_maximum`) no
    day could take it, so there is no reset time to wait for: `amount_exceeds_limit` "true"
    instead, as the wallet's refusal of a spend alone above a cap."""
    left_minor = max(terms.daily_max_minor - day_gross_minor, 0)
    when: dict[str, object] = (
        {"amount_exceeds_limit": "true"} if amount_exceeds_limit else {"resets_at_us": day_resets_at_us(day)}
    )
    return ResourceExhausted(
        f"the daily withdrawal maximum leaves {left_minor} {terms.currency_code} minor units for today",
        "DAILY_WITHDRAWAL_LIMIT",
        currency_code=terms.currency_code,
        daily_max_minor=terms.daily_max_minor,
        daily_left_minor=left_minor,
        daily_left_diamonds=diamonds_worth_at_most(left_minor, terms),
        **when,
    )


class WithdrawalStatus(enum.StrEnum):
    """Where a withdrawal is; PAID, FAILED and REJECTED are final."""

    PENDING_REVIEW = "PENDING_REVIEW"
    APPROVED = "APPROVED"
    PROCESSING = "PROCESSING"
    PAID = "PAID"
    FAILED = "FAILED"
    REJECTED = "REJECTED"


OPEN_STATUSES = (WithdrawalStatus.PENDING_REVIEW, WithdrawalStatus.APPROVED, WithdrawalStatus.PROCESSING)
# Never handed to the provider: the dispatcher claims a withdrawal (APPROVED -> PROCESSING, committed)
# before it submits it, so the provider can know only withdrawals that left these.
NOT_SUBMITTED = (WithdrawalStatus.PENDING_REVIEW, WithdrawalStatus.APPROVED)
_TRANSITIONS = {
    WithdrawalStatus.PENDING_REVIEW: {WithdrawalStatus.APPROVED, WithdrawalStatus.REJECTED},
    # REJECTED from APPROVED, and no PAID or FAILED: an APPROVED withdrawal has never reached the
    # provider (see NOT_SUBMITTED), so no outcome of it can be true. A submission whose answer is
    # lost (payout dies after the provider took it, before storing its reference) leaves it
    # PROCESSING with no provider_ref, and its callback applies from there.
    WithdrawalStatus.APPROVED: {WithdrawalStatus.PROCESSING, WithdrawalStatus.REJECTED},
    WithdrawalStatus.PROCESSING: {WithdrawalStatus.PAID, WithdrawalStatus.FAILED},
}
# Why a signed provider outcome (callback or look-up) is refused for the withdrawal's status.
CALLBACK_REFUSALS = ("WITHDRAWAL_NOT_SUBMITTED", "INVALID_WITHDRAWAL_TRANSITION")
# Why the dispatcher holds an approved withdrawal: the wallet says its creator may not withdraw
# (blocked, under age), or cannot say (Payout._check_eligible's reasons).
HOLD_REASONS = ("ACCOUNT_BLOCKED", "UNDERAGE", "WALLET_UNAVAILABLE")


def check_transition(current: WithdrawalStatus, target: WithdrawalStatus) -> None:
    """Refuse a move the withdrawal state machine does not have."""
    if target not in _TRANSITIONS.get(current, set()):
        raise FailedPrecondition(
            f"a {current.value} withdrawal cannot become {target.value}", "INVALID_WITHDRAWAL_TRANSITION"
        )


def check_provider_outcome(current: WithdrawalStatus, target: WithdrawalStatus) -> None:
    """Refuse a provider's outcome (PAID, FAILED) that the withdrawal cannot take: one never
    submitted (WITHDRAWAL_NOT_SUBMITTED), or one that already has another outcome
    (INVALID_WITHDRAWAL_TRANSITION: a FAILED after PAID, a payout returned by the bank, is not
    modelled)."""
    if current in NOT_SUBMITTED:
        raise FailedPrecondition(
            f"a {current.value} withdrawal was never submitted to the payout provider", "WITHDRAWAL_NOT_SUBMITTED"
        )
    check_transition(current, target)


# ---- payout methods -----------------------------------------------------------------------

# A method counts against a creator's METHODS_PER_CREATOR_MAX until its verification FAILED: there
# is no removing one, so counting failed ones would lock a creator out for good.
# VerifyPayoutMethod(verified=true) of a FAILED one makes it count again, within the limit.
ACTIVE_VERIFICATIONS = ("PENDING", "VERIFIED")


def check_method_count(active: int, limit: int) -> None:
    """RESOURCE_EXHAUSTED once a creator has `limit` active payout methods."""
    if active >= limit:
        raise ResourceExhausted(
            f"a creator may have at most {limit} payout methods that did not fail verification",
            "PAYOUT_METHOD_LIMIT",
            limit=limit,
        )


_EMAIL = re.compile(r"^[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9.-]{1,185}\.[A-Za-z]{2,24}$")
_IBAN = re.compile(r"^[A-Z]{2}[0-9]{2}[A-Z0-9]{11,30}$")


def mask(value: str, keep: int = 4) -> str:
    """All but the last `keep` characters hidden, and never less than half: a 4-digit account
    number (the shortest taken) shows its last 2, not the whole number."""
    keep = min(keep, len(value) // 2)
    return "•" * min(len(value) - keep, 8) + (value[-keep:] if keep else "")


def normalize_paypal(email: str) -> tuple[str, str]:
    """(normalized email, masked) or INVALID_ARGUMENT."""
    email = email.strip()
    if not _EMAIL.match(email):
        raise InvalidArgument("paypal_email is not a valid e-mail address", "INVALID_PAYOUT_METHOD")
    local, _, host = email.lower().partition("@")
    # The first character of the name and of the domain, unless it is the whole of it
    # (a@example.com), and the top-level domain: enough for a creator to tell their addresses
    # apart. A whole domain could be the person (jane@janedoe.dev), nearly the address itself.
    label, _, _ = host.partition(".")
    return email.lower(), f"{_first_of(local)}•••@{_first_of(label)}•••.{host.rsplit('.', 1)[1]}"


def _first_of(part: str) -> str:
    """The first character of a part of an e-mail address, unless it is the whole part."""
    return part[0] if len(part) > 1 else ""


def iban_valid(iban: str) -> bool:
    """ISO 13616 mod-97 check of an IBAN without spaces."""
    # fullmatch: with match, "$" also matches before a final newline, which then reached int()
    # below as a ValueError (INTERNAL) instead of an invalid IBAN.
    if not _IBAN.fullmatch(iban):
        return False
    digits = "".join(str(int(ch, 36)) for ch in iban[4:] + iban[:4])
    return int(digits) % 97 == 1


def normalize_bank(iban: str, account_number: str, routing_number: str, holder_name: str) -> tuple[str, str]:
    """(normalized account string, masked) for an IBAN or an account + routing number."""
    if not holder_name.strip() or len(holder_name) > 140:
        raise InvalidArgument("holder_name is required (1..140 characters)", "INVALID_PAYOUT_METHOD")
    if iban:
        iban = iban.replace(" ", "").upper()
        if not iban_valid(iban):
            raise InvalidArgument("iban is not a valid IBAN", "INVALID_PAYOUT_METHOD")
        return iban, f"{iban[:2]} {mask(iban)}"
    if not (_ascii_digits(account_number) and 4 <= len(account_number) <= 17):
        raise InvalidArgument("account_number must be 4..17 digits", "INVALID_PAYOUT_METHOD")
    if not (_ascii_digits(routing_number) and len(routing_number) == 9 and _aba_valid(routing_number)):
        raise InvalidArgument("routing_number must be a valid 9-digit ABA number", "INVALID_PAYOUT_METHOD")
    return f"{routing_number}:{account_number}", f"{mask(account_number)} (routing {routing_number[-4:]})"


def _ascii_digits(value: str) -> bool:
    """Only 0-9: str.isdigit() also takes other scripts' digits (vaulted as an account a bank
    cannot read) and superscripts such as "²", which int() refuses (INTERNAL in _aba_valid)."""
    return value.isascii() and value.isdigit()


def _aba_valid(r: str) -> bool:
    d = [int(c) for c in r]
    return (3 * (d[0] + d[3] + d[6]) + 7 * (d[1] + d[4] + d[7]) + (d[2] + d[5] + d[8])) % 10 == 0


# ---- clawback -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EarningRow:
    """An earning a reversal may take coins back from (newest first)."""

    event_id: str
    creator_id: str
    coins_open: int  # coins not yet clawed back
    share_bp: int


@dataclass(frozen=True)
class Take:
    """Coins taken back from one earning, at the share it was credited at."""

    event_id: str
    creator_id: str
    coins: int
    units: int


def attribute_reversal(coins_reversed: int, newest_first: Iterable[EarningRow]) -> list[Take]:
    """Which earnings a reversal of `coins_reversed` takes back: the sender's newest first, up to the coins.

    We cannot know which purchase funded which gift (coins are fungible), so the reversal is
    charged to the newest gifts the user sent, as many coins as the purchase bought; coins the
    user never gifted (still in, or overdrawn from, their wallet) take nothing from creators.
    """
    check(coins_reversed > 0, "coins_reversed > 0")
    left = coins_reversed
    out: list[Take] = []
    for row in newest_first:
        if left == 0:
            break
        take = min(left, row.coins_open)
        if take > 0:
            out.append(Take(row.event_id, row.creator_id, take, take * row.share_bp))
            left -= take
    return out


def stand_in_takes(
    coins: int,
    at_us: int,
    newer_taken: Iterable[tuple[int, int]],
    clawed_after: Iterable[tuple[int, int]],
    newest_first: Iterable[tuple[int, EarningRow]],
) -> list[Take]:
    """What a reversal at `at_us` may take, up to `coins`, of earnings recorded after it, standing in
    for the sender's newer reversals that took earnings it could have taken.

    A reversal may take only earnings of gifts recorded before it. Applied after a newer reversal
    (an event nak'ed, or parked and replayed), it can find those taken by the newer one, and the
    gifts that arrive later for the newer one out of its own reach. It may then take a later
    earning as long as some attribution still gives every clawed coin to a reversal recorded
    after that coin's gift: for every time p from `at_us` on, the coins taken by reversals
    newer than p (`newer_taken`: (reversed at, coins)) cover the coins clawed from earnings
    recorded after p (`clawed_after`: (recorded at, coins clawed), those recorded after `at_us`).
    Taking c coins of an earning recorded at e uses up c of that cover at every p in [at_us, e),
    so the total clawed back never exceeds what the reversals claim, as if they had been applied
    in order. `newest_first`: (recorded at, earning) of open earnings recorded after `at_us`.
    """
    check(coins > 0, "coins > 0")
    change: dict[int, int] = {}
    for at, n in newer_taken:
        change[at] = change.get(at, 0) + n
    for at, n in clawed_after:
        change[at] = change.get(at, 0) - n
    points = sorted({at_us, *(p for p in change if p > at_us)})
    # cover[i]: coins taken by reversals newer than points[i] less coins clawed from earnings
    # recorded after it; constant up to the next point.
    cover = [0] * len(points)
    run = 0
    for i in range(len(points) - 1, -1, -1):
        cover[i] = run
        run += change.get(points[i], 0)
    left = coins
    out: list[Take] = []
    for recorded_at, row in newest_first:
        if left == 0:
            break
        check(recorded_at > at_us, "an earning recorded after the reversal")
        upto = bisect.bisect_left(points, recorded_at)  # the points in [at_us, recorded_at)
        take = min(left, row.coins_open, min(cover[:upto]))
        if take > 0:
            for i in range(upto):
                cover[i] -= take
            out.append(Take(row.event_id, row.creator_id, take, take * row.share_bp))
            left -= take
    return out
