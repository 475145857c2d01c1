"""Background work is traced: a swept gift, a dispatched and a reconciled withdrawal.

The sweeper, the payout dispatcher and the reconciler act on their own, outside any call. Each
item they handle gets a trace of its own (`sweep gift`, `dispatch withdrawal`, `reconcile
withdrawal`) that holds the calls it makes (wallet, provider) and the events it writes, down to
their consumers; before, those calls were lone root spans, the events carried no trace context
and the consumers' spans began unrelated traces.

One suite of its own (SQLite): the wallet dies after committing a spend (its answer lost, so the
gift stays PENDING for the sweeper), gifting sweeps within seconds, and the payout provider
sends no callbacks, so the reconciler settles the withdrawal.
"""

from __future__ import annotations

import asyncio
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
from tests.integration.conftest import OPERATOR_TOKEN, WEBHOOK_SECRET, suite_config
from tests.integration.helpers import buy_coins, eventually, live_stream, uid
from tests.integration.payout_calls import gift_event, publish

OPERATOR = (("authorization", f"Bearer {OPERATOR_TOKEN}"), ("x-operator", "trace-test"))
SERVICES = ("wallet", "gifting", "payout")


@pytest.fixture
def suite(tmp_path: Path) -> Iterator[Suite]:
    """A suite whose wallet dies after its first spend commit, with fast background loops."""
    config = suite_config(
        tmp_path,
        {},
        {
            "wallet": {"LIVEGIFTS_WALLET_FAULTS": "wallet.after_spend_commit_before_answer"},
            "gifting": {"LIVEGIFTS_GIFTING_PENDING_TIMEOUT_S": "1", "LIVEGIFTS_GIFTING_SWEEP_INTERVAL_S": "0.3"},
            "payout": {
                "LIVEGIFTS_PAYOUT_DEV_PROVIDER_AUTO_CALLBACK": "false",
                "LIVEGIFTS_PAYOUT_RECONCILE_AFTER_S": "0.5",
                "LIVEGIFTS_PAYOUT_RECONCILE_INTERVAL_S": "0.3",
            },
        },
    )
    running = Suite(config)
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture
async def stubs(suite: Suite) -> AsyncIterator[dict[str, Any]]:
    """Stubs of the three services (fresh channels: the wallet restarts on a new port)."""
    chans: list[grpc.aio.Channel] = []

    def stub(svc: str) -> Any:
        chans.append(grpc.aio.insecure_channel(suite.addr(svc)))
        cls = {
            "wallet": wallet_pb2_grpc.WalletServiceStub,
            "gifting": gifting_pb2_grpc.GiftingServiceStub,
            "payout": payout_pb2_grpc.PayoutServiceStub,
        }[svc]
        return cls(chans[-1])

    yield {"stub": stub}
    await asyncio.gather(*(c.close() for c in chans))


def _spans(suite: Suite) -> list[dict[str, Any]]:
    """Every span the suite exported, each with its service."""
    return [{**s, "svc": svc} for svc in SERVICES for s in read_spans(suite.config.var_dir / f"{svc}.spans.jsonl")]


def _trace_id(span: dict[str, Any]) -> str:
    return str(span["context"]["trace_id"])


async def _trace_of(suite: Suite, root_name: str, attr: tuple[str, str | None], holds: list[tuple[str, str]]) -> None:
    """Wait until the root span `root_name` with attribute `attr` (value None: any) is exported and its trace holds a
    span of each (service, name ending) in `holds`; fail with what the trace has otherwise."""
    deadline = time.monotonic() + 60  # ends as soon as the trace is whole; three services export on a loaded machine
    seen: list[tuple[str, str]] = []
    while time.monotonic() < deadline:
        spans = _spans(suite)
        roots = [
            s
            for s in spans
            if s["name"] == root_name and attr[0] in s["attributes"] and attr[1] in (None, s["attributes"][attr[0]])
        ]
        for root in roots:
            assert root["parent_id"] is None, root
            seen = [(s["svc"], s["name"]) for s in spans if _trace_id(s) == _trace_id(root)]
            if all(any(svc == want_svc and name.endswith(want) for svc, name in seen) for want_svc, want in holds):
                return
        await asyncio.sleep(0.2)
    pytest.fail(f"no trace of {root_name} {attr} holding {holds}; it held {sorted(set(seen))}")


async def test_a_swept_gift_and_a_dispatched_and_reconciled_withdrawal_each_have_a_whole_trace(  # type: ignore[no-untyped-def]
    suite: Suite, stubs
) -> None:
    stub = stubs["stub"]
    wallet, gifting = stub("wallet"), stub("gifting")
    viewer, creator = uid("viewer"), uid("creator")
    await buy_coins(wallet, WEBHOOK_SECRET, viewer)
    stream = await live_stream(gifting, creator)
    # The wallet commits the spend and dies before answering: the gift stays PENDING.
    with pytest.raises(grpc.aio.AioRpcError):
        await gifting.SendGift(
            gifting_pb2.SendGiftRequest(
                stream_id=stream.stream_id, sender_id=viewer, gift_id="concert", quantity=1, idempotency_key=uid("g")
            )
        )
    proc = suite.procs["wallet"]
    await asyncio.to_thread(proc.wait, 10)
    suite.config.extra_env["wallet"].pop("LIVEGIFTS_WALLET_FAULTS")
    await asyncio.to_thread(suite.restart, "wallet")
    payout = stub("payout")
    earned = await eventually(
        lambda: payout.GetEarnings(payout_pb2.GetEarningsRequest(creator_id=creator)),
        lambda e: e.coins_received == 500,
        timeout_s=30,
    )
    assert earned.coins_received == 500, earned
    await _trace_of(
        suite,
        "sweep gift",
        ("gift.event_id", None),
        [
            ("wallet", "WalletService/CancelSpend"),
            ("gifting", "publish gifting.gift.sent"),
            ("payout", "process gifting.gift.sent"),
        ],
    )

    # A withdrawal: the dispatcher asks the wallet and submits it; no callback comes, so the
    # reconciler looks it up and applies the outcome (withdrawal.paid).
    await publish(suite.config.nats_url, [gift_event(creator, 40_000)])  # 20,000 diamonds, the $100 minimum
    await eventually(
        lambda: payout.GetEarnings(payout_pb2.GetEarningsRequest(creator_id=creator)),
        lambda e: e.coins_received == 40_500,
    )
    method = await payout.AddPayoutMethod(
        payout_pb2.AddPayoutMethodRequest(
            creator_id=creator,
            kind=payout_pb2.PAYOUT_METHOD_KIND_PAYPAL,
            paypal_email=f"{creator}@example.com",
            idempotency_key=uid("pm"),
        )
    )
    await payout.VerifyPayoutMethod(
        payout_pb2.VerifyPayoutMethodRequest(method_id=method.method_id, verified=True, idempotency_key=uid("v")),
        metadata=OPERATOR,
    )
    wd = await payout.RequestWithdrawal(
        payout_pb2.RequestWithdrawalRequest(
            creator_id=creator, diamonds=20_000, method_id=method.method_id, idempotency_key=uid("wd")
        )
    )
    paid = await eventually(
        lambda: payout.GetWithdrawal(payout_pb2.GetWithdrawalRequest(withdrawal_id=wd.withdrawal_id)),
        lambda w: w.status == payout_pb2.WITHDRAWAL_STATUS_PAID,
        timeout_s=30,
    )
    assert paid.status == payout_pb2.WITHDRAWAL_STATUS_PAID, paid
    await _trace_of(
        suite,
        "dispatch withdrawal",
        ("withdrawal.id", wd.withdrawal_id),
        [("wallet", "WalletService/GetAccountRestrictions")],
    )
    await _trace_of(
        suite,
        "reconcile withdrawal",
        ("withdrawal.id", wd.withdrawal_id),
        [("payout", "publish payout.withdrawal.paid")],
    )
