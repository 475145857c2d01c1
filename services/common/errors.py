"""Typed domain errors and the one table that maps them to gRPC status codes.

Every error carries a stable reason (google.rpc.ErrorInfo.reason) that callers may branch on;
the message is for humans and never holds SQL, stack traces or secrets.
"""

from __future__ import annotations

import unicodedata
from typing import Any

import grpc

# An ErrorInfo metadata value may echo a caller's input (a provider name, say): it travels in the
# trailers, which a gRPC client refuses past 16 KiB (RESOURCE_EXHAUSTED, "received metadata size
# exceeds hard limit"), losing the status and its reason. So each value is cut to this length,
# and shown printable: a client may log or display it, and a raw HTTP/2 caller may send any byte.
ERROR_METADATA_VALUE_CHARS_MAX = 256


def printable(text: str) -> str:
    """`text` with each character that would not show as itself replaced by "?": those
    str.isprintable() refuses, a control or format character (NUL, newline, a terminal escape, a
    right-to-left override), a space other than U+0020 (a no-break space), a line or paragraph
    separator, a private-use or unassigned code point."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


class DomainError(Exception):
    """Base of every error a use case may raise on purpose."""

    default_reason = "ERROR"

    def __init__(self, message: str, reason: str | None = None, **metadata: object) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = {k: printable(str(v)[:ERROR_METADATA_VALUE_CHARS_MAX]) for k, v in metadata.items()}


def shown(exc: BaseException) -> str:
    """An error as an operator's RPC, a dead letter or a span may show it: a domain error's reason
    and message (written for callers), otherwise the class name only; the driver's text (SQL,
    constraint names, bound values: tokens, birth dates, tips' messages) stays in the log."""
    if isinstance(exc, DomainError):
        return f"{type(exc).__name__} {exc.reason}: {exc.message}"
    return type(exc).__name__


class InvalidArgument(DomainError):
    """The request is malformed: a field is missing, out of range or of the wrong shape."""

    default_reason = "INVALID_ARGUMENT"


class NotFound(DomainError):
    """The named user, stream, gift, purchase or record does not exist."""

    default_reason = "NOT_FOUND"


class FailedPrecondition(DomainError):
    """The request is well formed but the state forbids it (INSUFFICIENT_COINS, STREAM_NOT_LIVE...)."""

    default_reason = "FAILED_PRECONDITION"


class ResourceExhausted(DomainError):
    """A limit was reached (SPENDING_LIMIT_EXCEEDED, DAILY_WITHDRAWAL_LIMIT)."""

    default_reason = "RESOURCE_EXHAUSTED"


class AlreadyExists(DomainError):
    """The idempotency key was used before with a different request."""

    default_reason = "ALREADY_EXISTS"


class Aborted(DomainError):
    """A conflict the caller may retry (or, for a cancelled spend, must not)."""

    default_reason = "ABORTED"


class Unavailable(DomainError):
    """A dependency is down; retry with the same idempotency key."""

    default_reason = "UNAVAILABLE"


class Unauthenticated(DomainError):
    """No or bad credentials (e.g. a payment callback with a forged signature)."""

    default_reason = "UNAUTHENTICATED"


class PermissionDenied(DomainError):
    """The caller may not do this."""

    default_reason = "PERMISSION_DENIED"


# The one table: error class -> status code.
STATUS_BY_ERROR: dict[type[DomainError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    Aborted: grpc.StatusCode.ABORTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


def status_for(error: DomainError) -> grpc.StatusCode:
    """The status code of a domain error, by its class (nearest listed ancestor)."""
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL


def error_info(exc: grpc.RpcError) -> Any:
    """The google.rpc.ErrorInfo of a failed call, sync or asyncio (an empty one when it carries none).

    Here, beside the reasons, so a client without the services' channels (the CLI) reads them
    with the same parser; services/common/clients.py re-exports it."""
    from google.rpc import error_details_pb2, status_pb2

    info = error_details_pb2.ErrorInfo()
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    detail.Unpack(info)
                    return info
    return info


def error_reason(exc: grpc.RpcError) -> str:
    """The google.rpc.ErrorInfo reason of a failed call ('' when it carries none)."""
    return str(error_info(exc).reason)


class InvariantViolation(AssertionError):
    """A check that must never fail did; unlike `assert`, `python -O` cannot strip it."""


class StartupError(Exception):
    """The service cannot start as configured (a port taken, the database unreachable, a NATS
    server that takes smaller messages than our events): `app.main` logs it as one line, without a
    traceback, and exits 1."""


def check(condition: object, message: str) -> None:
    """Assert an invariant in a way `python -O` keeps."""
    if not condition:
        raise InvariantViolation(message)


IDEMPOTENCY_KEY_MAX = 128
ID_MAX = 128
# The ids the services mint (32 hex digits) or an operator names (coin packages, promotions,
# gifts) live in String(64) columns: longer, such an id could never be found, and is refused as
# INVALID_ID like any other malformed id, the same on SQLite (which enforces no length) and on
# PostgreSQL. Every other id (users, creators, senders: the callers' own) is 1..ID_MAX.
# tests/unit/test_id_limits.py walks every RPC's request fields against each service's columns.
SHORT_ID_MAX = 64
ID_CHARS_MAX: dict[str, int] = dict.fromkeys(
    (
        "content_id",
        "gift_id",
        "method_id",
        "package_id",
        "promotion_id",
        "purchase_id",
        "stream_id",
        "withdrawal_id",
    ),
    SHORT_ID_MAX,
)


def id_chars_max(field: str) -> int:
    """The most characters an id field takes: the narrowest column it is kept in or compared with."""
    return ID_CHARS_MAX.get(field.rsplit(".", 1)[-1], ID_MAX)  # "promotion.package_id" is a package id


INT64_MAX = 2**63 - 1


def require_key(key: str, field: str = "idempotency_key") -> str:
    """Validate an idempotency key: 1..128 printable characters."""
    if not key:
        raise InvalidArgument(f"{field} is required", "MISSING_IDEMPOTENCY_KEY", field=field)
    if len(key) > IDEMPOTENCY_KEY_MAX or not key.isprintable():
        raise InvalidArgument(
            f"{field} must be 1..{IDEMPOTENCY_KEY_MAX} printable characters",
            "INVALID_IDEMPOTENCY_KEY",
            field=field,
        )
    return key


def require_id(value: str, field: str) -> str:
    """Validate an identifier field: 1..`id_chars_max(field)` printable characters without spaces."""
    if not value:
        raise InvalidArgument(f"{field} is required", "MISSING_FIELD", field=field)
    chars_max = id_chars_max(field)
    if len(value) > chars_max or not value.isprintable() or " " in value:
        raise InvalidArgument(
            f"{field} must be 1..{chars_max} printable characters, no spaces", "INVALID_ID", field=field
        )
    return value


def is_text(value: str) -> bool:
    """Text a screen can show and every database can store: no control character (NUL, newline,
    bell: category Cc) and no lone surrogate (Cs: not UTF-8, PostgreSQL refuses both). Format
    characters stay: the zero-width joiner of emoji such as a family, variation selectors,
    right-to-left marks."""
    # isprintable() (C) is True for nearly every value and implies no Cc or Cs: the walk in
    # Python, ~3 us for an event id (8x its decode), runs only for the rest. Each consumed
    # event's id is checked (inbox._id_problem).
    return value.isprintable() or not any(unicodedata.category(ch) in ("Cc", "Cs") for ch in value)


def require_positive(value: int, field: str, maximum: int = INT64_MAX) -> int:
    """Validate an amount: an integer in 1..maximum."""
    if value <= 0:
        raise InvalidArgument(f"{field} must be > 0", "AMOUNT_NOT_POSITIVE", field=field)
    if value > maximum:
        raise InvalidArgument(f"{field} must be <= {maximum}", "AMOUNT_TOO_LARGE", field=field)
    return value
