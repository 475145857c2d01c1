"""Gifting rules: pure, no I/O."""

from __future__ import annotations

from enum import StrEnum

from services.common.errors import FailedPrecondition, InvalidArgument, check


class GiftStatus(StrEnum):
    """Lifecycle of a gift: PENDING -> SENT or CANCELLED, never both."""

    PENDING = "PENDING"
    SENT = "SENT"
    CANCELLED = "CANCELLED"


class StreamStatus(StrEnum):
    """A stream is live until it ends."""

    LIVE = "LIVE"
    ENDED = "ENDED"


class GiftKind(StrEnum):
    """What the coins paid for."""

    GIFT = "GIFT"
    TIP = "TIP"
    UNLOCK = "UNLOCK"


# The public catalog (DOMAIN.md), prices in coins.
SEED_CATALOG: list[tuple[str, str, int]] = [
    ("rose", "Rose", 1),
    ("gg", "GG", 1),
    ("ice-cream-cone", "Ice Cream Cone", 1),
    ("finger-heart", "Finger Heart", 5),
    ("panda", "Panda", 5),
    ("hand-wave", "Hand Wave", 9),
    ("lollipop", "Lollipop", 10),
    ("love-bang", "Love Bang", 25),
    ("sun-cream", "Sun Cream", 50),
    ("rainbow-puke", "Rainbow Puke", 100),
    ("musical-notes", "Musical Notes", 169),
    ("drama-queen", "Drama Queen", 199),
    ("corgi", "Corgi", 299),
    ("concert", "Concert", 500),
    ("galaxy", "Galaxy", 1000),
    ("gold-mine", "Gold Mine", 1000),
    ("private-jet", "Private Jet", 4888),
    ("interstellar", "Interstellar", 10000),
    ("planet", "Planet", 15000),
    ("rocket", "Rocket", 20000),
    ("lion", "Lion", 29999),
    ("universe", "Universe", 34999),
]


def gift_cost(unit_price_coins: int, quantity: int, quantity_max: int) -> int:
    """Coins for `quantity` of a gift; INVALID_ARGUMENT outside 1..quantity_max."""
    if quantity < 1:
        raise InvalidArgument("quantity must be >= 1", "INVALID_QUANTITY")
    if quantity > quantity_max:
        raise InvalidArgument(f"quantity must be <= {quantity_max}", "INVALID_QUANTITY")
    check(unit_price_coins > 0, "catalog prices are positive")
    return unit_price_coins * quantity


def check_can_gift(stream_status: str, creator_id: str, sender_id: str) -> None:
    """STREAM_NOT_LIVE or SELF_GIFT unless the sender may gift this stream now."""
    if stream_status != StreamStatus.LIVE:
        raise FailedPrecondition("the stream is not live", "STREAM_NOT_LIVE")
    if creator_id == sender_id:
        raise FailedPrecondition("creators cannot send gifts to themselves", "SELF_GIFT")
