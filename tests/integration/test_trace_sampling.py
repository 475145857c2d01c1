"""OTEL_TRACES_SAMPLER=parentbased_traceidratio: a trace is recorded whole, across gRPC and NATS,
or not at all, and one not recorded still carries its trace id on.

One suite of its own (SQLite) that records no new trace (ratio 0): a gift sent without a trace
context leaves no span in any service, though its log lines still name a trace; a gift sent by a
caller whose `traceparent` says sampled is recorded in every service it reaches (gifting's call,
the wallet's spend, the publish, payout's consumer), as that caller decided.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from bench.callsplit import read_spans
from livegifts.gifting.v1 import gifting_pb2, gifting_pb2_grpc
from livegifts.payout.v1 import payout_pb2, payout_pb2_grpc
from livegifts.wallet.v1 import wallet_pb2_grpc
from services.cli.suite import Suite
from tests.integration.conftest import WEBHOOK_SECRET, running_suite
from tests.integration.helpers import buy_coins, eventually, live_stream, uid

SERVICES = ("wallet", "gifting", "payout")
SAMPLED_TRACE = "5ce0e9a56015fec5aadfa328ae398115"


@pytest.fixture
def suite(tmp_path: Path) -> Iterator[Suite]:
    """A suite that records no new trace, only those a caller's trace context says are sampled."""
    sampling = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}
    with running_suite("sqlite", tmp_path, "", {s: dict(sampling) for s in SERVICES}) as running:
        yield running


@pytest.fixture
async def stubs(suite: Suite) -> AsyncIterator[dict[str, Any]]:
    """A stub of each service."""
    channels = {svc: grpc.aio.insecure_channel(suite.addr(svc)) for svc in SERVICES}
    yield {
        "wallet": wallet_pb2_grpc.WalletServiceStub(channels["wallet"]),
        "gifting": gifting_pb2_grpc.GiftingServiceStub(channels["gifting"]),
        "payout": payout_pb2_grpc.PayoutServiceStub(channels["payout"]),
    }
    await asyncio.gather(*(c.close() for c in channels.values()))


def _spans(suite: Suite) -> list[dict[str, Any]]:
    """Every span the suite exported, each with its service."""
    return [{**s, "svc": svc} for svc in SERVICES for s in read_spans(suite.config.var_dir / f"{svc}.spans.jsonl")]


def _logged_trace_ids(suite: Suite) -> set[str]:
    """The trace ids the services' log lines name."""
    ids = set()
    for svc in SERVICES:
        for line in (suite.config.var_dir / "logs" / f"{svc}.log").read_text().splitlines():
            if line.startswith("{") and "trace_id" in line:
                ids.add(json.loads(line)["trace_id"])
    return ids


async def test_a_trace_is_recorded_whole_as_its_first_caller_decided(suite: Suite, stubs: dict[str, Any]) -> None:
    wallet, gifting, payout = stubs["wallet"], stubs["gifting"], stubs["payout"]
    viewer, creator = uid("viewer"), uid("creator")
    await buy_coins(wallet, WEBHOOK_SECRET, viewer)
    stream = await live_stream(gifting, creator)

    def send(metadata: tuple[tuple[str, str], ...] = ()) -> Any:
        request = gifting_pb2.SendGiftRequest(
            stream_id=stream.stream_id, sender_id=viewer, gift_id="rose", quantity=1, idempotency_key=uid("g")
        )
        return gifting.SendGift(request, metadata=metadata)

    # Not sampled (no trace context, ratio 0): consumed at payout, and no span anywhere.
    await send()
    await eventually(
        lambda: payout.GetEarnings(payout_pb2.GetEarningsRequest(creator_id=creator)),
        lambda e: e.coins_received > 0,
    )
    # A call that logs (a refused operator token), still unsampled: its line names its trace.
    with pytest.raises(grpc.aio.AioRpcError):
        await gifting.UpsertGift(
            gifting_pb2.UpsertGiftRequest(gift_id="rose", name="Rose", price_coins=1),
            metadata=(("authorization", "Bearer not-the-operator-token"),),
        )
    logged = await eventually(lambda: asyncio.to_thread(_logged_trace_ids, suite), bool, timeout_s=30)
    assert all(len(trace_id) == 32 and int(trace_id, 16) for trace_id in logged), logged
    assert _spans(suite) == []
    # A caller whose trace is sampled: each service it reaches records its part of that trace.
    await send((("traceparent", f"00-{SAMPLED_TRACE}-00f067aa0ba902b7-01"),))
    wanted = {
        ("gifting", "GiftingService/SendGift"),
        ("wallet", "WalletService/SpendMany"),
        ("gifting", "publish gifting.gift.sent"),
        ("payout", "process gifting.gift.sent"),
    }
    deadline = time.monotonic() + 60  # each service exports its spans every 200 ms; a loaded machine takes longer
    while time.monotonic() < deadline:
        spans = _spans(suite)
        seen = {(s["svc"], name) for s in spans for name in {n for _, n in wanted} if s["name"].endswith(name)}
        if wanted <= seen:
            break
        await asyncio.sleep(0.2)
    assert wanted <= seen, seen
    assert {s["context"]["trace_id"] for s in spans} == {f"0x{SAMPLED_TRACE}"}, "only the sampled trace"
