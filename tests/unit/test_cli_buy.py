"""`livegifts buy`: what it prints of the purchase a wallet answered."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from livegifts.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from services.cli import main


class _Wallet:
    def __init__(self, channel: Any) -> None:
        pass

    def GetBalance(self, request: wallet_pb2.GetBalanceRequest, **kwargs: Any) -> wallet_pb2.Balance:  # noqa: N802
        return wallet_pb2.Balance(user_id=request.user_id, coins=700)


@pytest.mark.parametrize(
    ("status", "shown"), [(wallet_pb2.PURCHASE_STATUS_SUCCEEDED, "SUCCEEDED"), (11, "UNKNOWN(11)")], ids=str
)
def test_a_purchase_status_is_printed_by_name_or_as_its_number(
    monkeypatch: pytest.MonkeyPatch, status: int, shown: str
) -> None:
    # A newer wallet's status (proto3 enums are open): protobuf's Name() raised ValueError, and
    # `buy` ended in a traceback after the purchase had gone through.
    monkeypatch.setattr(wallet_pb2_grpc, "WalletServiceStub", _Wallet)
    monkeypatch.setattr(main, "_buy", lambda *_a, **_k: wallet_pb2.Purchase(purchase_id="p-1", status=status))
    result = CliRunner().invoke(main.app, ["buy", "bob", "--webhook-secret", "s"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"purchase p-1: {shown}; bob has 700 coins", result.stdout
