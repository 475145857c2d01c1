"""The bench's call split (`--trace-calls`): trace contexts sent, spans read, calls split into parts."""

from __future__ import annotations

import json
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bench.callsplit import PARTS, RECORDED, SPENT, TraceContext, read_spans, send_gift_spans, split


def test_every_call_carries_a_context_and_one_gift_in_n_is_sampled() -> None:
    tc = TraceContext(3)
    sent = [tc.metadata(sample=True) for _ in range(9)]
    sampled = [tid for _, tid in sent if tid is not None]
    assert len(sampled) == 3 and len(set(sampled)) == 3
    for (md, tid), n in zip(sent, range(1, 10), strict=True):
        ((name, header),) = md
        version, trace_id, span_id, flags = header.split("-")
        assert name == "traceparent" and version == "00"
        assert len(trace_id) == 32 and len(span_id) == 16
        assert flags == ("01" if n % 3 == 0 else "00")
        assert tid == (trace_id if n % 3 == 0 else None)
    # Calls that are not timed (tips, unlocks, batches) are never sampled and do not count.
    md, tid = tc.metadata(sample=False)
    assert tid is None and md[0][1].endswith("-00")
    later = [tc.metadata(sample=True)[1] for _ in range(3)]
    assert [t is not None for t in later] == [False, False, True], "the twelfth gift is the fourth sampled"


def _exported(tmp_path: Path) -> tuple[Path, str, dict[str, int]]:
    """A SendGift server span (with both step events) and two others, as the file exporter writes them."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    t0 = 1_764_600_000_000_000_000  # ns
    ms = 1_000_000
    span = tracer.start_span("/livegifts.gifting.v1.GiftingService/SendGift", kind=trace.SpanKind.SERVER, start_time=t0)
    span.add_event(RECORDED, timestamp=t0 + 4 * ms)
    span.add_event(SPENT, timestamp=t0 + 10 * ms)
    span.end(end_time=t0 + 13 * ms)
    refused = tracer.start_span("/livegifts.gifting.v1.GiftingService/SendGift", kind=trace.SpanKind.SERVER)
    refused.add_event(RECORDED)
    refused.end()  # no "coins spent": left out
    tracer.start_span("/livegifts.gifting.v1.GiftingService/SendTip", kind=trace.SpanKind.SERVER).end()
    path = tmp_path / "gifting.spans.jsonl"
    path.write_text("".join(s.to_json(indent=None) + "\n" for s in exporter.get_finished_spans()))
    marks = {"start": t0 // 1000, RECORDED: t0 // 1000 + 4000, SPENT: t0 // 1000 + 10_000, "end": t0 // 1000 + 13_000}
    return path, format(span.get_span_context().trace_id, "032x"), marks


def test_send_gift_spans_are_read_with_their_step_events(tmp_path: Path) -> None:
    path, trace_id, marks = _exported(tmp_path)
    spans = send_gift_spans(read_spans(path))
    assert spans == {trace_id: marks}
    assert read_spans(tmp_path / "missing.jsonl") == []
    torn = tmp_path / "torn.jsonl"
    torn.write_text(path.read_text() + '{"name": "/livegifts.gifting.v1.GiftingService/Send')
    assert send_gift_spans(read_spans(torn)) == spans, "a torn last line is skipped"
    assert json.loads(path.read_text().splitlines()[0])["kind"] == "SpanKind.SERVER"


def test_a_call_splits_into_the_time_before_each_step_and_after_the_handler(tmp_path: Path) -> None:
    path, trace_id, marks = _exported(tmp_path)
    spans = send_gift_spans(read_spans(path))
    sent, answered = marks["start"] - 30_000, marks["end"] + 2_000  # 30 ms before, 2 ms after
    got = split([(trace_id, sent, answered), ("0" * 32, sent, answered)], spans)
    assert got["calls"] == 1, "a trace id without a span is left out"
    assert {p: got["parts_ms"][p]["p50"] for p in PARTS} == {
        "before_handler": 30.0,
        "step1": 4.0,
        "step2": 6.0,
        "step3": 3.0,
        "after_handler": 2.0,
    }
    assert got["total_ms"]["p50"] == 45.0
    assert got["slowest"] == {"calls": 1, "total_ms": 45.0, "parts_ms": {p: got["parts_ms"][p]["p50"] for p in PARTS}}
    assert split([], spans) == {"calls": 0}


def test_the_slowest_calls_are_chosen_by_client_latency() -> None:
    spans = {
        f"{i:032x}": {
            "start": 1_000 * i + 10_000,
            RECORDED: 1_000 * i + 11_000,
            SPENT: 1_000 * i + 12_000,
            "end": 1_000 * i + 13_000,
        }
        for i in range(200)
    }
    # Call i waits (i % 7) ms before its handler and 3 ms in it: the slowest 1% (two calls) wait 6 ms.
    traced = [(f"{i:032x}", 1_000 * i + 10_000 - 1_000 * (i % 7), 1_000 * i + 13_000) for i in range(200)]
    got = split(traced, spans)
    assert got["calls"] == 200
    assert got["slowest"]["calls"] == 2
    assert got["slowest"]["parts_ms"]["before_handler"] == 6.0
    assert got["slowest"]["total_ms"] == 9.0
    assert got["parts_ms"]["step2"]["p99"] == 1.0
