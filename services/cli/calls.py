"""The CLI's gRPC channels: a call that fails says which service, at which address, it went to.

gRPC's own text names no service, and for a deadline not even the address ("Deadline
Exceeded"): an audit or a demo talks to three services, and its one line must say which one did
not answer.
"""

from __future__ import annotations

from typing import Any

import grpc


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
    """A failed call in one line: `CODE: details (service at addr)`."""
    code = exc.code().name if callable(getattr(exc, "code", None)) else type(exc).__name__
    details = exc.details() if callable(getattr(exc, "details", None)) else ""
    # gRPC's details may hold newlines (a server's multi-line message): one line for a log.
    text = f"{code}: {' '.join((details or 'no details').split())}"
    where = "; ".join(getattr(exc, "__notes__", ()))
    return f"{text} ({where})" if where else text
