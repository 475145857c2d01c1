"""The durable consumers each service runs, by service: the one list of their names.

The services subscribe under these names (services/payout/__main__.py, services/gifting/readmodels.py)
and `app.serve` refuses to start one whose subscriptions differ from its entry here, or read another
stream than STREAM_READ gives; the CLI checks `dead-letters list --consumer` against it, and
`nats-drained` looks for each durable on the stream it reads. A consumer's name is its durable's name in JetStream,
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


# The stream each durable reads: its Subscription's `stream` (app.serve holds the two together).
STREAM_READ: dict[str, str] = {
    GIFTING_LEADERBOARDS: "GIFTING",
    PAYOUT_GIFT_SENT: "GIFTING",
    PAYOUT_PURCHASE_REVERSED: "WALLET",
}


def reading(stream: str) -> dict[str, str]:
    """The durables of CONSUMERS that read `stream`, each with its service."""
    return {d: svc for svc, names in CONSUMERS.items() for d in names if STREAM_READ.get(d) == stream}


def unlisted(service: str, subscriptions: dict[str, str]) -> str:
    """What differs between a service's subscriptions (durable -> the stream it reads) and its
    entries in CONSUMERS and STREAM_READ ("" when nothing)."""
    listed = set(CONSUMERS.get(service, ()))
    extra, missing = sorted(set(subscriptions) - listed), sorted(listed - set(subscriptions))
    elsewhere = sorted(f"{d} on {s}" for d, s in subscriptions.items() if d in listed and STREAM_READ.get(d) != s)
    differs = []
    if extra or missing:
        differs.append(f"{service} subscribes {extra} not in CONSUMERS and lists {missing} it does not subscribe")
    if elsewhere:
        differs.append(f"{service} subscribes {elsewhere}, not on the streams STREAM_READ gives")
    return "; ".join(differs)
