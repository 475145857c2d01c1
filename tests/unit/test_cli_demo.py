"""`livegifts demo` while payout credits nothing: it says what it waits for, then fails in a line.

The demo's last step waits for payout's consumer to credit the creator's diamonds. With NATS or
payout stopped that wait used to run for its whole length in silence. The gRPC stubs are
replaced by fakes here (the end-to-end demo runs against the real suite in
tests/integration/test_cli_demo.py).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from typer.testing import CliRunner

from livegifts.common.v1 import common_pb2
from livegifts.gifting.v1 import gifting_pb2_grpc
from livegifts.payout.v1 import payout_pb2, payout_pb2_grpc
from livegifts.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from services.cli import main


class _NotYet(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.NOT_FOUND


class _Gifting:
    def __init__(self, _channel: object) -> None:
        pass

    def StartStream(self, req: object, timeout: float) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(stream_id="s-1")

    def SendGift(self, req: Any, timeout: float) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(gift_event_id=f"ge-{req.gift_id}", coins=10, sender_balance=1_000)


class _Payout:
    """A payout whose consumer never credits: NOT_FOUND first (as a payout from before GetEarnings
    answered zeros for a creator never credited did), then an account with nothing."""

    calls = 0

    def __init__(self, _channel: object) -> None:
        pass

    def GetPolicy(self, req: object, timeout: float) -> payout_pb2.Policy:  # noqa: N802
        return payout_pb2.Policy(creator_share_bp=5_000)

    def GetEarnings(self, req: payout_pb2.GetEarningsRequest, timeout: float) -> payout_pb2.Earnings:  # noqa: N802
        _Payout.calls += 1
        if _Payout.calls < 3:
            raise _NotYet()
        return payout_pb2.Earnings(creator_id=req.creator_id, diamonds_lifetime=5)


def test_a_demo_whose_diamonds_do_not_come_says_what_it_waits_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wallet_pb2_grpc, "WalletServiceStub", lambda _channel: object())
    monkeypatch.setattr(gifting_pb2_grpc, "GiftingServiceStub", _Gifting)
    monkeypatch.setattr(payout_pb2_grpc, "PayoutServiceStub", _Payout)
    monkeypatch.setattr(
        main,
        "_buy",
        lambda *_a, **_k: wallet_pb2.Purchase(
            coins=1_400, price=common_pb2.Money(currency_code="USD", amount_minor=1999)
        ),
    )
    monkeypatch.setattr(main, "DEMO_PROGRESS_EVERY_S", 0.3, raising=False)
    result = CliRunner().invoke(main.app, ["demo", "--webhook-secret", "s", "--wait-s", "1.5"], env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    waits = [line for line in result.output.splitlines() if line.startswith("waiting for payout to credit")]
    # 4 gifts of 10 coins at 50%: 20 diamonds expected, 5 there once the account exists.
    assert len(waits) >= 2, result.output
    assert "0 of 20 diamonds" in waits[0] or "5 of 20 diamonds" in waits[0], result.output
    assert "5 of 20 diamonds" in waits[-1] and "gives up after 1.5 s" in waits[-1], result.output
    assert "has 5 diamonds, expected 20" in result.stderr, result.output
    assert "expected 20" not in result.stdout, result.stdout  # a failure, with the CLI's other failures


class _CreditingPayout(_Payout):
    """A payout whose consumer has credited the creator's share of the demo's gifts."""

    def GetEarnings(self, req: payout_pb2.GetEarningsRequest, timeout: float) -> payout_pb2.Earnings:  # noqa: N802
        return payout_pb2.Earnings(creator_id=req.creator_id, diamonds_lifetime=20, diamonds_available=20)


def test_a_demo_with_json_prints_one_object_at_the_end_and_its_steps_on_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    # A smoke test scripting the demo had "4. creator-... earned 20 diamonds ... OK" to parse for its ids.
    import json

    monkeypatch.setattr(wallet_pb2_grpc, "WalletServiceStub", lambda _channel: object())
    monkeypatch.setattr(gifting_pb2_grpc, "GiftingServiceStub", _Gifting)
    monkeypatch.setattr(payout_pb2_grpc, "PayoutServiceStub", _CreditingPayout)
    purchase = wallet_pb2.Purchase(
        purchase_id="p-1", coins=1_400, price=common_pb2.Money(currency_code="USD", amount_minor=1999)
    )
    monkeypatch.setattr(main, "_buy", lambda *_a, **_k: purchase)
    result = CliRunner().invoke(main.app, ["demo", "--webhook-secret", "s", "--json"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()
    answer = json.loads(line)
    creator = answer["creator_id"]
    assert creator.startswith("creator-") and answer["viewer_id"].startswith("viewer-"), answer
    assert answer["purchase"]["purchase_id"] == "p-1" and answer["stream_id"] == "s-1", answer
    assert [g["gift_id"] for g in answer["gifts"]] == ["rose", "panda", "galaxy", "love-bang"], answer
    # Each with its receipt's id, what `livegifts gift` takes to show where that gift stands.
    assert answer["gifts"][0] == {
        "gift_event_id": "ge-rose",
        "gift_id": "rose",
        "quantity": 7,
        "coins": 10,
        "sender_balance": 1_000,
    }, answer
    assert (answer["coins_sent"], answer["creator_share_bp"], answer["diamonds_expected"]) == (40, 5_000, 20), answer
    earnings = answer["earnings"]
    assert earnings["creator_id"] == creator and earnings["diamonds_lifetime"] == 20, earnings
    assert set(earnings) == {f.name for f in payout_pb2.Earnings.DESCRIPTOR.fields}  # as `earnings --json`
    # Every step, the last one too, as without --json.
    steps = result.stderr.splitlines()
    assert [ln[:2] for ln in steps] == ["1.", "2.", "3.", "3.", "3.", "3.", "4."], result.stderr
    assert steps[-1].startswith(f"4. {creator} earned 20 diamonds = 50% of 40 coins") and "OK" in steps[-1], steps
