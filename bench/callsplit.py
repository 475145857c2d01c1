"""Where a SendGift's time goes, call by call, from traces (`python -m bench.run --trace-calls N`).

The load generator sends a W3C trace context with every gifting call of a traced run and marks
one SendGift in N as sampled; it records when it sent each sampled call and when the answer came
back (wall clock, microseconds). The services record spans to files (OTEL_EXPORTER=file);
gifting's SendGift server span starts when the handler starts, after gRPC accepted the call and
read its request, and carries an event as step 1 ("gift recorded") and step 2 ("coins spent")
end (services/gifting/usecases.py `_settle`). Joined by trace id, each sampled call splits into:

- `before_handler`: from the client's send until the handler starts: the client's send, gRPC
  accepting the call (one call at a time per method in grpc.aio, in the server's event loop),
  and reading the request;
- `step1`: the gift recorded PENDING (eligibility, group-commit transaction);
- `step2`: the wallet's SpendMany for the batch the gift joined;
- `step3`: the gift marked SENT with its event, and the receipt;
- `after_handler`: from the handler's return until the client has the answer.

Every call then goes through the OpenTelemetry interceptors and the sampled spans are exported,
so a traced run answered ~15% fewer gifts per second than an untraced one here: it is for the
split, not for the headline figures.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

from bench.stats import percentiles

# The parts of a call, in order, and how the report heads them.
PARTS = {
    "before_handler": "before handler",
    "step1": "step 1",
    "step2": "step 2",
    "step3": "step 3",
    "after_handler": "after handler",
}
RECORDED, SPENT = "gift recorded", "coins spent"
SLOWEST_FRACTION = 0.01


class TraceContext:
    """The load generator's side: a `traceparent` for every gifting call, one SendGift in `every` sampled.

    Every call carries one, because a call without a parent would start a sampled trace of its
    own in the services. The ids come from an RNG of their own, so a traced run sends the same
    workload as an untraced one.
    """

    def __init__(self, every: int) -> None:
        self.every = every
        self._count = 0
        self._ids = random.Random()

    def metadata(self, *, sample: bool) -> tuple[tuple[tuple[str, str], ...], str | None]:
        """Call metadata, and the trace id (32 hex digits) if this call is sampled."""
        sampled = False
        if sample:
            self._count += 1
            sampled = self._count % self.every == 0
        trace_id = f"{self._ids.getrandbits(128) or 1:032x}"
        span_id = f"{self._ids.getrandbits(64) or 1:016x}"
        header = f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"
        return (("traceparent", header),), trace_id if sampled else None


def _us(iso: str) -> int:
    """An OpenTelemetry JSON timestamp ("2026-12-01T14:53:02.928874Z") as wall-clock microseconds."""
    d = datetime.fromisoformat(iso)
    return int(d.timestamp()) * 1_000_000 + d.microsecond


def read_spans(path: Path) -> list[dict[str, Any]]:
    """The spans a service exported to its file, one JSON object a line (none if there is no file).

    A line that is not whole JSON (the last one of a service killed while writing) is skipped:
    the split then counts one call fewer.
    """
    if not path.exists():
        return []
    spans = []
    for line in path.read_text().splitlines():
        try:
            spans.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return spans


def send_gift_spans(spans: Iterable[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Trace id (32 hex digits) -> the SendGift server span's start, step events and end, in us.

    Spans without both step events (a refused or failed gift) are left out.
    """
    out: dict[str, dict[str, int]] = {}
    for s in spans:
        if not s["name"].endswith("/SendGift") or s.get("kind") != "SpanKind.SERVER":
            continue
        events = {e["name"]: _us(e["timestamp"]) for e in s.get("events", [])}
        if RECORDED not in events or SPENT not in events:
            continue
        out[s["context"]["trace_id"].removeprefix("0x")] = {
            "start": _us(s["start_time"]),
            RECORDED: events[RECORDED],
            SPENT: events[SPENT],
            "end": _us(s["end_time"]),
        }
    return out


def split(traced: Iterable[tuple[str, int, int]], spans: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Each part's percentiles (ms) over the sampled calls found in `spans`, and the parts' means
    over the slowest 1% of them (by client latency)."""
    rows: list[tuple[float, ...]] = []
    for trace_id, sent_us, answered_us in traced:
        s = spans.get(trace_id)
        if s is None:
            continue
        marks = (sent_us, s["start"], s[RECORDED], s[SPENT], s["end"], answered_us)
        rows.append(tuple((b - a) / 1000 for a, b in pairwise(marks)))
    if not rows:
        return {"calls": 0}
    slow_n = max(1, round(len(rows) * SLOWEST_FRACTION))
    slowest = sorted(rows, key=sum, reverse=True)[:slow_n]
    return {
        "calls": len(rows),
        "total_ms": percentiles([sum(r) for r in rows]),
        "parts_ms": {p: percentiles([r[i] for r in rows]) for i, p in enumerate(PARTS)},
        "slowest": {
            "calls": slow_n,
            "total_ms": sum(sum(r) for r in slowest) / slow_n,
            "parts_ms": {p: sum(r[i] for r in slowest) / slow_n for i, p in enumerate(PARTS)},
        },
    }
