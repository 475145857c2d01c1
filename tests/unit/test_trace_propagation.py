"""With no exporter, tracing records nothing but still carries a caller's W3C trace context on."""

from __future__ import annotations

import json

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator

from services.common.clients import make_channel
from services.common.config import ServiceSettings
from services.common.grpcserver import ServiceRegistration, create_server
from services.common.telemetry import inject_headers, recording, setup_tracing

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


BAGGAGE = "email=jane%40example.com,user=u1"


def _metadata_echo_registration() -> ServiceRegistration:
    """A service whose one method answers, as JSON, the trace headers it would put on outgoing
    messages and the incoming call's metadata keys."""

    async def headers(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        keys = sorted(k for k, _ in context.invocation_metadata() or ())
        return json.dumps({"outgoing": inject_headers(), "incoming": keys}).encode()

    handler = grpc.method_handlers_generic_handler(
        "livegifts.test.v1.Echo",
        {"Headers": grpc.unary_unary_rpc_method_handler(headers)},
    )
    return ServiceRegistration(
        lambda _servicer, server: server.add_generic_rpc_handlers((handler,)), None, "livegifts.test.v1.Echo"
    )


async def test_a_callers_baggage_goes_no_further_than_the_call_it_came_with() -> None:
    # Baggage is the caller's (an app's, the edge's): no service reads it, and carried on it went
    # into every outgoing call, outbox row and NATS message the call made (up to 8 KB each, kept
    # for the streams' 30 days, personal data included). The trace context still goes on.
    running = await create_server([_metadata_echo_registration()], "127.0.0.1", 0, "livegifts.test")
    raw = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    channel = make_channel(f"127.0.0.1:{running.port}", 5.0)
    try:
        # A caller sends baggage in its metadata: the handler's outgoing headers do not carry it.
        answer = json.loads(
            await raw.unary_unary(METHOD)(b"", metadata=(("traceparent", CALLER), ("baggage", BAGGAGE)))
        )
        assert answer["outgoing"]["traceparent"].split("-")[1] == TRACE_ID
        assert "baggage" not in answer["outgoing"], answer
        # Nor do this side's outgoing calls send baggage that is current (a consumed event's, say).
        token = otel_context.attach(
            W3CBaggagePropagator().extract({"baggage": BAGGAGE}, context=propagate.extract({"traceparent": CALLER}))
        )
        try:
            answer = json.loads(await channel.unary_unary(METHOD)(b""))
        finally:
            otel_context.detach(token)
        assert "traceparent" in answer["incoming"]
        assert "baggage" not in answer["incoming"], answer
    finally:
        await raw.close()
        await channel.close()
        await running.server.stop(None)


def test_the_services_global_propagator_carries_the_trace_context_and_no_baggage() -> None:
    # The OpenTelemetry interceptors (spans recorded) extract and inject with the global propagator.
    before = propagate.get_global_textmap()
    try:
        setup_tracing("test", ServiceSettings(database_url="sqlite:///unused.db", nats_url="nats://127.0.0.1:1"))
        ctx = propagate.extract({"traceparent": CALLER, "tracestate": "k=v", "baggage": BAGGAGE})
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=ctx)
        assert carrier == {"traceparent": CALLER, "tracestate": "k=v"}
    finally:
        propagate.set_global_textmap(before)
