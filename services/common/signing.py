"""Provider callback signatures: HMAC-SHA256 over "<timestamp>.<raw payload>", header "t=<unix>,v1=<hex>".

The timestamp bounds replay (tolerance window); the comparison is constant-time. The same
scheme signs payment callbacks (wallet) and payout callbacks (payout).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.common.errors import FailedPrecondition, Unauthenticated, is_text
from services.common.metrics import PROVIDER_EVENT_IDS_REUSED

log = logging.getLogger(__name__)

SIGNATURE_HEADER_MAX = 1024


def sign(secret: bytes, payload: bytes, timestamp_s: int | None = None) -> str:
    """The signature header for `payload` at `timestamp_s` (now by default)."""
    ts = int(time.time()) if timestamp_s is None else timestamp_s
    mac = hmac.new(secret, f"{ts}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


TIMESTAMP_DIGITS_MAX = 12  # Unix seconds until the year 33658


def verify(
    secret: bytes | Sequence[bytes], payload: bytes, header: str, tolerance_s: int, now_s: float | None = None
) -> int:
    """Check a signature header; returns its timestamp or raises UNAUTHENTICATED with a reason.

    `secret` may be several: during a rotation on our side the current one and the previous one
    (*_WEBHOOK_SECRET_PREVIOUS), so callbacks signed with either verify."""
    if not header or len(header) > SIGNATURE_HEADER_MAX:
        raise Unauthenticated("missing or oversized signature", "SIGNATURE_MISSING")
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if sep:
            parts.setdefault(key, []).append(value)
    stamp = parts.get("t", [""])[0]
    # Unix seconds, ASCII digits only: int() would also take "1_7…", "+1…", other scripts'
    # digits, and hundreds of digits, which no clock comparison can handle.
    if not (1 <= len(stamp) <= TIMESTAMP_DIGITS_MAX and stamp.isascii() and stamp.isdigit()):
        raise Unauthenticated("signature has no valid timestamp", "SIGNATURE_MALFORMED")
    ts = int(stamp)
    now = time.time() if now_s is None else now_s
    if abs(now - ts) > tolerance_s:
        raise Unauthenticated("signature timestamp outside the tolerance window", "SIGNATURE_EXPIRED")
    secrets = (secret,) if isinstance(secret, bytes) else tuple(secret)
    signed = f"{ts}.".encode() + payload
    expected = [hmac.new(key, signed, hashlib.sha256).hexdigest().encode() for key in secrets]
    # Any of the v1 values may match (a provider rotating its secret sends two), against any of
    # our secrets. Compared as bytes: compare_digest refuses str with non-ASCII characters
    # (TypeError, not a reason).
    candidates = [candidate.encode() for candidate in parts.get("v1", [])]
    if not any(hmac.compare_digest(e, c) for e in expected for c in candidates):
        raise Unauthenticated("signature does not match", "SIGNATURE_INVALID")
    return ts


class BodyError(ValueError):
    """A verified callback body that is not the event it claims to be (MALFORMED_PAYLOAD)."""


def json_body(payload: bytes) -> dict[str, Any]:
    """A callback body as a JSON object; BodyError for anything else (nesting too deep included)."""
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        raise BodyError("not JSON") from None
    if not isinstance(body, dict):
        raise BodyError("not a JSON object")
    return body


def text_field(body: dict[str, Any], name: str, chars_max: int = 128) -> str:
    """A string field of text (`errors.is_text`: a NUL or a lone surrogate cannot be stored)."""
    value = body.get(name)
    if not isinstance(value, str) or len(value) > chars_max or not is_text(value):
        raise BodyError(f"{name} is not a string of at most {chars_max} printable characters")
    return value


def int_field(body: dict[str, Any], name: str) -> int:
    """A JSON integer (not a float, a boolean or a numeric string)."""
    value = body.get(name)
    if type(value) is not int:
        raise BodyError(f"{name} is not an integer")
    return value


def event_id_reused(
    provider: str,
    provider_event_id: str,
    noun: str,
    first_id: str,
    named_id: str,
    *,
    first_event_type: str = "",
    named_event_type: str = "",
) -> FailedPrecondition:
    """The refusal of a signed callback whose event id was recorded for another `noun` (logged, counted),
    or, with `first_event_type`, for another event type of the same `noun` (a refund under the id
    of the success: answered as a duplicate, the refund would never be applied).

    A provider bug: its event ids key our de-duplication. Choices: A) answer OK as a duplicate,
    with the record the id was first recorded for; B) refuse. B: an OK tells the provider this
    event was applied, and it was not (the record it names never sees it: a payment taken and
    never credited, a payout never settled); the refusal keeps the event on the provider's
    failing-webhook list and in our log on each retry until someone settles it, as an amount
    mismatch is. The id stays with the first record, whose retries are still duplicates.
    """
    context: dict[str, str] = {
        "provider": provider,
        "provider_event_id": provider_event_id,
        f"first_{noun}_id": first_id,
        f"named_{noun}_id": named_id,
    }
    if first_event_type:
        what = "event type"
        context |= {"first_event_type": first_event_type, "named_event_type": named_event_type}
    else:
        what = noun
    log.warning("provider callback refused: its event id was recorded for another %s", what, extra=context)
    PROVIDER_EVENT_IDS_REUSED.inc()
    metadata = {f"{noun}_id": first_id} | ({"event_type": first_event_type} if first_event_type else {})
    return FailedPrecondition(
        f"this provider event id was recorded for another {what}",
        "PROVIDER_EVENT_ID_REUSED",
        provider_event_id=provider_event_id,
        **metadata,
    )


@dataclass(frozen=True)
class RecordedEvent:
    """What a provider event id was first recorded with: the purchase or withdrawal, and the event type."""

    record_id: str
    event_type: str


def refuse_another_event(
    provider: str, provider_event_id: str, noun: str, first: RecordedEvent, named_id: str, named_event_type: str
) -> None:
    """PROVIDER_EVENT_ID_REUSED unless the callback is the event its id was recorded as (then a duplicate).

    Another `noun` (purchase, withdrawal), or the same one and another event type (a refund under
    the id of the purchase's success, a PAID under the id of the withdrawal's FAILED): answered
    OK as a duplicate, the provider would stop sending an event nothing applied (a refund whose
    coins the buyer keeps, a payout whose diamonds the creator got back), so it is refused,
    logged and counted alike (`event_id_reused`).
    """
    if first.record_id == named_id and first.event_type == named_event_type:
        return  # the event again: a duplicate
    # Another record's, or the same record's under another event type (then both types are named).
    types = (
        {"first_event_type": first.event_type, "named_event_type": named_event_type}
        if first.record_id == named_id
        else {}
    )
    raise event_id_reused(provider, provider_event_id, noun, first.record_id, named_id, **types)
