"""Wallet rules: balanced entries, purchase transitions, age and block checks."""

import datetime as dt

import pytest

from services.common.errors import FailedPrecondition, InvalidArgument
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
    assert domain.parse_birth_date("") is None
    for bad in ("22/11/2000", "2000-13-01", "2999-01-01"):
        with pytest.raises(InvalidArgument):
            domain.parse_birth_date(bad)
