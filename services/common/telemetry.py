"""One call sets up traces, structured logs and Prometheus metrics for a service."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import start_http_server

from services.common.config import ServiceSettings
from services.common.errors import shown

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
    """
    global _tracing
    propagate.set_global_textmap(PROPAGATOR)
    exporter = _exporter(settings)
    if exporter is None:
        _tracing = Tracing(None)
        return _tracing
    provider = TracerProvider(resource=Resource.create({"service.name": f"livegifts-{service}"}))
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=200))
    trace.set_tracer_provider(provider)
    _tracing = Tracing(provider)
    return _tracing


def recording() -> bool:
    """True when spans are recorded (an exporter is configured); False when tracing only propagates."""
    return _tracing.recording


def start_metrics(settings: ServiceSettings) -> int:
    """Serve Prometheus /metrics; returns the bound port (0 when disabled)."""
    if settings.metrics_port == 0:
        return 0
    server, _thread = start_http_server(settings.metrics_port, addr=settings.metrics_host)
    return int(server.server_port)


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
