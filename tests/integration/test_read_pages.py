"""Read side: paged lists refuse tokens they never gave with one stable reason, on every service."""

from __future__ import annotations

import base64

import grpc
import pytest

from livegifts.common.v1 import audit_pb2, audit_pb2_grpc
from livegifts.payout.v1 import payout_pb2
from livegifts.wallet.v1 import wallet_pb2
from tests.integration.helpers import expect_error, uid


def _token(text: str) -> str:
    """A page token shaped like payout's (url-safe base64 of "<micros>:<id>") with any content."""
    return base64.urlsafe_b64encode(text.encode()).decode()


FORGED_TOKENS = [
    pytest.param(_token(f"{2**63}:e"), id="instant past int64"),
    pytest.param(_token(f"{-(2**63) - 1}:e"), id="instant below int64"),
    pytest.param(_token("1:\x00"), id="nul in the id"),
    pytest.param("not a token", id="not base64"),
    # Forms int() and the lenient base64 decoder take but payout never gives, as the wallet's
    # ListTransactions and the audit's window tokens refuse theirs.
    pytest.param(_token(" 5:e"), id="a space before the instant"),
    pytest.param(_token("+5:e"), id="a plus sign"),
    pytest.param(_token("5_0:e"), id="an underscore in the instant"),
    pytest.param(_token("05:e"), id="a leading zero"),
    pytest.param(_token("\u0665:e"), id="another script's digit"),
    pytest.param("NT!pl", id="a character base64 has not"),  # "NTpl" is "5:e"
]


@pytest.mark.parametrize("token", FORGED_TOKENS)
async def test_payout_lists_refuse_a_forged_page_token_as_invalid_not_internal(clients, token: str) -> None:  # type: ignore[no-untyped-def]
    creator = uid("creator")
    await expect_error(
        clients.payout.ListEarnings(payout_pb2.ListEarningsRequest(creator_id=creator, page_token=token)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )
    await expect_error(
        clients.payout.ListWithdrawals(payout_pb2.ListWithdrawalsRequest(creator_id=creator, page_token=token)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )
    await expect_error(
        clients.payout.ListPayoutMethods(payout_pb2.ListPayoutMethodsRequest(creator_id=creator, page_token=token)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )


@pytest.mark.parametrize("token", ["-1", "0", str(2**63), "1\x00"])
async def test_the_wallet_refuses_a_forged_page_token_as_invalid_not_internal(clients, token: str) -> None:  # type: ignore[no-untyped-def]
    await expect_error(
        clients.wallet.ListTransactions(wallet_pb2.ListTransactionsRequest(user_id=uid("u"), page_token=token)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )


@pytest.mark.parametrize(
    ("service", "kind"), [("wallet", "spends"), ("gifting", "gifts"), ("payout", "earnings")], ids=str
)
async def test_audit_records_refuse_a_page_token_or_id_no_record_can_have(deployment, service: str, kind: str) -> None:  # type: ignore[no-untyped-def]
    async with grpc.aio.insecure_channel(getattr(deployment, f"{service}_addr")) as channel:
        audit = audit_pb2_grpc.AuditServiceStub(channel)
        await expect_error(
            audit.ListAuditRecords(audit_pb2.ListAuditRecordsRequest(kind=kind, page_token="a\x00")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PAGE_TOKEN",
        )
        for bad in (
            audit_pb2.ListAuditRecordsRequest(kind=kind, up_to="a\x00"),
            audit_pb2.ListAuditRecordsRequest(kind=kind, ids=["ok", "a\x00"]),
            audit_pb2.ListAuditRecordsRequest(kind=kind, after_id="a\x00"),
            audit_pb2.ListAuditRecordsRequest(kind=kind, since_us=1, after_id="a\x00", up_to="b"),
        ):
            err = await expect_error(audit.ListAuditRecords(bad), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ID")
            assert not bad.after_id or "after_id" in (err.details() or ""), err.details()
        # A window's id bounds that hold no id (after_id at or above up_to, by code point: "B" < "a")
        # are a caller's bug, named; the same bounds apart are a read like any other.
        for after_id, up_to in (("b", "b"), ("b", "a"), ("a", "B")):
            await expect_error(
                audit.ListAuditRecords(
                    audit_pb2.ListAuditRecordsRequest(kind=kind, since_us=1, after_id=after_id, up_to=up_to)
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_ID_RANGE",
            )
        page = await audit.ListAuditRecords(
            audit_pb2.ListAuditRecordsRequest(kind=kind, since_us=1, after_id="B", up_to="a", page_size=1)
        )
        assert page.since_applied
        # A window's page token is the (time, id) the servers made; anything else names the token.
        # Other scripts' digits too: str.isdigit() takes them, and int() refuses some ("²": INTERNAL).
        for token in ("e1", "x/e1", "-5/e1", "1" * 19 + "/e1", "\u00b2/e1", "\u0661\u0662/e1"):
            await expect_error(
                audit.ListAuditRecords(audit_pb2.ListAuditRecordsRequest(kind=kind, since_us=1, page_token=token)),
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_PAGE_TOKEN",
            )
        await expect_error(
            audit.ListAuditRecords(audit_pb2.ListAuditRecordsRequest(kind=kind, since_us=-1)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_SINCE",
        )
