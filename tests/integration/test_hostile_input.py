"""The nastiest inputs per RPC (both backends): each is refused with its code and stable reason.

A table, not a fuzzer: values an exploration over every RPC found to reach deep code (NULs and
control characters, lone format characters, over-long strings, int64 extremes, forged page
tokens, timestamps outside 0001..9999, non-ASCII digits, undecodable bodies). None may answer
INTERNAL or UNKNOWN, answer without an ErrorInfo reason, or answer differently per backend.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import grpc
import pytest

from livegifts.common.v1 import audit_pb2, dead_letters_pb2
from livegifts.gifting.v1 import gifting_pb2 as G
from livegifts.payout.v1 import payout_pb2 as P
from livegifts.wallet.v1 import wallet_pb2 as W
from services.common import signing
from tests.integration.helpers import expect_error, live_stream, reason_of, uid

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


def _stats(**edges: tuple[int, int]) -> G.GetCreatorStatsRequest:
    req = G.GetCreatorStatsRequest(creator_id="creator")
    for name, (seconds, nanos) in edges.items():
        getattr(req, name).seconds, getattr(req, name).nanos = seconds, nanos
    return req


def _bank(**fields: str) -> P.AddPayoutMethodRequest:
    return P.AddPayoutMethodRequest(
        creator_id="creator", kind=P.PAYOUT_METHOD_KIND_BANK, holder_name="A Creator", idempotency_key="k", **fields
    )


# (label, service, method, request, operator?, code, reason)
CASES: list[tuple[str, str, str, Any, bool, grpc.StatusCode, str]] = [
    # wallet
    ("balance of an empty user", "wallet", "GetBalance", W.GetBalanceRequest(), False, INVALID, "MISSING_FIELD"),
    (
        "balance of a NUL user",
        "wallet",
        "GetBalance",
        W.GetBalanceRequest(user_id="\x00"),
        False,
        INVALID,
        "INVALID_ID",
    ),
    (
        "balance of a SQL-looking user",
        "wallet",
        "GetBalance",
        W.GetBalanceRequest(user_id="' OR 1=1 --"),
        False,
        INVALID,
        "INVALID_ID",
    ),
    (
        "balance of a zero-width joiner",
        "wallet",
        "GetBalance",
        W.GetBalanceRequest(user_id="\u200d"),
        False,
        INVALID,
        "INVALID_ID",
    ),
    (
        "balance of 129 emoji",
        "wallet",
        "GetBalance",
        W.GetBalanceRequest(user_id="\U0001f600" * 129),
        False,
        INVALID,
        "INVALID_ID",
    ),
    (
        "transactions after a NUL token",
        "wallet",
        "ListTransactions",
        W.ListTransactionsRequest(user_id="u", page_token="\x00"),
        False,
        INVALID,
        "INVALID_PAGE_TOKEN",
    ),
    (
        "transactions after a token past int64",
        "wallet",
        "ListTransactions",
        W.ListTransactionsRequest(user_id="u", page_token=str(INT64_MAX + 1)),
        False,
        INVALID,
        "INVALID_PAGE_TOKEN",
    ),
    (
        "transactions after a 100k-digit token",
        "wallet",
        "ListTransactions",
        W.ListTransactionsRequest(user_id="u", page_token="9" * 100_000),
        False,
        INVALID,
        "INVALID_PAGE_TOKEN",
    ),
    (
        "transactions in pages of int32 max",
        "wallet",
        "ListTransactions",
        W.ListTransactionsRequest(user_id="u", page_size=2**31 - 1),
        False,
        INVALID,
        "INVALID_PAGE_SIZE",
    ),
    (
        "a spend of int64 max",
        "wallet",
        "Spend",
        W.SpendRequest(user_id="u", amount=INT64_MAX, reason=W.SPEND_REASON_TIP, reference_id="r", idempotency_key="k"),
        False,
        INVALID,
        "AMOUNT_TOO_LARGE",
    ),
    (
        "a spend of int64 min",
        "wallet",
        "Spend",
        W.SpendRequest(user_id="u", amount=INT64_MIN, reason=W.SPEND_REASON_TIP, reference_id="r", idempotency_key="k"),
        False,
        INVALID,
        "AMOUNT_NOT_POSITIVE",
    ),
    (
        "a spend for an unknown reason",
        "wallet",
        "Spend",
        W.SpendRequest(user_id="u", amount=1, reason=99, reference_id="r", idempotency_key="k"),
        False,
        INVALID,
        "INVALID_REASON",
    ),
    (
        "a spend keyed by a NUL",
        "wallet",
        "Spend",
        W.SpendRequest(user_id="u", amount=1, reason=W.SPEND_REASON_TIP, reference_id="r", idempotency_key="\x00"),
        False,
        INVALID,
        "INVALID_IDEMPOTENCY_KEY",
    ),
    (
        "a spend keyed by 129 characters",
        "wallet",
        "Spend",
        W.SpendRequest(user_id="u", amount=1, reason=W.SPEND_REASON_TIP, reference_id="r", idempotency_key="k" * 129),
        False,
        INVALID,
        "INVALID_IDEMPOTENCY_KEY",
    ),
    (
        "a spend for a NUL recipient",
        "wallet",
        "Spend",
        W.SpendRequest(
            user_id="u",
            amount=1,
            reason=W.SPEND_REASON_TIP,
            reference_id="r",
            idempotency_key="k",
            recipient_user_id="\x00",
        ),
        False,
        INVALID,
        "INVALID_ID",
    ),
    (
        "501 spends at once",
        "wallet",
        "SpendMany",
        W.SpendManyRequest(
            spends=[W.SpendRequest(user_id="u", amount=1, reason=1, idempotency_key=f"k{i}") for i in range(501)]
        ),
        False,
        INVALID,
        "INVALID_BATCH_SIZE",
    ),
    (
        "a purchase by an unknown method",
        "wallet",
        "CreatePurchase",
        W.CreatePurchaseRequest(
            user_id="u", package_id="us-usd-700", currency_code="USD", payment_method=99, idempotency_key="k"
        ),
        False,
        INVALID,
        "INVALID_PAYMENT_METHOD",
    ),
    (
        "a purchase in a NUL region",
        "wallet",
        "CreatePurchase",
        W.CreatePurchaseRequest(
            user_id="u",
            package_id="us-usd-700",
            currency_code="USD",
            payment_method=1,
            region="\x00",
            idempotency_key="k",
        ),
        False,
        INVALID,
        "INVALID_REGION",
    ),
    (
        "a NUL birth date",
        "wallet",
        "SetAccountRestrictions",
        W.SetAccountRestrictionsRequest(user_id="u", birth_date="\x00", idempotency_key="k"),
        False,
        INVALID,
        "INVALID_BIRTH_DATE",
    ),
    (
        "a birth date in Arabic-Indic digits",
        "wallet",
        "SetAccountRestrictions",
        W.SetAccountRestrictionsRequest(user_id="u", birth_date="١٩٩٠-٠١-٠٢", idempotency_key="k"),
        False,
        INVALID,
        "INVALID_BIRTH_DATE",
    ),
    (
        "a daily cap of int64 max",
        "wallet",
        "SetSpendingLimits",
        W.SetSpendingLimitsRequest(user_id="u", daily=INT64_MAX, idempotency_key="k"),
        False,
        INVALID,
        "INVALID_LIMIT",
    ),
    (
        "a cap set by an unknown setter",
        "wallet",
        "SetSpendingLimits",
        W.SetSpendingLimitsRequest(user_id="u", daily=1, set_by=99, idempotency_key="k"),
        False,
        INVALID,
        "INVALID_SETTER",
    ),
    (
        "501 restrictions at once",
        "wallet",
        "GetAccountRestrictionsMany",
        W.GetAccountRestrictionsManyRequest(user_ids=["u"] * 501),
        False,
        INVALID,
        "INVALID_BATCH_SIZE",
    ),
    (
        "a package without the operator token",
        "wallet",
        "UpsertCoinPackage",
        W.UpsertCoinPackageRequest(package_id="p"),
        False,
        grpc.StatusCode.UNAUTHENTICATED,
        "OPERATOR_TOKEN_MISSING",
    ),
    (
        "a package of int64 max coins",
        "wallet",
        "UpsertCoinPackage",
        W.UpsertCoinPackageRequest(
            package_id="p", region="US", currency_code="USD", coins=INT64_MAX, price_minor=1, idempotency_key="k"
        ),
        True,
        INVALID,
        "AMOUNT_TOO_LARGE",
    ),
    (
        "a promotion starting at int64 max seconds",
        "wallet",
        "UpsertPromotion",
        W.UpsertPromotionRequest(
            promotion=W.Promotion(
                promotion_id="pr",
                package_id="us-usd-700",
                bonus_coins=1,
                starts_at={"seconds": INT64_MAX},
                ends_at={"seconds": INT64_MAX},
            ),
            idempotency_key="k",
        ),
        True,
        INVALID,
        "INVALID_PROMOTION",
    ),
    (
        "a payment callback from a 16 KiB provider",
        "wallet",
        "HandlePaymentEvent",
        W.HandlePaymentEventRequest(provider="p" * 16_384, payload=b"{}", signature="t=1,v1=0"),
        False,
        INVALID,
        "UNKNOWN_PROVIDER",
    ),
    (
        "a payment signature with non-ASCII digits",
        "wallet",
        "HandlePaymentEvent",
        W.HandlePaymentEventRequest(provider="dev", payload=b"{}", signature="t=١٧٠٠٠٠٠٠٠٠,v1=ÿ"),
        False,
        grpc.StatusCode.UNAUTHENTICATED,
        "SIGNATURE_MALFORMED",
    ),
    (
        "audit records after a NUL",
        "wallet",
        "ListAuditRecords",
        audit_pb2.ListAuditRecordsRequest(kind="spends", page_token="\x00"),
        True,
        INVALID,
        "INVALID_PAGE_TOKEN",
    ),
    (
        "a dead letter of id int64 min",
        "wallet",
        "ReplayDeadLetter",
        dead_letters_pb2.ReplayDeadLetterRequest(id=INT64_MIN, idempotency_key="k"),
        True,
        INVALID,
        "MISSING_FIELD",
    ),
    # gifting
    (
        "stats from before the year 1",
        "gifting",
        "GetCreatorStats",
        _stats(**{"from": (-62_135_596_801, 0)}),
        False,
        INVALID,
        "INVALID_WINDOW",
    ),
    (
        "stats to the year 10000",
        "gifting",
        "GetCreatorStats",
        _stats(to=(253_402_300_800, 0)),
        False,
        INVALID,
        "INVALID_WINDOW",
    ),
    (
        "stats to int64 min seconds",
        "gifting",
        "GetCreatorStats",
        _stats(to=(INT64_MIN, 0)),
        False,
        INVALID,
        "INVALID_WINDOW",
    ),
    (
        "stats from a second and a nanosecond",
        "gifting",
        "GetCreatorStats",
        _stats(**{"from": (0, 1_000_000_000)}),
        False,
        INVALID,
        "INVALID_WINDOW",
    ),
    (
        "a leaderboard of int32 max",
        "gifting",
        "GetLeaderboard",
        G.GetLeaderboardRequest(stream_id="s", limit=2**31 - 1),
        False,
        INVALID,
        "INVALID_LIMIT",
    ),
    (
        "a leaderboard over an unknown window",
        "gifting",
        "GetLeaderboard",
        G.GetLeaderboardRequest(stream_id="s", window=99),
        False,
        INVALID,
        "INVALID_WINDOW",
    ),
    (
        "a gift on a NUL stream",
        "gifting",
        "SendGift",
        G.SendGiftRequest(stream_id="\x00", sender_id="u", gift_id="rose", quantity=1, idempotency_key="k"),
        False,
        INVALID,
        "INVALID_ID",
    ),
    (
        "101 gifts at once",
        "gifting",
        "SendGifts",
        G.SendGiftsRequest(
            gifts=[
                G.SendGiftRequest(stream_id="s", sender_id="u", gift_id="rose", quantity=1, idempotency_key=f"k{i}")
                for i in range(101)
            ]
        ),
        False,
        INVALID,
        "INVALID_BATCH_SIZE",
    ),
    (
        "a tip of int64 max",
        "gifting",
        "SendTip",
        G.SendTipRequest(stream_id="s", sender_id="u", coins=INT64_MAX, idempotency_key="k"),
        False,
        INVALID,
        "INVALID_TIP_AMOUNT",
    ),
    (
        "a tip message with a NUL",
        "gifting",
        "SendTip",
        G.SendTipRequest(stream_id="s", sender_id="u", coins=1, message="hi\x00", idempotency_key="k"),
        False,
        INVALID,
        "INVALID_MESSAGE",
    ),
    (
        "a stream titled with a terminal escape",
        "gifting",
        "StartStream",
        G.StartStreamRequest(creator_id="c", title="\x1b[2J", idempotency_key="k"),
        False,
        INVALID,
        "INVALID_TITLE",
    ),
    (
        "a stream titled with 100k characters",
        "gifting",
        "StartStream",
        G.StartStreamRequest(creator_id="c", title="t" * 100_000, idempotency_key="k"),
        False,
        INVALID,
        "TITLE_TOO_LONG",
    ),
    (
        "content priced at int64 max",
        "gifting",
        "CreateContent",
        G.CreateContentRequest(creator_id="c", title="t", price_coins=INT64_MAX, idempotency_key="k"),
        False,
        INVALID,
        "AMOUNT_TOO_LARGE",
    ),
    (
        "a gift priced at int64 max",
        "gifting",
        "UpsertGift",
        G.UpsertGiftRequest(gift_id="g", name="G", price_coins=INT64_MAX, idempotency_key="k"),
        True,
        INVALID,
        "AMOUNT_TOO_LARGE",
    ),
    (
        "access to NUL content",
        "gifting",
        "CheckAccess",
        G.CheckAccessRequest(user_id="u", content_id="\x00"),
        False,
        INVALID,
        "INVALID_ID",
    ),
    # payout
    (
        "earnings after a token of 5000 digits",
        "payout",
        "ListEarnings",
        P.ListEarningsRequest(creator_id="c", page_token=_b64(b"9" * 5000 + b":x")),
        False,
        INVALID,
        "INVALID_PAGE_TOKEN",
    ),
    (
        "earnings after a token past int64",
        "payout",
        "ListEarnings",
        P.ListEarningsRequest(creator_id="c", page_token=_b64(f"{INT64_MAX + 1}:x".encode())),
        False,
        INVALID,
        "INVALID_PAGE_TOKEN",
    ),
    (
        "earnings after a token holding a NUL",
        "payout",
        "ListEarnings",
        P.ListEarningsRequest(creator_id="c", page_token=_b64(b"5:a\x00b")),
        False,
        INVALID,
        "INVALID_PAGE_TOKEN",
    ),
    (
        "earnings after a token of bad UTF-8",
        "payout",
        "ListEarnings",
        P.ListEarningsRequest(creator_id="c", page_token=_b64(b"5:\xed\xa0\x80")),
        False,
        INVALID,
        "INVALID_PAGE_TOKEN",
    ),
    (
        "withdrawals after a negative instant",
        "payout",
        "ListWithdrawals",
        P.ListWithdrawalsRequest(creator_id="c", page_token=_b64(b"-5:x")),
        False,
        INVALID,
        "INVALID_PAGE_TOKEN",
    ),
    (
        "withdrawals in pages of -1",
        "payout",
        "ListWithdrawals",
        P.ListWithdrawalsRequest(creator_id="c", page_size=-1),
        False,
        INVALID,
        "INVALID_PAGE_SIZE",
    ),
    (
        "payout methods after a token holding a NUL",
        "payout",
        "ListPayoutMethods",
        P.ListPayoutMethodsRequest(creator_id="c", page_token=_b64(b"5:a\x00b")),
        False,
        INVALID,
        "INVALID_PAGE_TOKEN",
    ),
    (
        "payout methods in pages of 2**31-1",
        "payout",
        "ListPayoutMethods",
        P.ListPayoutMethodsRequest(creator_id="c", page_size=2**31 - 1),
        False,
        INVALID,
        "INVALID_PAGE_SIZE",
    ),
    (
        "a statement of the year 0",
        "payout",
        "GetStatement",
        P.GetStatementRequest(creator_id="c", year=0),
        False,
        INVALID,
        "INVALID_YEAR",
    ),
    (
        "a statement of the year 10000",
        "payout",
        "GetStatement",
        P.GetStatementRequest(creator_id="c", year=10_000),
        False,
        INVALID,
        "INVALID_YEAR",
    ),
    (
        "a statement of the year -1",
        "payout",
        "GetStatement",
        P.GetStatementRequest(creator_id="c", year=-1),
        False,
        INVALID,
        "INVALID_YEAR",
    ),
    (
        "a withdrawal of int64 max diamonds",
        "payout",
        "RequestWithdrawal",
        P.RequestWithdrawalRequest(creator_id="c", diamonds=INT64_MAX, method_id="m", idempotency_key="k"),
        False,
        INVALID,
        "AMOUNT_TOO_LARGE",
    ),
    (
        "an IBAN ending in a newline",
        "payout",
        "AddPayoutMethod",
        _bank(iban="DE89370400440532013000\n"),
        False,
        INVALID,
        "INVALID_PAYOUT_METHOD",
    ),
    (
        "a routing number of superscript digits",
        "payout",
        "AddPayoutMethod",
        _bank(account_number="12345678", routing_number="²" * 9),
        False,
        INVALID,
        "INVALID_PAYOUT_METHOD",
    ),
    (
        "an account number in Arabic-Indic digits",
        "payout",
        "AddPayoutMethod",
        _bank(account_number="١٢٣٤٥", routing_number="011000015"),
        False,
        INVALID,
        "INVALID_PAYOUT_METHOD",
    ),
    (
        "a payout method of an unknown kind",
        "payout",
        "AddPayoutMethod",
        P.AddPayoutMethodRequest(creator_id="c", kind=99, idempotency_key="k"),
        False,
        INVALID,
        "INVALID_PAYOUT_METHOD",
    ),
    (
        "a rejection whose reason holds a NUL",
        "payout",
        "RejectWithdrawal",
        P.RejectWithdrawalRequest(withdrawal_id="w", reason="fraud\x00", idempotency_key="k"),
        True,
        INVALID,
        "INVALID_REASON",
    ),
    (
        "an approval without the operator token",
        "payout",
        "ApproveWithdrawal",
        P.ApproveWithdrawalRequest(withdrawal_id="w", idempotency_key="k"),
        False,
        grpc.StatusCode.UNAUTHENTICATED,
        "OPERATOR_TOKEN_MISSING",
    ),
    (
        "a policy with a fee of int32 max",
        "payout",
        "SetPolicy",
        P.SetPolicyRequest(
            creator_share_bp=5000,
            fee_bp=2**31 - 1,
            currencies=[P.CurrencyTerms(currency_code="USD", diamonds=1, amount_minor=1)],
            idempotency_key="k",
        ),
        True,
        INVALID,
        "INVALID_FEE",
    ),
    (
        "dead letters of a NUL consumer",
        "payout",
        "ListDeadLetters",
        dead_letters_pb2.ListDeadLettersRequest(consumer="\x00"),
        True,
        INVALID,
        "INVALID_CONSUMER",
    ),
]


def _past_its_column(n: int) -> list[tuple[str, str, Any, bool, str, str]]:
    """(service, method, request, operator?, field, the reason of an unknown id) for each RPC taking
    an id the services mint or an operator names, kept in String(64) columns, `n` characters long."""
    i = "i" * n
    return [
        ("wallet", "GetPurchase", W.GetPurchaseRequest(purchase_id=i), False, "purchase_id", "UNKNOWN_PURCHASE"),
        (
            "wallet",
            "CreatePurchase",
            W.CreatePurchaseRequest(
                user_id="u",
                package_id=i,
                currency_code="USD",
                payment_method=W.PAYMENT_METHOD_CARD,
                idempotency_key="k",
            ),
            False,
            "package_id",
            "UNKNOWN_PACKAGE",
        ),
        ("wallet", "ListPromotions", W.ListPromotionsRequest(package_id=i), True, "package_id", ""),
        ("gifting", "GetStream", G.GetStreamRequest(stream_id=i), False, "stream_id", "UNKNOWN_STREAM"),
        (
            "gifting",
            "EndStream",
            G.EndStreamRequest(stream_id=i, idempotency_key="k"),
            False,
            "stream_id",
            "UNKNOWN_STREAM",
        ),
        (
            "gifting",
            "SendGift",
            G.SendGiftRequest(stream_id=i, sender_id="v", gift_id="rose", quantity=1, idempotency_key="k"),
            False,
            "stream_id",
            "UNKNOWN_STREAM",
        ),
        (
            "gifting",
            "SendTip",
            G.SendTipRequest(stream_id=i, sender_id="v", coins=1, idempotency_key="k"),
            False,
            "stream_id",
            "UNKNOWN_STREAM",
        ),
        ("gifting", "GetLeaderboard", G.GetLeaderboardRequest(stream_id=i), False, "stream_id", ""),
        (
            "gifting",
            "CheckAccess",
            G.CheckAccessRequest(user_id="u", content_id=i),
            False,
            "content_id",
            "UNKNOWN_CONTENT",
        ),
        (
            "gifting",
            "UnlockContent",
            G.UnlockContentRequest(user_id="u", content_id=i, idempotency_key="k"),
            False,
            "content_id",
            "UNKNOWN_CONTENT",
        ),
        (
            "payout",
            "GetWithdrawal",
            P.GetWithdrawalRequest(withdrawal_id=i),
            False,
            "withdrawal_id",
            "UNKNOWN_WITHDRAWAL",
        ),
        (
            "payout",
            "ApproveWithdrawal",
            P.ApproveWithdrawalRequest(withdrawal_id=i, idempotency_key="k"),
            True,
            "withdrawal_id",
            "UNKNOWN_WITHDRAWAL",
        ),
        (
            "payout",
            "RejectWithdrawal",
            P.RejectWithdrawalRequest(withdrawal_id=i, reason="r", idempotency_key="k"),
            True,
            "withdrawal_id",
            "UNKNOWN_WITHDRAWAL",
        ),
        (
            "payout",
            "VerifyPayoutMethod",
            P.VerifyPayoutMethodRequest(method_id=i, idempotency_key="k"),
            True,
            "method_id",
            "UNKNOWN_PAYOUT_METHOD",
        ),
        (
            "payout",
            "RequestWithdrawal",
            P.RequestWithdrawalRequest(creator_id="c", method_id=i, diamonds=1, idempotency_key="k"),
            False,
            "method_id",
            "UNKNOWN_PAYOUT_METHOD",
        ),
    ]


# One character past the column: such an id could never be found. It was answered "not found"
# (or, written, would pass on SQLite and fail on PostgreSQL); it is malformed, like any other.
CASES += [
    (f"{method} with a 65-character {field}", service, method, request, operator, INVALID, "INVALID_ID")
    for service, method, request, operator, field, _ in _past_its_column(65)
]

SERVICES = {
    "wallet": "livegifts.wallet.v1.WalletService",
    "gifting": "livegifts.gifting.v1.GiftingService",
    "payout": "livegifts.payout.v1.PayoutService",
}
COMMON = {
    "ListAuditRecords": "livegifts.common.v1.AuditService",
    "ListDeadLetters": "livegifts.common.v1.DeadLetterService",
    "ReplayDeadLetter": "livegifts.common.v1.DeadLetterService",
}


def _channel(clients, service: str) -> grpc.aio.Channel:  # type: ignore[no-untyped-def]
    return clients.channels[list(SERVICES).index(service)]


@pytest.mark.parametrize(
    ("service", "method", "request_", "operator", "code", "reason"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
async def test_a_hostile_input_is_refused_with_its_code_and_stable_reason(  # type: ignore[no-untyped-def]
    clients, deployment, service: str, method: str, request_: Any, operator: bool, code: grpc.StatusCode, reason: str
) -> None:
    path = f"/{COMMON.get(method, SERVICES[service])}/{method}"
    call = _channel(clients, service).unary_unary(path, request_serializer=type(request_).SerializeToString)
    metadata = deployment.operator_metadata if operator else None
    exc = await expect_error(call(request_, metadata=metadata, timeout=10), code, reason)
    assert exc.details() and "Traceback" not in exc.details() and "Error" not in exc.details()


async def test_gifts_whose_cost_would_overflow_int64_are_an_invalid_quantity(clients) -> None:  # type: ignore[no-untyped-def]
    stream = await live_stream(clients.gifting, uid("creator"))
    for quantity in (INT64_MAX, 2**62, INT64_MAX // 500 + 1, 0, -1):
        gift = G.SendGiftRequest(
            stream_id=stream.stream_id,
            sender_id=uid("viewer"),
            gift_id="concert",
            quantity=quantity,
            idempotency_key="k",
        )
        await expect_error(clients.gifting.SendGift(gift), INVALID, "INVALID_QUANTITY")
        batch = await clients.gifting.SendGifts(G.SendGiftsRequest(gifts=[gift]))
        assert (batch.results[0].error.code, batch.results[0].error.reason) == (INVALID.value[0], "INVALID_QUANTITY")


async def test_a_signed_callback_body_that_is_no_event_is_a_malformed_payload(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    secret = deployment.webhook_secret.encode()
    bodies = [
        b"[" * 50_000 + b"]" * 50_000,  # nesting past the recursion limit
        json.dumps({"id": "e", "type": "payment.succeeded", "purchase_id": "p", "currency_code": "USD"}).encode()[:-1]
        + b', "amount_minor": 1'
        + b"0" * 5000
        + b"}",  # an int past Python's digit limit
        json.dumps({"id": "e\x00", "type": "payment.succeeded", "purchase_id": "p", "amount_minor": 1}).encode(),
        json.dumps({"id": "e", "type": ["payment.succeeded"], "purchase_id": "p", "amount_minor": 1.0}).encode(),
    ]
    for body in bodies:
        signature = signing.sign(secret, body)
        await expect_error(
            clients.wallet.HandlePaymentEvent(
                W.HandlePaymentEventRequest(provider="dev", payload=body, signature=signature)
            ),
            INVALID,
            "MALFORMED_PAYLOAD",
        )
        await expect_error(
            clients.payout.HandlePayoutEvent(
                P.HandlePayoutEventRequest(
                    provider="dev", payload=body, signature=signing.sign(deployment.payout_secret.encode(), body)
                )
            ),
            INVALID,
            "MALFORMED_PAYLOAD",
        )


async def test_a_body_that_is_not_the_message_is_refused_on_every_rpc(clients) -> None:  # type: ignore[no-untyped-def]
    """A truncated body (field 1 claims 16 bytes, two follow) cannot be decoded as any message;
    nor can invalid UTF-8 in a string field 1. grpc answered UNKNOWN naming DecodeError."""
    files = {"wallet": W, "gifting": G, "payout": P}
    answers = {}
    for service, full_name in SERVICES.items():
        desc = files[service].DESCRIPTOR.services_by_name[full_name.rsplit(".", 1)[1]]
        channel = _channel(clients, service)
        for m in desc.methods:
            bodies = [b"\x0a\x10ab"]
            first = m.input_type.fields_by_number.get(1)
            if first is not None and first.type == first.TYPE_STRING:
                bodies.append(b"\x0a\x02\xff\xfe")
            for body in bodies:
                path = f"/{full_name}/{m.name}"
                try:
                    if m.server_streaming:
                        await channel.unary_stream(path)(body, timeout=10).read()
                    else:
                        await channel.unary_unary(path)(body, timeout=10)
                    answers[(m.name, body)] = ("OK", None)
                except grpc.aio.AioRpcError as exc:
                    answers[(m.name, body)] = (exc.code().name, reason_of(exc))
    wrong = {k: v for k, v in answers.items() if v != ("INVALID_ARGUMENT", "MALFORMED_REQUEST")}
    assert not wrong, wrong
    assert len(answers) > 40  # every RPC of the three services was tried


@pytest.mark.parametrize(
    ("service", "method", "request_", "operator", "reason"),
    [(s, m, r, o, reason) for s, m, r, o, _, reason in _past_its_column(64) if reason],
    ids=[m for _, m, _, _, _, reason in _past_its_column(64) if reason],
)
async def test_an_id_that_fills_its_column_is_well_formed_and_unknown(  # type: ignore[no-untyped-def]
    clients, deployment, service: str, method: str, request_: Any, operator: bool, reason: str
) -> None:
    """64 characters, the column's length, is a well-formed id: looked up (and not found), not refused."""
    path = f"/{COMMON.get(method, SERVICES[service])}/{method}"
    call = _channel(clients, service).unary_unary(path, request_serializer=type(request_).SerializeToString)
    metadata = deployment.operator_metadata if operator else None
    await expect_error(call(request_, metadata=metadata, timeout=10), grpc.StatusCode.NOT_FOUND, reason)
