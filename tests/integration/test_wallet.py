"""The wallet over gRPC on SQLite and PostgreSQL: purchases and callbacks, price lists and
promotions, operator RPCs, spending limits under concurrency, reversals and bad input."""

from __future__ import annotations

import asyncio
import time

import grpc
import nats
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from livegifts.gifting.v1 import gifting_pb2
from livegifts.wallet.v1 import events_pb2, wallet_pb2
from services.common import signing
from services.common.clients import error_info
from tests.integration.helpers import (
    balance_of,
    buy_coins,
    expect_error,
    live_stream,
    reason_of,
    signed_callback,
    spend_req,
    uid,
)

OK = grpc.StatusCode


async def new_purchase(wallet, user: str, package_id: str = "us-usd-700", currency: str = "USD"):  # type: ignore[no-untyped-def]
    """A PENDING purchase."""
    return await wallet.CreatePurchase(
        wallet_pb2.CreatePurchaseRequest(
            user_id=user,
            package_id=package_id,
            currency_code=currency,
            payment_method=wallet_pb2.PAYMENT_METHOD_APPLE_PAY,
            idempotency_key=uid("buy"),
        )
    )


def ts(offset_s: int) -> Timestamp:
    """Now plus `offset_s`, as a Timestamp."""
    out = Timestamp()
    out.FromSeconds(int(time.time()) + offset_s)
    return out


# ---- the purchase flow -------------------------------------------------------------------


async def test_a_signed_success_callback_credits_the_coins_once_however_often_it_arrives(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    user = uid("viewer")
    purchase = await new_purchase(clients.wallet, user)
    assert purchase.status == wallet_pb2.PURCHASE_STATUS_PENDING
    assert purchase.checkout.session_id and purchase.checkout.redirect_url
    assert (purchase.coins, purchase.price.amount_minor, purchase.region) == (700, 999, "US")
    callback = signed_callback(deployment.webhook_secret, "payment.succeeded", purchase, event_id=uid("evt"))
    answers = await asyncio.gather(*(clients.wallet.HandlePaymentEvent(callback) for _ in range(5)))
    assert sum(not a.duplicate for a in answers) == 1
    assert all(a.purchase.status == wallet_pb2.PURCHASE_STATUS_SUCCEEDED for a in answers)
    assert await balance_of(clients.wallet, user) == 700
    history = await clients.wallet.ListTransactions(wallet_pb2.ListTransactionsRequest(user_id=user))
    assert [(t.kind, t.amount, t.balance_after, t.reference_id) for t in history.transactions] == [
        ("PURCHASE", 700, 700, purchase.purchase_id)
    ]


async def test_a_checkout_is_resumed_by_create_purchase_with_its_key_as_get_purchase_has_no_redirect_url(  # type: ignore[no-untyped-def]
    clients,
) -> None:
    """What wallet.proto and the README say an app may count on: the redirect URL comes with
    CreatePurchase's answer and its retries under the key, GetPurchase answers the checkout without it."""
    request = wallet_pb2.CreatePurchaseRequest(
        user_id=uid("viewer"),
        package_id="us-usd-70",
        currency_code="USD",
        payment_method=wallet_pb2.PAYMENT_METHOD_CARD,
        idempotency_key=uid("buy"),
    )
    first = await clients.wallet.CreatePurchase(request)
    assert first.checkout.redirect_url
    assert await clients.wallet.CreatePurchase(request) == first  # the app's way back to its checkout
    read = await clients.wallet.GetPurchase(wallet_pb2.GetPurchaseRequest(purchase_id=first.purchase_id))
    assert (read.checkout.session_id, read.checkout.redirect_url) == (first.checkout.session_id, "")


async def test_another_users_page_token_only_sets_where_the_page_starts_within_the_users_own_entries(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    """ListTransactions refuses a token not of its form only: a well-formed one, even another
    user's, is a position, and shows nothing but the user's own entries before it."""
    mine, theirs = uid("viewer"), uid("viewer")
    for user in (mine, theirs, theirs, mine):
        await buy_coins(clients.wallet, deployment.webhook_secret, user, "us-usd-70")
    their_page = await clients.wallet.ListTransactions(wallet_pb2.ListTransactionsRequest(user_id=theirs, page_size=1))
    assert their_page.next_page_token
    mine_all = await clients.wallet.ListTransactions(wallet_pb2.ListTransactionsRequest(user_id=mine))
    assert len(mine_all.transactions) == 2
    mine_before = await clients.wallet.ListTransactions(
        wallet_pb2.ListTransactionsRequest(user_id=mine, page_token=their_page.next_page_token)
    )
    # My entries older than their newest one: my first purchase only, and none of theirs.
    assert [t.entry_id for t in mine_before.transactions] == [mine_all.transactions[1].entry_id]


async def test_an_event_id_reused_for_another_purchase_is_refused_and_the_first_purchase_keeps_it(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    """A provider bug: an event id it sent for one purchase comes again naming another."""
    secret, user = deployment.webhook_secret, uid("viewer")
    first, other = await new_purchase(clients.wallet, user), await new_purchase(clients.wallet, user)
    event_id = uid("evt")
    paid = await clients.wallet.HandlePaymentEvent(signed_callback(secret, "payment.succeeded", first, event_id))
    reused = signed_callback(secret, "payment.succeeded", other, event_id)
    for _ in range(2):  # the provider retries a refusal: each retry is refused alike
        err = await expect_error(
            clients.wallet.HandlePaymentEvent(reused), OK.FAILED_PRECONDITION, "PROVIDER_EVENT_ID_REUSED"
        )
        assert first.purchase_id in str(err.trailing_metadata()), err.trailing_metadata()
    pending = await clients.wallet.GetPurchase(wallet_pb2.GetPurchaseRequest(purchase_id=other.purchase_id))
    assert pending.status == wallet_pb2.PURCHASE_STATUS_PENDING and await balance_of(clients.wallet, user) == 700
    # The id still belongs to the first purchase: its retry is a duplicate.
    again = await clients.wallet.HandlePaymentEvent(signed_callback(secret, "payment.succeeded", first, event_id))
    assert again.duplicate and again.purchase == paid.purchase
    # Once the provider sends the other purchase's event under an id of its own, it applies.
    fixed = await clients.wallet.HandlePaymentEvent(signed_callback(secret, "payment.succeeded", other))
    assert (fixed.purchase.status, fixed.duplicate) == (wallet_pb2.PURCHASE_STATUS_SUCCEEDED, False)
    assert await balance_of(clients.wallet, user) == 1400

    # Both at once: one is applied, the other refused, whichever records the id first.
    a, b = await new_purchase(clients.wallet, user), await new_purchase(clients.wallet, user)
    event_id = uid("evt")
    answers = await asyncio.gather(
        *(clients.wallet.HandlePaymentEvent(signed_callback(secret, "payment.succeeded", p, event_id)) for p in (a, b)),
        return_exceptions=True,
    )
    refused = [x for x in answers if isinstance(x, grpc.aio.AioRpcError)]
    applied = [x for x in answers if not isinstance(x, BaseException)]
    assert len(refused) == 1 and reason_of(refused[0]) == "PROVIDER_EVENT_ID_REUSED", answers
    assert len(applied) == 1 and not applied[0].duplicate, answers
    assert await balance_of(clients.wallet, user) == 2100


async def test_forged_stale_and_malformed_callbacks_are_refused_and_change_nothing(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    user = uid("viewer")
    purchase = await new_purchase(clients.wallet, user)
    forged = signed_callback("not-the-secret", "payment.succeeded", purchase)
    await expect_error(clients.wallet.HandlePaymentEvent(forged), OK.UNAUTHENTICATED, "SIGNATURE_INVALID")
    stale = signed_callback(deployment.webhook_secret, "payment.succeeded", purchase, ts=int(time.time()) - 3600)
    await expect_error(clients.wallet.HandlePaymentEvent(stale), OK.UNAUTHENTICATED, "SIGNATURE_EXPIRED")
    unsigned = signed_callback(deployment.webhook_secret, "payment.succeeded", purchase)
    unsigned.signature = ""
    await expect_error(clients.wallet.HandlePaymentEvent(unsigned), OK.UNAUTHENTICATED, "SIGNATURE_MISSING")
    tampered = signed_callback(deployment.webhook_secret, "payment.succeeded", purchase)
    tampered.payload = tampered.payload.replace(b'"amount_minor":999', b'"amount_minor":1')
    await expect_error(clients.wallet.HandlePaymentEvent(tampered), OK.UNAUTHENTICATED, "SIGNATURE_INVALID")
    body = b'{"id": "x", "type": "payment.succeeded"}'
    malformed = wallet_pb2.HandlePaymentEventRequest(
        provider="dev", payload=body, signature=signing.sign(deployment.webhook_secret.encode(), body)
    )
    await expect_error(clients.wallet.HandlePaymentEvent(malformed), OK.INVALID_ARGUMENT, "MALFORMED_PAYLOAD")
    huge = (
        b'{"id":"y","type":"payment.succeeded","purchase_id":"%s","amount_minor":1e400,"currency_code":"USD"}'
        % purchase.purchase_id.encode()
    )
    overflow = wallet_pb2.HandlePaymentEventRequest(
        provider="dev", payload=huge, signature=signing.sign(deployment.webhook_secret.encode(), huge)
    )
    await expect_error(clients.wallet.HandlePaymentEvent(overflow), OK.INVALID_ARGUMENT, "MALFORMED_PAYLOAD")
    pid = purchase.purchase_id.encode()
    for odd in (
        b"[" * 10_000 + b"]" * 10_000,  # deeper than the JSON parser recurses
        b'{"id":"z","type":"payment.succeeded","purchase_id":"%s\u0000","amount_minor":999,"currency_code":"USD"}'
        % pid,  # a NUL: PostgreSQL cannot store it
        b'{"id":"u","type":"payment.succeeded","purchase_id":"%s\\ud800","amount_minor":999,"currency_code":"USD"}'
        % pid,  # a lone surrogate: not UTF-8, PostgreSQL cannot store it either
        b'{"id":"w","type":"payment.succeeded","purchase_id":"%s","amount_minor":999.9,"currency_code":"USD"}' % pid,
        b'{"id":"v","type":"payment.succeeded","purchase_id":"%s","amount_minor":"999","currency_code":"USD"}' % pid,
    ):
        signed = wallet_pb2.HandlePaymentEventRequest(
            provider="dev", payload=odd, signature=signing.sign(deployment.webhook_secret.encode(), odd)
        )
        await expect_error(clients.wallet.HandlePaymentEvent(signed), OK.INVALID_ARGUMENT, "MALFORMED_PAYLOAD")
    other = wallet_pb2.HandlePaymentEventRequest()
    other.CopyFrom(signed_callback(deployment.webhook_secret, "payment.succeeded", purchase))
    other.provider = "stripe"
    await expect_error(clients.wallet.HandlePaymentEvent(other), OK.INVALID_ARGUMENT, "UNKNOWN_PROVIDER")
    ghost = wallet_pb2.Purchase()
    ghost.CopyFrom(purchase)
    ghost.purchase_id = "no-such-purchase"
    unknown = signed_callback(deployment.webhook_secret, "payment.succeeded", ghost)
    await expect_error(clients.wallet.HandlePaymentEvent(unknown), OK.NOT_FOUND, "UNKNOWN_PURCHASE")
    cheap = wallet_pb2.Purchase()
    cheap.CopyFrom(purchase)
    cheap.price.amount_minor = 1
    underpaid = signed_callback(deployment.webhook_secret, "payment.succeeded", cheap)
    mismatch = await expect_error(clients.wallet.HandlePaymentEvent(underpaid), OK.INVALID_ARGUMENT, "AMOUNT_MISMATCH")
    assert dict(error_info(mismatch).metadata) == {  # what the callback must carry
        "expected_amount_minor": str(purchase.price.amount_minor),
        "expected_currency_code": purchase.price.currency_code,
    }

    still = await clients.wallet.GetPurchase(wallet_pb2.GetPurchaseRequest(purchase_id=purchase.purchase_id))
    assert still.status == wallet_pb2.PURCHASE_STATUS_PENDING
    assert await balance_of(clients.wallet, user) == 0


async def test_transitions_a_purchase_cannot_make_are_refused(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    """A reversal of coins never credited and a second reversal stay errors; a success once one
    was applied, under a new event id, is that success again: a duplicate for its own amount."""
    secret = deployment.webhook_secret
    failed = await new_purchase(clients.wallet, uid("viewer"))
    await clients.wallet.HandlePaymentEvent(signed_callback(secret, "payment.failed", failed))
    for late in ("charge.refunded", "charge.dispute.lost"):
        await expect_error(
            clients.wallet.HandlePaymentEvent(signed_callback(secret, late, failed)),
            OK.FAILED_PRECONDITION,
            "INVALID_TRANSITION",
        )
    succeeded = await new_purchase(clients.wallet, uid("viewer"))
    await clients.wallet.HandlePaymentEvent(signed_callback(secret, "payment.succeeded", succeeded))
    # The provider's own callback after a look-up applied the success (payout's PAID after PAID).
    again = await clients.wallet.HandlePaymentEvent(signed_callback(secret, "payment.succeeded", succeeded))
    assert again.duplicate and again.purchase.status == wallet_pb2.PURCHASE_STATUS_SUCCEEDED
    await clients.wallet.HandlePaymentEvent(signed_callback(secret, "charge.refunded", succeeded))
    late = await clients.wallet.HandlePaymentEvent(signed_callback(secret, "payment.succeeded", succeeded))
    assert late.duplicate and late.purchase.status == wallet_pb2.PURCHASE_STATUS_REFUNDED
    for again_type in ("charge.refunded", "charge.dispute.lost"):
        await expect_error(
            clients.wallet.HandlePaymentEvent(signed_callback(secret, again_type, succeeded)),
            OK.FAILED_PRECONDITION,
            "INVALID_TRANSITION",
        )
    pending = await new_purchase(clients.wallet, uid("viewer"))
    early = signed_callback(secret, "charge.refunded", pending)
    await expect_error(clients.wallet.HandlePaymentEvent(early), OK.FAILED_PRECONDITION, "INVALID_TRANSITION")


async def test_a_failure_reported_after_the_success_is_answered_ok_recorded_once_and_changes_nothing(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    """The provider's failure of a declined attempt arrives (or is retried) after the success was applied."""
    secret, user = deployment.webhook_secret, uid("viewer")
    purchase = await new_purchase(clients.wallet, user)
    paid = await clients.wallet.HandlePaymentEvent(signed_callback(secret, "payment.succeeded", purchase))
    before = await clients.wallet.ListTransactions(wallet_pb2.ListTransactionsRequest(user_id=user))
    late = signed_callback(secret, "payment.failed", purchase)
    answer = await clients.wallet.HandlePaymentEvent(late)
    # Accepted, not a retry of an applied event, and the purchase as it was: nothing changed.
    assert not answer.duplicate and answer.purchase == paid.purchase
    retried = await clients.wallet.HandlePaymentEvent(late)
    assert retried.duplicate and retried.purchase == paid.purchase
    assert await clients.wallet.GetPurchase(wallet_pb2.GetPurchaseRequest(purchase_id=purchase.purchase_id)) == (
        paid.purchase
    )
    assert await clients.wallet.ListTransactions(wallet_pb2.ListTransactionsRequest(user_id=user)) == before
    assert await balance_of(clients.wallet, user) == 700
    # The success can still be reversed, and a failure reported after that changes nothing either.
    refunded = await clients.wallet.HandlePaymentEvent(signed_callback(secret, "charge.refunded", purchase))
    assert refunded.purchase.status == wallet_pb2.PURCHASE_STATUS_REFUNDED
    for _ in range(2):
        after = await clients.wallet.HandlePaymentEvent(signed_callback(secret, "payment.failed", purchase))
        assert not after.duplicate and after.purchase == refunded.purchase
    assert (await clients.wallet.HandlePaymentEvent(late)).duplicate
    assert await balance_of(clients.wallet, user) == 0


async def test_a_second_declined_attempt_is_answered_ok_and_a_later_success_still_credits(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    """Two cards declined, then a third that paid, for the same checkout."""
    secret, user = deployment.webhook_secret, uid("viewer")
    purchase = await new_purchase(clients.wallet, user)
    first = await clients.wallet.HandlePaymentEvent(signed_callback(secret, "payment.failed", purchase))
    second = signed_callback(secret, "payment.failed", purchase)
    answer = await clients.wallet.HandlePaymentEvent(second)
    assert not answer.duplicate and answer.purchase == first.purchase  # FAILED, updated_at unchanged
    assert (await clients.wallet.HandlePaymentEvent(second)).duplicate
    paid = await clients.wallet.HandlePaymentEvent(signed_callback(secret, "payment.succeeded", purchase))
    assert (paid.purchase.status, paid.duplicate) == (wallet_pb2.PURCHASE_STATUS_SUCCEEDED, False)
    assert await balance_of(clients.wallet, user) == 700


async def test_a_payment_that_failed_and_then_succeeded_credits_its_coins_once(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    """A declined attempt, then a later one that took the money, for the same checkout (a second card)."""
    secret, user = deployment.webhook_secret, uid("viewer")
    purchase = await new_purchase(clients.wallet, user)
    failure = signed_callback(secret, "payment.failed", purchase)
    await clients.wallet.HandlePaymentEvent(failure)
    assert await balance_of(clients.wallet, user) == 0
    success = signed_callback(secret, "payment.succeeded", purchase)
    answer = await clients.wallet.HandlePaymentEvent(success)
    assert (answer.purchase.status, answer.duplicate) == (wallet_pb2.PURCHASE_STATUS_SUCCEEDED, False)
    assert (await clients.wallet.HandlePaymentEvent(success)).duplicate  # the provider re-sends it
    assert await balance_of(clients.wallet, user) == 700
    # The failure re-sent after the success is a duplicate: it changes nothing.
    late = await clients.wallet.HandlePaymentEvent(failure)
    assert late.duplicate and late.purchase.status == wallet_pb2.PURCHASE_STATUS_SUCCEEDED
    assert await balance_of(clients.wallet, user) == 700


async def test_a_chargeback_after_the_coins_were_gifted_leaves_a_debt_that_a_later_purchase_repays(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    viewer, creator = uid("viewer"), uid("creator")
    purchase = await buy_coins(clients.wallet, deployment.webhook_secret, viewer, "us-usd-700")
    stream = await live_stream(clients.gifting, creator)
    gift = gifting_pb2.SendGiftRequest(
        stream_id=stream.stream_id, sender_id=viewer, gift_id="panda", quantity=100, idempotency_key=uid("gift")
    )
    assert (await clients.gifting.SendGift(gift)).coins == 500

    received: list[events_pb2.PurchaseReversed] = []
    nc = await nats.connect(deployment.nats_url) if deployment.nats_url else None
    if nc is not None:

        async def on_msg(msg) -> None:  # type: ignore[no-untyped-def]
            event = events_pb2.PurchaseReversed.FromString(msg.data)
            if event.purchase_id == purchase.purchase_id:
                received.append(event)

        await nc.subscribe("wallet.purchase.reversed", cb=on_msg)
        await nc.flush()
    try:
        answer = await clients.wallet.HandlePaymentEvent(
            signed_callback(deployment.webhook_secret, "charge.dispute.lost", purchase)
        )
        assert answer.purchase.status == wallet_pb2.PURCHASE_STATUS_CHARGED_BACK
        balance = await clients.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=viewer))
        assert (balance.coins, balance.debt_coins) == (200 - 700, 500)
        if nc is not None:
            for _ in range(100):
                if received:
                    break
                await asyncio.sleep(0.1)
            assert len(received) == 1
            assert (received[0].coins, received[0].coins_already_spent, received[0].balance_after) == (700, 500, -500)
            assert received[0].kind == "CHARGED_BACK" and received[0].user_id == viewer
    finally:
        if nc is not None:
            await nc.close()

    # The debt blocks spending, whether through gifting or directly.
    again = gifting_pb2.SendGiftRequest(
        stream_id=stream.stream_id, sender_id=viewer, gift_id="rose", quantity=1, idempotency_key=uid("gift")
    )
    await expect_error(clients.gifting.SendGift(again), OK.FAILED_PRECONDITION, "INSUFFICIENT_COINS")
    await expect_error(clients.wallet.Spend(spend_req(viewer, 1)), OK.FAILED_PRECONDITION, "INSUFFICIENT_COINS")
    # The next purchase repays the debt first; only the rest can be spent.
    await buy_coins(clients.wallet, deployment.webhook_secret, viewer, "us-usd-700")
    assert await balance_of(clients.wallet, viewer) == 200
    await expect_error(clients.wallet.Spend(spend_req(viewer, 201)), OK.FAILED_PRECONDITION, "INSUFFICIENT_COINS")
    assert (await clients.wallet.Spend(spend_req(viewer, 200))).balance_after == 0

    history = await clients.wallet.ListTransactions(wallet_pb2.ListTransactionsRequest(user_id=viewer))
    assert [(t.kind, t.balance_after) for t in history.transactions] == [
        ("SPEND_GIFT", 0),
        ("PURCHASE", 200),
        ("REVERSAL_CHARGED_BACK", -500),
        ("SPEND_GIFT", 200),
        ("PURCHASE", 700),
    ]
    audit = await clients.wallet.GetAudit(wallet_pb2.GetAuditRequest())
    assert (audit.ledger_sum, audit.unbalanced_entries, audit.postings_mismatch) == (0, 0, 0)
    assert audit.negative_balances_without_reversal == 0
    assert audit.coins_issued == audit.coins_in_user_balances + audit.coins_spent + audit.coins_reversed


# ---- packages, promotions, operator RPCs -------------------------------------------------


async def test_each_region_lists_its_own_currency_with_its_minor_units(clients) -> None:  # type: ignore[no-untyped-def]
    gb = (await clients.wallet.ListCoinPackages(wallet_pb2.ListCoinPackagesRequest(region="GB"))).packages
    assert [(p.coins, p.price.currency_code, p.price.amount_minor) for p in gb][0] == (65, "GBP", 89)
    assert gb[-1].coins == 16500 and gb[-1].price.amount_minor == 21999
    assert {p.currency_minor_units for p in gb} == {2}
    jp = (
        await clients.wallet.ListCoinPackages(wallet_pb2.ListCoinPackagesRequest(region="jp", currency_code="JPY"))
    ).packages
    assert [(p.coins, p.price.amount_minor, p.currency_minor_units) for p in jp][:2] == [(70, 160, 0), (350, 800, 0)]
    web = (
        await clients.wallet.ListCoinPackages(wallet_pb2.ListCoinPackagesRequest(region="US", channel="web"))
    ).packages
    assert (web[0].package_id, web[0].coins, web[0].price.amount_minor, web[0].channel) == (
        "us-usd-web-70",
        70,
        74,
        "WEB",
    )
    app = (await clients.wallet.ListCoinPackages(wallet_pb2.ListCoinPackagesRequest(region="US"))).packages
    assert (app[0].coins, app[0].price.amount_minor, app[0].channel) == (70, 99, "APP")
    await expect_error(
        clients.wallet.ListCoinPackages(wallet_pb2.ListCoinPackagesRequest(region="US", channel="TV")),
        OK.INVALID_ARGUMENT,
        "INVALID_CHANNEL",
    )
    de = (await clients.wallet.ListCoinPackages(wallet_pb2.ListCoinPackagesRequest(region="DE"))).packages
    assert {p.price.currency_code for p in de} == {"EUR"}
    assert (
        await clients.wallet.ListCoinPackages(wallet_pb2.ListCoinPackagesRequest(region="GB", currency_code="USD"))
    ).packages == []
    await expect_error(
        clients.wallet.ListCoinPackages(wallet_pb2.ListCoinPackagesRequest(region="GB", currency_code="XYZ")),
        OK.INVALID_ARGUMENT,
        "UNKNOWN_CURRENCY",
    )
    user = uid("viewer")
    await expect_error(new_purchase(clients.wallet, user, "gb-gbp-65", "USD"), OK.INVALID_ARGUMENT, "CURRENCY_MISMATCH")
    await expect_error(new_purchase(clients.wallet, user, "gb-gbp-65", "XYZ"), OK.INVALID_ARGUMENT, "UNKNOWN_CURRENCY")
    await expect_error(new_purchase(clients.wallet, user, "no-such-pack", "GBP"), OK.NOT_FOUND, "UNKNOWN_PACKAGE")
    bought = await new_purchase(clients.wallet, user, "jp-jpy-700", "JPY")
    assert (bought.price.currency_code, bought.price.amount_minor, bought.coins) == ("JPY", 1600, 700)


async def test_operator_rpcs_refuse_callers_without_the_operator_token(clients) -> None:  # type: ignore[no-untyped-def]
    req = wallet_pb2.UpsertCoinPackageRequest(
        package_id=uid("pk"),
        region="US",
        currency_code="USD",
        coins=10,
        price_minor=15,
        active=True,
        idempotency_key=uid("k"),
    )
    await expect_error(clients.wallet.UpsertCoinPackage(req), OK.UNAUTHENTICATED, "OPERATOR_TOKEN_MISSING")
    bad = (("authorization", "Bearer wrong"),)
    await expect_error(clients.wallet.UpsertCoinPackage(req, metadata=bad), OK.PERMISSION_DENIED, "NOT_AN_OPERATOR")
    await expect_error(
        clients.wallet.ListPromotions(wallet_pb2.ListPromotionsRequest()), OK.UNAUTHENTICATED, "OPERATOR_TOKEN_MISSING"
    )


async def test_a_running_promotion_sets_the_price_paid_and_a_purchase_keeps_what_it_was_offered(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    md = deployment.operator_metadata
    region = "T" + uid("r")[-6:].upper()
    pkg = await clients.wallet.UpsertCoinPackage(
        wallet_pb2.UpsertCoinPackageRequest(
            package_id=uid("pk"),
            region=region,
            currency_code="eur",
            coins=1000,
            price_minor=1299,
            active=True,
            idempotency_key=uid("k"),
        ),
        metadata=md,
    )
    assert (pkg.region, pkg.price.currency_code, pkg.price.amount_minor) == (region, "EUR", 1299)

    def promotion(pid: str, bonus: int, bps: int, start: int, end: int) -> wallet_pb2.UpsertPromotionRequest:
        return wallet_pb2.UpsertPromotionRequest(
            promotion=wallet_pb2.Promotion(
                promotion_id=pid,
                package_id=pkg.package_id,
                bonus_coins=bonus,
                discount_bps=bps,
                starts_at=ts(start),
                ends_at=ts(end),
                active=True,
            ),
            idempotency_key=uid("k"),
        )

    running = await clients.wallet.UpsertPromotion(promotion(uid("promo"), 100, 2000, -3600, 3600), metadata=md)
    await clients.wallet.UpsertPromotion(promotion(uid("future"), 5000, 9000, 3600, 7200), metadata=md)
    listed = (await clients.wallet.ListCoinPackages(wallet_pb2.ListCoinPackagesRequest(region=region))).packages
    assert len(listed) == 1
    shown = listed[0]
    assert (shown.price.amount_minor, shown.list_price.amount_minor) == (1040, 1299)  # 20% off, rounded up
    assert (shown.coins, shown.bonus_coins, shown.total_coins) == (1000, 100, 1100)
    assert shown.promotion_id == running.promotion_id and shown.promotion_ends_at.seconds > 0
    promos = await clients.wallet.ListPromotions(
        wallet_pb2.ListPromotionsRequest(package_id=pkg.package_id), metadata=md
    )
    assert len(promos.promotions) == 2

    user = uid("viewer")
    purchase = await new_purchase(clients.wallet, user, pkg.package_id, "EUR")
    assert (purchase.coins, purchase.bonus_coins, purchase.price.amount_minor) == (1100, 100, 1040)
    assert purchase.promotion_id == running.promotion_id
    # The operator ends the promotion; the purchase already made keeps its price and coins.
    ended = promotion(running.promotion_id, 100, 2000, -3600, -1)
    await clients.wallet.UpsertPromotion(ended, metadata=md)
    listed = (await clients.wallet.ListCoinPackages(wallet_pb2.ListCoinPackagesRequest(region=region))).packages
    assert (listed[0].price.amount_minor, listed[0].bonus_coins, listed[0].promotion_id) == (1299, 0, "")
    await clients.wallet.HandlePaymentEvent(signed_callback(deployment.webhook_secret, "payment.succeeded", purchase))
    assert await balance_of(clients.wallet, user) == 1100


async def test_operator_input_that_makes_no_sense_is_refused(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    md = deployment.operator_metadata

    def pkg(**kw) -> wallet_pb2.UpsertCoinPackageRequest:  # type: ignore[no-untyped-def]
        fields = {"package_id": uid("pk"), "region": "US", "currency_code": "USD", "coins": 10, "price_minor": 15}
        return wallet_pb2.UpsertCoinPackageRequest(**{**fields, **kw}, active=True, idempotency_key=uid("k"))

    cases = [
        (pkg(package_id="p" * 65), "INVALID_ID"),
        (pkg(region="U S"), "INVALID_REGION"),
        (pkg(currency_code="DOGE"), "UNKNOWN_CURRENCY"),
        (pkg(coins=0), "AMOUNT_NOT_POSITIVE"),
        (pkg(price_minor=-5), "AMOUNT_NOT_POSITIVE"),
        (pkg(coins=2**63 - 1), "AMOUNT_TOO_LARGE"),
    ]
    for req, reason in cases:
        await expect_error(clients.wallet.UpsertCoinPackage(req, metadata=md), OK.INVALID_ARGUMENT, reason)
    promo = wallet_pb2.Promotion(
        promotion_id=uid("p"), package_id="us-usd-70", bonus_coins=5, starts_at=ts(0), ends_at=ts(-10), active=True
    )
    req = wallet_pb2.UpsertPromotionRequest(promotion=promo, idempotency_key=uid("k"))
    await expect_error(clients.wallet.UpsertPromotion(req, metadata=md), OK.INVALID_ARGUMENT, "INVALID_PROMOTION")
    promo.ends_at.seconds = 10**15  # beyond year 9999
    req = wallet_pb2.UpsertPromotionRequest(promotion=promo, idempotency_key=uid("k"))
    await expect_error(clients.wallet.UpsertPromotion(req, metadata=md), OK.INVALID_ARGUMENT, "INVALID_PROMOTION")
    promo.ends_at.CopyFrom(ts(60))
    promo.package_id = "no-such-package"
    req = wallet_pb2.UpsertPromotionRequest(promotion=promo, idempotency_key=uid("k"))
    await expect_error(clients.wallet.UpsertPromotion(req, metadata=md), OK.NOT_FOUND, "UNKNOWN_PACKAGE")
    promo.ClearField("starts_at")
    req = wallet_pb2.UpsertPromotionRequest(promotion=promo, idempotency_key=uid("k"))
    await expect_error(clients.wallet.UpsertPromotion(req, metadata=md), OK.INVALID_ARGUMENT, "MISSING_FIELD")


# ---- spending, limits and concurrency ------------------------------------------------------


async def test_parallel_spends_never_pass_a_daily_limit_and_each_key_is_charged_once(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    user = uid("viewer")
    await buy_coins(clients.wallet, deployment.webhook_secret, user, "us-usd-7000")
    limits = await clients.wallet.SetSpendingLimits(
        wallet_pb2.SetSpendingLimitsRequest(user_id=user, daily=500, idempotency_key=uid("lim"))
    )
    assert next(p for p in limits.periods if p.period == "DAY").limit_coins == 500
    keys = [uid("k") for _ in range(80)]
    # Every key is sent twice at once: 160 concurrent calls for 80 spends of 10 against a cap of 500.
    calls = [clients.wallet.Spend(spend_req(user, 10, k)) for k in keys for _ in range(2)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    charged: dict[str, set[str]] = {}
    for (key, _), res in zip(((k, i) for k in keys for i in range(2)), results, strict=True):
        if isinstance(res, grpc.aio.AioRpcError):
            assert (res.code(), reason_of(res)) == (OK.RESOURCE_EXHAUSTED, "SPENDING_LIMIT_EXCEEDED"), res
        else:
            charged.setdefault(key, set()).add(res.spend_id)
    assert len(charged) == 50
    assert all(len(ids) == 1 for ids in charged.values()), "a key charged twice"
    assert await balance_of(clients.wallet, user) == 7000 - 500
    now = await clients.wallet.GetSpendingLimits(wallet_pb2.GetSpendingLimitsRequest(user_id=user))
    assert {p.period: p.spent_coins for p in now.periods} == {"DAY": 500, "WEEK": 500, "MONTH": 500}
    await expect_error(clients.wallet.Spend(spend_req(user, 1)), OK.RESOURCE_EXHAUSTED, "SPENDING_LIMIT_EXCEEDED")


async def test_parallel_spends_never_overdraw_an_account(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    user = uid("viewer")
    await buy_coins(clients.wallet, deployment.webhook_secret, user, "us-usd-700")
    results = await asyncio.gather(
        *(clients.wallet.Spend(spend_req(user, 10)) for _ in range(100)), return_exceptions=True
    )
    failures = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert {(f.code(), reason_of(f)) for f in failures} == {(OK.FAILED_PRECONDITION, "INSUFFICIENT_COINS")}
    assert len(results) - len(failures) == 70
    assert sorted(r.balance_after for r in results if not isinstance(r, BaseException)) == list(range(0, 700, 10))
    assert await balance_of(clients.wallet, user) == 0


async def test_a_lower_limit_applies_at_once_a_higher_one_waits_and_the_operators_cap_binds_too(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    user = uid("viewer")
    await buy_coins(clients.wallet, deployment.webhook_secret, user, "us-usd-700")
    w = clients.wallet

    def day(limits: wallet_pb2.SpendingLimits) -> wallet_pb2.PeriodLimit:
        return next(p for p in limits.periods if p.period == "DAY")

    await w.Spend(spend_req(user, 80))
    lowered = await w.SetSpendingLimits(
        wallet_pb2.SetSpendingLimitsRequest(user_id=user, daily=100, weekly=300, idempotency_key=uid("l"))
    )
    assert (day(lowered).limit_coins, day(lowered).spent_coins) == (100, 80)  # what was spent today counts
    await expect_error(w.Spend(spend_req(user, 21)), OK.RESOURCE_EXHAUSTED, "SPENDING_LIMIT_EXCEEDED")
    raised = await w.SetSpendingLimits(
        wallet_pb2.SetSpendingLimitsRequest(user_id=user, daily=1000, idempotency_key=uid("l"))
    )
    assert (day(raised).limit_coins, day(raised).raise_pending, day(raised).pending_limit_coins) == (100, True, 1000)
    assert day(raised).pending_effective_at.seconds > time.time() + 3600
    await expect_error(w.Spend(spend_req(user, 21)), OK.RESOURCE_EXHAUSTED, "SPENDING_LIMIT_EXCEEDED")
    removed = await w.SetSpendingLimits(
        wallet_pb2.SetSpendingLimitsRequest(user_id=user, daily=0, idempotency_key=uid("l"))
    )
    assert (day(removed).limit_coins, day(removed).pending_limit_coins) == (100, 0)  # removal waits too

    by_operator = wallet_pb2.SetSpendingLimitsRequest(
        user_id=user, daily=90, set_by=wallet_pb2.LIMIT_SETTER_OPERATOR, idempotency_key=uid("l")
    )
    await expect_error(w.SetSpendingLimits(by_operator), OK.UNAUTHENTICATED, "OPERATOR_TOKEN_MISSING")
    capped = await w.SetSpendingLimits(by_operator, metadata=deployment.operator_metadata)
    assert (day(capped).limit_coins, day(capped).operator_limit_coins, day(capped).user_limit_coins) == (90, 90, 100)
    assert (await w.Spend(spend_req(user, 10))).balance_after == 700 - 90
    await expect_error(w.Spend(spend_req(user, 1)), OK.RESOURCE_EXHAUSTED, "SPENDING_LIMIT_EXCEEDED")


@pytest.mark.parametrize(
    ("call", "code", "reason"),
    [
        (lambda w: w.Spend(spend_req("u", 0)), OK.INVALID_ARGUMENT, "AMOUNT_NOT_POSITIVE"),
        (lambda w: w.Spend(spend_req("u", -3)), OK.INVALID_ARGUMENT, "AMOUNT_NOT_POSITIVE"),
        (lambda w: w.Spend(spend_req("u", 2**63 - 1)), OK.INVALID_ARGUMENT, "AMOUNT_TOO_LARGE"),
        (
            lambda w: w.Spend(wallet_pb2.SpendRequest(user_id="u", amount=1, idempotency_key="k")),
            OK.INVALID_ARGUMENT,
            "INVALID_REASON",
        ),
        (lambda w: w.Spend(spend_req("u", 1, "")), OK.INVALID_ARGUMENT, "MISSING_IDEMPOTENCY_KEY"),
        (lambda w: w.Spend(spend_req("no-such-user-xyz", 1)), OK.FAILED_PRECONDITION, "INSUFFICIENT_COINS"),
        (lambda w: w.GetBalance(wallet_pb2.GetBalanceRequest(user_id="")), OK.INVALID_ARGUMENT, "MISSING_FIELD"),
        (lambda w: w.GetPurchase(wallet_pb2.GetPurchaseRequest(purchase_id="nope")), OK.NOT_FOUND, "UNKNOWN_PURCHASE"),
        (
            lambda w: w.ListTransactions(wallet_pb2.ListTransactionsRequest(user_id="u", page_token="x")),
            OK.INVALID_ARGUMENT,
            "INVALID_PAGE_TOKEN",
        ),
        (
            lambda w: w.ListTransactions(wallet_pb2.ListTransactionsRequest(user_id="u", page_token="9" * 30)),
            OK.INVALID_ARGUMENT,
            "INVALID_PAGE_TOKEN",
        ),
        (
            lambda w: w.ListTransactions(wallet_pb2.ListTransactionsRequest(user_id="u", page_size=-1)),
            OK.INVALID_ARGUMENT,
            "INVALID_PAGE_SIZE",
        ),
        (
            lambda w: w.ListCoinPackages(wallet_pb2.ListCoinPackagesRequest(region="??")),
            OK.INVALID_ARGUMENT,
            "INVALID_REGION",
        ),
        (
            lambda w: w.SetSpendingLimits(
                wallet_pb2.SetSpendingLimitsRequest(user_id="u", daily=-1, idempotency_key="k")
            ),
            OK.INVALID_ARGUMENT,
            "INVALID_LIMIT",
        ),
        (
            lambda w: w.SetSpendingLimits(
                wallet_pb2.SetSpendingLimitsRequest(user_id="u", weekly=10**15, idempotency_key="k")
            ),
            OK.INVALID_ARGUMENT,
            "INVALID_LIMIT",
        ),
        (
            lambda w: w.SetSpendingLimits(wallet_pb2.SetSpendingLimitsRequest(user_id="u", idempotency_key="k")),
            OK.INVALID_ARGUMENT,
            "MISSING_FIELD",
        ),
        (
            lambda w: w.SetSpendingLimits(wallet_pb2.SetSpendingLimitsRequest(user_id="u", daily=5)),
            OK.INVALID_ARGUMENT,
            "MISSING_IDEMPOTENCY_KEY",
        ),
        (
            lambda w: w.SetAccountRestrictions(
                wallet_pb2.SetAccountRestrictionsRequest(user_id=uid("u"), is_minor=True)
            ),
            OK.INVALID_ARGUMENT,
            "MISSING_IDEMPOTENCY_KEY",
        ),
        (
            lambda w: w.SetAccountRestrictions(
                wallet_pb2.SetAccountRestrictionsRequest(user_id=uid("u"), is_minor=True, idempotency_key="k" * 129)
            ),
            OK.INVALID_ARGUMENT,
            "INVALID_IDEMPOTENCY_KEY",
        ),
        (
            lambda w: w.CreatePurchase(
                wallet_pb2.CreatePurchaseRequest(
                    user_id="u", package_id="us-usd-70", currency_code="USD", idempotency_key="k"
                )
            ),
            OK.INVALID_ARGUMENT,
            "INVALID_PAYMENT_METHOD",
        ),
        (
            lambda w: w.CreatePurchase(
                wallet_pb2.CreatePurchaseRequest(
                    user_id="u",
                    package_id="us-usd-70",
                    currency_code="USD",
                    region="GB",
                    payment_method=1,
                    idempotency_key="k",
                )
            ),
            OK.INVALID_ARGUMENT,
            "REGION_MISMATCH",
        ),
        (
            lambda w: w.CreatePurchase(
                wallet_pb2.CreatePurchaseRequest(
                    user_id="u", package_id="us-usd-70", currency_code="USD", payment_method=99, idempotency_key="k"
                )
            ),
            OK.INVALID_ARGUMENT,
            "INVALID_PAYMENT_METHOD",
        ),
    ],
)
async def test_bad_input_is_refused_with_a_stable_reason_and_never_internal(clients, call, code, reason) -> None:  # type: ignore[no-untyped-def]
    await expect_error(call(clients.wallet), code, reason)


async def test_minors_and_blocked_accounts_may_neither_buy_nor_spend(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    w = clients.wallet
    md = deployment.operator_metadata  # an operator blocks and unblocks here, named in the log
    adult, minor, korean = uid("adult"), uid("minor"), uid("kr")
    await buy_coins(w, deployment.webhook_secret, adult)
    await w.SetAccountRestrictions(
        wallet_pb2.SetAccountRestrictionsRequest(user_id=minor, is_minor=True, region="US", idempotency_key=uid("r"))
    )
    await expect_error(new_purchase(w, minor), OK.FAILED_PRECONDITION, "UNDERAGE")
    eighteen = f"{time.gmtime().tm_year - 18}-01-01"
    await w.SetAccountRestrictions(
        wallet_pb2.SetAccountRestrictionsRequest(
            user_id=korean, birth_date=eighteen, region="KR", idempotency_key=uid("r")
        )
    )
    assert not (await w.GetAccountRestrictions(wallet_pb2.GetAccountRestrictionsRequest(user_id=korean))).may_spend
    await expect_error(new_purchase(w, korean), OK.FAILED_PRECONDITION, "UNDERAGE")  # 19+ in South Korea

    await w.SetAccountRestrictions(
        wallet_pb2.SetAccountRestrictionsRequest(user_id=adult, blocked=True, idempotency_key=uid("r")), metadata=md
    )
    await expect_error(w.Spend(spend_req(adult, 1)), OK.FAILED_PRECONDITION, "ACCOUNT_BLOCKED")
    await expect_error(new_purchase(w, adult), OK.FAILED_PRECONDITION, "ACCOUNT_BLOCKED")
    await w.SetAccountRestrictions(
        wallet_pb2.SetAccountRestrictionsRequest(user_id=adult, blocked=False, idempotency_key=uid("r")), metadata=md
    )
    assert (await w.Spend(spend_req(adult, 1))).balance_after == 699


async def test_blocking_and_unblocking_keeps_the_age_and_recording_an_age_keeps_the_block(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    w = clients.wallet
    md = deployment.operator_metadata  # an operator blocks and unblocks here, named in the log

    async def restrictions(user: str) -> wallet_pb2.AccountRestrictions:
        return await w.GetAccountRestrictions(wallet_pb2.GetAccountRestrictionsRequest(user_id=user))

    kid, flagged = uid("kid"), uid("flagged")
    born = f"{time.gmtime().tm_year - 12}-03-01"
    await w.SetAccountRestrictions(
        wallet_pb2.SetAccountRestrictionsRequest(user_id=kid, birth_date=born, region="KR", idempotency_key=uid("r"))
    )
    await w.SetAccountRestrictions(
        wallet_pb2.SetAccountRestrictionsRequest(user_id=flagged, is_minor=True, idempotency_key=uid("r"))
    )
    for user in (kid, flagged):  # an operator blocks, then unblocks, naming only the block
        await w.SetAccountRestrictions(
            wallet_pb2.SetAccountRestrictionsRequest(user_id=user, blocked=True, idempotency_key=uid("r")), metadata=md
        )
        await w.SetAccountRestrictions(
            wallet_pb2.SetAccountRestrictionsRequest(user_id=user, blocked=False, idempotency_key=uid("r")), metadata=md
        )
        assert not (await restrictions(user)).may_spend, user  # still a minor
    kept = await restrictions(kid)
    assert (kept.birth_date, kept.region, kept.blocked) == (born, "KR", False)
    assert (await restrictions(flagged)).is_minor

    adult = uid("adult")
    await w.SetAccountRestrictions(
        wallet_pb2.SetAccountRestrictionsRequest(user_id=adult, blocked=True, idempotency_key=uid("r")), metadata=md
    )
    await w.SetAccountRestrictions(
        wallet_pb2.SetAccountRestrictionsRequest(user_id=adult, birth_date="1990-05-01", idempotency_key=uid("r"))
    )
    assert (await restrictions(adult)).blocked  # the identity service's age does not lift an operator's block
    await w.SetAccountRestrictions(
        wallet_pb2.SetAccountRestrictionsRequest(user_id=flagged, is_minor=False, idempotency_key=uid("r"))
    )
    assert (await restrictions(flagged)).may_spend  # set explicitly, the flag is cleared
    await expect_error(
        w.SetAccountRestrictions(
            wallet_pb2.SetAccountRestrictionsRequest(user_id=adult, region="ＫＲ", idempotency_key=uid("r"))
        ),
        OK.INVALID_ARGUMENT,
        "INVALID_REGION",
    )


async def test_a_block_with_a_wrong_operator_token_is_refused_and_changes_nothing(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    # No token is needed (the contract lists SetAccountRestrictions among internal callers' RPCs),
    # but one that is sent is checked: a wrong one never changes a user as no one's call.
    w = clients.wallet
    user = uid("viewer")
    await w.SetAccountRestrictions(
        wallet_pb2.SetAccountRestrictionsRequest(user_id=user, blocked=True, idempotency_key=uid("r")),
        metadata=deployment.operator_metadata,
    )
    unblock = wallet_pb2.SetAccountRestrictionsRequest(user_id=user, blocked=False, idempotency_key=uid("r"))
    bad = (("authorization", "Bearer wrong"),)
    await expect_error(w.SetAccountRestrictions(unblock, metadata=bad), OK.PERMISSION_DENIED, "NOT_AN_OPERATOR")
    assert (await w.GetAccountRestrictions(wallet_pb2.GetAccountRestrictionsRequest(user_id=user))).blocked
    assert not (await w.SetAccountRestrictions(unblock)).blocked  # without a token: an internal caller's


async def test_a_retried_restriction_answers_as_its_first_call_and_never_undoes_a_later_one(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    w = clients.wallet
    md = deployment.operator_metadata  # an operator blocks and unblocks here, named in the log
    user = uid("viewer")
    block = wallet_pb2.SetAccountRestrictionsRequest(user_id=user, blocked=True, idempotency_key=uid("r"))
    blocked = await w.SetAccountRestrictions(block, metadata=md)
    assert blocked.blocked and not blocked.may_spend
    unblock = wallet_pb2.SetAccountRestrictionsRequest(user_id=user, blocked=False, idempotency_key=uid("r"))
    assert (await w.SetAccountRestrictions(unblock, metadata=md)).may_spend

    # The block's answer was lost and its retry arrives after the unblock: the first answer, no change.
    assert await w.SetAccountRestrictions(block, metadata=md) == blocked
    now = await w.GetAccountRestrictions(wallet_pb2.GetAccountRestrictionsRequest(user_id=user))
    assert (now.blocked, now.may_spend) == (False, True)


async def test_a_restriction_key_reused_for_another_request_is_refused_and_changes_nothing(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    w = clients.wallet
    md = deployment.operator_metadata  # an operator blocks and unblocks here, named in the log
    user = uid("viewer")
    key = uid("r")
    first = await w.SetAccountRestrictions(
        wallet_pb2.SetAccountRestrictionsRequest(user_id=user, blocked=False, idempotency_key=key), metadata=md
    )
    assert first.may_spend
    for other in ({"blocked": True}, {"blocked": False, "is_minor": True}, {}):
        reused = wallet_pb2.SetAccountRestrictionsRequest(user_id=user, idempotency_key=key, **other)
        await expect_error(w.SetAccountRestrictions(reused, metadata=md), OK.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    another_user = wallet_pb2.SetAccountRestrictionsRequest(user_id=uid("viewer"), blocked=False, idempotency_key=key)
    await expect_error(w.SetAccountRestrictions(another_user, metadata=md), OK.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    assert await w.GetAccountRestrictions(wallet_pb2.GetAccountRestrictionsRequest(user_id=user)) == first


async def test_many_users_restrictions_in_one_call_answer_as_one_call_each(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    w = clients.wallet
    md = deployment.operator_metadata  # blocking is an operator's
    minor, blocked, adult, unknown = uid("minor"), uid("blocked"), uid("adult"), uid("nobody")
    await w.SetAccountRestrictions(
        wallet_pb2.SetAccountRestrictionsRequest(user_id=minor, is_minor=True, region="US", idempotency_key=uid("r"))
    )
    await w.SetAccountRestrictions(
        wallet_pb2.SetAccountRestrictionsRequest(user_id=blocked, blocked=True, idempotency_key=uid("r")), metadata=md
    )
    await w.SetAccountRestrictions(
        wallet_pb2.SetAccountRestrictionsRequest(
            user_id=adult, birth_date="1990-05-01", region="KR", idempotency_key=uid("r")
        )
    )
    ids = [unknown, minor, adult, blocked, minor]  # request order kept, a repeated id answered twice
    many = await w.GetAccountRestrictionsMany(wallet_pb2.GetAccountRestrictionsManyRequest(user_ids=ids))
    one_each = [await w.GetAccountRestrictions(wallet_pb2.GetAccountRestrictionsRequest(user_id=u)) for u in ids]
    assert list(many.restrictions) == one_each
    assert [r.may_spend for r in many.restrictions] == [True, False, True, False, False]
    assert many.restrictions[2].region == "KR" and many.restrictions[2].birth_date == "1990-05-01"

    ask = w.GetAccountRestrictionsMany
    await expect_error(ask(wallet_pb2.GetAccountRestrictionsManyRequest()), OK.INVALID_ARGUMENT, "INVALID_BATCH_SIZE")
    too_many = [uid("u") for _ in range(501)]
    await expect_error(
        ask(wallet_pb2.GetAccountRestrictionsManyRequest(user_ids=too_many)), OK.INVALID_ARGUMENT, "INVALID_BATCH_SIZE"
    )
    await expect_error(
        ask(wallet_pb2.GetAccountRestrictionsManyRequest(user_ids=[adult, "a b"])), OK.INVALID_ARGUMENT, "INVALID_ID"
    )


async def test_concurrent_first_calls_for_a_new_user_all_succeed(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    user = uid("newcomer")
    answers = await asyncio.gather(
        *(
            clients.wallet.SetAccountRestrictions(
                wallet_pb2.SetAccountRestrictionsRequest(
                    user_id=user, birth_date="1990-01-01", region="US", idempotency_key=uid("r")
                )
            )
            for _ in range(10)
        )
    )
    assert all(a.may_spend for a in answers)
    assert (await clients.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))).coins == 0


async def test_a_reference_id_with_control_characters_is_refused_on_every_backend(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    user = uid("spender")
    await buy_coins(clients.wallet, deployment.webhook_secret, user, "us-usd-70")
    await expect_error(
        clients.wallet.Spend(
            wallet_pb2.SpendRequest(
                user_id=user,
                amount=1,
                reason=wallet_pb2.SPEND_REASON_TIP,
                reference_id="a\x00b",
                idempotency_key=uid("k"),
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ID",
    )
    assert (await clients.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))).coins == 70
