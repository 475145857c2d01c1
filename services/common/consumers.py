"""The durable consumers each service runs, by service: the one list of their names.

The services subscribe under these names (services/payout/__main__.py, services/gifting/readmodels.py)
and `app.serve` refuses to start one whose subscriptions differ from its entry here; the CLI checks
`dead-letters list --consumer` against it. A consumer's name is its durable's name in JetStream,
its inbox's and its dead letters' `consumer`, and the `consumer` label of its metrics.
"""

from __future__ import annotations

GIFTING_LEADERBOARDS = "gifting-leaderboards"
PAYOUT_GIFT_SENT = "payout-gift-sent"
PAYOUT_PURCHASE_REVERSED = "payout-purchase-reversed"

CONSUMERS: dict[str, tuple[str, ...]] = {
    "wallet": (),
    "gifting": (GIFTING_LEADERBOARDS,),
    "payout": (PAYOUT_GIFT_SENT, PAYOUT_PURCHASE_REVERSED),
}


def unlisted(service: str, durables: list[str]) -> str:
    """What differs between a service's subscriptions and its entry in CONSUMERS ("" when nothing)."""
    listed = set(CONSUMERS.get(service, ()))
    extra, missing = sorted(set(durables) - listed), sorted(listed - set(durables))
    if not extra and not missing:
        return ""
    return f"{service} subscribes {extra} not in CONSUMERS and lists {missing} it does not subscribe"
