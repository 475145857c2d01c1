"""Payout rules: exact diamond arithmetic in integers, no I/O."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from services.common.errors import InvalidArgument, check

BP_DENOMINATOR = 10_000  # basis points: 5000 = 50%
DEFAULT_CREATOR_SHARE_BP = 5_000


def check_share(share_bp: int) -> int:
    """A creator share in 0..100% (basis points)."""
    if not 0 <= share_bp <= BP_DENOMINATOR:
        raise InvalidArgument("creator share must be 0..10000 basis points", "INVALID_SHARE")
    return share_bp


def units_for(coins: int, share_bp: int) -> int:
    """The creator's share of `coins`, in 1/10000 diamond."""
    check(coins > 0 and 0 <= share_bp <= BP_DENOMINATOR, "coins > 0 and share in range")
    return coins * share_bp


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
