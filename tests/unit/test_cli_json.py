"""`balance --json` and `earnings --json`: what a support script reads, one JSON object on stdout.

The prose lines ("bob: 700 coins", "... (+0/10000 of a diamond kept)") were all a script had to
parse, and `earnings` left out fields of its answer (the cash available, the clawback remainder).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from livegifts.common.v1 import common_pb2
from livegifts.payout.v1 import payout_pb2, payout_pb2_grpc
from livegifts.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from services.cli.main import app

_EARNINGS = payout_pb2.Earnings(
    creator_id="creator-1",
    diamonds_available=-20,
    diamonds_held=100,
    diamonds_withdrawn=300,
    diamonds_lifetime=500,
    coins_received=1000,
    remainder_units=7,
    diamonds_clawed_back=120,
    clawback_remainder_units=3,
    cash_available=[common_pb2.Money(currency_code="USD", amount_minor=-10)],
    withdrawals_held=True,
)


def _invoke(monkeypatch: pytest.MonkeyPatch, *args: str) -> Any:
    class Wallet:
        def __init__(self, channel: Any) -> None:
            pass

        def GetBalance(self, request: Any, **kwargs: Any) -> wallet_pb2.Balance:
            return wallet_pb2.Balance(user_id=request.user_id, coins=-40, debt_coins=40)

    class Payout:
        def __init__(self, channel: Any) -> None:
            pass

        def GetEarnings(self, request: Any, **kwargs: Any) -> payout_pb2.Earnings:
            return _EARNINGS

    monkeypatch.setattr(wallet_pb2_grpc, "WalletServiceStub", Wallet)
    monkeypatch.setattr(payout_pb2_grpc, "PayoutServiceStub", Payout)
    return CliRunner().invoke(app, list(args), env={"COLUMNS": None})


def test_balance_with_json_is_one_object_with_every_field(monkeypatch: pytest.MonkeyPatch) -> None:
    result = _invoke(monkeypatch, "balance", "bob", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"user_id": "bob", "coins": -40, "debt_coins": 40}, result.stdout
    assert set(json.loads(result.stdout)) == {f.name for f in wallet_pb2.Balance.DESCRIPTOR.fields}


def test_earnings_with_json_is_one_object_with_every_field(monkeypatch: pytest.MonkeyPatch) -> None:
    result = _invoke(monkeypatch, "earnings", "creator-1", "--json")
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()
    assert json.loads(line) == {
        "creator_id": "creator-1",
        "diamonds_available": -20,
        "diamonds_held": 100,
        "diamonds_withdrawn": 300,
        "diamonds_clawed_back": 120,
        "diamonds_lifetime": 500,
        "coins_received": 1000,
        "remainder_units": 7,
        "clawback_remainder_units": 3,
        "cash_available": [{"amount_minor": -10, "currency_code": "USD"}],
        "withdrawals_held": True,
    }, line
    # A field payout adds later is a field this answer shows: this fails until it is added.
    assert set(json.loads(line)) == {f.name for f in payout_pb2.Earnings.DESCRIPTOR.fields}


def test_without_json_they_print_their_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _invoke(monkeypatch, "balance", "bob").stdout == "bob: -40 coins\n"
    out = _invoke(monkeypatch, "earnings", "creator-1").stdout
    assert out.startswith("creator-1: -20 diamonds available, 500 lifetime"), out


@pytest.mark.parametrize(("last", "code"), [("ok", 0), ("in flight", 3), ("FAILED", 1)])
def test_audit_with_json_is_one_object_per_invariant_and_keeps_its_exit_codes(
    monkeypatch: pytest.MonkeyPatch, last: str, code: int
) -> None:
    # A cron job that alerts with the failed invariants' names had the table's box glyphs to parse.
    from services.cli import audit

    report = [audit.Check("1. ledger", audit.OK, "sum 0"), audit.Check("4a. credits", last, "w-1 not yet credited")]
    monkeypatch.setattr(audit, "wait_until_settled", lambda fetch, wait_s, progress: report)
    result = CliRunner().invoke(app, ["audit", "--json"], env={"COLUMNS": None})
    assert result.exit_code == code, result.output
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {"invariant": "1. ledger", "status": "ok", "detail": "sum 0"},
        {"invariant": "4a. credits", "status": last, "detail": "w-1 not yet credited"},
    ], result.stdout
