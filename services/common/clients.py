"""Outgoing gRPC channels: a deadline on every call, traces propagated, transparent retry of
UNAVAILABLE and CANCELLED.

Retrying is safe because every mutating RPC of the suite carries an idempotency key. A server
answers CANCELLED when it stops: gRPC cancels the calls that had reached it but no handler yet
(a graceful stop with calls pouring in, as in every rolling update), and a call still running
when its grace ends. A call this side cancels (its deadline, its caller gone) is never retried.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from services.common.errors import error_info, error_reason
from services.common.telemetry import inject_headers, recording

__all__ = ["DefaultDeadline", "error_info", "error_reason", "make_channel"]


class DefaultDeadline(grpc.aio.UnaryUnaryClientInterceptor):
    """Sets a deadline on every unary call that has none; optionally carries the trace context on.

    `propagate_trace` is for when spans are not recorded (no OpenTelemetry client interceptor):
    the current W3C trace context, e.g. a caller's traceparent made current by the server's
    ErrorInterceptor, goes into the call's metadata so the callee continues the same trace.
    """

    def __init__(self, deadline_s: float, *, propagate_trace: bool = False) -> None:
        self.deadline_s = deadline_s
        self.propagate_trace = propagate_trace

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        """Add the default timeout when the caller gave none, and the trace context if any."""
        if client_call_details.timeout is None:
            client_call_details = client_call_details._replace(timeout=self.deadline_s)
        if self.propagate_trace:
            carrier = inject_headers()  # nothing when no trace context is current
            if carrier:
                metadata = grpc.aio.Metadata(*tuple(client_call_details.metadata or ()))
                for key, value in carrier.items():
                    metadata.add(key, value)
                client_call_details = client_call_details._replace(metadata=metadata)
        return await continuation(client_call_details, request)


def _service_config(retry_attempts_max: int) -> str:
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{}],
                    "retryPolicy": {
                        "maxAttempts": retry_attempts_max,
                        "initialBackoff": "0.05s",
                        "maxBackoff": "1s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
                    },
                }
            ]
        }
    )


def make_channel(target: str, deadline_s: float, retry_attempts_max: int = 3) -> grpc.aio.Channel:
    """An insecure channel (the mesh encrypts) with default deadline, retries and tracing.

    Client spans only when telemetry records them (an exporter is set); otherwise the trace
    context is still propagated, at the cost of one dict and a contextvar read per call.
    """
    spans = recording()
    interceptors: list[Any] = [DefaultDeadline(deadline_s, propagate_trace=not spans)]
    if spans:
        interceptors += aio_client_interceptors()
    return grpc.aio.insecure_channel(
        target,
        interceptors=interceptors,
        options=[
            ("grpc.service_config", _service_config(retry_attempts_max)),
            ("grpc.enable_retries", 1),
            ("grpc.keepalive_time_ms", 30_000),
        ],
    )
