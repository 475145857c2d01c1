"""`livegifts withdrawals --json`: the review queue for a script (`| jq`), one object per line.

A runbook or cron job that pages on withdrawals waiting too long had only the table to parse.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from typer.testing import CliRunner

from livegifts.common.v1 import common_pb2
from livegifts.payout.v1 import payout_pb2, payout_pb2_grpc
from services.cli.main import app

_HELD = payout_pb2.Withdrawal(
    withdrawal_id="w-held",
    creator_id="creator-1",
    method_id="m-1",
    diamonds=120_000,
    gross=common_pb2.Money(currency_code="USD", amount_minor=60_000),
    fee=common_pb2.Money(currency_code="USD", amount_minor=150),
    net=common_pb2.Money(currency_code="USD", amount_minor=59_850),
    status=payout_pb2.WITHDRAWAL_STATUS_APPROVED,
    policy_version=3,
    reviewed_by="ops-ann",
    requested_at=Timestamp(seconds=1_700_000_000),
    updated_at=Timestamp(seconds=1_700_000_060),
    hold=payout_pb2.WITHDRAWAL_HOLD_BALANCE_NEGATIVE,
)
_PAID = payout_pb2.Withdrawal(
    withdrawal_id="w-paid",
    creator_id="creator-2",
    status=payout_pb2.WITHDRAWAL_STATUS_PAID,
    provider_ref="tr_1",
    paid_at=Timestamp(seconds=1_700_000_120, nanos=500_000_000),
)


def _listing(withdrawals: list[payout_pb2.Withdrawal], *args: str) -> Any:
    """`withdrawals` answered one page of `withdrawals` by a stubbed payout, stdout no terminal."""

    class Stub:
        def __init__(self, channel: Any) -> None:
            pass

        def ListWithdrawals(self, request: Any, **kwargs: Any) -> payout_pb2.ListWithdrawalsResponse:
            return payout_pb2.ListWithdrawalsResponse(withdrawals=withdrawals)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(payout_pb2_grpc, "PayoutServiceStub", Stub)
        return CliRunner().invoke(app, ["withdrawals", "--operator-token", "t", *args], env={"COLUMNS": None})


def test_withdrawals_with_json_prints_one_object_per_withdrawal_with_every_field() -> None:
    result = _listing([_HELD, _PAID], "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows[0] == {
        "withdrawal_id": "w-held",
        "creator_id": "creator-1",
        "method_id": "m-1",
        "diamonds": 120_000,
        "gross": {"amount_minor": 60_000, "currency_code": "USD"},
        "fee": {"amount_minor": 150, "currency_code": "USD"},
        "net": {"amount_minor": 59_850, "currency_code": "USD"},
        "status": "APPROVED",
        "hold": "BALANCE_NEGATIVE",
        "policy_version": 3,
        "reviewed_by": "ops-ann",
        "failure_reason": "",
        "provider_ref": "",
        "requested_at": "2023-11-14T22:13:20Z",
        "updated_at": "2023-11-14T22:14:20Z",
        "paid_at": None,
    }, rows[0]
    assert (rows[1]["status"], rows[1]["hold"], rows[1]["paid_at"]) == ("PAID", "", "2023-11-14T22:15:20.500Z")
    assert len(rows) == 2, result.stdout


@pytest.mark.parametrize(
    ("withdrawals", "note"),
    [([], "no withdrawals PENDING_REVIEW"), ([_HELD, _PAID], "more withdrawals than --limit 1")],
    ids=["none", "cut"],
)
def test_withdrawals_with_json_keeps_its_notes_off_stdout(withdrawals: list[payout_pb2.Withdrawal], note: str) -> None:
    # `withdrawals --json | jq` reads every stdout line as a withdrawal: a note there breaks it.
    result = _listing(withdrawals, "--json", "--limit", "1")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["withdrawal_id"] for line in result.stdout.splitlines()] == [
        w.withdrawal_id for w in withdrawals[:1]
    ]
    assert note in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("args", "note"),
    [
        (["creator-1", "--status", "paid"], "no withdrawals PAID for creator-1"),
        (["creator-1"], "no withdrawals for creator-1"),
        (["--status", "approved"], "no withdrawals APPROVED"),  # across creators: none to name
    ],
)
def test_an_empty_answer_names_whose_withdrawals_were_asked_for(args: list[str], note: str) -> None:
    # As `transactions` says "no coin history for bob": "no withdrawals PAID" did not say whose.
    result = _listing([], *args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == note, result.stdout


def test_withdrawals_without_json_is_the_table() -> None:
    result = _listing([_HELD])
    assert result.exit_code == 0, result.output
    (row,) = [line for line in result.stdout.splitlines() if "w-held" in line]
    assert "APPROVED, held: BALANCE_NEGATIVE" in row and "60000 USD minor" in row, row


def test_withdrawals_json_names_every_field_of_a_withdrawal() -> None:
    # A field payout adds later is a field this answer shows: this fails until it is added.
    (row,) = [json.loads(line) for line in _listing([_HELD], "--json").stdout.splitlines()]
    assert set(row) == {f.name for f in payout_pb2.Withdrawal.DESCRIPTOR.fields}, row


# A newer payout's status and hold: numbers this CLI's protos lack (proto3 enums are open, so the
# answer carries them). protobuf's Name() raised ValueError, and the listing ended in a traceback.
_NEWER = payout_pb2.Withdrawal(withdrawal_id="w-newer", creator_id="creator-3", status=42, hold=9)


def test_a_status_and_hold_this_cli_does_not_know_show_as_their_numbers_in_the_table() -> None:
    result = _listing([_NEWER, _HELD])
    assert result.exit_code == 0, result.output
    (row,) = [line for line in result.stdout.splitlines() if "w-newer" in line]
    assert "UNKNOWN(42), held: UNKNOWN(9)" in row, row
    assert any("w-held" in line for line in result.stdout.splitlines()), result.stdout


def test_a_status_and_hold_this_cli_does_not_know_show_as_their_numbers_in_json() -> None:
    result = _listing([_NEWER, _HELD], "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["withdrawal_id"], r["status"], r["hold"]) for r in rows] == [
        ("w-newer", "UNKNOWN(42)", "UNKNOWN(9)"),
        ("w-held", "APPROVED", "BALANCE_NEGATIVE"),
    ], rows
