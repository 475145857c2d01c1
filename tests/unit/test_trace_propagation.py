"""With no exporter, tracing records nothing but still carries a caller's W3C trace context on."""

from __future__ import annotations

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from services.common.clients import make_channel
from services.common.grpcserver import ServiceRegistration, create_server
from services.common.telemetry import inject_headers, recording

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
METHOD = "/livegifts.test.v1.Echo/Headers"


def _echo_registration() -> ServiceRegistration:
    """A service whose one method answers the trace headers it would put on outgoing messages."""

    async def headers(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return (inject_headers().get("traceparent") or "").encode()

    handler = grpc.method_handlers_generic_handler(
        "livegifts.test.v1.Echo",
        {"Headers": grpc.unary_unary_rpc_method_handler(headers)},
    )
    return ServiceRegistration(
        lambda _servicer, server: server.add_generic_rpc_handlers((handler,)), None, "livegifts.test.v1.Echo"
    )


async def test_without_an_exporter_nothing_is_recorded_and_the_callers_trace_reaches_the_callees_events() -> None:
    assert not recording(), "the unit tests run without an exporter"
    running = await create_server([_echo_registration()], "127.0.0.1", 0, "livegifts.test")
    channel = make_channel(f"127.0.0.1:{running.port}", 5.0)
    try:
        call = channel.unary_unary(METHOD)
        token = otel_context.attach(propagate.extract({"traceparent": CALLER}))
        try:
            assert not trace.get_current_span().is_recording()
            # The client side passes the caller's context on; the server makes it current, so
            # what the handler writes into NATS headers continues the caller's trace.
            seen = (await call(b"")).decode()
        finally:
            otel_context.detach(token)
        assert seen.split("-")[1] == TRACE_ID, seen
        # A call made outside any trace carries none, and the server invents none.
        assert (await call(b"")).decode() == ""
    finally:
        await channel.close()
        await running.server.stop(None)


def test_without_an_exporter_a_consumed_events_trace_reaches_the_events_its_handler_writes() -> None:
    # What Consumer._batch_span relies on: the no-op tracer hands back the message's context as a
    # non-recording span, and the handler runs with it current.
    tracer = trace.get_tracer(__name__)
    span = tracer.start_span("consume", context=propagate.extract({"traceparent": CALLER}))
    assert not span.is_recording()
    with trace.use_span(span, end_on_exit=True):
        assert inject_headers()["traceparent"].split("-")[1] == TRACE_ID
    assert "traceparent" not in inject_headers()
