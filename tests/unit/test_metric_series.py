"""The series the services export stay a fixed few, whatever callers send.

Prometheus keeps every label set it scrapes as a series of its own, per pod: a label value taken
from a request (a method name a prober makes up, an error's text) is a new series per value, and
enough of them take its memory. The whole suite's labels against hostile callers are
tests/integration/test_observability_volume.py; these are the gRPC layer's, with and without
spans recorded (prod and dev), and what each series costs beside it.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY, generate_latest

from services.common import grpcserver
from services.common.errors import InvalidArgument
from services.common.grpcserver import ServiceRegistration, create_server
from services.common.metrics import RPC_SECONDS

SERVICE = "livegifts.test.v1.Probed"
PROBES = 50  # made-up methods a caller tries


def _registration() -> ServiceRegistration:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if request:
            # A refusal whose message carries what the caller sent, as many do: the status
            # (`code`) is a label, never the message.
            raise InvalidArgument(f"cannot echo {request.decode(errors='replace')}", "NOT_EMPTY")
        return b""

    handler = grpc.method_handlers_generic_handler(SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    return ServiceRegistration(lambda _servicer, server: server.add_generic_rpc_handlers((handler,)), None, SERVICE)


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """The OpenTelemetry server interceptor recording into memory (the global provider untouched)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(grpcserver, "aio_server_interceptor", lambda: aio_server_interceptor(tracer_provider=provider))
    yield exporter
    provider.shutdown()


@pytest.fixture(params=[False, True], ids=["propagating", "recording spans"])
async def port(request: pytest.FixtureRequest, spans: InMemorySpanExporter) -> AsyncIterator[int]:
    running = await create_server([_registration()], "127.0.0.1", 0, "test", trace_spans=request.param)
    try:
        yield running.port
    finally:
        await running.stop(0)


def _label_values() -> set[str]:
    return {value for metric in REGISTRY.collect() for s in metric.samples for value in s.labels.values()}


def _rpc_series() -> set[tuple[str, ...]]:
    return {tuple(s.labels.values()) for s in RPC_SECONDS.collect()[0].samples}


async def test_methods_a_caller_makes_up_and_what_it_sends_become_no_series_and_no_span_name(
    port: int, spans: InMemorySpanExporter
) -> None:
    made_up = [f"probe-{uuid.uuid4().hex}" for _ in range(PROBES)]
    before = _rpc_series()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        for name in made_up:
            for method in (f"/{SERVICE}/{name}", f"/{name}.v1.Svc/Call", f"/{name}", f"/{SERVICE}/Echo/{name}"):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await channel.unary_unary(method)(b"", metadata=(("x-operator", name),), timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED, method
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await channel.unary_unary(f"/{SERVICE}/Echo")(name.encode(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert await channel.unary_unary(f"/{SERVICE}/Echo")(b"", timeout=5) == b""
    values = _label_values()
    assert not [n for n in made_up if any(n in v for v in values)], "a made-up name became a label value"
    # The known method's series, one label set per code it answered: all the calls added.
    added = {labels[:2] for labels in _rpc_series() - before}
    assert added <= {(f"/{SERVICE}/Echo", "OK"), (f"/{SERVICE}/Echo", "INVALID_ARGUMENT")}, added
    names = {span.name for span in spans.get_finished_spans()}
    assert not [n for n in made_up if any(n in s for s in names)], f"a made-up name became a span name: {names}"


def test_counters_and_histograms_export_no_created_series() -> None:
    # prometheus_client's default adds `<name>_created` (when the label set was first used) beside
    # every counter's and histogram's label set: series nothing reads, stored by Prometheus all the same.
    RPC_SECONDS.labels(f"/{SERVICE}/Echo", "OK").observe(0.001)
    text = generate_latest(REGISTRY).decode()
    assert "livegifts_rpc_seconds_count{" in text
    created = sorted(
        {
            line.split("{")[0].split(" ")[0]
            for line in text.splitlines()
            if "_created" in line and not line.startswith("#")
        }
    )
    assert not created, f"_created series exported: {created}"
