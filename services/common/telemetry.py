"""One call sets up traces, structured logs and Prometheus metrics for a service."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from services.common.config import ServiceSettings
from services.common.errors import shown
from services.common.throttle import LogThrottle

# What a call or an event carries on of its caller's trace: the W3C trace context (traceparent,
# tracestate), nothing else. OpenTelemetry's default also carries W3C baggage, which no service
# reads: whatever a caller (an app, the edge) put there, up to 8 KB of it, went on to every call
# and event the call made, stored in each outbox row and kept in the streams for 30 days, personal
# data included. setup_tracing installs it as the global propagator (the OpenTelemetry
# interceptors use that one); the helpers below use it directly.
PROPAGATOR = TraceContextTextMapPropagator()

_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line, with the current trace and span ids."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        """Render a record as JSON."""
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            out["trace_id"] = format(ctx.trace_id, "032x")
            out["span_id"] = format(ctx.span_id, "016x")
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def change_fields(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, Any]:
    """The log fields of an operator's catalog or price change: every field as it is now, each one
    that changed as it was (`previous_<field>`), `added` (a new row) and `changed` (the changed fields'
    names, comma-separated), so the log says what an operator changed, not only that they did."""
    changed = [k for k, v in after.items() if before is None or before.get(k) != v]
    out: dict[str, Any] = {**after, "added": before is None, "changed": ",".join(changed)}
    if before is not None:
        out |= {f"previous_{k}": before.get(k) for k in changed}
    return out


def setup_logging(service: str, level: str, fmt: str) -> None:
    """Structured logs to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("nats", "aiosqlite", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _exporter(settings: ServiceSettings) -> SpanExporter | None:
    if settings.otel_exporter == "console":
        return ConsoleSpanExporter()
    if settings.otel_exporter == "file":
        # Line-buffered JSON lines: tests and operators can grep one trace across services.
        out = open(settings.otel_file, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
        return ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(indent=None) + "\n")
    if settings.otel_exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=settings.otlp_endpoint, insecure=True)
    return None


def sampler(settings: ServiceSettings) -> Sampler:
    """Which traces are recorded (OTEL_TRACES_SAMPLER, _ARG, validated at start): always
    parent-based (but always_off, which records nothing), so a span whose parent came in a call's
    or an event's trace context follows the parent's sampled flag (a trace is recorded whole or
    not at all, across services); a new trace is recorded always, never, or at the ratio (by its trace id).

    A span not sampled is not recorded, but it still has its trace and span ids, made current as
    a recorded one is: log lines and error messages carry the trace id, and calls and events carry
    it on (with the sampled flag off) - only the trace store has nothing under it."""
    sampling = settings.trace_sampling()
    if sampling.sampler == "always_off":
        return ALWAYS_OFF
    if sampling.sampler == "parentbased_always_off":
        return ParentBased(ALWAYS_OFF)
    if sampling.sampler == "parentbased_traceidratio":
        return ParentBased(TraceIdRatioBased(sampling.ratio))
    return ParentBased(ALWAYS_ON)


def warn_of_sampling(settings: ServiceSettings) -> None:
    """Log, at start, a WARNING for each sampler setting taken otherwise than it says (see
    `ServiceSettings.trace_sampling`)."""
    for warning in settings.trace_sampling().warnings:
        logging.getLogger(__name__).warning("%s", warning)


def tracer_provider(service: str, settings: ServiceSettings) -> TracerProvider:
    """The SDK provider of a service's spans, sampled as configured (no processor yet)."""
    return TracerProvider(sampler=sampler(settings), resource=Resource.create({"service.name": f"livegifts-{service}"}))


class Tracing:
    """What setup_tracing installed: whether spans are recorded, and how to flush them at exit."""

    def __init__(self, provider: TracerProvider | None) -> None:
        self.provider = provider

    @property
    def recording(self) -> bool:
        """True when an exporter is configured and spans are recorded (the SDK is installed)."""
        return self.provider is not None

    def shutdown(self) -> None:
        """Flush and stop the exporter, if any."""
        if self.provider is not None:
            self.provider.shutdown()


_tracing = Tracing(None)


def setup_tracing(service: str, settings: ServiceSettings) -> Tracing:
    """Install the SDK tracer provider when an exporter is configured; with none, only propagate.

    Choices with `OTEL_EXPORTER=none`: A) the SDK provider with no processor (every call still
    builds, samples and ends SDK spans through the OpenTelemetry gRPC interceptors, ~5% of a
    service's busy samples, to throw them away); B) the SDK with ParentBased(ALWAYS_OFF) (no
    recording, but the interceptors still run and every span still gets ids and a sampling
    decision); C) no SDK at all: the API's no-op tracer returns the parent's context as a
    non-recording span (`NoOpTracer.start_span`), so a caller's W3C traceparent still reaches
    outgoing calls and NATS headers, if the incoming context is attached - which the small
    propagation-only interceptors do (`grpcserver.ErrorInterceptor`, `clients.CallDefaults`)
    instead of the OpenTelemetry ones. We take C; logs keep the caller's trace id.

    With an exporter, which traces are recorded is `sampler`'s (OTEL_TRACES_SAMPLER, validated
    with the settings): the SDK's provider is given it, never left to read the variables itself.
    """
    global _tracing
    propagate.set_global_textmap(PROPAGATOR)
    warn_of_sampling(settings)
    exporter = _exporter(settings)
    if exporter is None:
        _tracing = Tracing(None)
        return _tracing
    provider = tracer_provider(service, settings)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=200))
    trace.set_tracer_provider(provider)
    _tracing = Tracing(provider)
    return _tracing


def recording() -> bool:
    """True when spans are recorded (an exporter is configured); False when tracing only propagates."""
    return _tracing.recording


# The /metrics server (prometheus_client's, a thread per connection) with two bounds it lacks.
# Without them any pod that reaches the port (deploy/k8s lets only `monitoring` in, the mesh may
# not) held a thread for good with each connection it opened and left silent, thousands of them:
# the service's memory and thread limit, so its gRPC too. A scrape's request line and headers
# arrive in milliseconds, and Prometheus opens one connection at a time per target.
# - a connection's request must arrive whole within this; a silent or trickling one is closed
METRICS_REQUEST_TIMEOUT_S = 10.0
# - at most this many connections are served at once; one past it is closed unanswered
METRICS_CONNECTIONS_MAX = 16
METRICS_REFUSED_LOG_INTERVAL_S = 60.0
# The one path answered (what the ServiceMonitor and the pods' annotations scrape)
METRICS_PATH = "/metrics"


class _Deadline(io.RawIOBase):
    """A connection's bytes, until a deadline: each receive waits at most what remains of it, so
    a client sending a byte at a time is cut there too, not only one that goes silent."""

    def __init__(self, connection: socket.socket, timeout_s: float) -> None:
        super().__init__()
        self._connection = connection
        self._deadline = time.monotonic() + timeout_s

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request did not arrive in time")
        self._connection.settimeout(remaining)
        return self._connection.recv_into(buffer)


class _Answer(io.BufferedIOBase):
    """A connection's writer (socketserver's own, unbuffered) whose write that times out is the
    client gone: ConnectionAbortedError.

    wsgiref's ServerHandler.run takes ConnectionAbortedError, BrokenPipeError and
    ConnectionResetError for a client that left and returns quietly; any other error while
    writing went to its handle_error, whose log_exception printed a traceback to stderr: each
    client that stopped reading an answer (METRICS_REQUEST_TIMEOUT_S per write) left one. Only a
    write's timeout is turned; an error of the metrics app itself still prints its traceback."""

    def __init__(self, connection: socket.socket) -> None:
        super().__init__()
        self._connection = connection

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            self._connection.sendall(data)
        except TimeoutError as exc:
            raise ConnectionAbortedError("the client did not read the answer in time") from exc
        with memoryview(data) as view:
            return view.nbytes

    def fileno(self) -> int:
        return self._connection.fileno()


def _only_metrics(app: Any) -> Any:
    """The metrics app behind a check of the path and method: GET or HEAD on METRICS_PATH only.

    prometheus_client's app answers the metrics at any path (for backwards compatibility, it
    says), and OPTIONS with 200: what scrapes the services asks for /metrics alone (the
    ServiceMonitor, the pods' annotations, `livegifts run`), so any other path is 404 and any
    other method 405. HEAD is answered as GET is, without the body (wsgiref sends what the app
    returns, for HEAD too)."""

    def metrics_only(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        method = environ.get("REQUEST_METHOD", "")
        if environ.get("PATH_INFO") != METRICS_PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"not found: metrics are at {METRICS_PATH}\n".encode()]
        if method not in ("GET", "HEAD"):
            start_response(
                "405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Type", "text/plain; charset=utf-8")]
            )
            return [b"method not allowed: use GET or HEAD\n"]
        if method == "GET":
            return list(app(environ, start_response))
        answered: list[Any] = []
        body = b"".join(app({**environ, "REQUEST_METHOD": "GET"}, lambda *args: answered.append(args)))
        status, headers, *_exc_info = answered[0]
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return []

    return metrics_only


class _MetricsHandler(WSGIRequestHandler):
    """prometheus_client's handler (logs no request), whose request must arrive within
    METRICS_REQUEST_TIMEOUT_S; a connection that times out or breaks is closed without a trace
    on stderr, one whose answer is not read in time too (`_Answer`)."""

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the socket's own reader, which waits without a deadline
        self.rfile = io.BufferedReader(_Deadline(self.connection, METRICS_REQUEST_TIMEOUT_S))
        self.wfile = _Answer(self.connection)

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        # The request is in: the answer's writes each get the whole timeout (a client that stops
        # reading is let go after it).
        self.connection.settimeout(METRICS_REQUEST_TIMEOUT_S)
        return parsed

    def handle(self) -> None:
        with contextlib.suppress(OSError):  # TimeoutError included: the client is gone or too slow
            super().handle()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the signature overridden
        """Log nothing (a scrape every few seconds)."""


class _MetricsServer(ThreadingWSGIServer):
    """A thread per connection, at most METRICS_CONNECTIONS_MAX at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(METRICS_CONNECTIONS_MAX)
        self._refused = LogThrottle(METRICS_REFUSED_LOG_INTERVAL_S)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            if refused := self._refused.occurred():
                logging.getLogger(__name__).warning(
                    "metrics connection refused: too many open",
                    extra={"connections_max": METRICS_CONNECTIONS_MAX, "refused": refused},
                )
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def serve_metrics(host: str, port: int) -> ThreadingWSGIServer:
    """Serve Prometheus metrics on host:port (0: a free one) from a daemon thread; returns the server."""
    family, *_rest, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class Server(_MetricsServer):
        address_family = family  # an IPv6 host is served on IPv6, as prometheus_client does

    app = _only_metrics(make_wsgi_app())
    server = make_server(str(address[0]), port, app, Server, handler_class=_MetricsHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def start_metrics(settings: ServiceSettings) -> int:
    """Serve Prometheus /metrics; returns the bound port (0 when disabled)."""
    if settings.metrics_port == 0:
        return 0
    return int(serve_metrics(settings.metrics_host, settings.metrics_port).server_port)


def current_trace_id() -> str:
    """The current trace's id as the logs print it ("" outside a trace): an error message that
    names it lets an operator find the log lines of the call without the message holding internals."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


_tracer = trace.get_tracer(__name__)


def mark_failed(span: trace.Span, exc: BaseException) -> None:
    """Mark `span` failed by `exc`, with what a caller may be shown of it (`errors.shown`: the
    class, or a domain error's reason and message) and an `exception` event with its type.

    OpenTelemetry's own recording (`record_exception`, `set_status_on_exception`, on by default)
    puts str(exc) and the stack on the span: for a database error, the statement and its bound
    values (a payout token, a birth date, a tip's message), kept by the trace store. The log
    has the whole error, under the span's trace id."""
    span.set_status(Status(StatusCode.ERROR, shown(exc)))
    span.add_event("exception", {"exception.type": type(exc).__name__})


@contextlib.contextmanager
def spanning(span: trace.Span, *, end_on_exit: bool = False) -> Iterator[trace.Span]:
    """`trace.use_span` that marks the span failed by an error with `mark_failed`, not with the
    error's text."""
    with trace.use_span(span, end_on_exit=end_on_exit, record_exception=False, set_status_on_exception=False):
        try:
            yield span
        except Exception as exc:  # as use_span: a cancellation or an exit is no failure
            mark_failed(span, exc)
            raise


def start_span(name: str, **kwargs: Any) -> contextlib.AbstractContextManager[trace.Span]:
    """A new span of this module's tracer, current while the block runs and ended after it,
    marked failed as `spanning` does."""
    return spanning(_tracer.start_span(name, **kwargs), end_on_exit=True)


def background_span(name: str, **attributes: str) -> contextlib.AbstractContextManager[trace.Span]:
    """A context manager: a new trace for one item of a background loop's work (a swept gift, a
    dispatched withdrawal), current while it runs.

    Without it that work ran outside any trace: its wallet or provider calls were lone root
    spans, the events it wrote carried no trace context (so their consumers' spans began new,
    unrelated traces) and its log lines had no trace id. A root, not a child of the loop: a
    loop that runs for days would make one endless trace. A no-op when spans are not recorded.
    An error that ends the work marks the span failed without its text (`mark_failed`).
    """
    return start_span(name, context=otel_context.Context(), kind=trace.SpanKind.INTERNAL, attributes=attributes)


def inject_headers(context: Any = None) -> dict[str, str]:
    """The current trace context (or `context`) as message headers (W3C traceparent)."""
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier, context=context)
    return carrier


def extract_context(headers: dict[str, str] | None) -> Any:
    """A trace context from message headers."""
    return PROPAGATOR.extract(headers or {})


TRACE_HEADERS = frozenset(PROPAGATOR.fields)  # traceparent, tracestate


def attach_remote_context(metadata: Any) -> object | None:
    """Make an incoming call's trace context current (propagation only); returns the token to detach.

    None, and nothing attached, when the call carries no trace headers (the common case costs a
    scan of a few metadata keys).
    """
    carrier = {k: v for k, v in metadata or () if k in TRACE_HEADERS}
    if not carrier:
        return None
    return otel_context.attach(PROPAGATOR.extract(carrier))


def detach_context(token: object | None) -> None:
    """Undo attach_remote_context."""
    if token is not None:
        otel_context.detach(token)  # type: ignore[arg-type]


@contextlib.contextmanager
def remote_context(metadata: Any) -> Iterator[None]:
    """attach_remote_context for the block: the trace the metadata (or message headers) carry is
    current inside it, as it was before after it."""
    token = attach_remote_context(metadata)
    try:
        yield
    finally:
        detach_context(token)
