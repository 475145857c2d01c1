"""Wallet rules: pure functions and values, no I/O."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum

from services.common.errors import FailedPrecondition, InvalidArgument

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


# Allowed transitions; anything else is INVALID_TRANSITION.
TRANSITIONS: dict[PurchaseStatus, set[PurchaseStatus]] = {
    PurchaseStatus.PENDING: {PurchaseStatus.SUCCEEDED, PurchaseStatus.FAILED},
    PurchaseStatus.SUCCEEDED: {PurchaseStatus.REFUNDED, PurchaseStatus.CHARGED_BACK},
    PurchaseStatus.FAILED: set(),
    PurchaseStatus.REFUNDED: set(),
    PurchaseStatus.CHARGED_BACK: set(),
}


def check_transition(current: PurchaseStatus, target: PurchaseStatus) -> None:
    """Raise FAILED_PRECONDITION/INVALID_TRANSITION unless current -> target is allowed."""
    if target not in TRANSITIONS[current]:
        raise FailedPrecondition(
            f"a {current.value} purchase cannot become {target.value}",
            "INVALID_TRANSITION",
            current=current.value,
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


def parse_birth_date(value: str) -> dt.date | None:
    """An ISO date or None; INVALID_ARGUMENT if malformed or in the future."""
    if not value:
        return None
    try:
        born = dt.date.fromisoformat(value)
    except ValueError:
        raise InvalidArgument("birth_date must be YYYY-MM-DD", "INVALID_BIRTH_DATE") from None
    if born > dt.date.today():
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
