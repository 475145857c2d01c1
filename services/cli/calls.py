"""The CLI's gRPC channels: a call that fails says which service, at which address, it went to.

gRPC's own text names no service, and for a deadline not even the address ("Deadline
Exceeded"): an audit or a demo talks to three services, and its one line must say which one did
not answer. It also carries the stable reason of the google.rpc.ErrorInfo a service answers
with (`REPLAY_FAILED`, `INSUFFICIENT_COINS`): the name README's table and docs/sre.md's runbooks
go by.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.message import DecodeError

from services.common.errors import error_info, printable

# The ErrorInfo metadata a one-line error shows, `key=value` pairs, up to this many characters in
# all (a value may be 256): a consumer's name and a trace id fit, an echoed input is cut with "...".
ERROR_METADATA_SHOWN_CHARS_MAX = 160


class _NameTheService(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Adds a note naming the service and its address to every error a call ends with."""

    def __init__(self, where: str) -> None:
        self._where = where

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        """Make the call; an error it ends with is raised by the caller, with this note on it."""
        outcome = continuation(client_call_details, request)
        if isinstance(outcome, grpc.RpcError) and isinstance(outcome, Exception):
            outcome.add_note(self._where)
        return outcome


def channel(service: str, addr: str) -> grpc.Channel:
    """An insecure channel to `service` at `addr` whose failed calls name both."""
    return grpc.intercept_channel(grpc.insecure_channel(addr), _NameTheService(f"{service} at {addr}"))


def describe(exc: grpc.RpcError) -> str:
    """A failed call in one line: `CODE REASON: details [key=value, ...] (service at addr)`.

    REASON and the ErrorInfo metadata come only when the answer carries an ErrorInfo (gRPC's own
    errors, an unreachable service or a deadline, carry none).
    """
    code = exc.code().name if callable(getattr(exc, "code", None)) else type(exc).__name__
    details = exc.details() if callable(getattr(exc, "details", None)) else ""
    # gRPC's details may hold newlines (a server's multi-line message): one line for a log.
    text = f"{code}{_reason(exc)}: {' '.join((details or 'no details').split())}{_metadata(exc)}"
    where = "; ".join(getattr(exc, "__notes__", ()))
    return f"{text} ({where})" if where else text


def _info(exc: grpc.RpcError) -> Any:
    if not callable(getattr(exc, "trailing_metadata", None)):
        return None
    try:
        return error_info(exc)
    except DecodeError:  # trailers that are no google.rpc.Status: the code and details still say it
        return None


def _reason(exc: grpc.RpcError) -> str:
    info = _info(exc)
    reason = " ".join(printable(info.reason).split()) if info is not None else ""
    return f" {reason}" if reason else ""


def _metadata(exc: grpc.RpcError) -> str:
    info = _info(exc)
    if info is None or not info.metadata:
        return ""
    pairs = [
        f"{' '.join(printable(k).split())}={' '.join(printable(v).split())}"
        for k, v in sorted(info.metadata.items())
        if v  # an empty value (no trace id) says nothing
    ]
    shown = ", ".join(pairs)
    if not shown:
        return ""
    if len(shown) > ERROR_METADATA_SHOWN_CHARS_MAX:
        shown = shown[: ERROR_METADATA_SHOWN_CHARS_MAX - 3] + "..."
    return f" [{shown}]"
