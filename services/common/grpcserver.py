"""gRPC server bootstrap: interceptors (traces, errors -> status, metrics), health, reflection."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from sqlalchemy import exc as sa_exc

from services.common.config import GRPC_KEEPALIVE_TIME_S, GRPC_KEEPALIVE_TIMEOUT_S
from services.common.dependency_errors import error_kind, is_serialization_failure, is_unavailable, storage_refusal
from services.common.errors import DomainError, InvalidArgument, status_for
from services.common.metrics import RPC_SECONDS
from services.common.telemetry import (
    TRACE_HEADERS,
    attach_remote_context,
    current_trace_id,
    detach_context,
    recording,
    remote_context,
)
from services.common.throttle import KeyedLogThrottle

log = logging.getLogger(__name__)

MESSAGE_BYTES_MAX = 4 * 1024 * 1024
CONCURRENT_RPCS_MAX = 2048
# A client connection older than this is closed gracefully (GOAWAY: calls in flight finish, the
# next ones go on a new connection). Behind a Kubernetes Service a channel's one connection stays
# on the pod kube-proxy picked when it connected: without an end, gifting's calls would stay on
# the wallet pods that were up then, however many the autoscaler adds. gRPC adds +-10% jitter.
CONNECTION_AGE_MAX_S = 300.0
# That GOAWAY does not end calls in flight (the age grace is unlimited: overlays stay connected),
# so a client whose network vanished without a FIN or RST keeps its calls, a WatchStream its
# feed slot, until the server's keepalive ping goes unanswered (GRPC_KEEPALIVE_TIME_S and
# _TIMEOUT_S, settings). gRPC core's ping policy beside it (doc/keepalive.md), chosen so that
# the server's pings always go out and well-behaved clients' pings are never refused:
# - a quiet feed sends no data for minutes; gRPC's documented default stops a sender's pings
#   after 2 without data, and a client that died after them would hold its slot for good: no
#   limit. (grpcio 1.85's server already pings on whatever this says, measured; this keeps it so.)
KEEPALIVE_PINGS_WITHOUT_DATA_MAX = 0
# - a client may ping with no call open (an overlay between two watches, grpc-java's
#   keepAliveWithoutCalls): accepted at the interval below, not counted as abuse against a
#   2-hour interval; the server pings such connections too (they end at CONNECTION_AGE_MAX_S
#   anyway, so this only costs a ping a minute).
KEEPALIVE_PERMIT_WITHOUT_CALLS = 1
# - a client pinging more often than this while the server sends nothing earns a strike, and
#   past KEEPALIVE_PING_STRIKES_MAX strikes the connection is closed (GOAWAY "too_many_pings",
#   every call on it UNAVAILABLE). 10 s is the shortest keepalive grpc-java and grpc-go clients
#   can set, and below the services' own clients' 30 s (services/common/clients.py); gRPC's
#   default of 5 minutes would cut a quiet feed of any client pinging every 30 s or minute.
KEEPALIVE_CLIENT_PING_INTERVAL_MIN_S = 10.0
KEEPALIVE_PING_STRIKES_MAX = 2  # gRPC's default; 0 would let a client ping without bound
# The probe server (RunningServer.serve_probes): calls in progress at once (the kubelet's three
# probes, compose's check, an operator's grpc_health_probe, with room) and the largest request
# it reads (a HealthCheckRequest is a service name).
PROBE_CONCURRENT_RPCS_MAX = 32
PROBE_MESSAGE_BYTES_MAX = 4096
# A probe connection older than this is sent GOAWAY, and closed (its calls cancelled) the grace
# after: a call whose request never comes holds one of the probe server's slots until then, not
# for good. Without it PROBE_CONCURRENT_RPCS_MAX such calls (a stray or stuck client in the pod)
# refused every Check there RESOURCE_EXHAUSTED for as long as their connection stayed open, and
# the liveness probe restarted the pod. The kubelet opens a connection per probe and a Check
# takes milliseconds, so no probe comes near either; held slots are free within ~16 s (gRPC adds
# +-10% to the age), well inside liveness' 60 s (6 failures 10 s apart).
PROBE_CONNECTION_AGE_MAX_S = 10.0
PROBE_CONNECTION_AGE_GRACE_S = 5.0
_HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name  # grpc.health.v1.Health

# A call answered UNAVAILABLE for one reason and error logs one line per this many seconds.
UNAVAILABLE_LOG_INTERVAL_S = 30.0
# The (reason, error) pairs throttled apart: a few in practice (classes and SQLSTATEs), bounded
# all the same, as the interceptor lives as long as the process.
UNAVAILABLE_LOG_KEYS_MAX = 64


# The full name of the method the current call is to ("/livegifts.wallet.v1.WalletService/..."),
# set by ErrorInterceptor for its handler: grpc.aio's ServicerContext does not say it, and the
# operator-token refusals log it (services/common/auth.py). "" outside a call.
_CALL_METHOD: contextvars.ContextVar[str] = contextvars.ContextVar("livegifts_call_method", default="")


def current_method() -> str:
    """The method of the call being handled ("" outside one)."""
    return _CALL_METHOD.get()


def _rich_status(code: grpc.StatusCode, message: str, reason: str, domain: str, metadata: dict[str, str]) -> Any:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=[detail]))


def internal_error() -> tuple[str, dict[str, str]]:
    """The message and ErrorInfo metadata of an INTERNAL answer: the trace id to quote, if any
    (the error interceptor's, and a SendGifts item's that failed alone)."""
    trace_id = current_trace_id()
    return (f"internal error (trace {trace_id})" if trace_id else "internal error"), {"trace_id": trace_id}


class _Undecodable:
    """Stands for a request body that is not the method's message (see `_tolerant`)."""


UNDECODABLE = _Undecodable()


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The method's request deserializer, answering UNDECODABLE where it raises DecodeError.

    A body that is not the message (invalid UTF-8 in a string field, which any non-Python
    client or proxy may send; a truncated or garbled body) failed inside grpc, before any
    handler: UNKNOWN "Unexpected <class 'google.protobuf.message.DecodeError'>", no reason, and
    a traceback in the log. The handler wrapper refuses UNDECODABLE with a reason instead."""
    if deserialize is None:
        return None

    def load(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError:
            return UNDECODABLE

    return load


def _require_decoded(request: Any) -> None:
    """INVALID_ARGUMENT MALFORMED_REQUEST for a body `_tolerant` could not decode."""
    if request is UNDECODABLE:
        raise InvalidArgument(
            "the request is not a valid message for this method (string fields must be UTF-8)",
            "MALFORMED_REQUEST",
        )


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps typed domain errors to status codes with google.rpc.ErrorInfo; times every call.

    With `propagate_trace` (no span recording, so no OpenTelemetry interceptor in front), it also
    makes an incoming W3C trace context current for the handler, so outgoing calls and outbox
    events carry the caller's trace on.
    """

    def __init__(self, domain: str, *, propagate_trace: bool = False) -> None:
        self.domain = domain
        self.propagate_trace = propagate_trace
        # "dependency unavailable", one line per UNAVAILABLE_LOG_INTERVAL_S for each reason and
        # error (a few: classes and SQLSTATEs), keyed by both.
        self._unavailable_log: KeyedLogThrottle[tuple[str, str]] = KeyedLogThrottle(
            UNAVAILABLE_LOG_INTERVAL_S, UNAVAILABLE_LOG_KEYS_MAX
        )

    def _status_of(self, exc: BaseException) -> Any:
        if isinstance(exc, DomainError):
            return _rich_status(status_for(exc), exc.message, exc.reason, self.domain, exc.metadata)
        if isinstance(exc, sa_exc.DBAPIError) and is_serialization_failure(exc):
            return _rich_status(
                grpc.StatusCode.ABORTED, "conflict, retry with the same key", "CONFLICT", self.domain, {}
            )
        if is_unavailable(exc):
            refusal = storage_refusal(exc)
            self._log_unavailable(error_kind(exc), refusal or "DEPENDENCY_UNAVAILABLE")
            if refusal is not None:
                return _rich_status(
                    grpc.StatusCode.UNAVAILABLE,
                    "the service's storage refuses writes (full or read-only), retry with the same key later",
                    refusal,
                    self.domain,
                    {},
                )
            return _rich_status(
                grpc.StatusCode.UNAVAILABLE,
                "a dependency is unavailable, retry with the same key",
                "DEPENDENCY_UNAVAILABLE",
                self.domain,
                {},
            )
        log.exception("unexpected error")
        message, metadata = internal_error()
        return _rich_status(grpc.StatusCode.INTERNAL, message, "INTERNAL", self.domain, metadata)

    def _log_unavailable(self, error: str, reason: str) -> None:
        """Log a call answered UNAVAILABLE at once the first time for its reason and error, then
        at most once per UNAVAILABLE_LOG_INTERVAL_S (`calls`: the calls the line stands for, this
        one included); the calls themselves are counted in livegifts_rpc_seconds_count. Before,
        every call of an outage logged a line: hundreds a second on a busy pod, for as long as it
        lasted."""
        if calls := self._unavailable_log.occurred((reason, error)):
            log.warning("dependency unavailable", extra={"error": error, "reason": reason, "calls": calls})

    @contextlib.asynccontextmanager
    async def _answering(self, method: str, remote: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """A streaming call's handler runs in the caller's trace, with its method known
        (`current_method`), and its error ends the call with the status the mapping gives it."""
        named = _CALL_METHOD.set(method)
        try:
            with remote_context(remote):
                try:
                    yield
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:  # noqa: BLE001 - every error becomes a status here, in one place
                    status = self._status_of(exc)
                    await context.abort(status.code, status.details, status.trailing_metadata)
        finally:
            # A generator closed from elsewhere (asyncio's finalizer, in a task of its own) is in
            # another context, where the reset does not apply; the call's own task ends anyway.
            with contextlib.suppress(ValueError):
                _CALL_METHOD.reset(named)

    async def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        """Wrap unary-unary and unary-stream handlers."""
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        remote = None
        if self.propagate_trace:
            remote = [(k, v) for k, v in details.invocation_metadata or () if k in TRACE_HEADERS] or None
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = time.perf_counter()
                code = "OK"
                token = attach_remote_context(remote) if remote else None
                named = _CALL_METHOD.set(method)
                try:
                    _require_decoded(request)
                    return await inner(request, context)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    code = "ABORTED_BY_HANDLER"
                    raise
                except Exception as exc:  # noqa: BLE001 - every error becomes a status here, in one place
                    status = self._status_of(exc)
                    code = status.code.name
                    await context.abort(status.code, status.details, status.trailing_metadata)
                finally:
                    RPC_SECONDS.labels(method, code).observe(time.perf_counter() - started)
                    _CALL_METHOD.reset(named)
                    detach_context(token)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with self._answering(method, remote, context):
                    _require_decoded(request)
                    async for item in inner_stream(request, context):
                        yield item

            async def writing(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                # A handler that sends with context.write() and returns (grpc.health.v1 Watch).
                # An async generator that yields nothing: the OpenTelemetry interceptor in front
                # (when spans are recorded) iterates every unary-stream handler, and a plain
                # coroutine failed there as UNKNOWN ("'async for' requires ... __aiter__").
                async with self._answering(method, remote, context):
                    _require_decoded(request)
                    await inner_stream(request, context)
                return
                yield  # pragma: no cover - makes this an async generator

            return grpc.unary_stream_rpc_method_handler(
                stream if inspect.isasyncgenfunction(inner_stream) else writing,
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler


@dataclass
class ServiceRegistration:
    """A servicer and the generated function that adds it to a server."""

    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    full_name: str  # e.g. livegifts.wallet.v1.WalletService


@dataclass
class RunningServer:
    """A started server, the port it bound and its health servicer; once `serve_probes` ran, the
    probe server beside it, its port and its own health servicer."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: list[str]
    serving: bool = False
    probe: grpc.aio.Server | None = None
    probe_port: int | None = None
    probe_health: health.aio.HealthServicer | None = None

    async def set_serving(self, serving: bool) -> None:
        """Flip every service's health status, on the main port and the probe port alike."""
        self.serving = serving
        for servicer in (self.health, self.probe_health):
            if servicer is not None:
                await self._set(servicer)

    async def _set(self, servicer: health.aio.HealthServicer) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if self.serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await servicer.set(name, status)

    async def serve_probes(
        self,
        host: str,
        port: int,
        *,
        keepalive_time_s: float = GRPC_KEEPALIVE_TIME_S,
        keepalive_timeout_s: float = GRPC_KEEPALIVE_TIMEOUT_S,
    ) -> int:
        """Serve grpc.health.v1 Check alone on a second server of its own, on host:port (port 0 picks a
        free one; PROBE_HOST / PROBE_PORT), with the main server's status from now on; returns
        the bound port.

        The main server's limit on calls in progress (`create_server`'s `concurrent_rpcs_max`)
        counts a call from its headers on, one whose body never comes included, and health
        checks with the rest: calls enough (a hostile client's, or honest overload past the
        limit) refused every health check there, so the kubelet's liveness probe restarted pods
        exactly when they were loaded. The main port keeps its own grpc.health.v1 and
        reflection, as every service serves them there.

        No interceptors (a probe is no call worth a span or a latency sample) and a limit of its
        own (PROBE_CONCURRENT_RPCS_MAX): the kubelet runs a few probes at once, and the
        NetworkPolicies let no pod reach this port, so the limit only bounds what a stray client
        costs; a connection lasts PROBE_CONNECTION_AGE_MAX_S plus _GRACE_S at most, so calls
        whose request never comes give their slots back within that."""
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", PROBE_MESSAGE_BYTES_MAX),
                ("grpc.so_reuseport", 0),
                ("grpc.max_connection_age_ms", int(PROBE_CONNECTION_AGE_MAX_S * 1000)),
                ("grpc.max_connection_age_grace_ms", int(PROBE_CONNECTION_AGE_GRACE_S * 1000)),
                ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)),
                ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
                ("grpc.http2.ping_timeout_ms", int(keepalive_timeout_s * 1000)),
            ],
            maximum_concurrent_rpcs=PROBE_CONCURRENT_RPCS_MAX,
        )
        servicer = health.aio.HealthServicer()
        await self._set(servicer)
        # Check alone: Watch answers UNIMPLEMENTED. A Watch stream lasts as long as its client
        # keeps it open, and PROBE_CONCURRENT_RPCS_MAX of them refused every Check here
        # RESOURCE_EXHAUSTED, which restarted the pod. The kubelet and grpc_health_probe only check.
        check = grpc.unary_unary_rpc_method_handler(
            servicer.Check,
            request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_HEALTH_SERVICE, {"Check": check}),))
        bound = server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise OSError(f"cannot bind the gRPC probe port to {host}:{port}")
        await server.start()
        self.probe, self.probe_port, self.probe_health = server, bound, servicer
        return bound

    async def stop(self, grace_s: float | None) -> None:
        """Stop taking calls and let those in flight finish for `grace_s`, then stop the probe
        server: a probe during the grace still gets an answer (NOT_SERVING), not a refusal."""
        await self.server.stop(grace_s)
        if self.probe is not None:
            await self.probe.stop(0)


async def create_server(
    registrations: Sequence[ServiceRegistration],
    host: str,
    port: int,
    domain: str,
    *,
    trace_spans: bool | None = None,
    concurrent_rpcs_max: int = CONCURRENT_RPCS_MAX,
    keepalive_time_s: float = GRPC_KEEPALIVE_TIME_S,
    keepalive_timeout_s: float = GRPC_KEEPALIVE_TIMEOUT_S,
) -> RunningServer:
    """Build and start a server on host:port (port 0 picks a free one); returns it with its port.

    `concurrent_rpcs_max` bounds the calls in progress at once, every kind counted (a streaming
    call for as long as it streams, and health checks): past it a call is refused with
    RESOURCE_EXHAUSTED.

    `keepalive_time_s` and `keepalive_timeout_s` (GRPC_KEEPALIVE_TIME_S, _TIMEOUT_S): a connection
    with a call open that sends nothing for the first is pinged, and closed (its calls cancelled)
    when the ping is not answered within the second.

    `trace_spans` (default: whether telemetry records spans) puts the OpenTelemetry interceptor
    in front; without it ErrorInterceptor only carries an incoming trace context on.
    """
    if trace_spans is None:
        trace_spans = recording()
    interceptors: list[grpc.aio.ServerInterceptor] = [ErrorInterceptor(domain, propagate_trace=not trace_spans)]
    if trace_spans:
        interceptors.insert(0, aio_server_interceptor())
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
            ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
            ("grpc.so_reuseport", 0),  # a second process on the same port must fail, not share it
            ("grpc.max_connection_age_ms", int(CONNECTION_AGE_MAX_S * 1000)),
            ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
            # How long gRPC core waits for a ping's answer in fact: with grpcio 1.85 a frozen
            # client's connection was closed after this key's default of 60 s, not after the
            # keepalive timeout of 1 s (tests/integration/test_dead_watchers.py), so both are set.
            ("grpc.http2.ping_timeout_ms", int(keepalive_timeout_s * 1000)),
            ("grpc.http2.max_pings_without_data", KEEPALIVE_PINGS_WITHOUT_DATA_MAX),
            ("grpc.keepalive_permit_without_calls", KEEPALIVE_PERMIT_WITHOUT_CALLS),
            ("grpc.http2.min_ping_interval_without_data_ms", int(KEEPALIVE_CLIENT_PING_INTERVAL_MIN_S * 1000)),
            ("grpc.http2.max_ping_strikes", KEEPALIVE_PING_STRIKES_MAX),
        ],
        maximum_concurrent_rpcs=concurrent_rpcs_max,
    )
    for reg in registrations:
        reg.add_to_server(reg.servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [r.full_name for r in registrations]
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {host}:{port}")
    await server.start()
    running = RunningServer(server, bound, health_servicer, names)
    await running.set_serving(True)
    return running
