"""SendGifts: many gifts in one call, each with its own key and its own result."""

from __future__ import annotations

import time

import grpc

from livegifts.gifting.v1 import gifting_pb2
from livegifts.payout.v1 import payout_pb2
from livegifts.wallet.v1 import wallet_pb2
from services.common.clients import error_info
from tests.integration.helpers import balance, buy_coins, eventually, expect_error, gift, live_stream, uid


async def test_a_batch_sends_every_gift_once_and_bad_items_fail_alone(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    rich, poor, creator = uid("rich"), uid("poor"), uid("creator")
    await buy_coins(clients.wallet, deployment.webhook_secret, rich, "us-usd-700")
    await buy_coins(clients.wallet, deployment.webhook_secret, poor, "us-usd-70")
    stream = await live_stream(clients.gifting, creator)
    s = stream.stream_id
    items = [
        gift(s, rich, "panda", 2),  # 10 coins
        gift(s, rich, "no-such-gift", 1),  # NOT_FOUND / UNKNOWN_GIFT
        gift(s, poor, "galaxy", 1),  # 1000 coins, poor has 70: the wallet refuses
        gift(s, creator, "rose", 1),  # SELF_GIFT
        gift("no-such-stream", rich, "rose", 1),  # UNKNOWN_STREAM
        gift(s, rich, "rose", 0),  # INVALID_QUANTITY
        gift(s, poor, "lollipop", 3),  # 30 coins
        gift(s, rich, "rose", 1, key=""),  # MISSING_IDEMPOTENCY_KEY
    ]
    answer = await clients.gifting.SendGifts(gifting_pb2.SendGiftsRequest(gifts=items))
    assert len(answer.results) == len(items)
    r = answer.results
    assert r[0].receipt.coins == 10 and r[0].receipt.status == gifting_pb2.GIFT_STATUS_SENT
    assert (r[1].error.code, r[1].error.reason) == (grpc.StatusCode.NOT_FOUND.value[0], "UNKNOWN_GIFT")
    assert (r[2].error.code, r[2].error.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION.value[0],
        "INSUFFICIENT_COINS",
    )
    # The metadata SendGift's ErrorInfo carries comes along (a client shows what is missing).
    assert dict(r[2].error.metadata) == {"balance": "70", "required": "1000"}
    assert r[3].error.reason == "SELF_GIFT"
    assert r[4].error.reason == "UNKNOWN_STREAM"
    assert (r[5].error.code, r[5].error.reason) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], "INVALID_QUANTITY")
    assert r[6].receipt.coins == 30 and r[6].receipt.sender_balance == 70 - 30
    assert r[7].error.reason == "MISSING_IDEMPOTENCY_KEY"
    assert len({r[0].receipt.gift_event_id, r[6].receipt.gift_event_id}) == 2
    # Coins were charged for the two good items only, once each.
    assert await balance(clients, rich) == 700 - 10
    assert await balance(clients, poor) == 70 - 30

    # The same batch again: every good item answers as before and nothing is charged twice.
    again = await clients.gifting.SendGifts(gifting_pb2.SendGiftsRequest(gifts=items))
    assert again.results[0].receipt == r[0].receipt
    assert again.results[6].receipt == r[6].receipt
    assert again.results[2].error.reason == "INSUFFICIENT_COINS"
    assert await balance(clients, rich) == 700 - 10
    assert await balance(clients, poor) == 70 - 30

    # A batch item and SendGift share one key space: SendGift with the item's key returns its receipt.
    single = await clients.gifting.SendGift(items[0])
    assert single == r[0].receipt
    assert await balance(clients, rich) == 700 - 10

    # The creator is credited 40 coins' share, each gift once.
    earned = await eventually(
        lambda: clients.payout.GetEarnings(payout_pb2.GetEarningsRequest(creator_id=creator)),
        lambda e: e.coins_received >= 40,
    )
    assert earned.coins_received == 40
    assert earned.diamonds_lifetime == 20


async def test_a_reused_key_fails_only_its_own_item(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    viewer, creator = uid("viewer"), uid("creator")
    await buy_coins(clients.wallet, deployment.webhook_secret, viewer, "us-usd-700")
    s = (await live_stream(clients.gifting, creator)).stream_id
    key = uid("gift")
    first = await clients.gifting.SendGift(gift(s, viewer, "rose", 1, key=key))
    answer = await clients.gifting.SendGifts(
        gifting_pb2.SendGiftsRequest(
            gifts=[
                gift(s, viewer, "rose", 2, key=key),  # same key, different request
                gift(s, viewer, "rose", 1, key=key),  # same key again within the batch
                gift(s, viewer, "gg", 4),
            ]
        )
    )
    r = answer.results
    assert (r[0].error.code, r[0].error.reason) == (grpc.StatusCode.ALREADY_EXISTS.value[0], "IDEMPOTENCY_KEY_REUSED")
    assert dict(r[0].error.metadata) == {"scope": "SendGift"}  # the key space gifts, tips and unlocks share
    assert r[1].error.reason == "DUPLICATE_KEY_IN_BATCH"
    assert r[2].receipt.coins == 4
    assert first.coins == 1
    assert await balance(clients, viewer) == 700 - 1 - 4


async def test_an_items_error_carries_the_metadata_sendgift_would(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    minor, viewer, capped, creator = uid("minor"), uid("viewer"), uid("capped"), uid("creator")
    for v in (minor, viewer, capped):
        await buy_coins(clients.wallet, deployment.webhook_secret, v, "us-usd-70")
    await clients.wallet.SetAccountRestrictions(
        wallet_pb2.SetAccountRestrictionsRequest(user_id=minor, is_minor=True, idempotency_key=uid("r")),
        metadata=deployment.operator_metadata,
    )
    await clients.wallet.SetSpendingLimits(
        wallet_pb2.SetSpendingLimitsRequest(user_id=capped, daily=5, idempotency_key=uid("l"))
    )
    s = (await live_stream(clients.gifting, creator)).stream_id
    await clients.gifting.SendGift(gift(s, capped, "rose", 1))  # 1 of today's 5 spent
    items = [
        gift(s, minor, "rose", 1),
        gift(s, capped, "rose", 5),  # 1 + 5 > 5: fits tomorrow
        gift(s, capped, "panda", 2),  # 10 coins > 5: fits on no day
        gift(s, viewer, "rose", 1),
    ]
    days = {_next_utc_midnight_us()}
    answer = await clients.gifting.SendGifts(gifting_pb2.SendGiftsRequest(gifts=items))
    days.add(_next_utc_midnight_us())  # two only if the call straddled midnight
    r = answer.results
    assert (r[0].error.reason, dict(r[0].error.metadata)) == ("UNDERAGE", {"role": "sender"})
    meta = dict(r[1].error.metadata)
    assert int(meta.pop("resets_at_us")) in days  # when today's count starts again from 0
    assert (r[1].error.reason, meta) == (
        "SPENDING_LIMIT_EXCEEDED",
        {"period": "DAY", "limit_coins": "5", "spent_coins": "1"},
    )
    # No reset time that waiting would reach: the amount alone is above the limit.
    assert (r[2].error.reason, dict(r[2].error.metadata)) == (
        "SPENDING_LIMIT_EXCEEDED",
        {"period": "DAY", "limit_coins": "5", "spent_coins": "1", "amount_exceeds_limit": "true"},
    )
    assert r[3].receipt.coins == 1
    # SendGift answers the same items with the same metadata in its ErrorInfo.
    for item, result in zip(items[:3], r[:3], strict=True):
        err = await expect_error(clients.gifting.SendGift(item), _CODES[result.error.code])
        assert (error_info(err).reason, dict(error_info(err).metadata)) == (
            result.error.reason,
            dict(result.error.metadata),
        )


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def _next_utc_midnight_us() -> int:
    """The instant today's (UTC) spending counters start again from 0, by this machine's clock."""
    return (int(time.time()) // 86_400 + 1) * 86_400 * 1_000_000


async def test_a_batch_of_a_hundred_lands_every_gift(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    viewers = [uid("viewer") for _ in range(5)]
    creators = [uid("creator") for _ in range(3)]
    for v in viewers:
        await buy_coins(clients.wallet, deployment.webhook_secret, v, "us-usd-350")
    streams = [(await live_stream(clients.gifting, c)).stream_id for c in creators]
    items = [gift(streams[i % 3], viewers[i % 5], "finger-heart", 1 + i % 2) for i in range(100)]
    answer = await clients.gifting.SendGifts(gifting_pb2.SendGiftsRequest(gifts=items))
    assert all(x.HasField("receipt") for x in answer.results), [x.error for x in answer.results if x.error.reason]
    assert len({x.receipt.gift_event_id for x in answer.results}) == 100
    assert sum(x.receipt.coins for x in answer.results) == sum(5 * it.quantity for it in items)
    for i, v in enumerate(viewers):
        spent = sum(5 * it.quantity for it in items[i::5])
        assert await balance(clients, v) == 350 - spent


async def test_an_empty_or_oversized_batch_is_refused(clients) -> None:  # type: ignore[no-untyped-def]
    await expect_error(
        clients.gifting.SendGifts(gifting_pb2.SendGiftsRequest()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_BATCH_SIZE",
    )
    too_many = [gift("s", "v", "rose", 1) for _ in range(101)]
    await expect_error(
        clients.gifting.SendGifts(gifting_pb2.SendGiftsRequest(gifts=too_many)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_BATCH_SIZE",
    )
