"""The largest event each service may write stays under bus.EVENT_BYTES_MAX, the least max_payload
a service accepts from the NATS servers when it connects.

Each kind of event is built with every field at the most its request limits allow (strings of
their longest at 4 UTF-8 bytes a character, integers at the widest varint) and the largest trace
context a caller can hand in, and sized as the relay sends it: a field or a limit that grows past
the bound fails here, before a server refuses such events in production.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from livegifts.gifting.v1 import events_pb2 as gifting_events
from livegifts.payout.v1 import events_pb2 as payout_events
from livegifts.wallet.v1 import events_pb2 as wallet_events
from services.common.bus import EVENT_BYTES_MAX, message_bytes
from services.common.errors import ID_MAX
from services.common.outbox import BATCH_HEADERS_MAX, _headers, _stored_headers, new_event_id
from services.common.telemetry import PROPAGATOR, extract_context
from services.gifting.config import GiftingSettings
from services.payout.domain import REASON_CHARS_MAX, WithdrawalStatus
from services.wallet.domain import PurchaseStatus

WIDEST_CHAR = "\U0010ffff"  # 4 bytes in UTF-8
TRACESTATE_CHARS_MAX = 8192  # OpenTelemetry's extract drops a caller's longer tracestate


def _setting_max(settings: type, name: str) -> int:
    """A setting's ceiling (its Field's `le`): what an operator may set it to at most."""
    return next(m.le for m in settings.model_fields[name].metadata if hasattr(m, "le"))


# The most characters each string field of an event holds, by field name, and where that is enforced.
CHARS_MAX = {
    "event_id": len(new_event_id()),
    "stream_id": ID_MAX,  # errors.require_id
    "creator_id": ID_MAX,
    "sender_id": ID_MAX,
    "user_id": ID_MAX,
    "gift_id": ID_MAX,  # a catalog gift (GIFT_ID_MAX, less) or an unlocked content's id
    "purchase_id": ID_MAX,
    "withdrawal_id": ID_MAX,
    "message": _setting_max(GiftingSettings, "tip_message_chars_max"),  # a tip's, domain.tip_message
    "reason": REASON_CHARS_MAX,  # a withdrawal's failure_reason
    "status": max(len(s.value) for s in WithdrawalStatus),
    "kind": max(len(s.value) for s in PurchaseStatus),  # PurchaseReversed's REFUNDED or CHARGED_BACK
    "currency_code": 3,  # ISO 4217, checked by wallet and payout
}


def _event_classes() -> Iterator[type[Message]]:
    for module in (gifting_events, payout_events, wallet_events):
        for name in module.DESCRIPTOR.message_types_by_name:
            yield getattr(module, name)


def _fill(msg: Message) -> Message:
    """`msg` with every field at its largest encoding."""
    for f in msg.DESCRIPTOR.fields:
        assert not f.is_repeated, f"{f.full_name}: a list; bound its items here"
        if f.type == FieldDescriptor.TYPE_STRING:
            assert f.name in CHARS_MAX, f"{f.full_name}: declare its longest in CHARS_MAX"
            setattr(msg, f.name, WIDEST_CHAR * CHARS_MAX[f.name])
        elif f.type == FieldDescriptor.TYPE_MESSAGE:
            _fill(getattr(msg, f.name))
        elif f.type == FieldDescriptor.TYPE_ENUM:
            setattr(msg, f.name, max(v.number for v in f.enum_type.values))
        else:
            assert f.type in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_INT32), f.full_name
            setattr(msg, f.name, -1)  # a negative integer is the widest varint (10 bytes)
    return msg


def _largest_trace_headers() -> dict[str, str]:
    """The trace headers an outbox row stores for the largest context a caller may send."""
    members = [f"k{i:02d}=" for i in range(32)]  # OpenTelemetry keeps at most 32
    room = TRACESTATE_CHARS_MAX - sum(len(m) for m in members) - (len(members) - 1)
    value = [room // 32 + (1 if i < room % 32 else 0) for i in range(32)]
    tracestate = ",".join(m + "v" * n for m, n in zip(members, value, strict=True))
    assert len(tracestate) == TRACESTATE_CHARS_MAX
    carrier = {"traceparent": f"00-{'a' * 32}-{'b' * 16}-01", "tracestate": tracestate}
    stored = _stored_headers([extract_context(carrier)])[0]
    headers: dict[str, str] = json.loads(stored)
    assert len(headers["tracestate"]) == TRACESTATE_CHARS_MAX, "the largest tracestate is carried whole"
    return headers


def test_a_longer_tracestate_than_the_bound_assumes_is_dropped() -> None:
    carrier = {"traceparent": f"00-{'a' * 32}-{'b' * 16}-01", "tracestate": "k=" + "v" * (TRACESTATE_CHARS_MAX - 1)}
    out: dict[str, str] = {}
    PROPAGATOR.inject(out, context=extract_context(carrier))
    assert "tracestate" not in out and "traceparent" in out


def test_every_event_declares_no_field_the_bound_does_not_cover() -> None:
    assert sorted(cls.DESCRIPTOR.full_name for cls in _event_classes()) == [
        "livegifts.gifting.v1.GiftSent",
        "livegifts.gifting.v1.StreamEnded",
        "livegifts.payout.v1.DiamondsClawedBack",
        "livegifts.payout.v1.DiamondsCredited",
        "livegifts.payout.v1.WithdrawalChanged",
        "livegifts.wallet.v1.PurchaseCompleted",
        "livegifts.wallet.v1.PurchaseReversed",
    ]


@pytest.mark.parametrize("cls", list(_event_classes()), ids=lambda c: c.DESCRIPTOR.name)
def test_the_largest_event_of_each_kind_as_the_relay_sends_it_stays_under_the_bound(cls: type[Message]) -> None:
    event = _fill(cls())
    headers = _headers(_largest_trace_headers(), new_event_id()) | BATCH_HEADERS_MAX
    size = message_bytes(event.SerializeToString(), headers)
    assert size < EVENT_BYTES_MAX, f"{cls.DESCRIPTOR.name} may take {size} bytes: raise EVENT_BYTES_MAX (bus.py)"
    assert size > 8192 + 100  # the trace context was carried whole: the bound is measured, not assumed
