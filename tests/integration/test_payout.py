"""Payout: diamonds earned exactly, withdrawn safely, clawed back when coins are reversed."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import time

import grpc
import pytest

from livegifts.payout.v1 import payout_pb2
from livegifts.wallet.v1 import wallet_pb2
from services.common import signing
from services.common.clients import error_info
from services.payout.providers import dev_payout_payload
from tests.integration.helpers import (
    buy_coins,
    eventually,
    expect_error,
    gift_700_coins,
    signed_callback,
    uid,
)
from tests.integration.payout_calls import earnings, fund, gift_event, publish, settled, verified_method, withdraw

W = payout_pb2


def assert_books_balance(a: payout_pb2.PayoutAudit) -> None:
    """Invariant 5 and the entries behind each bucket."""
    assert a.diamonds_credited == a.diamonds_available + a.diamonds_held + a.diamonds_withdrawn + a.diamonds_clawed_back
    assert a.diamonds_held == a.diamonds_in_open_withdrawals
    assert a.diamonds_withdrawn == a.diamonds_in_paid_withdrawals
    assert a.diamonds_clawed_back == a.diamonds_in_clawback_entries
    assert a.diamonds_credited * 10_000 + a.remainder_units == a.earned_units
    assert a.ledger_sum == 0


async def test_ten_thousand_gift_events_with_duplicates_and_out_of_order_credit_the_exact_share(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    if deployment.nats_url is None:
        pytest.skip("needs the deployment's NATS URL (LIVEGIFTS_TEST_TARGET_NATS_URL)")
    creator = uid("hot-creator")
    rnd = random.Random(5)
    events = [gift_event(creator, rnd.choice([1, 1, 5, 9, 25, 99, 299]), f"v{i % 97}") for i in range(10_000)]
    if sum(e.coins for e in events) % 2 == 0:
        events[0].coins = events[0].quantity = events[0].coins + 1  # an odd total: half a diamond must be kept
    total = sum(e.coins for e in events)
    share_bp = (await clients.payout.GetPolicy(W.GetPolicyRequest())).creator_share_bp
    deliveries = events + rnd.sample(events, 2_000)  # 2,000 redeliveries of the same event ids
    rnd.shuffle(deliveries)
    before = await clients.payout.GetAudit(W.GetAuditRequest())

    await publish(deployment.nats_url, deliveries)
    # A liveness bound, not a speed check (bench/ measures speed): the exact share is checked below.
    earned = await eventually(lambda: earnings(clients, creator), lambda e: e.coins_received >= total, 120)
    await asyncio.sleep(1.0)  # let any stray duplicate land: it must change nothing
    earned = await earnings(clients, creator)

    assert earned.coins_received == total
    assert earned.diamonds_lifetime == total * share_bp // 10_000
    assert earned.remainder_units == total * share_bp % 10_000
    assert earned.diamonds_lifetime * 10_000 + earned.remainder_units == total * share_bp
    after = await clients.payout.GetAudit(W.GetAuditRequest())
    assert after.events_consumed - before.events_consumed == 10_000
    assert_books_balance(after)

    # Every event once in the history, walked page by page.
    seen: list[str] = []
    token = ""
    while True:
        page = await clients.payout.ListEarnings(
            W.ListEarningsRequest(creator_id=creator, page_token=token, page_size=500)
        )
        seen += [e.event_id for e in page.entries]
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(e.event_id for e in events)


async def test_a_withdrawal_is_paid_and_its_diamonds_leave_for_good(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    creator = uid("creator")
    await fund(clients, deployment, creator, 60_000)  # 30,000 diamonds = $150
    method_id = await verified_method(clients, deployment, creator)
    wd = await clients.payout.RequestWithdrawal(withdraw(creator, 20_000, method_id))
    assert wd.status == W.WITHDRAWAL_STATUS_APPROVED  # $100 is below the $500 review threshold
    assert (wd.gross.amount_minor, wd.fee.amount_minor, wd.net.amount_minor) == (10_000, 0, 10_000)
    assert wd.gross.currency_code == "USD"
    held = await earnings(clients, creator)
    assert (held.diamonds_available, held.diamonds_held) in ((10_000, 20_000), (10_000, 0))

    paid = await settled(clients, wd.withdrawal_id)
    assert paid.status == W.WITHDRAWAL_STATUS_PAID
    assert paid.provider_ref
    after = await earnings(clients, creator)
    assert (after.diamonds_available, after.diamonds_held, after.diamonds_withdrawn) == (10_000, 0, 20_000)
    assert [m.amount_minor for m in after.cash_available if m.currency_code == "USD"] == [5_000]

    statement = await clients.payout.GetStatement(
        W.GetStatementRequest(creator_id=creator, year=dt.datetime.now(dt.UTC).year)
    )
    assert len(statement.months) == 12
    assert sum(m.diamonds_earned for m in statement.months) == 30_000
    assert sum(p.net_minor for m in statement.months for p in m.paid) == 10_000
    # The statement reconciles on its own: each month closes with what it opened with and moved,
    # and the year closes (from the month of the payment on) with the creator's balance now.
    for m in statement.months:
        moved = m.diamonds_earned - m.diamonds_clawed_back - sum(p.diamonds for p in m.paid)
        assert m.closing_diamonds == m.opening_diamonds + moved
    assert [b.opening_diamonds for b in statement.months[1:]] == [a.closing_diamonds for a in statement.months[:-1]]
    assert statement.months[-1].closing_diamonds == after.diamonds_available + after.diamonds_held == 10_000
    listed = await clients.payout.ListWithdrawals(W.ListWithdrawalsRequest(creator_id=creator))
    assert [w.withdrawal_id for w in listed.withdrawals] == [wd.withdrawal_id]
    assert_books_balance(await clients.payout.GetAudit(W.GetAuditRequest()))


async def test_a_failed_withdrawal_gives_the_diamonds_back(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    creator = uid("creator")
    await fund(clients, deployment, creator, 600_000)  # 300,000 diamonds = $1,500
    # The development provider fails payouts to addresses at fail.invalid.
    method_id = await verified_method(clients, deployment, creator, f"{creator}@fail.invalid")
    wd = await clients.payout.RequestWithdrawal(withdraw(creator, 80_000, method_id))  # $400, auto-approved
    failed = await settled(clients, wd.withdrawal_id)
    assert failed.status == W.WITHDRAWAL_STATUS_FAILED
    assert failed.failure_reason
    after = await earnings(clients, creator)
    assert (after.diamonds_available, after.diamonds_held, after.diamonds_withdrawn) == (300_000, 0, 0)
    # The failed amount no longer counts against the day: two more $400 fit under the $1,000
    # daily maximum only if the failed $400 was taken off the day's total.
    for _ in range(2):
        again = await clients.payout.RequestWithdrawal(withdraw(creator, 80_000, method_id))
        assert again.status == W.WITHDRAWAL_STATUS_APPROVED
    assert_books_balance(await clients.payout.GetAudit(W.GetAuditRequest()))


async def test_an_operator_reviews_large_withdrawals_and_a_rejection_releases_the_diamonds(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    creator = uid("creator")
    await fund(clients, deployment, creator, 600_000)  # 300,000 diamonds = $1,500
    method_id = await verified_method(clients, deployment, creator)
    big = await clients.payout.RequestWithdrawal(withdraw(creator, 120_000, method_id))  # $600
    assert big.status == W.WITHDRAWAL_STATUS_PENDING_REVIEW
    approve = W.ApproveWithdrawalRequest(withdrawal_id=big.withdrawal_id, idempotency_key=uid("ap"))
    await expect_error(clients.payout.ApproveWithdrawal(approve), grpc.StatusCode.UNAUTHENTICATED)
    approved = await clients.payout.ApproveWithdrawal(approve, metadata=deployment.operator_metadata)
    assert approved.reviewed_by == "integration-test"
    assert (await settled(clients, big.withdrawal_id)).status == W.WITHDRAWAL_STATUS_PAID

    # $600 today already: $500 more would pass $1,000.
    await expect_error(
        clients.payout.RequestWithdrawal(withdraw(creator, 100_000, method_id)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "DAILY_WITHDRAWAL_LIMIT",
    )
    small = await clients.payout.RequestWithdrawal(withdraw(creator, 20_000, method_id))  # $100: auto-approved
    assert small.status == W.WITHDRAWAL_STATUS_APPROVED
    await settled(clients, small.withdrawal_id)

    other = uid("creator")
    await fund(clients, deployment, other, 200_000)  # 100,000 diamonds = $500: reviewed
    other_method = await verified_method(clients, deployment, other)
    review = await clients.payout.RequestWithdrawal(withdraw(other, 100_000, other_method))
    assert review.status == W.WITHDRAWAL_STATUS_PENDING_REVIEW
    assert (await earnings(clients, other)).diamonds_held == 100_000
    # The reason becomes the withdrawal's failure_reason: a NUL (INTERNAL on PostgreSQL, kept on
    # SQLite) or a terminal escape is refused, and the withdrawal stays under review.
    for reason in ("fraud\x00check", "\x1b[2Jfraud"):
        await expect_error(
            clients.payout.RejectWithdrawal(
                W.RejectWithdrawalRequest(withdrawal_id=review.withdrawal_id, reason=reason, idempotency_key=uid("rj")),
                metadata=deployment.operator_metadata,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_REASON",
        )
    under_review = await clients.payout.GetWithdrawal(W.GetWithdrawalRequest(withdrawal_id=review.withdrawal_id))
    assert under_review.status == W.WITHDRAWAL_STATUS_PENDING_REVIEW
    rejected = await clients.payout.RejectWithdrawal(
        W.RejectWithdrawalRequest(withdrawal_id=review.withdrawal_id, reason="fraud check", idempotency_key=uid("rj")),
        metadata=deployment.operator_metadata,
    )
    assert rejected.status == W.WITHDRAWAL_STATUS_REJECTED
    after = await earnings(clients, other)
    assert (after.diamonds_available, after.diamonds_held) == (100_000, 0)
    await expect_error(
        clients.payout.ApproveWithdrawal(
            W.ApproveWithdrawalRequest(withdrawal_id=review.withdrawal_id, idempotency_key=uid("ap")),
            metadata=deployment.operator_metadata,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "INVALID_WITHDRAWAL_TRANSITION",
    )
    assert_books_balance(await clients.payout.GetAudit(W.GetAuditRequest()))


async def test_two_concurrent_withdrawals_cannot_together_exceed_the_balance(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    creator = uid("creator")
    await fund(clients, deployment, creator, 60_000)  # 30,000 diamonds
    method_id = await verified_method(clients, deployment, creator)
    results = await asyncio.gather(
        *(clients.payout.RequestWithdrawal(withdraw(creator, 20_000, method_id)) for _ in range(2)),
        return_exceptions=True,
    )
    ok = [r for r in results if isinstance(r, W.Withdrawal)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 1 and len(refused) == 1, results
    assert refused[0].code() == grpc.StatusCode.FAILED_PRECONDITION
    e = await earnings(clients, creator)
    assert e.diamonds_available == 10_000
    assert e.diamonds_held + e.diamonds_withdrawn == 20_000
    assert_books_balance(await clients.payout.GetAudit(W.GetAuditRequest()))


async def test_concurrent_withdrawals_cannot_together_exceed_the_daily_maximum(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    creator = uid("creator")
    await fund(clients, deployment, creator, 1_000_000)  # 500,000 diamonds = $2,500
    method_id = await verified_method(clients, deployment, creator)
    # Five requests of $300 at once: only three fit under $1,000 a day.
    results = await asyncio.gather(
        *(clients.payout.RequestWithdrawal(withdraw(creator, 60_000, method_id)) for _ in range(5)),
        return_exceptions=True,
    )
    ok = [r for r in results if isinstance(r, W.Withdrawal)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 3, results
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused), refused
    e = await earnings(clients, creator)
    assert e.diamonds_available == 500_000 - 180_000


@pytest.mark.parametrize(
    ("case", "code", "reason"),
    [
        ("below minimum", grpc.StatusCode.FAILED_PRECONDITION, "BELOW_MINIMUM_WITHDRAWAL"),
        ("above balance", grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_DIAMONDS"),
        ("above daily maximum", grpc.StatusCode.RESOURCE_EXHAUSTED, "DAILY_WITHDRAWAL_LIMIT"),
        ("zero", grpc.StatusCode.INVALID_ARGUMENT, "AMOUNT_NOT_POSITIVE"),
        ("negative", grpc.StatusCode.INVALID_ARGUMENT, "AMOUNT_NOT_POSITIVE"),
        ("not whole cents", grpc.StatusCode.INVALID_ARGUMENT, "DIAMONDS_NOT_WHOLE_CASH"),
        ("unverified method", grpc.StatusCode.FAILED_PRECONDITION, "PAYOUT_METHOD_NOT_VERIFIED"),
        ("someone else's method", grpc.StatusCode.NOT_FOUND, "UNKNOWN_PAYOUT_METHOD"),
    ],
)
async def test_bad_withdrawals_are_refused_with_a_stable_reason_and_write_nothing(  # type: ignore[no-untyped-def]
    clients, deployment, case, code, reason
) -> None:
    creator = uid("creator")
    await fund(clients, deployment, creator, 60_000)  # 30,000 diamonds = $150
    method_id = await verified_method(clients, deployment, creator)
    diamonds = {
        "below minimum": 10_000,
        "above balance": 30_002,
        "above daily maximum": 200_002,
        "zero": 0,
        "negative": -2,
        "not whole cents": 20_001,
    }.get(case, 20_000)
    if case == "unverified method":
        method_id = (
            await clients.payout.AddPayoutMethod(
                W.AddPayoutMethodRequest(
                    creator_id=creator,
                    kind=W.PAYOUT_METHOD_KIND_PAYPAL,
                    paypal_email="new@example.com",
                    idempotency_key=uid("pm"),
                )
            )
        ).method_id
    if case == "someone else's method":
        method_id = await verified_method(clients, deployment, uid("other"))
    await expect_error(clients.payout.RequestWithdrawal(withdraw(creator, diamonds, method_id)), code, reason)
    e = await earnings(clients, creator)
    assert (e.diamonds_available, e.diamonds_held) == (30_000, 0)
    listed = await clients.payout.ListWithdrawals(W.ListWithdrawalsRequest(creator_id=creator))
    assert list(listed.withdrawals) == []


async def test_withdrawal_refusals_say_what_would_pass_in_their_metadata(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    creator = uid("creator")
    await fund(clients, deployment, creator, 600_000)  # 300,000 diamonds = $1,500
    method_id = await verified_method(clients, deployment, creator)
    midnight = (int(time.time()) // 86_400 + 1) * 86_400 * 1_000_000  # today's end, UTC, by this clock
    days = {midnight, midnight + 86_400 * 1_000_000}  # the next too, should the test straddle midnight

    low = await expect_error(
        clients.payout.RequestWithdrawal(withdraw(creator, 19_998, method_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "BELOW_MINIMUM_WITHDRAWAL",
    )
    assert dict(error_info(low).metadata) == {
        "currency_code": "USD",
        "withdrawal_min_minor": "10000",
        "withdrawal_min_diamonds": "20000",
        "fee_minor": "0",
    }
    # Nothing requested today yet: a gross no day takes is refused before the balance is read.
    whole_day = await expect_error(
        clients.payout.RequestWithdrawal(withdraw(creator, 200_002, method_id)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "DAILY_WITHDRAWAL_LIMIT",
    )
    # No day takes it, so waiting for a reset does not help: no reset time, amount_exceeds_limit.
    assert dict(error_info(whole_day).metadata) == {
        "currency_code": "USD",
        "daily_max_minor": "100000",
        "daily_left_minor": "100000",
        "daily_left_diamonds": "200000",
        "amount_exceeds_limit": "true",
    }
    review = await clients.payout.RequestWithdrawal(withdraw(creator, 120_000, method_id))  # $600, held for review
    assert review.status == W.WITHDRAWAL_STATUS_PENDING_REVIEW
    short = await expect_error(
        clients.payout.RequestWithdrawal(withdraw(creator, 180_002, method_id)),  # $900.01: under the day's $1,000
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_DIAMONDS",
    )
    assert dict(error_info(short).metadata) == {"available_diamonds": "180000", "required_diamonds": "180002"}
    # $600 of today's $1,000 requested: $400 (80,000 diamonds) left, so $400.02 is refused.
    over = await expect_error(
        clients.payout.RequestWithdrawal(withdraw(creator, 80_004, method_id)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "DAILY_WITHDRAWAL_LIMIT",
    )
    over_meta = dict(error_info(over).metadata)
    assert int(over_meta.pop("resets_at_us")) in days  # the UTC midnight that ends today
    assert over_meta == {
        "currency_code": "USD",
        "daily_max_minor": "100000",
        "daily_left_minor": "40000",
        "daily_left_diamonds": "80000",
    }
    fits = await clients.payout.RequestWithdrawal(withdraw(creator, 80_000, method_id))  # exactly what was left
    assert fits.gross.amount_minor == 40_000


async def test_payout_methods_are_validated_and_never_shown_in_full(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    creator = uid("creator")
    bank = await clients.payout.AddPayoutMethod(
        W.AddPayoutMethodRequest(
            creator_id=creator,
            kind=W.PAYOUT_METHOD_KIND_BANK,
            iban="DE89 3704 0044 0532 0130 00",
            holder_name="A Creator",
            idempotency_key=uid("pm"),
        )
    )
    paypal = await clients.payout.AddPayoutMethod(
        W.AddPayoutMethodRequest(
            creator_id=creator,
            kind=W.PAYOUT_METHOD_KIND_PAYPAL,
            paypal_email="someone.private@example.com",
            idempotency_key=uid("pm"),
        )
    )
    listed = await clients.payout.ListPayoutMethods(W.ListPayoutMethodsRequest(creator_id=creator))
    shown = str(listed)
    assert "DE89370400440532013000" not in shown and "0532013000" not in shown
    assert "someone.private" not in shown
    assert bank.masked.endswith("3000") and paypal.masked.endswith("@e•••.com")
    assert {m.verification for m in listed.methods} == {W.VERIFICATION_STATUS_PENDING}
    for bad in (
        W.AddPayoutMethodRequest(creator_id=creator, kind=W.PAYOUT_METHOD_KIND_PAYPAL, paypal_email="not-an-email"),
        W.AddPayoutMethodRequest(
            creator_id=creator, kind=W.PAYOUT_METHOD_KIND_BANK, iban="DE00370400440532013000", holder_name="A"
        ),
        W.AddPayoutMethodRequest(
            creator_id=creator,
            kind=W.PAYOUT_METHOD_KIND_BANK,
            account_number="12345678",
            routing_number="123456789",
            holder_name="A",
        ),
    ):
        bad.idempotency_key = uid("pm")
        await expect_error(
            clients.payout.AddPayoutMethod(bad), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAYOUT_METHOD"
        )


async def test_payout_callbacks_with_a_bad_signature_or_for_an_unknown_withdrawal_are_refused(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    secret = deployment.payout_secret.encode()
    payload = dev_payout_payload(uid("evt"), "payout.paid", "wd_unknown", 100, "USD")
    await expect_error(
        clients.payout.HandlePayoutEvent(
            W.HandlePayoutEventRequest(provider="dev", payload=payload, signature=signing.sign(b"forged", payload))
        ),
        grpc.StatusCode.UNAUTHENTICATED,
        "SIGNATURE_INVALID",
    )
    await expect_error(
        clients.payout.HandlePayoutEvent(
            W.HandlePayoutEventRequest(
                provider="dev", payload=payload, signature=signing.sign(secret, payload, int(time.time()) - 3600)
            )
        ),
        grpc.StatusCode.UNAUTHENTICATED,
        "SIGNATURE_EXPIRED",
    )
    await expect_error(
        clients.payout.HandlePayoutEvent(
            W.HandlePayoutEventRequest(provider="dev", payload=payload, signature=signing.sign(secret, payload))
        ),
        grpc.StatusCode.NOT_FOUND,
        "UNKNOWN_WITHDRAWAL",
    )


async def test_an_event_id_reused_for_another_withdrawal_is_refused_and_the_first_withdrawal_keeps_it(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    """A provider bug: an event id it sent for one withdrawal comes again naming another."""
    secret = deployment.payout_secret.encode()
    creator = uid("creator")
    await fund(clients, deployment, creator, 100_000)  # 50,000 diamonds
    method_id = await verified_method(clients, deployment, creator)
    first = await settled(
        clients, (await clients.payout.RequestWithdrawal(withdraw(creator, 20_000, method_id))).withdrawal_id
    )
    other = await settled(
        clients, (await clients.payout.RequestWithdrawal(withdraw(creator, 24_000, method_id))).withdrawal_id
    )
    assert (first.status, other.status) == (W.WITHDRAWAL_STATUS_PAID, W.WITHDRAWAL_STATUS_PAID)
    event_id = f"evt_{first.provider_ref}"  # the id of the development provider's callback for `first`

    def callback(w: payout_pb2.Withdrawal, event_type: str) -> payout_pb2.HandlePayoutEventRequest:
        payload = dev_payout_payload(event_id, event_type, w.withdrawal_id, w.net.amount_minor, w.net.currency_code)
        return W.HandlePayoutEventRequest(provider="dev", payload=payload, signature=signing.sign(secret, payload))

    for event_type in ("payout.paid", "payout.failed"):
        err = await expect_error(
            clients.payout.HandlePayoutEvent(callback(other, event_type)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "PROVIDER_EVENT_ID_REUSED",
        )
        assert first.withdrawal_id in str(err.trailing_metadata()), err.trailing_metadata()
    assert await clients.payout.GetWithdrawal(W.GetWithdrawalRequest(withdrawal_id=other.withdrawal_id)) == other
    # The other outcome of the first withdrawal under its id is no duplicate either (was: OK,
    # duplicate=true, a transfer the provider reports both ways acknowledged without a word),
    # nor is its own outcome under its id for another amount.
    err = await expect_error(
        clients.payout.HandlePayoutEvent(callback(first, "payout.failed")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PROVIDER_EVENT_ID_REUSED",
    )
    assert dict(error_info(err).metadata) == {
        "provider_event_id": event_id,
        "withdrawal_id": first.withdrawal_id,
        "event_type": "payout.paid",
    }
    payload = dev_payout_payload(event_id, "payout.paid", first.withdrawal_id, 1, first.net.currency_code)
    await expect_error(
        clients.payout.HandlePayoutEvent(
            W.HandlePayoutEventRequest(provider="dev", payload=payload, signature=signing.sign(secret, payload))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "AMOUNT_MISMATCH",
    )
    assert await clients.payout.GetWithdrawal(W.GetWithdrawalRequest(withdrawal_id=first.withdrawal_id)) == first
    # The id still belongs to the first withdrawal: its retry is a duplicate.
    again = await clients.payout.HandlePayoutEvent(callback(first, "payout.paid"))
    assert again.duplicate and again.withdrawal == first
    after = await earnings(clients, creator)
    assert (after.diamonds_available, after.diamonds_held, after.diamonds_withdrawn) == (6_000, 0, 44_000)


async def test_a_callback_from_an_unknown_provider_with_a_huge_name_keeps_its_stable_reason(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    # The name was echoed whole in the error's trailers: past 16 KiB the client refused them
    # (RESOURCE_EXHAUSTED, "received metadata size exceeds hard limit") and lost the reason.
    secret = deployment.payout_secret.encode()
    payload = dev_payout_payload(uid("evt"), "payout.paid", "wd_unknown", 100, "USD")
    err = await expect_error(
        clients.payout.HandlePayoutEvent(
            W.HandlePayoutEventRequest(provider="p" * 100_000, payload=payload, signature=signing.sign(secret, payload))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_PROVIDER",
    )
    assert len(str(err.trailing_metadata())) < 4_000


async def test_set_policy_needs_an_operator_records_who_and_refuses_bad_values(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    current = await clients.payout.GetPolicy(W.GetPolicyRequest())
    assert current.creator_share_bp == 5_000
    usd = [t for t in current.currencies if t.currency_code == "USD"][0]
    assert (usd.diamonds, usd.amount_minor, usd.daily_max_minor) == (200, 100, 100_000)

    def policy(**change: object) -> payout_pb2.SetPolicyRequest:
        req = W.SetPolicyRequest(
            creator_share_bp=current.creator_share_bp, fee_bp=current.fee_bp, idempotency_key=uid("p")
        )
        req.currencies.extend(current.currencies)
        for k, v in change.items():
            setattr(req, k, v)
        return req

    await expect_error(clients.payout.SetPolicy(policy()), grpc.StatusCode.UNAUTHENTICATED, "OPERATOR_TOKEN_MISSING")
    await expect_error(
        clients.payout.SetPolicy(policy(), metadata=(("authorization", "Bearer wrong"),)),
        grpc.StatusCode.PERMISSION_DENIED,
        "NOT_AN_OPERATOR",
    )
    op = deployment.operator_metadata
    await expect_error(
        clients.payout.SetPolicy(policy(creator_share_bp=10_001), metadata=op),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_SHARE",
    )
    await expect_error(
        clients.payout.SetPolicy(policy(fee_bp=-1), metadata=op), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FEE"
    )
    negative_fixed = policy()
    negative_fixed.currencies[0].fee_fixed_minor = -5
    await expect_error(
        clients.payout.SetPolicy(negative_fixed, metadata=op), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FEE"
    )
    assert (await clients.payout.GetPolicy(W.GetPolicyRequest())).version == current.version  # nothing written

    # A real change, then back to the defaults the other tests expect (restored even when the
    # check of the change fails, or later tests would run on a 2.5% fee): each is a recorded version.
    try:
        changed = await clients.payout.SetPolicy(policy(fee_bp=250), metadata=op)
        assert (changed.version, changed.fee_bp, changed.changed_by) == (current.version + 1, 250, "integration-test")
    finally:
        restored = await clients.payout.SetPolicy(policy(), metadata=op)
    assert restored.version == current.version + 2 and restored.fee_bp == current.fee_bp


async def test_a_chargeback_claws_back_the_diamonds_and_holds_withdrawals(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    viewer, creator = uid("viewer"), uid("creator")
    await fund(clients, deployment, creator, 40_000)  # 20,000 diamonds from someone else
    purchase = await buy_coins(clients.wallet, deployment.webhook_secret, viewer, "us-usd-700")
    await gift_700_coins(clients.gifting, viewer, creator)  # all of the purchase's coins
    await eventually(lambda: earnings(clients, creator), lambda e: e.coins_received == 40_700)
    method_id = await verified_method(clients, deployment, creator)
    wd = await clients.payout.RequestWithdrawal(withdraw(creator, 20_200, method_id))  # $101, leaves 150
    assert (await settled(clients, wd.withdrawal_id)).status == W.WITHDRAWAL_STATUS_PAID

    await clients.wallet.HandlePaymentEvent(signed_callback(deployment.webhook_secret, "charge.dispute.lost", purchase))
    clawed = await eventually(lambda: earnings(clients, creator), lambda e: e.diamonds_clawed_back > 0)
    assert clawed.diamonds_clawed_back == 350  # the 700 reversed coins earned 350 diamonds
    assert clawed.diamonds_available == 150 - 350
    assert clawed.withdrawals_held
    assert clawed.diamonds_lifetime == 20_350  # what was credited stays on record; the clawback is its own entry

    await expect_error(
        clients.payout.RequestWithdrawal(withdraw(creator, 20_000, method_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "BALANCE_NEGATIVE",
    )
    listed = await clients.payout.ListEarnings(W.ListEarningsRequest(creator_id=creator, page_size=10))
    assert sum(e.coins_clawed_back for e in listed.entries) == 700
    assert_books_balance(await clients.payout.GetAudit(W.GetAuditRequest()))

    # Month end: the refunded money's coins are tied to the diamonds taken back, across services.
    async def reversals() -> tuple[int, int]:
        p = await clients.payout.GetAudit(W.GetAuditRequest())
        w = await clients.wallet.GetAudit(wallet_pb2.GetAuditRequest())
        return p.coins_in_clawback_entries + p.coins_in_open_shortfalls, w.coins_claimed_by_reversals

    consumed, claimed = await eventually(reversals, lambda r: r[0] == r[1])
    assert consumed == claimed >= 700


async def test_a_retried_withdrawal_answers_as_the_first_even_when_the_wallet_now_says_no(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    creator = uid("creator")
    await fund(clients, deployment, creator, 60_000)
    method_id = await verified_method(clients, deployment, creator)
    req = withdraw(creator, 20_000, method_id)
    first = await clients.payout.RequestWithdrawal(req)
    await clients.wallet.SetAccountRestrictions(
        wallet_pb2.SetAccountRestrictionsRequest(user_id=creator, blocked=True, idempotency_key=uid("r")),
        metadata=deployment.operator_metadata,
    )
    # The retry is answered from the key's record: the wallet is not asked again (it could be down).
    again = await clients.payout.RequestWithdrawal(req)
    assert (again.withdrawal_id, again.diamonds) == (first.withdrawal_id, 20_000)
    # A new request is asked about, and refused.
    await expect_error(
        clients.payout.RequestWithdrawal(withdraw(creator, 20_000, method_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ACCOUNT_BLOCKED",
    )
    e = await earnings(clients, creator)
    assert e.diamonds_held + e.diamonds_withdrawn == 20_000  # held once, never twice


@pytest.mark.parametrize(
    ("restriction", "reason"), [({"birth_date": "2015-01-01"}, "UNDERAGE"), ({"blocked": True}, "ACCOUNT_BLOCKED")]
)
async def test_a_minor_or_blocked_creator_cannot_withdraw_in_the_wallets_word(  # type: ignore[no-untyped-def]
    clients, deployment, restriction, reason
) -> None:
    creator = uid("creator")
    await fund(clients, deployment, creator, 60_000)
    method_id = await verified_method(clients, deployment, creator)
    await clients.wallet.SetAccountRestrictions(
        wallet_pb2.SetAccountRestrictionsRequest(user_id=creator, **restriction, idempotency_key=uid("r")),
        metadata=deployment.operator_metadata,
    )
    await expect_error(
        clients.payout.RequestWithdrawal(withdraw(creator, 20_000, method_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        reason,
    )
    e = await earnings(clients, creator)
    assert (e.diamonds_available, e.diamonds_held) == (30_000, 0)
