"""Named fault points that kill the process on the spot; armed only by a test setting.

`LIVEGIFTS_GIFTING_FAULTS="gifting.after_spend_before_commit,relay.after_puback_before_mark@3"` arms
two points: the first fires the first time it is reached, the second on its third hit. Unarmed
points cost a set lookup.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

# Every point the code defines, so a typo in the setting is an error, not a silent no-op.
KNOWN_POINTS = frozenset(
    {
        "gifting.after_spend_before_commit",
        "relay.after_puback_before_mark",  # before the published rows are deleted (the name predates it)
        "consumer.after_commit_before_ack",
        # Each step of a withdrawal's hand-over to the payout provider (Payout.dispatch_once).
        "payout.after_claim_before_submit",  # PROCESSING, the provider not called yet
        "payout.after_submit_before_commit",  # the provider took it; its reference not stored
        "payout.after_commit_before_callback",  # reference stored; the dev provider's callback not applied
        # A payment callback's effect committed, the provider not answered (it sends it again).
        "wallet.after_purchase_commit_before_answer",  # coins credited
        "wallet.after_reversal_commit_before_answer",  # a refund or chargeback taken back
        # Spend and SpendMany: their transaction committed, the caller not answered.
        "wallet.after_spend_commit_before_answer",
    }
)

_armed: dict[str, int] = {}


def parse(spec: str) -> dict[str, int]:
    """`spec` (comma separated, each `name` or `name@N`, N >= 1) as {point: hit that fires it}."""
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, nth = item.partition("@")
        hit = nth or "1"
        if name not in KNOWN_POINTS:
            raise ValueError(f"unknown fault point {name!r}; known: {sorted(KNOWN_POINTS)}")
        if not hit.isdigit() or int(hit) < 1:
            raise ValueError(f"{item!r}: the hit after '@' is a whole number from 1")
        out[name] = int(hit)
    return out


def arm(spec: str) -> None:
    """Arm the points named in `spec` (see `parse`)."""
    _armed.clear()
    _armed.update(parse(spec))


def point(name: str) -> None:
    """Kill this process with SIGKILL if `name` is armed and its hit count is reached."""
    if name not in _armed:
        return
    _armed[name] -= 1
    if _armed[name] <= 0:
        log.warning("fault point fired, killing the process", extra={"fault_point": name})
        os.kill(os.getpid(), signal.SIGKILL)
