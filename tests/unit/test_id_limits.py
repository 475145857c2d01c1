"""Every id a request carries is checked to the narrowest column it is kept in or compared with.

An id longer than its `String(n)` column can never be found: checked to a wider limit it was
answered "not found" (PostgreSQL compares a VARCHAR(64) with the longer parameter and finds
nothing) where it is plainly malformed, and a write of it would pass on SQLite (which holds
strings to no length) and fail on PostgreSQL. So `errors.require_id` holds each id field to
`errors.id_chars_max(field)`, and this test walks every RPC's request (nested messages too)
of the three services and the common ones: each string field is either an id checked to
exactly its columns' length, or listed below with where its length is enforced. A new field,
a renamed one or a narrowed column fails here until the two agree.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from sqlalchemy import MetaData, String

from livegifts.common.v1 import audit_pb2, dead_letters_pb2
from livegifts.gifting.v1 import gifting_pb2
from livegifts.payout.v1 import payout_pb2
from livegifts.wallet.v1 import wallet_pb2
from services.common.errors import (
    ID_MAX,
    IDEMPOTENCY_KEY_MAX,
    InvalidArgument,
    id_chars_max,
    require_id,
)
from services.gifting import storage as gifting_storage
from services.payout import storage as payout_storage
from services.wallet import storage as wallet_storage

SERVICES: dict[str, tuple[ModuleType, MetaData]] = {
    "wallet": (wallet_pb2, wallet_storage.metadata),
    "gifting": (gifting_pb2, gifting_storage.metadata),
    "payout": (payout_pb2, payout_storage.metadata),
}
# DeadLetterService and AuditService run in every service, on its own tables.
COMMON_FILES = (dead_letters_pb2, audit_pb2)

# An id field kept under another column name.
COLUMN_OF = {"recipient_user_id": "user_id", "user_ids": "user_id"}

# String fields that are not ids held to a column by require_id: where their length is enforced.
NOT_IDS = {
    "idempotency_key": "errors.require_key, IDEMPOTENCY_KEY_MAX (test_the_idempotency_key_limit_is_its_columns)",
    "page_token": "a decoded cursor, never stored",
    "region": "one of the configured regions (INVALID_REGION)",
    "currency_code": "a known ISO 4217 code (UNKNOWN_CURRENCY, INVALID_CURRENCY)",
    "channel": "APP or WEB (INVALID_CHANNEL)",
    "birth_date": "an ISO date (INVALID_BIRTH_DATE)",
    "provider": "a configured provider's name (UNKNOWN_PROVIDER)",
    "signature": "checked, never stored",
    "title": "TITLE_TOO_LONG / INVALID_TITLE: 200, the title columns'",
    "name": "gifting domain.GIFT_NAME_MAX, the gift name column's",
    "message": "TIP_MESSAGE_CHARS_MAX (test_batch_column_limits)",
    "reason": "payout domain.REASON_CHARS_MAX, the failure_reason column's",
    "paypal_email": "kept only masked (domain.normalize_paypal)",
    "iban": "kept only masked and vaulted",
    "account_number": "kept only masked and vaulted",
    "routing_number": "kept only masked and vaulted",
    "holder_name": "sent to the provider, not stored",
    "consumer": "a filter on the dead letters' consumer names (INVALID_CONSUMER for control characters)",
    "resume_cursor": "an item of the stream's feed, else UNKNOWN_CURSOR (INVALID_ARGUMENT) at any length",
    "kind": "ListAuditRecords: a kind the service audits",
    "ids": "ListAuditRecords: a filter over every kind's ids, compared, never stored",
    "up_to": "ListAuditRecords: a range bound, compared, never stored",
    "after_id": "ListAuditRecords: a range bound, compared, never stored",
}


def _string_fields(message: Descriptor, seen: frozenset[str] = frozenset()) -> Iterator[str]:
    for field in message.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            yield field.name
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.full_name not in seen:
            yield from _string_fields(field.message_type, seen | {field.message_type.full_name})


def _request_fields(files: tuple[ModuleType, ...]) -> Iterator[tuple[str, str]]:
    for file in files:
        for service in file.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                for name in _string_fields(method.input_type):
                    yield method.name, name


def _columns(metadata: MetaData, name: str) -> list[tuple[str, int]]:
    return [
        (f"{table.name}.{column.name}", column.type.length)
        for table in metadata.tables.values()
        for column in table.columns
        if column.name == name and isinstance(column.type, String) and column.type.length
    ]


CASES = [
    (service, method, field)
    for service, (pb2, _) in SERVICES.items()
    for method, field in sorted(set(_request_fields((pb2, *COMMON_FILES))))
]


@pytest.mark.parametrize(("service", "method", "field"), CASES, ids=[f"{s}.{m}.{f}" for s, m, f in CASES])
def test_each_request_id_is_checked_to_its_columns_length(service: str, method: str, field: str) -> None:
    if field in NOT_IDS:
        return  # enforced where NOT_IDS says
    columns = _columns(SERVICES[service][1], COLUMN_OF.get(field, field))
    assert columns, (
        f"{service} {method}.{field}: no {service} column of that name; map it in COLUMN_OF, or say in "
        "NOT_IDS where its length is enforced"
    )
    narrowest = min(length for _, length in columns)
    assert id_chars_max(field) == narrowest, (
        f"{service} {method}.{field} is checked to {id_chars_max(field)} characters but kept in or "
        f"compared with {columns}: make errors.ID_CHARS_MAX and the columns agree"
    )


@pytest.mark.parametrize("service", SERVICES)
def test_the_idempotency_key_limit_is_its_columns(service: str) -> None:
    metadata = SERVICES[service][1]
    lengths = [n for name in ("key", "idempotency_key", "client_key") for _, n in _columns(metadata, name)]
    assert lengths and min(lengths) == IDEMPOTENCY_KEY_MAX


@pytest.mark.parametrize("field", ["stream_id", "promotion.package_id", "user_id", "withdrawal_id"])
def test_an_id_one_past_its_limit_is_invalid_and_one_at_it_is_taken(field: str) -> None:
    limit = id_chars_max(field)
    assert require_id("x" * limit, field) == "x" * limit
    with pytest.raises(InvalidArgument) as refused:
        require_id("x" * (limit + 1), field)
    assert refused.value.reason == "INVALID_ID"
    assert f"1..{limit} " in str(refused.value)


def test_the_callers_own_ids_keep_the_documented_128() -> None:
    assert [id_chars_max(f) for f in ("user_id", "creator_id", "sender_id", "reference_id")] == [ID_MAX] * 4
