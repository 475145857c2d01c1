"""Work done for many traces at once can be found from each of them (spans recorded in memory).

A consumer's batch runs its handler in one `process` span linked to every message's own trace
(before, each message got a span of its own and the handler's work showed in the first one's
trace only); a group commit's callers link to the caller whose trace holds the shared work; and
payout's shortfall settler gives each round with work a trace, as the sweeper and the reconciler
give each item theirs (tests/integration/test_background_traces.py). The events a group
commit writes for its callers carry each caller's own trace context, not the first caller's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Sampler
from sqlalchemy import insert, select

from livegifts.gifting.v1 import events_pb2, gifting_pb2
from livegifts.wallet.v1 import wallet_pb2
from services.common import inbox, telemetry
from services.common.batching import MicroBatcher
from services.common.inbox import Consumer, Subscription
from services.common.outbox import _stored_headers
from services.common.telemetry import JsonFormatter, Tracing, inject_headers
from services.gifting.storage import common as gifting_common
from services.gifting.usecases import Gifting
from services.payout.storage import clawback_shortfalls, common
from tests.support.consumers import ConnectedBus
from tests.support.gifting import OneSpendFailingWallet, ScriptedWallet, gifting_on, pending_gifts
from tests.support.payout import gift_event

NOW_US = 1_795_305_600_000_000


@contextlib.contextmanager
def _recorded(monkeypatch: pytest.MonkeyPatch, sampler: Sampler | None = None) -> Iterator[InMemorySpanExporter]:
    """Spans recorded as with an exporter configured, into memory (the global provider untouched)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(telemetry, "_tracing", Tracing(provider))
    monkeypatch.setattr(telemetry, "_tracer", provider.get_tracer("telemetry"))
    monkeypatch.setattr(inbox, "tracer", provider.get_tracer("inbox"))
    try:
        yield exporter
    finally:
        provider.shutdown()


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    with _recorded(monkeypatch) as exporter:
        yield exporter


def _ratio(settings: Any, ratio: float) -> Sampler:
    """The sampler the services build from OTEL_TRACES_SAMPLER=parentbased_traceidratio and `ratio`."""
    return telemetry.sampler(
        settings.model_copy(
            update={"otel_traces_sampler": "parentbased_traceidratio", "otel_traces_sampler_arg": str(ratio)}
        )
    )


def _traceparent(trace_id: int, span_id: int, sampled: bool = True) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


@dataclass
class _Msg:
    """A fetched message as the consumer reads it: its publisher's trace context in its headers."""

    data: bytes
    headers: dict[str, str]
    subject: str = "s.x"
    metadata: Any = None
    acked: list[bool] = field(default_factory=list)

    async def ack(self) -> None:
        self.acked.append(True)


async def _process(payout: Any, count: int, sampled: bool | list[bool] = True) -> tuple[list[_Msg], list[str]]:
    """`count` messages from traces 1..count through a consumer as one batch (each sampled as
    `sampled` says, or its item for that message); the messages and the traceparent the handler
    would write into its own events."""
    flags = sampled if isinstance(sampled, list) else [sampled] * count
    written: list[str] = []

    async def handle(uow: Any, events: list[Any]) -> None:
        written.append(inject_headers()["traceparent"])

    sub = Subscription(durable="traced", stream="S", subject="s.x", event_type=events_pb2.GiftSent, handle=handle)
    consumer = Consumer(payout.db, ConnectedBus(), common, sub, payout.settings)  # type: ignore[arg-type]
    msgs = [
        _Msg(
            events_pb2.GiftSent(event_id=uuid.uuid4().hex).SerializeToString(),
            {"traceparent": _traceparent(n, 100 + n, flags[n - 1])},
        )
        for n in range(1, count + 1)
    ]
    await consumer.process(msgs)  # type: ignore[arg-type]
    assert all(m.acked for m in msgs)
    return msgs, written


def _only(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    found = [s for s in exporter.get_finished_spans() if s.name == name]
    assert len(found) == 1, [s.name for s in exporter.get_finished_spans()]
    return found[0]


async def test_a_consumed_batch_is_one_process_span_linked_to_every_messages_trace(  # type: ignore[no-untyped-def]
    setup,
    spans: InMemorySpanExporter,
) -> None:
    payout, _provider, _path = setup
    _msgs, written = await _process(payout, 3)
    process = _only(spans, "process s.x")
    assert process.kind == trace.SpanKind.CONSUMER
    # A child of the first message's publish span: its trace carries the handler's writes on.
    assert process.parent is not None and (process.parent.trace_id, process.parent.span_id) == (1, 101)
    assert process.context.trace_id == 1
    assert written == [_traceparent(1, process.context.span_id)]
    # And every message's trace is reachable from the work done for it.
    assert [(link.context.trace_id, link.context.span_id) for link in process.links] == [(1, 101), (2, 102), (3, 103)]
    assert process.attributes is not None
    assert process.attributes["messaging.batch.message_count"] == 3
    assert process.attributes["messaging.batch.links_dropped"] == 0
    assert process.attributes["messaging.destination.name"] == "s.x"
    assert process.attributes["messaging.consumer"] == "traced"


async def test_without_an_exporter_a_batchs_handler_still_carries_the_first_messages_trace(setup) -> None:  # type: ignore[no-untyped-def]
    payout, _provider, _path = setup
    assert not telemetry.recording()
    _msgs, written = await _process(payout, 3)
    assert written == [_traceparent(1, 101)], "the no-op tracer hands back the first message's context"


async def test_a_consumed_batch_is_recorded_as_its_producer_decided_whatever_the_ratio(  # type: ignore[no-untyped-def]
    setup,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OTEL_TRACES_SAMPLER=parentbased_traceidratio: the ratio decides new traces alone; an
    event's consumer follows the sampled flag its producer's trace context carries, so a trace is
    recorded whole (writer, publish, consumers) or not at all."""
    payout, _provider, _path = setup
    with _recorded(monkeypatch, _ratio(payout.settings, 0.0)) as exporter:
        _msgs, written = await _process(payout, 2, sampled=True)
        process = _only(exporter, "process s.x")
        assert process.context.trace_id == 1 and process.context.trace_flags.sampled
        assert written == [_traceparent(1, process.context.span_id)]
    with _recorded(monkeypatch, _ratio(payout.settings, 1.0)) as exporter:
        _msgs, written = await _process(payout, 2, sampled=False)
        assert not exporter.get_finished_spans(), "the producer's trace is not sampled: neither is its consumer's span"
        # Not recorded, still carried on: the handler's events continue trace 1, unsampled.
        (carried,) = written
        assert carried.split("-")[1] == f"{1:032x}" and not int(carried.split("-")[3], 16) & 1, carried


async def test_a_batch_whose_first_message_is_unsampled_is_recorded_in_its_first_sampled_ones_trace(  # type: ignore[no-untyped-def]
    setup,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under the first message's trace, unsampled, the batch's span was dropped: the sampled gift
    later in the batch lost its consumer's span, and the events written for it went on unsampled."""
    payout, _provider, _path = setup
    with _recorded(monkeypatch, _ratio(payout.settings, 0.0)) as exporter:
        _msgs, written = await _process(payout, 3, sampled=[False, True, True])
        process = _only(exporter, "process s.x")
        assert process.parent is not None and (process.parent.trace_id, process.parent.span_id) == (2, 102)
        assert process.context.trace_flags.sampled
        assert written == [_traceparent(2, process.context.span_id)]
        # Still linked to every message's trace, the unsampled first one's too.
        assert [link.context.trace_id for link in process.links] == [1, 2, 3]
    with _recorded(monkeypatch, _ratio(payout.settings, 1.0)) as exporter:
        _msgs, written = await _process(payout, 2, sampled=[False, False])
        assert not exporter.get_finished_spans(), "none sampled: under the first, dropped as before"
        assert written[0].split("-")[1] == f"{1:032x}"


def test_with_a_ratio_of_0_nothing_is_recorded_but_logs_and_events_still_carry_the_trace(  # type: ignore[no-untyped-def]
    setup,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    payout, _provider, _path = setup
    lines: list[dict[str, Any]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(JsonFormatter("test").format(record)))

    log = logging.getLogger("test_sampling")
    handler = Collect()
    log.addHandler(handler)
    try:
        with _recorded(monkeypatch, _ratio(payout.settings, 0.0)) as exporter:
            with telemetry.background_span("sweep gift", **{"gift.id": "g"}) as span:
                log.warning("swept")
                carried = inject_headers()["traceparent"]
            ctx = span.get_span_context()
            assert not ctx.trace_flags.sampled and not span.is_recording()
            assert not exporter.get_finished_spans()
    finally:
        log.removeHandler(handler)
    # The log line names the trace (what an error message tells the caller to look for), and the
    # events written in it carry it on, marked unsampled so their consumers record nothing either.
    assert lines[0]["trace_id"] == f"{ctx.trace_id:032x}" and lines[0]["span_id"] == f"{ctx.span_id:016x}"
    _version, trace_id, span_id, flags = carried.split("-")
    assert (trace_id, span_id) == (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
    assert not int(flags, 16) & 1, f"sampled flag set: {carried}"  # (02: the SDK's random trace id flag)


async def test_a_batch_links_at_most_batch_links_max_messages_and_counts_the_rest(  # type: ignore[no-untyped-def]
    setup,
    spans: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    payout, _provider, _path = setup
    monkeypatch.setattr(inbox, "BATCH_LINKS_MAX", 2)
    await _process(payout, 5)
    process = _only(spans, "process s.x")
    assert [link.context.trace_id for link in process.links] == [1, 2]
    assert process.attributes is not None and process.attributes["messaging.batch.links_dropped"] == 3


async def test_a_dead_letter_replay_names_its_event_and_cannot_link_to_its_trace(  # type: ignore[no-untyped-def]
    setup,
    spans: InMemorySpanExporter,
) -> None:
    payout, _provider, _path = setup

    async def handle(uow: Any, events: list[Any]) -> None:
        return None

    sub = Subscription(durable="traced", stream="S", subject="s.x", event_type=events_pb2.GiftSent, handle=handle)
    consumer = Consumer(payout.db, ConnectedBus(), common, sub, payout.settings)  # type: ignore[arg-type]
    event_id = uuid.uuid4().hex
    async with payout.db.unit_of_work() as uow:
        parked = await uow.conn.execute(
            insert(common.dead_letters).values(
                consumer="traced",
                subject="s.x",
                event_id=event_id,
                payload=events_pb2.GiftSent(event_id=event_id).SerializeToString(),
                error="failed",
                received_at_us=NOW_US,
            )
        )
        await uow.commit()
    assert await consumer.replay(parked.inserted_primary_key[0]) is not None
    replay = _only(spans, "replay s.x")
    # A parked row keeps no headers: the event id is what leads to the event's own trace (logs).
    assert replay.attributes is not None and replay.attributes["messaging.message.id"] == event_id
    assert not replay.links


async def test_a_group_commits_callers_link_to_the_caller_whose_trace_holds_the_shared_work(
    spans: InMemorySpanExporter,
) -> None:
    tracer = telemetry._tracer
    ran_in: list[trace.SpanContext] = []

    async def run(items: list[int]) -> list[int | BaseException]:
        ran_in.append(trace.get_current_span().get_span_context())
        return [i * 2 for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(run, 10, "traced")
    callers = [tracer.start_span(f"caller {n}") for n in range(3)]

    async def call(n: int) -> int:
        with trace.use_span(callers[n], end_on_exit=True):
            return await batcher.submit(n)

    assert await asyncio.gather(*(call(n) for n in range(3))) == [0, 2, 4]
    first = callers[0].get_span_context()
    assert ran_in == [first], "one batch, in the first caller's trace"
    finished = {s.name: s for s in spans.get_finished_spans()}
    for n in (1, 2):
        (link,) = finished[f"caller {n}"].links
        assert link.context == first
        assert link.attributes == {"livegifts.batcher": "traced", "livegifts.batch.size": 3}
    (event,) = finished["caller 0"].events
    assert event.attributes == {"livegifts.batcher": "traced", "livegifts.batch.size": 3}
    assert not finished["caller 0"].links
    # A lone caller shares nothing: its span says nothing of a batch.
    lone = tracer.start_span("lone caller")
    with trace.use_span(lone, end_on_exit=True):
        assert await batcher.submit(5) == 10
    assert not _only(spans, "lone caller").events and not _only(spans, "lone caller").links


async def test_a_shortfall_settler_round_with_work_has_a_trace_its_clawback_events_carry(  # type: ignore[no-untyped-def]
    setup,
    spans: InMemorySpanExporter,
) -> None:
    payout, _provider, _path = setup
    assert await payout.settle_shortfalls_once() == 0
    assert not spans.get_finished_spans(), "a round with nothing open makes no trace"
    reversal_id = uuid.uuid4().hex
    async with payout.db.unit_of_work() as uow:
        await uow.conn.execute(
            insert(clawback_shortfalls).values(
                reversal_event_id=reversal_id,
                purchase_id="p-viewer",
                sender_id="viewer",
                kind="CHARGED_BACK",
                coins_open=10,
                reversed_at_us=NOW_US,
                created_at_us=NOW_US,
                updated_at_us=NOW_US,
            )
        )
        await payout.credit_gifts(uow, [gift_event("creator-c", 40, at_s=NOW_US // 1_000_000 - 60)])
        await uow.commit()
    assert await payout.settle_shortfalls_once() == 10
    round_ = _only(spans, "settle shortfalls")
    assert round_.parent is None, "a root: a trace of its own"
    assert round_.attributes is not None and round_.attributes["clawback.coins_settled"] == 10
    assert [(e.name, dict(e.attributes or {})) for e in round_.events] == [
        ("shortfall settled", {"reversal.event_id": reversal_id, "coins": 10})
    ]
    # The clawback's events continue that trace (to the relay's publish and their consumers).
    async with payout.db.unit_of_work(readonly=True) as uow:
        headers = (await uow.conn.execute(select(common.outbox.c.subject, common.outbox.c.headers))).all()
    clawed = [json.loads(h) for subject, h in headers if subject.endswith("clawed_back")]
    assert clawed, headers
    for carrier in clawed:
        ctx = trace.get_current_span(propagate.extract(carrier)).get_span_context()
        assert ctx.trace_id == round_.context.trace_id


class SpendingWallet(ScriptedWallet):
    """SpendMany spends every item (balance 90 after)."""

    async def SpendMany(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        self.spend_many_calls += 1
        return wallet_pb2.SpendManyResponse(
            results=[
                wallet_pb2.SpendManyResult(
                    spent=wallet_pb2.SpendResponse(spend_id=s.idempotency_key, amount=s.amount, balance_after=90)
                )
                for s in req.spends
            ]
        )


async def _gift_sent_traces(g: Gifting) -> dict[str, tuple[int, int]]:
    """Each stored gift.sent event's trace context (trace id, parent span id: what its publish and
    its consumers continue), by gift event id."""
    o = gifting_common.outbox.c
    async with g.db.unit_of_work(readonly=True) as uow:
        rows = (await uow.conn.execute(select(o.event_id, o.headers).where(o.subject == "gifting.gift.sent"))).all()
    out = {}
    for event_id, headers in rows:
        ctx = trace.get_current_span(propagate.extract(json.loads(headers))).get_span_context()
        out[event_id] = (ctx.trace_id, ctx.span_id)
    return out


async def _concurrent_gifts(g: Gifting, callers: list[Callable[[], Any]]) -> list[str]:
    """One SendGift per caller at once, each inside `caller()` (a context manager); their gift event ids."""
    stream = await g.start_stream(gifting_pb2.StartStreamRequest(creator_id="c1", title="t", idempotency_key="s"))

    async def call(n: int) -> str:
        with callers[n]():
            receipt = await g.send_gift(
                gifting_pb2.SendGiftRequest(
                    stream_id=stream.stream_id, sender_id="v1", gift_id="panda", quantity=1, idempotency_key=f"k{n}"
                )
            )
        assert receipt.status == gifting_pb2.GIFT_STATUS_SENT
        return receipt.gift_event_id

    sent = await asyncio.gather(*(call(n) for n in range(len(callers))))
    assert g.wallet.spend_many_calls == 1, "the calls shared one batch"
    return list(sent)


def _incoming(trace_id: int, span_id: int) -> Callable[[], Any]:
    """A caller's incoming traceparent made current, as the server's interceptor does without an exporter."""
    return lambda: telemetry.remote_context([("traceparent", _traceparent(trace_id, span_id))])


async def test_without_an_exporter_each_batched_gifts_event_carries_its_own_callers_trace(tmp_path: Any) -> None:
    assert not telemetry.recording()
    async with gifting_on(tmp_path, SpendingWallet(wallet_pb2.CancelSpendResponse.OUTCOME_SPENT)) as (g, db):
        sent = await _concurrent_gifts(g, [_incoming(n, 100 + n) for n in (1, 2, 3)])
        traces = await _gift_sent_traces(g)
        assert [traces[e] for e in sent] == [(1, 101), (2, 102), (3, 103)]
        # SendGifts is one call: every gift's event carries its one trace.
        stream = await g.start_stream(gifting_pb2.StartStreamRequest(creator_id="c2", title="t", idempotency_key="s2"))
        item = gifting_pb2.SendGiftRequest
        with _incoming(9, 109)():
            resp = await g.send_gifts(
                gifting_pb2.SendGiftsRequest(
                    gifts=[
                        item(stream_id=stream.stream_id, sender_id="v2", gift_id="panda", quantity=1, idempotency_key=k)
                        for k in ("m1", "m2")
                    ]
                )
            )
        traces = await _gift_sent_traces(g)
        assert [traces[r.receipt.gift_event_id] for r in resp.results] == [(9, 109), (9, 109)]


async def test_without_a_trace_batched_gifts_events_carry_no_trace_context(tmp_path: Any) -> None:
    async with gifting_on(tmp_path, SpendingWallet(wallet_pb2.CancelSpendResponse.OUTCOME_SPENT)) as (g, db):
        sent = await _concurrent_gifts(g, [contextlib.nullcontext, _incoming(4, 104), contextlib.nullcontext])
        o = gifting_common.outbox.c
        async with g.db.unit_of_work(readonly=True) as uow:
            rows = (await uow.conn.execute(select(o.event_id, o.headers))).all()
        # By event id: the batch writes its events in feed order (event id), not its callers' order.
        stored = {event_id: json.loads(h) for event_id, h in rows}
        assert [("traceparent" in stored[e]) for e in sent] == [False, True, False], stored


async def test_with_spans_recorded_each_batched_gifts_event_continues_its_own_callers_span(
    tmp_path: Any, spans: InMemorySpanExporter
) -> None:
    async with gifting_on(tmp_path, SpendingWallet(wallet_pb2.CancelSpendResponse.OUTCOME_SPENT)) as (g, db):
        callers = [telemetry._tracer.start_span(f"caller {n}") for n in range(3)]
        sent = await _concurrent_gifts(g, [lambda s=s: trace.use_span(s, end_on_exit=True) for s in callers])
        traces = await _gift_sent_traces(g)
        expected = [(c.get_span_context().trace_id, c.get_span_context().span_id) for c in callers]
        assert len({t for t, _ in expected}) == 3
        assert [traces[e] for e in sent] == expected


def test_stored_headers_are_each_contexts_json_built_once_per_distinct_context() -> None:
    plain = propagate.extract({"traceparent": _traceparent(5, 105)})
    rich = propagate.extract({"traceparent": _traceparent(6, 106), "tracestate": "k=v", "baggage": "user=u1"})
    none = otel_context.Context()
    contexts = [plain, rich, none, plain, none]
    assert _stored_headers(contexts) == [json.dumps(inject_headers(c)) for c in contexts]
    # The trace context only: a caller's baggage is not stored (tests/unit/test_trace_propagation.py).
    assert json.loads(_stored_headers([rich])[0]) == {"traceparent": _traceparent(6, 106), "tracestate": "k=v"}


@dataclass
class _FailingMsg(_Msg):
    """A message the consumer will nak (its handler fails), once per delivery."""

    naked: list[float] = field(default_factory=list)

    async def nak(self, delay: float | None = None) -> None:
        self.naked.append(delay or 0.0)


async def test_a_failed_batchs_span_says_what_failed_but_not_the_statements_values(  # type: ignore[no-untyped-def]
    setup,
    spans: InMemorySpanExporter,
) -> None:
    # A database error's text holds its statement and bound values (tokens, birth dates, tips'
    # messages): OpenTelemetry's defaults put it on the span, as its status and an exception
    # event with the stack, for the trace store to keep, while the consumer's log line (repr)
    # and a dead letter's error (the class) had been kept free of them.
    from sqlalchemy.exc import IntegrityError

    payout, _provider, _path = setup

    async def handle(uow: Any, events: list[Any]) -> None:
        raise IntegrityError(
            "INSERT INTO t (token, born) VALUES (?, ?)", ("tok_secret_42", "1990-01-02"), Exception("x")
        )

    sub = Subscription(durable="traced", stream="S", subject="s.x", event_type=events_pb2.GiftSent, handle=handle)
    consumer = Consumer(payout.db, ConnectedBus(), common, sub, payout.settings)  # type: ignore[arg-type]
    msg = _FailingMsg(events_pb2.GiftSent(event_id=uuid.uuid4().hex).SerializeToString(), {})
    await consumer.process([msg])  # type: ignore[list-item]
    assert msg.naked and not msg.acked  # failed, to be redelivered
    process = _only(spans, "process s.x")
    assert process.status.status_code is trace.StatusCode.ERROR
    assert process.status.description == "IntegrityError"
    recorded = json.dumps([(e.name, dict(e.attributes or {})) for e in process.events])
    assert "IntegrityError" in recorded  # the class is still there to find
    for value in ("tok_secret_42", "1990-01-02", "INSERT INTO"):
        assert value not in recorded and value not in (process.status.description or "")


def test_a_background_items_span_ended_by_an_error_keeps_none_of_its_values(spans: InMemorySpanExporter) -> None:
    # The same for a swept gift, a dispatched withdrawal or a reconciled purchase (background_span).
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError), telemetry.background_span("sweep gift", **{"gift.event_id": "g1"}):
        raise IntegrityError("UPDATE t SET message = ?", ("call me on 555-0100",), Exception("x"))
    swept = _only(spans, "sweep gift")
    assert swept.parent is None and swept.attributes is not None and swept.attributes["gift.event_id"] == "g1"
    assert (swept.status.status_code, swept.status.description) == (trace.StatusCode.ERROR, "IntegrityError")
    recorded = json.dumps([(e.name, dict(e.attributes or {})) for e in swept.events])
    assert "555-0100" not in recorded and "UPDATE t" not in recorded and "IntegrityError" in recorded


async def test_a_swept_gift_the_round_passes_over_leaves_an_errored_trace(
    spans: InMemorySpanExporter, tmp_path: Any
) -> None:
    # ItemFailures caught the gift's error inside its background_span, which ended OK: the
    # errored `sweep gift` trace docs/sre.md sends one to was not there to find.
    import grpc

    wallet = OneSpendFailingWallet()
    async with gifting_on(tmp_path, wallet, group_commit=False, pending_timeout_s=0.001) as (g, db):
        ids = await pending_gifts(g, db, 3)
        wallet.failing = {ids[1]: grpc.StatusCode.DEADLINE_EXCEEDED}
        spans.clear()
        assert await g.sweep_once() == 2
    swept = {
        s.attributes["gift.event_id"]: s.status
        for s in spans.get_finished_spans()
        if s.name == "sweep gift" and s.attributes is not None
    }
    assert set(swept) == set(ids)
    assert swept[ids[1]].status_code == trace.StatusCode.ERROR and swept[ids[1]].description
    assert {swept[i].status_code for i in (ids[0], ids[2])} == {trace.StatusCode.UNSET}
