"""`balance --json` and `earnings --json`: what a support script reads, one JSON object on stdout.

The prose lines ("bob: 700 coins", "... (+0/10000 of a diamond kept)") were all a script had to
parse, and `earnings` left out fields of its answer (the cash available, the clawback remainder).
"""

from __future__ import annotations

import json
from typing import Any

import grpc
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


_PURCHASE = wallet_pb2.Purchase(
    purchase_id="p-1",
    user_id="bob",
    package_id="us-usd-700",
    coins=770,
    bonus_coins=70,
    promotion_id="promo-1",
    price=common_pb2.Money(currency_code="USD", amount_minor=999),
    payment_method=wallet_pb2.PAYMENT_METHOD_CARD,
    status=wallet_pb2.PURCHASE_STATUS_SUCCEEDED,
    checkout=wallet_pb2.CheckoutSession(provider="dev", session_id="cs-1"),
    region="US",
)


def test_buy_with_json_is_one_object_with_every_field_of_the_purchase_and_the_balance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A script that buys for a test user had "purchase p-1: SUCCEEDED; bob has 700 coins" to parse.
    from services.cli import main

    purchase = wallet_pb2.Purchase()
    purchase.CopyFrom(_PURCHASE)
    purchase.created_at.FromSeconds(1_700_000_000)
    purchase.updated_at.FromSeconds(1_700_000_001)
    monkeypatch.setattr(main, "_buy", lambda *_a, **_k: purchase)
    result = _invoke(monkeypatch, "buy", "bob", "--webhook-secret", "s", "--json")
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()
    answer = json.loads(line)
    assert answer == {
        "purchase": {
            "purchase_id": "p-1",
            "user_id": "bob",
            "package_id": "us-usd-700",
            "region": "US",
            "coins": 770,
            "bonus_coins": 70,
            "promotion_id": "promo-1",
            "price": {"amount_minor": 999, "currency_code": "USD"},
            "payment_method": "CARD",
            "status": "SUCCEEDED",
            "checkout": {"provider": "dev", "session_id": "cs-1", "redirect_url": ""},
            "created_at": "2023-11-14T22:13:20Z",
            "updated_at": "2023-11-14T22:13:21Z",
        },
        "balance": {"user_id": "bob", "coins": -40, "debt_coins": 40},  # as `balance --json` has it
    }, line
    # A field the wallet adds later is a field this answer shows: this fails until it is added.
    assert set(answer["purchase"]) == {f.name for f in wallet_pb2.Purchase.DESCRIPTOR.fields}
    assert set(answer["purchase"]["checkout"]) == {f.name for f in wallet_pb2.CheckoutSession.DESCRIPTOR.fields}
    assert answer["balance"] == json.loads(_invoke(monkeypatch, "balance", "bob", "--json").stdout)


def test_buy_with_json_keeps_its_failures_on_stderr_and_its_exit_codes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    # No secret to sign with: exit 1, stdout empty for `| jq` to read nothing rather than prose.
    result = _invoke(monkeypatch, "buy", "bob", "--var", str(tmp_path), "--json")
    assert result.exit_code == 1, result.output
    assert result.stdout == "" and "no secret to sign with" in result.stderr, (result.stdout, result.stderr)


def _replay_stub(outcome: int) -> type:
    from livegifts.common.v1 import dead_letters_pb2

    class Stub:
        def __init__(self, channel: Any) -> None:
            pass

        def ReplayDeadLetter(self, request: Any, **kwargs: Any) -> Any:
            d = dead_letters_pb2.DeadLetter(
                id=request.id,
                consumer="payout-gift-sent",
                subject="gifting.gift.sent",
                event_id="e7",
                payload_bytes=120,
                error="IntegrityError",
            )
            d.parked_at.FromSeconds(1_700_000_000)
            return dead_letters_pb2.ReplayDeadLetterResponse(dead_letter=d, outcome=outcome)

    return Stub


@pytest.mark.parametrize(("outcome", "shown"), [(1, "APPLIED"), (2, "DUPLICATE"), (9, "UNKNOWN(9)")])
def test_a_replay_with_json_is_one_object_with_its_outcome_key_and_the_event_as_the_list_shows_it(
    monkeypatch: pytest.MonkeyPatch, outcome: int, shown: str
) -> None:
    # "replayed 7: event e7 applied by payout-gift-sent" was all a script had to tell applied from duplicate.
    from livegifts.common.v1 import dead_letters_pb2_grpc

    monkeypatch.setattr(dead_letters_pb2_grpc, "DeadLetterServiceStub", _replay_stub(outcome))
    args = ["dead-letters", "replay", "7", "--service", "payout", "--operator-token", "t", "--idempotency-key", "k-1"]
    result = CliRunner().invoke(app, [*args, "--json"], env={"COLUMNS": None})
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()
    assert json.loads(line) == {
        "outcome": shown,
        "idempotency_key": "k-1",
        "dead_letter": {  # the fields and names of `dead-letters list --json`
            "service": "payout",
            "id": 7,
            "consumer": "payout-gift-sent",
            "subject": "gifting.gift.sent",
            "event_id": "e7",
            "parked_at": "2023-11-14T22:13:20Z",
            "payload_bytes": 120,
            "error": "IntegrityError",
        },
    }, line


def test_a_replay_with_json_that_keeps_failing_prints_nothing_on_stdout_and_exits_1(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from livegifts.common.v1 import dead_letters_pb2_grpc
    from services.cli import main

    class Lost(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "the answer was lost"

    class Stub:
        def __init__(self, channel: Any) -> None:
            pass

        def ReplayDeadLetter(self, request: Any, **kwargs: Any) -> Any:
            raise Lost()

    monkeypatch.setattr(dead_letters_pb2_grpc, "DeadLetterServiceStub", Stub)
    monkeypatch.setattr(main, "REPLAY_RETRY_PAUSES_S", (0.0, 0.0))
    args = ["dead-letters", "replay", "7", "--service", "payout", "--operator-token", "t", "--json"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": None})
    assert result.exit_code == 1, result.output
    assert result.stdout == "" and "--idempotency-key cli-replay-" in result.stderr, (result.stdout, result.stderr)
