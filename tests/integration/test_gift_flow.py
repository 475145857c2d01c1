"""The walking skeleton: coins bought, a gift sent, the creator's exact share credited."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import nats
import pytest

from bench.callsplit import TraceContext, read_spans
from livegifts.gifting.v1 import events_pb2 as gifting_events
from livegifts.gifting.v1 import gifting_pb2
from livegifts.payout.v1 import payout_pb2
from livegifts.wallet.v1 import wallet_pb2
from tests.integration.helpers import buy_coins, eventually, expect_error, live_stream, signed_callback, uid

# SpendMany when gifting group-commits (the default): the batch runs in its first gift's trace.
SPEND_SPANS = ("WalletService/Spend", "WalletService/SpendMany")


async def earnings_of(clients, creator: str, lifetime: int) -> payout_pb2.Earnings:  # type: ignore[no-untyped-def]
    """Wait until the creator's lifetime diamonds reach `lifetime`."""
    return await eventually(
        lambda: clients.payout.GetEarnings(payout_pb2.GetEarningsRequest(creator_id=creator)),
        lambda e: e.diamonds_lifetime >= lifetime,
    )


async def test_a_gift_flows_from_purchase_to_creator_diamonds(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    viewer, creator = uid("viewer"), uid("creator")
    await buy_coins(clients.wallet, deployment.webhook_secret, viewer, "us-usd-700")
    stream = await live_stream(clients.gifting, creator)

    receipt = await clients.gifting.SendGift(
        gifting_pb2.SendGiftRequest(
            stream_id=stream.stream_id, sender_id=viewer, gift_id="panda", quantity=3, idempotency_key=uid("gift")
        )
    )
    assert receipt.coins == 15
    assert receipt.sender_balance == 700 - 15
    assert receipt.status == gifting_pb2.GIFT_STATUS_SENT
    # An odd coin count: 7 coins at 50% is 3.5 diamonds; with the panda's 15 (7.5) the creator's
    # 22 coins make exactly 11 diamonds, nothing kept. The next rose leaves half a diamond kept.
    await clients.gifting.SendGift(
        gifting_pb2.SendGiftRequest(
            stream_id=stream.stream_id, sender_id=viewer, gift_id="rose", quantity=7, idempotency_key=uid("gift")
        )
    )
    balance = await clients.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=viewer))
    assert balance.coins == 700 - 15 - 7

    earned = await earnings_of(clients, creator, 11)
    assert earned.coins_received == 22
    assert earned.diamonds_lifetime == 11  # 22 * 50% exactly
    assert earned.diamonds_available == 11
    assert earned.remainder_units == 0

    await clients.gifting.SendGift(
        gifting_pb2.SendGiftRequest(
            stream_id=stream.stream_id, sender_id=viewer, gift_id="rose", quantity=1, idempotency_key=uid("gift")
        )
    )
    earned = await eventually(
        lambda: clients.payout.GetEarnings(payout_pb2.GetEarningsRequest(creator_id=creator)),
        lambda e: e.coins_received == 23,
    )
    assert (earned.diamonds_lifetime, earned.remainder_units) == (11, 5000)  # half a diamond kept, not lost


async def test_send_gift_is_idempotent_per_key(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    viewer, creator = uid("viewer"), uid("creator")
    await buy_coins(clients.wallet, deployment.webhook_secret, viewer)
    stream = await live_stream(clients.gifting, creator)
    req = gifting_pb2.SendGiftRequest(
        stream_id=stream.stream_id, sender_id=viewer, gift_id="lollipop", quantity=2, idempotency_key=uid("gift")
    )
    first, second = await asyncio.gather(clients.gifting.SendGift(req), clients.gifting.SendGift(req))
    third = await clients.gifting.SendGift(req)
    assert first.gift_event_id == second.gift_event_id == third.gift_event_id
    balance = await clients.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=viewer))
    assert balance.coins == 700 - 20  # charged once

    other = gifting_pb2.SendGiftRequest()
    other.CopyFrom(req)
    other.quantity = 3
    await expect_error(clients.gifting.SendGift(other), grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")


@pytest.mark.parametrize(
    ("change", "code", "reason"),
    [
        ({"stream_id": "no-such-stream"}, grpc.StatusCode.NOT_FOUND, "UNKNOWN_STREAM"),
        ({"gift_id": "no-such-gift"}, grpc.StatusCode.NOT_FOUND, "UNKNOWN_GIFT"),
        ({"quantity": 0}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_QUANTITY"),
        ({"quantity": -5}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_QUANTITY"),
        ({"quantity": 10_000_000}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_QUANTITY"),
        ({"idempotency_key": ""}, grpc.StatusCode.INVALID_ARGUMENT, "MISSING_IDEMPOTENCY_KEY"),
        ({"idempotency_key": "k" * 129}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_IDEMPOTENCY_KEY"),
        ({"sender_id": ""}, grpc.StatusCode.INVALID_ARGUMENT, "MISSING_FIELD"),
        ({"sender_id": "SELF"}, grpc.StatusCode.FAILED_PRECONDITION, "SELF_GIFT"),
        ({"gift_id": "universe", "quantity": 9}, grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_COINS"),
    ],
)
async def test_bad_gifts_are_refused_with_a_stable_reason_and_charge_nothing(  # type: ignore[no-untyped-def]
    clients, deployment, change, code, reason
) -> None:
    viewer, creator = uid("viewer"), uid("creator")
    await buy_coins(clients.wallet, deployment.webhook_secret, viewer)
    stream = await live_stream(clients.gifting, creator)
    fields = {
        "stream_id": stream.stream_id,
        "sender_id": viewer,
        "gift_id": "rose",
        "quantity": 1,
        "idempotency_key": uid("g"),
    }
    fields.update(change)
    if fields["sender_id"] == "SELF":
        fields["sender_id"] = creator
    before = await clients.gifting.GetAudit(gifting_pb2.GetAuditRequest())
    await expect_error(clients.gifting.SendGift(gifting_pb2.SendGiftRequest(**fields)), code, reason)
    balance = await clients.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=viewer))
    assert balance.coins == 700
    after = await clients.gifting.GetAudit(gifting_pb2.GetAuditRequest())
    assert after.coins_sent == before.coins_sent or deployment.suite is None


async def test_a_refused_combo_or_tip_message_names_the_bound_an_app_shows(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    """QUANTITY_MAX and TIP_MESSAGE_CHARS_MAX are settings: the wire errors (and SendGifts' item
    errors) carry them, so an app needs no copy of a deployment's settings to say what would pass."""
    from google.rpc import error_details_pb2, status_pb2

    def metadata(exc: grpc.aio.AioRpcError) -> dict[str, str]:
        for key, value in exc.trailing_metadata() or ():
            if key == "grpc-status-details-bin":
                info = error_details_pb2.ErrorInfo()
                status_pb2.Status.FromString(value).details[0].Unpack(info)
                return dict(info.metadata)
        return {}

    viewer, creator = uid("viewer"), uid("creator")
    stream = await live_stream(clients.gifting, creator)
    combo = gifting_pb2.SendGiftRequest(
        stream_id=stream.stream_id, sender_id=viewer, gift_id="rose", quantity=10_000, idempotency_key=uid("g")
    )
    exc = await expect_error(clients.gifting.SendGift(combo), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_QUANTITY")
    assert metadata(exc)["quantity_max"] == "9999"
    dear = gifting_pb2.SendGiftRequest(
        stream_id=stream.stream_id, sender_id=viewer, gift_id="universe", quantity=286, idempotency_key=uid("g")
    )
    batch = await clients.gifting.SendGifts(gifting_pb2.SendGiftsRequest(gifts=[dear]))
    assert (batch.results[0].error.reason, batch.results[0].error.metadata["quantity_max"]) == (
        "INVALID_QUANTITY",
        "285",
    )
    tip = gifting_pb2.SendTipRequest(
        stream_id=stream.stream_id, sender_id=viewer, coins=1, message="x" * 151, idempotency_key=uid("t")
    )
    exc = await expect_error(clients.gifting.SendTip(tip), grpc.StatusCode.INVALID_ARGUMENT, "MESSAGE_TOO_LONG")
    assert metadata(exc) == {"tip_message_chars_max": "150"}


async def test_a_gift_to_an_ended_stream_is_refused_but_a_retry_of_an_earlier_one_is_answered(
    clients, deployment
) -> None:  # type: ignore[no-untyped-def]
    viewer, creator = uid("viewer"), uid("creator")
    await buy_coins(clients.wallet, deployment.webhook_secret, viewer)
    stream = await live_stream(clients.gifting, creator)
    before = gifting_pb2.SendGiftRequest(
        stream_id=stream.stream_id, sender_id=viewer, gift_id="rose", quantity=1, idempotency_key=uid("g")
    )
    sent = await clients.gifting.SendGift(before)
    ended = await clients.gifting.EndStream(
        gifting_pb2.EndStreamRequest(stream_id=stream.stream_id, idempotency_key=uid("end"))
    )
    assert ended.status == gifting_pb2.STREAM_STATUS_ENDED
    await expect_error(
        clients.gifting.SendGift(
            gifting_pb2.SendGiftRequest(
                stream_id=stream.stream_id, sender_id=viewer, gift_id="rose", quantity=1, idempotency_key=uid("g")
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "STREAM_NOT_LIVE",
    )
    # A retry of the gift sent while live: its key answers first, with the same gift, charged once;
    # the key with another request is a misuse of the key, whatever the stream's state.
    assert (await clients.gifting.SendGift(before)).gift_event_id == sent.gift_event_id
    other = gifting_pb2.SendGiftRequest()
    other.CopyFrom(before)
    other.quantity = 2
    await expect_error(clients.gifting.SendGift(other), grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    assert (await clients.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=viewer))).coins == 700 - 1


async def test_a_gift_refused_for_coins_frees_its_key_for_a_later_retry(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    viewer, creator = uid("viewer"), uid("creator")
    await buy_coins(clients.wallet, deployment.webhook_secret, viewer, "us-usd-70")
    stream = await live_stream(clients.gifting, creator)
    req = gifting_pb2.SendGiftRequest(
        stream_id=stream.stream_id, sender_id=viewer, gift_id="rainbow-puke", quantity=1, idempotency_key=uid("g")
    )
    await expect_error(clients.gifting.SendGift(req), grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_COINS")
    await buy_coins(clients.wallet, deployment.webhook_secret, viewer, "us-usd-70")
    receipt = await clients.gifting.SendGift(req)
    assert receipt.coins == 100 and receipt.sender_balance == 40


async def test_concurrent_spends_never_overdraw_an_account(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    user = uid("spender")
    await buy_coins(clients.wallet, deployment.webhook_secret, user, "us-usd-700")

    async def spend(i: int) -> int:
        try:
            r = await clients.wallet.Spend(
                wallet_pb2.SpendRequest(
                    user_id=user,
                    amount=30,
                    reason=wallet_pb2.SPEND_REASON_TIP,
                    reference_id=f"r{i}",
                    idempotency_key=uid("s"),
                )
            )
            assert r.balance_after >= 0
            return 1
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.details()
            return 0

    results = await asyncio.gather(*(spend(i) for i in range(40)))
    assert sum(results) == 700 // 30  # 23 succeed, the rest are refused
    balance = await clients.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))
    assert balance.coins == 700 - 23 * 30


async def test_a_gift_event_delivered_twice_credits_diamonds_once(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    if deployment.nats_url is None:
        pytest.skip("needs the deployment's NATS URL (LIVEGIFTS_TEST_TARGET_NATS_URL)")
    creator = uid("creator")
    event = gifting_events.GiftSent(
        event_id=uuid.uuid4().hex,
        kind=gifting_events.GIFT_KIND_GIFT,
        stream_id="s-dup",
        creator_id=creator,
        sender_id=uid("viewer"),
        gift_id="rose",
        quantity=11,
        coins=11,
    )
    nc = await nats.connect(deployment.nats_url)
    try:
        js = nc.jetstream()
        # Different Nats-Msg-Ids get past JetStream's own de-duplication: only the inbox stops them.
        for _ in range(2):
            await js.publish("gifting.gift.sent", event.SerializeToString(), headers={"Nats-Msg-Id": uuid.uuid4().hex})
        marker = gifting_events.GiftSent()
        marker.CopyFrom(event)
        marker.event_id, marker.coins, marker.quantity = uuid.uuid4().hex, 2, 2
        await js.publish("gifting.gift.sent", marker.SerializeToString(), headers={"Nats-Msg-Id": marker.event_id})
    finally:
        await nc.close()
    # Once the later marker event is in, both copies of the first have been consumed too.
    earned = await eventually(
        lambda: clients.payout.GetEarnings(payout_pb2.GetEarningsRequest(creator_id=creator)),
        lambda e: e.coins_received >= 13,
    )
    await asyncio.sleep(0.5)
    earned = await clients.payout.GetEarnings(payout_pb2.GetEarningsRequest(creator_id=creator))
    assert earned.coins_received == 13
    assert (earned.diamonds_lifetime, earned.remainder_units) == (6, 5000)


def _spans_of(deployment, trace_id: str) -> dict[str, list[dict]]:  # type: ignore[no-untyped-def,type-arg]
    """The spans of one trace the suite's services exported, by service."""
    return {
        svc: [
            s
            for s in read_spans(deployment.var_dir / f"{svc}.spans.jsonl")
            if s["context"]["trace_id"].removeprefix("0x") == trace_id
        ]
        for svc in ("gifting", "wallet", "payout")
    }


async def _trace(deployment, trace_id: str, whole) -> dict[str, list[dict]]:  # type: ignore[no-untyped-def,type-arg]
    """The trace's spans once `whole(spans)` holds (each service exports on its own 200 ms timer)."""
    spans = _spans_of(deployment, trace_id)
    for _ in range(50):
        if whole(spans):
            break
        await asyncio.sleep(0.2)
        spans = _spans_of(deployment, trace_id)
    names = {svc: sorted({s["name"] for s in spans[svc]}) for svc in spans}
    assert whole(spans), f"trace {trace_id} is not whole: {names}"
    return spans


def _one(spans: list[dict], name: str) -> dict:  # type: ignore[type-arg]
    """The one span of that name (or name ending)."""
    found = [s for s in spans if s["name"] == name or s["name"].endswith(name)]
    assert len(found) == 1, (name, [s["name"] for s in spans])
    return found[0]


def _has(spans: list[dict], name: str) -> bool:  # type: ignore[type-arg]
    return any(s["name"] == name or s["name"].endswith(name) for s in spans)


async def test_one_send_gift_is_traced_across_gifting_wallet_and_payout(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    if deployment.var_dir is None:
        pytest.skip("reads the services' span files; only for suites the tests start")
    viewer, creator = uid("viewer"), uid("creator")
    await buy_coins(clients.wallet, deployment.webhook_secret, viewer)
    stream = await live_stream(clients.gifting, creator)
    # This call's own trace, sampled, as the load generator sends it: only its spans carry this id,
    # whatever other tests' gifts left in the span files.
    traceparent, trace_id = TraceContext(every=1).metadata(sample=True)
    assert trace_id is not None
    await clients.gifting.SendGift(
        gifting_pb2.SendGiftRequest(
            stream_id=stream.stream_id, sender_id=viewer, gift_id="rose", quantity=1, idempotency_key=uid("g")
        ),
        metadata=traceparent,
    )
    await eventually(
        lambda: clients.payout.GetEarnings(payout_pb2.GetEarningsRequest(creator_id=creator)),
        lambda e: e.coins_received == 1,
    )
    spans = await _trace(
        deployment,
        trace_id,
        lambda sp: (
            _has(sp["gifting"], "SendGift")
            and any(s["name"].endswith(SPEND_SPANS) for s in sp["wallet"])
            and _has(sp["gifting"], "publish gifting.gift.sent")
            and _has(sp["payout"], "process gifting.gift.sent")
        ),
    )
    # The SendGift server span marks when each step ended (bench/callsplit.py splits calls by them).
    server = _one(spans["gifting"], "SendGift")
    events = [(e["name"], e["timestamp"]) for e in server["events"]]
    assert [n for n, _ in events] == ["gift recorded", "coins spent"], events
    assert server["start_time"] <= events[0][1] <= events[1][1] <= server["end_time"], (server, events)
    # The relay's publish hangs under the call that wrote the event, and payout's credit under
    # the publish: the time the event waited in the outbox shows between them.
    publish = _one(spans["gifting"], "publish gifting.gift.sent")
    assert publish["kind"] == "SpanKind.PRODUCER", publish
    assert publish["parent_id"] == server["context"]["span_id"], (publish, server)
    consume = _one(spans["payout"], "process gifting.gift.sent")
    assert consume["parent_id"] == publish["context"]["span_id"], (consume, publish)


async def test_a_purchase_and_its_reversal_are_traced_from_the_callback_to_payouts_clawback(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    if deployment.var_dir is None:
        pytest.skip("reads the services' span files; only for suites the tests start")
    viewer = uid("viewer")
    purchase = await clients.wallet.CreatePurchase(
        wallet_pb2.CreatePurchaseRequest(
            user_id=viewer,
            package_id="us-usd-700",
            currency_code="USD",
            payment_method=wallet_pb2.PAYMENT_METHOD_CARD,
            idempotency_key=uid("buy"),
        )
    )
    bought, bought_trace = TraceContext(every=1).metadata(sample=True)
    assert bought_trace is not None
    await clients.wallet.HandlePaymentEvent(
        signed_callback(deployment.webhook_secret, "payment.succeeded", purchase), metadata=bought
    )
    # Every span read below: each service exports on its own timer, so one's spans can be in its
    # file before another's (CI once read the wallet's file before its reversal spans were in it).
    bought_spans = ("HandlePaymentEvent", "publish wallet.purchase.completed")
    spans = await _trace(deployment, bought_trace, lambda sp: all(_has(sp["wallet"], n) for n in bought_spans))
    callback = _one(spans["wallet"], "HandlePaymentEvent")
    publish = _one(spans["wallet"], "publish wallet.purchase.completed")
    assert publish["parent_id"] == callback["context"]["span_id"], (publish, callback)

    reversed_, reversed_trace = TraceContext(every=1).metadata(sample=True)
    assert reversed_trace is not None
    await clients.wallet.HandlePaymentEvent(
        signed_callback(deployment.webhook_secret, "charge.refunded", purchase), metadata=reversed_
    )
    reversal_spans = ("HandlePaymentEvent", "publish wallet.purchase.reversed")
    spans = await _trace(
        deployment,
        reversed_trace,
        lambda sp: (
            _has(sp["payout"], "process wallet.purchase.reversed")
            and all(_has(sp["wallet"], n) for n in reversal_spans)
        ),
    )
    callback = _one(spans["wallet"], "HandlePaymentEvent")
    publish = _one(spans["wallet"], "publish wallet.purchase.reversed")
    assert publish["parent_id"] == callback["context"]["span_id"], (publish, callback)
    consume = _one(spans["payout"], "process wallet.purchase.reversed")
    assert consume["parent_id"] == publish["context"]["span_id"], (consume, publish)
