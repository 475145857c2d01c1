"""The load generator: a separate process of async gRPC clients driving a running suite.

`python -m bench.loadgen --plan plan.json --out out.json` (bench/run.py writes the plan). Every
phase is bounded twice, by a duration and by a count of calls, and seeded. Workers are a fixed
number of asyncio tasks (the concurrency), each calling in a loop: the same loop drives SendGift,
SendGifts, the mix with tips and unlocks, and the no-op ceiling, so their figures compare.

Calls are not retried: a benchmark counts errors, it does not hide them. Gifts the load leaves
PENDING (a timeout) are settled by the suite's sweeper; the audit afterwards proves it.

Diamonds lag, per gift: the time the client got SendGift's answer (wall clock, microseconds)
to the time this process received the `payout.diamonds.credited` event of the payout batch that
credited it. The batch is found exactly: payout's earnings row for the gift's event id carries
`credited_at`, which is the `occurred_at` of that batch's credited event for the creator. The
event is published only after payout's commit and JetStream's ack, so this lag is an upper
bound on "credited": it includes payout's outbox relay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import nats
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from bench.callsplit import TraceContext
from bench.diskprobe import FsyncProbe
from bench.noop import METHOD as NOOP_METHOD
from bench.stats import percentiles
from livegifts.gifting.v1 import gifting_pb2, gifting_pb2_grpc
from livegifts.payout.v1 import events_pb2 as payout_events_pb2
from livegifts.payout.v1 import payout_pb2, payout_pb2_grpc
from livegifts.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from services.common import signing
from services.common.clients import error_reason
from services.common.gc_tuning import GEN0_THRESHOLD, tune_gc
from services.wallet.payments import dev_event_payload

CALL_TIMEOUT_S = 10.0
SETUP_CONCURRENCY = 16
PACKAGE_ID = "us-usd-17500"  # the largest US package: one purchase funds a viewer's whole run
LAG_WAIT_S_MAX = 30.0
EARNINGS_PAGE_SIZE = 500


def _uid(prefix: str, rnd: random.Random) -> str:
    return f"{prefix}-{uuid.UUID(int=rnd.getrandbits(128)).hex[:16]}"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds() -> float:
    """CPU seconds used so far by every PostgreSQL process on this machine (its backends serve the suite).

    Backends that exit during a phase take their CPU with them, so this is a lower bound; the
    services keep pooled connections, so in practice their backends live through a phase.
    """
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if "(postgres)" in text[:64]:
            fields = text.rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


# The services' histograms read before and after each phase: group-commit batches (by batcher),
# consumer batches (by consumer), garbage-collector pauses (by generation), the event loop's lag
# (no label).
BATCH_HISTOGRAMS = {"livegifts_batch_items": "batcher", "livegifts_consumer_batch_size": "consumer"}
GC_HISTOGRAM = "livegifts_gc_pause_seconds"
LOOP_LAG_HISTOGRAM = "livegifts_event_loop_lag_seconds"
HISTOGRAMS = {**BATCH_HISTOGRAMS, GC_HISTOGRAM: "generation", LOOP_LAG_HISTOGRAM: ""}


def histogram_totals(urls: dict[str, str]) -> dict[str, dict[str, tuple[float, float]]]:
    """(count, sum) so far of each of HISTOGRAMS the services export: by metric, then "service/label"
    ("service" for a histogram without a label)."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for svc, url in urls.items():
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            label = HISTOGRAMS.get(family.name)
            if label is None:
                continue
            series = out.setdefault(family.name, {})
            for sample in family.samples:
                key = f"{svc}/{sample.labels[label]}" if label else svc
                count, total = series.get(key, (0.0, 0.0))
                if sample.name.endswith("_count"):
                    series[key] = (sample.value, total)
                elif sample.name.endswith("_sum"):
                    series[key] = (count, sample.value)
    return out


def histogram_deltas(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, tuple[int, float]]:
    """(count, mean) of what a histogram observed between two readings, by "service/label" (those it observed)."""
    out: dict[str, tuple[int, float]] = {}
    for key, (count, total) in sorted(after.items()):
        c0, t0 = before.get(key, (0.0, 0.0))
        if count > c0:
            out[key] = (int(count - c0), (total - t0) / (count - c0))
    return out


def phase_histograms(
    before: dict[str, dict[str, tuple[float, float]]], after: dict[str, dict[str, tuple[float, float]]]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A phase's batches (count and mean size, by "service/name"), GC pauses (count, mean ms, by
    "service/generation") and event-loop lag (wake-ups and their mean lateness in ms, by service),
    from two readings of `histogram_totals`."""
    batches: dict[str, Any] = {}
    for name in BATCH_HISTOGRAMS:
        for key, (n, mean) in histogram_deltas(before.get(name, {}), after.get(name, {})).items():
            batches[key] = {"batches": n, "mean_items": round(mean, 2)}

    def timed(name: str) -> dict[str, Any]:
        deltas = histogram_deltas(before.get(name, {}), after.get(name, {}))
        return {key: {"count": n, "mean_ms": round(mean * 1000, 2)} for key, (n, mean) in deltas.items()}

    return batches, timed(GC_HISTOGRAM), timed(LOOP_LAG_HISTOGRAM)


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = parts[3] + parts[4]  # idle + iowait
    return (sum(parts) - idle) / tick, sum(parts) / tick


@dataclass
class World:
    """Who takes part: funded viewers, live streams (one hot), content to unlock, the catalog."""

    viewers: list[str]
    fresh: list[str]  # funded viewers who have sent nothing yet: each sends one gift (fresh phases)
    streams: list[tuple[str, str]]  # (stream_id, creator_id)
    hot: tuple[str, str]
    contents: list[str]
    gift_ids: list[str]
    gift_weights: list[float]
    prices: dict[str, int]


@dataclass
class PhaseResult:
    """What one phase measured."""

    name: str
    op: str
    concurrency: int
    duration_s: float = 0.0
    calls: int = 0
    gifts_ok: int = 0  # gifts that came back SENT (for SendGifts: items)
    ops_ok: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    answered: list[tuple[str, str, int]] = field(default_factory=list)  # (gift event id, creator, answer wall us)
    lag_ms: list[float] = field(default_factory=list)
    lag_missing: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds each process used in the phase
    machine_busy_fraction: float = 0.0  # of all CPUs, everyone's processes included
    batches: dict[str, Any] = field(default_factory=dict)  # phase_histograms() of the phase
    gc_pauses: dict[str, Any] = field(default_factory=dict)
    loop_lag: dict[str, Any] = field(default_factory=dict)  # by service: wake-ups and mean lateness (looplag.py)
    disk: dict[str, Any] = field(default_factory=dict)  # the fsync probe's figures in the phase (diskprobe.py)
    traced: list[tuple[str, int, int]] = field(default_factory=list)  # (trace id, sent us, answered us): callsplit.py

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return {
            "name": self.name,
            "op": self.op,
            "concurrency": self.concurrency,
            "duration_s": round(self.duration_s, 3),
            "calls": self.calls,
            "calls_per_s": self.calls / self.duration_s if self.duration_s else 0.0,
            "gifts_ok": self.gifts_ok,
            "gifts_per_s": self.gifts_ok / self.duration_s if self.duration_s else 0.0,
            "ops_ok": dict(self.ops_ok),
            "errors": dict(self.errors),
            "latency_ms": {k: percentiles(v) | {"n": len(v)} for k, v in self.latencies_ms.items()},
            "lag_ms": percentiles(self.lag_ms) | {"n": len(self.lag_ms), "missing": self.lag_missing},
            "cpu_s": {k: round(v, 3) for k, v in self.cpu_s.items()},
            "cpu_ms_per_gift": {k: round(1000 * v / self.gifts_ok, 3) for k, v in self.cpu_s.items()}
            if self.gifts_ok
            else {},
            "machine_busy_fraction": round(self.machine_busy_fraction, 3),
            "batches": self.batches,
            "gc_pauses": self.gc_pauses,
            "loop_lag": self.loop_lag,
            "disk_fsync": self.disk,
            "traced": self.traced,
        }


class Load:
    """Async stubs of the suite and the no-op server, the credited-event listener, and the phases."""

    def __init__(self, plan: dict[str, Any]) -> None:
        self.plan = plan
        self.rnd = random.Random(plan["seed"])
        self.channels: list[grpc.aio.Channel] = []
        self.credited_at: dict[tuple[str, int], int] = {}  # (creator, occurred_at us) -> received wall us
        probe_path = plan.get("disk_probe_path")
        self.disk_probe = FsyncProbe(Path(probe_path)) if probe_path else None
        self.tracing = TraceContext(plan["trace_every"]) if plan.get("trace_every") else None

    def _channel(self, addr: str) -> grpc.aio.Channel:
        ch = grpc.aio.insecure_channel(addr)
        self.channels.append(ch)
        return ch

    async def run(self) -> dict[str, Any]:
        """Set up the world, run every phase in order, return the results."""
        p = self.plan
        self.wallet = wallet_pb2_grpc.WalletServiceStub(self._channel(p["wallet"]))
        self.gifting = gifting_pb2_grpc.GiftingServiceStub(self._channel(p["gifting"]))
        self.payout = payout_pb2_grpc.PayoutServiceStub(self._channel(p["payout"]))
        self.noop = self._channel(p["noop"]).unary_unary(NOOP_METHOD)
        nc = await nats.connect(p["nats"], connect_timeout=5, max_reconnect_attempts=3)
        await nc.subscribe("payout.diamonds.credited", cb=self._on_credited)
        try:
            t0 = time.monotonic()
            world = await self.setup()
            out: dict[str, Any] = {"setup_s": time.monotonic() - t0, "viewers": len(world.viewers), "phases": []}
            if self.disk_probe is not None:
                self.disk_probe.start()
            for phase in p["phases"]:
                result = await self.phase(world, phase)
                if result.answered:
                    await self.collect_lag(result)
                out["phases"].append(result.summary())
                print(f"phase {result.name}: {json.dumps(result.summary()['latency_ms'])[:200]}", flush=True)
            return out
        finally:
            if self.disk_probe is not None:
                self.disk_probe.stop()
            await nc.close()
            await asyncio.gather(*(c.close() for c in self.channels))

    async def _on_credited(self, msg: Any) -> None:
        received_us = time.time_ns() // 1000
        e = payout_events_pb2.DiamondsCredited.FromString(msg.data)
        self.credited_at.setdefault((e.creator_id, e.occurred_at.ToMicroseconds()), received_us)

    # ---- setup -------------------------------------------------------------------------------

    async def setup(self) -> World:
        """Fund viewers through signed purchase callbacks, start streams, publish unlockable content."""
        p, rnd = self.plan, self.rnd
        viewers = [_uid("bv", rnd) for _ in range(p["viewers"])]
        fresh = [_uid("fv", rnd) for _ in range(p.get("fresh_viewers", 0))]
        creators = [_uid("bc", rnd) for _ in range(p["creators"])]
        hot_creator = _uid("hot", rnd)
        sem = asyncio.Semaphore(SETUP_CONCURRENCY)

        async def fund(v: str) -> None:
            async with sem:
                purchase = await self.wallet.CreatePurchase(
                    wallet_pb2.CreatePurchaseRequest(
                        user_id=v,
                        package_id=PACKAGE_ID,
                        currency_code="USD",
                        payment_method=wallet_pb2.PAYMENT_METHOD_CARD,
                        idempotency_key=_uid("buy", rnd),
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
                payload = dev_event_payload(
                    _uid("evt", rnd),
                    "payment.succeeded",
                    purchase.purchase_id,
                    purchase.price.amount_minor,
                    purchase.price.currency_code,
                )
                answer = await self.wallet.HandlePaymentEvent(
                    wallet_pb2.HandlePaymentEventRequest(
                        provider="dev", payload=payload, signature=signing.sign(p["secret"].encode(), payload)
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
                assert answer.purchase.status == wallet_pb2.PURCHASE_STATUS_SUCCEEDED, answer

        async def stream(c: str) -> tuple[str, str]:
            async with sem:
                s = await self.gifting.StartStream(
                    gifting_pb2.StartStreamRequest(creator_id=c, title="bench", idempotency_key=_uid("start", rnd)),
                    timeout=CALL_TIMEOUT_S,
                )
                return s.stream_id, c

        async def content(c: str, price: int) -> str:
            async with sem:
                got = await self.gifting.CreateContent(
                    gifting_pb2.CreateContentRequest(
                        creator_id=c, title="bench content", price_coins=price, idempotency_key=_uid("content", rnd)
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
                return got.content_id

        await asyncio.gather(*(fund(v) for v in viewers + fresh))
        streams = await asyncio.gather(*(stream(c) for c in [*creators, hot_creator]))
        contents = await asyncio.gather(*(content(rnd.choice(creators), rnd.randint(1, 50)) for _ in range(20)))
        catalog = (await self.gifting.ListGifts(gifting_pb2.ListGiftsRequest(), timeout=CALL_TIMEOUT_S)).gifts
        # The catalog's price distribution: viewers send a gift with probability proportional to
        # 1 / price (roses are common, universes rare), which puts the mean near 6 coins.
        return World(
            viewers=viewers,
            fresh=fresh,
            streams=list(streams[:-1]),
            hot=streams[-1],
            contents=list(contents),
            gift_ids=[g.gift_id for g in catalog],
            gift_weights=[1.0 / g.price_coins for g in catalog],
            prices={g.gift_id: g.price_coins for g in catalog},
        )

    # ---- phases ------------------------------------------------------------------------------

    def _gift_request(self, world: World, hot: bool, fresh: bool = False) -> tuple[gifting_pb2.SendGiftRequest, str]:
        """A gift from a random viewer (with `fresh`, one who never sent anything: used up)."""
        rnd = self.rnd
        stream_id, creator = world.hot if hot else rnd.choice(world.streams)
        gift_id = rnd.choices(world.gift_ids, world.gift_weights)[0]
        quantity = 1 if rnd.random() < 0.8 else rnd.randint(2, 5)
        req = gifting_pb2.SendGiftRequest(
            stream_id=stream_id,
            sender_id=world.fresh.pop() if fresh else rnd.choice(world.viewers),
            gift_id=gift_id,
            quantity=quantity,
            idempotency_key=_uid("gift", rnd),
        )
        return req, creator

    async def phase(self, world: World, spec: dict[str, Any]) -> PhaseResult:
        """Run one phase: `concurrency` workers calling until the duration or the count runs out."""
        op, hot, batch = spec["op"], spec.get("hot", False), spec.get("batch_size", 100)
        fresh = spec.get("fresh", False)
        result = PhaseResult(spec["name"], op, spec["concurrency"])
        calls_left = min(spec["count_max"], len(world.fresh)) if fresh else spec["count_max"]
        mix = spec.get("mix", {"gift": 1.0})
        kinds, weights = list(mix), list(mix.values())
        rnd = self.rnd

        def record(kind: str, t0: float) -> None:
            result.latencies_ms.setdefault(kind, []).append((time.perf_counter() - t0) * 1000)

        async def one_call() -> None:
            kind = "noop" if op == "noop" else ("batch" if op == "batch" else rnd.choices(kinds, weights)[0])
            md, trace_id = self.tracing.metadata(sample=kind == "gift") if self.tracing else (None, None)
            t0 = time.perf_counter()
            try:
                if kind == "noop":
                    await self.noop(b"", timeout=CALL_TIMEOUT_S)
                elif kind == "gift":
                    req, creator = self._gift_request(world, hot, fresh)
                    sent_us = time.time_ns() // 1000
                    receipt = await self.gifting.SendGift(req, timeout=CALL_TIMEOUT_S, metadata=md)
                    answered_us = time.time_ns() // 1000
                    result.answered.append((receipt.gift_event_id, creator, answered_us))
                    if trace_id is not None:
                        result.traced.append((trace_id, sent_us, answered_us))
                    result.gifts_ok += 1
                elif kind == "batch":
                    reqs = [self._gift_request(world, hot) for _ in range(batch)]
                    answer = await self.gifting.SendGifts(
                        gifting_pb2.SendGiftsRequest(gifts=[r for r, _ in reqs]), timeout=CALL_TIMEOUT_S, metadata=md
                    )
                    now_us = time.time_ns() // 1000
                    for (_, creator), item in zip(reqs, answer.results, strict=True):
                        if item.HasField("receipt"):
                            result.answered.append((item.receipt.gift_event_id, creator, now_us))
                            result.gifts_ok += 1
                        else:
                            result.errors[f"item:{item.error.reason}"] += 1
                elif kind == "tip":
                    stream_id, _ = world.hot if hot else rnd.choice(world.streams)
                    await self.gifting.SendTip(
                        gifting_pb2.SendTipRequest(
                            stream_id=stream_id,
                            sender_id=rnd.choice(world.viewers),
                            coins=rnd.randint(1, 20),
                            message="gg",
                            idempotency_key=_uid("tip", rnd),
                        ),
                        timeout=CALL_TIMEOUT_S,
                        metadata=md,
                    )
                elif kind == "unlock":
                    await self.gifting.UnlockContent(
                        gifting_pb2.UnlockContentRequest(
                            user_id=rnd.choice(world.viewers),
                            content_id=rnd.choice(world.contents),
                            idempotency_key=_uid("unlock", rnd),
                        ),
                        timeout=CALL_TIMEOUT_S,
                        metadata=md,
                    )
                else:
                    raise ValueError(f"unknown op {kind}")
                result.ops_ok[kind] += 1
                record(kind, t0)
            except grpc.aio.AioRpcError as exc:
                result.errors[f"{kind}:{exc.code().name}:{error_reason(exc) or '-'}"] += 1

        deadline = time.monotonic() + spec["duration_s"]

        async def worker() -> None:
            nonlocal calls_left
            while time.monotonic() < deadline and calls_left > 0:
                calls_left -= 1
                result.calls += 1
                await one_call()

        profilers = self._start_profilers(spec)
        pids = {**self.plan.get("cpu_pids", {}), "loadgen": os.getpid()}
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        pg0 = postgres_cpu_seconds()
        metrics = self.plan.get("metrics", {})
        histograms0 = await asyncio.to_thread(histogram_totals, metrics)
        busy0, total0 = machine_busy()
        # Like the services (services/common/gc_tuning.py): what earlier phases kept (the world,
        # their latencies) is left out of collections, so no phase's calls wait for a full
        # collection of the load generator's growing heap.
        tune_gc(freeze=True, gen0_threshold=GEN0_THRESHOLD)
        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(spec["concurrency"])))
        result.duration_s = time.monotonic() - t0
        if self.disk_probe is not None:
            result.disk = self.disk_probe.window(t0, t0 + result.duration_s)
        busy1, total1 = machine_busy()
        result.cpu_s = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
        if self.plan.get("backend") == "postgres":
            result.cpu_s["postgres"] = postgres_cpu_seconds() - pg0
        result.machine_busy_fraction = (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
        histograms1 = await asyncio.to_thread(histogram_totals, metrics)
        result.batches, result.gc_pauses, result.loop_lag = phase_histograms(histograms0, histograms1)
        for proc in profilers:
            proc.wait(timeout=120)
        return result

    def _start_profilers(self, spec: dict[str, Any]) -> list[subprocess.Popen[bytes]]:
        """py-spy record of the named services for this phase's duration (bench/run.py --profile)."""
        prof = self.plan.get("profile")
        if not prof or prof["phase"] != spec["name"]:
            return []
        out_dir = Path(prof["dir"])
        out_dir.mkdir(parents=True, exist_ok=True)
        return [
            subprocess.Popen(
                [
                    prof["py_spy"],
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(int(spec["duration_s"])),
                    "--rate",
                    "200",
                    "--format",
                    "raw",
                    "--output",
                    str(out_dir / f"{prof['label']}-{svc}.txt"),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for svc, pid in prof["pids"].items()
        ]

    # ---- diamonds lag ------------------------------------------------------------------------

    async def collect_lag(self, result: PhaseResult) -> None:
        """Match each answered gift with the credited event of the payout batch that counted it."""
        wanted: dict[str, dict[str, int]] = {}
        for event_id, creator, answered_us in result.answered:
            wanted.setdefault(creator, {})[event_id] = answered_us
        credited: dict[str, int] = {}  # gift event id -> credited_at us (payout's batch timestamp)
        deadline = time.monotonic() + LAG_WAIT_S_MAX
        while True:
            for creator, ids in wanted.items():
                missing = {i for i in ids if i not in credited}
                if not missing:
                    continue
                token = ""
                while missing:
                    page = await self.payout.ListEarnings(
                        payout_pb2.ListEarningsRequest(
                            creator_id=creator, page_token=token, page_size=EARNINGS_PAGE_SIZE
                        ),
                        timeout=CALL_TIMEOUT_S,
                    )
                    for e in page.entries:
                        if e.event_id in missing:
                            credited[e.event_id] = e.credited_at.ToMicroseconds()
                            missing.discard(e.event_id)
                    token = page.next_page_token
                    if not token:
                        break
            if len(credited) == len(result.answered) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(0.5)  # the last credited events may still be on their way to us
        for creator, ids in wanted.items():
            for event_id, answered_us in ids.items():
                at = credited.get(event_id)
                received = self.credited_at.get((creator, at)) if at is not None else None
                if received is None:
                    result.lag_missing += 1
                else:
                    result.lag_ms.append((received - answered_us) / 1000)


def main() -> None:
    """`python -m bench.loadgen --plan plan.json --out out.json`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plan", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    plan = json.loads(args.plan.read_text())
    args.out.write_text(json.dumps(uvloop.run(Load(plan).run()), indent=1))


if __name__ == "__main__":
    main()
