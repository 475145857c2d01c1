"""Gifting on real processes: catalog, tips, unlocks, eligibility, leaderboards, stats, the live feed."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from livegifts.gifting.v1 import events_pb2, gifting_pb2
from livegifts.payout.v1 import payout_pb2
from livegifts.wallet.v1 import wallet_pb2
from services.common.clients import error_info
from tests.integration.helpers import balance, buy_coins, eventually, expect_error, live_stream, uid


async def received_by(clients, creator: str, coins: int) -> payout_pb2.Earnings:  # type: ignore[no-untyped-def]
    """Wait until payout has credited `coins` received by the creator."""
    return await eventually(
        lambda: clients.payout.GetEarnings(payout_pb2.GetEarningsRequest(creator_id=creator)),
        lambda e: e.coins_received >= coins,
    )


def gift(stream_id: str, sender: str, gift_id: str = "rose", quantity: int = 1) -> gifting_pb2.SendGiftRequest:
    """A SendGift request with a fresh key."""
    return gifting_pb2.SendGiftRequest(
        stream_id=stream_id, sender_id=sender, gift_id=gift_id, quantity=quantity, idempotency_key=uid("g")
    )


async def test_a_tip_flows_to_the_creators_diamonds_and_carries_its_message(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    viewer, creator = uid("viewer"), uid("creator")
    await buy_coins(clients.wallet, deployment.webhook_secret, viewer)
    stream = await live_stream(clients.gifting, creator)
    req = gifting_pb2.SendTipRequest(
        stream_id=stream.stream_id, sender_id=viewer, coins=42, message="great set!", idempotency_key=uid("tip")
    )
    receipt = await clients.gifting.SendTip(req)
    again = await clients.gifting.SendTip(req)
    assert receipt.status == gifting_pb2.GIFT_STATUS_SENT
    assert (receipt.coins, receipt.sender_balance) == (42, 700 - 42)
    assert again.gift_event_id == receipt.gift_event_id  # same key: the same tip, charged once
    assert await balance(clients, viewer) == 700 - 42

    earned = await received_by(clients, creator, 42)
    assert (earned.coins_received, earned.diamonds_lifetime) == (42, 21)
    audit = await clients.gifting.GetAudit(gifting_pb2.GetAuditRequest())
    assert audit.coins_by_kind["TIP"] >= 42 and audit.sent_by_kind["TIP"] >= 1


async def test_tips_and_gifts_sent_together_each_charge_once_per_key(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    """Concurrent tips and gifts share step 1's batches: every key is its own tip or gift, charged once.

    Each tip is sent twice at once with its key (a retry racing the first call, often in the
    same batch); one tip reuses a gift's key with another request and must be refused.
    """
    viewers = [uid("viewer") for _ in range(6)]
    creator = uid("creator")
    for v in viewers:
        await buy_coins(clients.wallet, deployment.webhook_secret, v)
    stream = await live_stream(clients.gifting, creator)
    tips = [
        gifting_pb2.SendTipRequest(
            stream_id=stream.stream_id, sender_id=v, coins=7 + i, message=f"tip {i}", idempotency_key=uid("tip")
        )
        for i, v in enumerate(viewers)
    ]
    gifts = [gift(stream.stream_id, v) for v in viewers]  # a rose is 1 coin
    reused = gifting_pb2.SendTipRequest(
        stream_id=stream.stream_id, sender_id=viewers[0], coins=5, idempotency_key=gifts[0].idempotency_key
    )
    calls = [clients.gifting.SendTip(t) for t in tips for _ in range(2)] + [clients.gifting.SendGift(g) for g in gifts]
    answers = await asyncio.gather(*calls, clients.gifting.SendTip(reused), return_exceptions=True)
    tip_answers, gift_answers, reused_answer = answers[: 2 * len(tips)], answers[2 * len(tips) : -1], answers[-1]
    for i in range(len(tips)):
        first, second = tip_answers[2 * i], tip_answers[2 * i + 1]
        assert isinstance(first, gifting_pb2.GiftReceipt) and isinstance(second, gifting_pb2.GiftReceipt)
        assert first.gift_event_id == second.gift_event_id and first.coins == 7 + i
    assert all(isinstance(a, gifting_pb2.GiftReceipt) for a in gift_answers)
    # The reused key belongs to a gift, or (if the tip came first) the gift is the one refused.
    refused = [a for a in [reused_answer, gift_answers[0]] if isinstance(a, grpc.aio.AioRpcError)]
    assert len(refused) == 1, [reused_answer, gift_answers[0]]
    assert error_info(refused[0]).reason == "IDEMPOTENCY_KEY_REUSED"
    tip_coins_by_viewer = {v: 7 + i for i, v in enumerate(viewers)}
    reused_spent = 5 if isinstance(reused_answer, gifting_pb2.GiftReceipt) else 0
    for i, v in enumerate(viewers):
        rose = 0 if (i == 0 and reused_spent) else 1
        spent = tip_coins_by_viewer[v] + rose + (reused_spent if i == 0 else 0)
        assert await balance(clients, v) == 700 - spent, v
    total = sum(tip_coins_by_viewer.values()) + len(viewers) - (1 if reused_spent else 0) + reused_spent
    earned = await received_by(clients, creator, total)
    assert earned.coins_received == total


@pytest.mark.parametrize(
    ("change", "code", "reason"),
    [
        ({"coins": 0}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TIP_AMOUNT"),
        ({"coins": 100_001}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TIP_AMOUNT"),
        ({"message": "x" * 151}, grpc.StatusCode.INVALID_ARGUMENT, "MESSAGE_TOO_LONG"),
        ({"message": "bell\a"}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MESSAGE"),
        ({"sender_id": "SELF"}, grpc.StatusCode.FAILED_PRECONDITION, "SELF_GIFT"),
        ({"stream_id": "no-such-stream"}, grpc.StatusCode.NOT_FOUND, "UNKNOWN_STREAM"),
        ({"coins": 701}, grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_COINS"),
    ],
)
async def test_bad_tips_are_refused_with_a_stable_reason_and_charge_nothing(  # type: ignore[no-untyped-def]
    clients, deployment, change, code, reason
) -> None:
    viewer, creator = uid("viewer"), uid("creator")
    await buy_coins(clients.wallet, deployment.webhook_secret, viewer)
    stream = await live_stream(clients.gifting, creator)
    fields = {"stream_id": stream.stream_id, "sender_id": viewer, "coins": 5, "idempotency_key": uid("tip")}
    fields.update(change)
    if fields["sender_id"] == "SELF":
        fields["sender_id"] = creator
    await expect_error(clients.gifting.SendTip(gifting_pb2.SendTipRequest(**fields)), code, reason)
    assert await balance(clients, viewer) == 700


async def test_an_unlock_charges_once_and_a_second_unlock_returns_the_existing_access(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    viewer, creator = uid("viewer"), uid("creator")
    await buy_coins(clients.wallet, deployment.webhook_secret, viewer)
    content = await clients.gifting.CreateContent(
        gifting_pb2.CreateContentRequest(
            creator_id=creator, title="backstage", price_coins=120, idempotency_key=uid("c")
        )
    )
    access = await clients.gifting.CheckAccess(
        gifting_pb2.CheckAccessRequest(user_id=viewer, content_id=content.content_id)
    )
    assert not access.has_access

    unlock = gifting_pb2.UnlockContentRequest(user_id=viewer, content_id=content.content_id)
    # Two unlocks with different keys at once: one charge, both answers name the same unlock.
    a, b = await asyncio.gather(
        clients.gifting.UnlockContent(gifting_pb2.UnlockContentRequest(**_fields(unlock), idempotency_key=uid("u"))),
        clients.gifting.UnlockContent(gifting_pb2.UnlockContentRequest(**_fields(unlock), idempotency_key=uid("u"))),
    )
    assert a.gift_event_id == b.gift_event_id
    assert {a.already_unlocked, b.already_unlocked} == {False, True}
    first = a if not a.already_unlocked else b
    assert (first.coins, first.sender_balance, first.status) == (120, 580, gifting_pb2.GIFT_STATUS_SENT)
    later = await clients.gifting.UnlockContent(
        gifting_pb2.UnlockContentRequest(**_fields(unlock), idempotency_key=uid("u"))
    )
    assert later.already_unlocked and later.gift_event_id == first.gift_event_id
    assert await balance(clients, viewer) == 700 - 120

    access = await clients.gifting.CheckAccess(
        gifting_pb2.CheckAccessRequest(user_id=viewer, content_id=content.content_id)
    )
    assert access.has_access and access.unlocked_at.seconds > 0
    earned = await received_by(clients, creator, 120)
    assert (earned.coins_received, earned.diamonds_lifetime) == (120, 60)


async def test_a_key_used_for_a_gift_is_refused_for_an_unlock_the_user_already_has(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    viewer, creator = uid("viewer"), uid("creator")
    await buy_coins(clients.wallet, deployment.webhook_secret, viewer)
    content = await clients.gifting.CreateContent(
        gifting_pb2.CreateContentRequest(creator_id=creator, title="vip", price_coins=50, idempotency_key=uid("c"))
    )
    unlock = gifting_pb2.UnlockContentRequest(user_id=viewer, content_id=content.content_id)
    first = await clients.gifting.UnlockContent(
        gifting_pb2.UnlockContentRequest(**_fields(unlock), idempotency_key=uid("u"))
    )
    stream = await live_stream(clients.gifting, creator)
    key = uid("k")
    await clients.gifting.SendGift(
        gifting_pb2.SendGiftRequest(
            stream_id=stream.stream_id, sender_id=viewer, gift_id="rose", quantity=1, idempotency_key=key
        )
    )
    # The same key for the unlock the user already has (its content's creator now known to gifting).
    await expect_error(
        clients.gifting.UnlockContent(gifting_pb2.UnlockContentRequest(**_fields(unlock), idempotency_key=key)),
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
    )
    again = await clients.gifting.UnlockContent(
        gifting_pb2.UnlockContentRequest(**_fields(unlock), idempotency_key=uid("u"))
    )
    assert again.already_unlocked and again.gift_event_id == first.gift_event_id
    assert await balance(clients, viewer) == 700 - 50 - 1


async def test_concurrent_unlocks_of_many_viewers_share_step_one_and_charge_each_viewer_once(
    clients, deployment
) -> None:  # type: ignore[no-untyped-def]
    creator = uid("creator")
    viewers = [uid("viewer") for _ in range(5)]
    for v in viewers:
        await buy_coins(clients.wallet, deployment.webhook_secret, v)
    content = await clients.gifting.CreateContent(
        gifting_pb2.CreateContentRequest(creator_id=creator, title="vlog", price_coins=50, idempotency_key=uid("c"))
    )
    # Every viewer twice (two keys) at once, with a retry of one key: one batch holds them all.
    reqs = [
        gifting_pb2.UnlockContentRequest(user_id=v, content_id=content.content_id, idempotency_key=uid("u"))
        for v in viewers
        for _ in range(2)
    ]
    receipts = await asyncio.gather(*(clients.gifting.UnlockContent(r) for r in [*reqs, reqs[0]]))
    by_viewer: dict[str, list[gifting_pb2.UnlockReceipt]] = {}
    for r in receipts:
        by_viewer.setdefault(r.user_id, []).append(r)
    for v in viewers:
        mine = by_viewer[v]
        assert len({r.gift_event_id for r in mine}) == 1, "one unlock per viewer, every answer names it"
        fresh = [r for r in mine if not r.already_unlocked]
        assert fresh and all(r.sender_balance == 650 for r in fresh)
        assert await balance(clients, v) == 700 - 50
    assert receipts[0].gift_event_id == receipts[-1].gift_event_id
    assert receipts[0].already_unlocked == receipts[-1].already_unlocked, "a retry answers as its key did"
    earned = await received_by(clients, creator, 50 * len(viewers))
    assert earned.coins_received == 50 * len(viewers)


async def test_an_unlock_refused_for_coins_grants_no_access_and_can_be_retried(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    viewer, creator = uid("viewer"), uid("creator")
    await buy_coins(clients.wallet, deployment.webhook_secret, viewer, "us-usd-70")
    content = await clients.gifting.CreateContent(
        gifting_pb2.CreateContentRequest(creator_id=creator, title="dm", price_coins=100, idempotency_key=uid("c"))
    )
    req = gifting_pb2.UnlockContentRequest(user_id=viewer, content_id=content.content_id, idempotency_key=uid("u"))
    await expect_error(clients.gifting.UnlockContent(req), grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_COINS")
    check = gifting_pb2.CheckAccessRequest(user_id=viewer, content_id=content.content_id)
    assert not (await clients.gifting.CheckAccess(check)).has_access
    await buy_coins(clients.wallet, deployment.webhook_secret, viewer, "us-usd-70")
    receipt = await clients.gifting.UnlockContent(req)
    assert (receipt.already_unlocked, receipt.sender_balance) == (False, 40)
    assert (await clients.gifting.CheckAccess(check)).has_access
    await expect_error(
        clients.gifting.UnlockContent(
            gifting_pb2.UnlockContentRequest(user_id=creator, content_id=content.content_id, idempotency_key=uid("u"))
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "SELF_GIFT",
    )


def _fields(req: gifting_pb2.UnlockContentRequest) -> dict[str, str]:
    return {"user_id": req.user_id, "content_id": req.content_id}


async def test_operators_add_reprice_and_retire_gifts_and_the_price_charged_is_the_price_at_send_time(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    md = deployment.operator_metadata
    viewer, creator = uid("viewer"), uid("creator")
    gift_id = uid("comet")
    await buy_coins(clients.wallet, deployment.webhook_secret, viewer)
    stream = await live_stream(clients.gifting, creator)

    add = gifting_pb2.UpsertGiftRequest(gift_id=gift_id, name="Comet", price_coins=7, idempotency_key=uid("op"))
    await expect_error(clients.gifting.UpsertGift(add), grpc.StatusCode.UNAUTHENTICATED, "OPERATOR_TOKEN_MISSING")
    await expect_error(
        clients.gifting.UpsertGift(add, metadata=(("authorization", "Bearer wrong"),)),
        grpc.StatusCode.PERMISSION_DENIED,
        "NOT_AN_OPERATOR",
    )
    added = await clients.gifting.UpsertGift(add, metadata=md)
    assert (added.name, added.price_coins, added.active) == ("Comet", 7, True)
    first = await clients.gifting.SendGift(gift(stream.stream_id, viewer, gift_id, 2))
    assert first.coins == 14

    repriced = await clients.gifting.UpsertGift(
        gifting_pb2.UpsertGiftRequest(gift_id=gift_id, price_coins=11, idempotency_key=uid("op")), metadata=md
    )
    assert (repriced.name, repriced.price_coins) == ("Comet", 11)
    second = await clients.gifting.SendGift(gift(stream.stream_id, viewer, gift_id, 2))
    assert second.coins == 22

    await clients.gifting.UpsertGift(
        gifting_pb2.UpsertGiftRequest(gift_id=gift_id, retired=True, idempotency_key=uid("op")), metadata=md
    )
    await expect_error(
        clients.gifting.SendGift(gift(stream.stream_id, viewer, gift_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "GIFT_RETIRED",
    )
    listed = await clients.gifting.ListGifts(gifting_pb2.ListGiftsRequest())
    assert gift_id not in {g.gift_id for g in listed.gifts}
    assert await balance(clients, viewer) == 700 - 14 - 22
    await expect_error(
        clients.gifting.UpsertGift(
            gifting_pb2.UpsertGiftRequest(gift_id=uid("new"), name="No price", idempotency_key=uid("op")), metadata=md
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "MISSING_FIELD",
    )


@pytest.mark.parametrize(
    ("who", "restriction", "reason"),
    [
        ("sender", {"is_minor": True}, "UNDERAGE"),
        ("sender", {"blocked": True}, "ACCOUNT_BLOCKED"),
        ("creator", {"birth_date": "2015-01-01"}, "UNDERAGE"),
        ("creator", {"blocked": True}, "ACCOUNT_BLOCKED"),
    ],
)
async def test_ineligible_senders_and_creators_are_refused_before_any_coin_moves(  # type: ignore[no-untyped-def]
    clients, deployment, who, restriction, reason
) -> None:
    viewer, creator = uid("viewer"), uid("creator")
    await buy_coins(clients.wallet, deployment.webhook_secret, viewer)
    stream = await live_stream(clients.gifting, creator)
    content = await clients.gifting.CreateContent(
        gifting_pb2.CreateContentRequest(creator_id=creator, title="x", price_coins=5, idempotency_key=uid("c"))
    )
    await clients.wallet.SetAccountRestrictions(
        wallet_pb2.SetAccountRestrictionsRequest(
            user_id=viewer if who == "sender" else creator, **restriction, idempotency_key=uid("r")
        ),
        metadata=deployment.operator_metadata,
    )
    before = await clients.gifting.GetAudit(gifting_pb2.GetAuditRequest())
    code = grpc.StatusCode.FAILED_PRECONDITION
    await expect_error(clients.gifting.SendGift(gift(stream.stream_id, viewer)), code, reason)
    await expect_error(
        clients.gifting.SendTip(
            gifting_pb2.SendTipRequest(stream_id=stream.stream_id, sender_id=viewer, coins=3, idempotency_key=uid("t"))
        ),
        code,
        reason,
    )
    await expect_error(
        clients.gifting.UnlockContent(
            gifting_pb2.UnlockContentRequest(user_id=viewer, content_id=content.content_id, idempotency_key=uid("u"))
        ),
        code,
        reason,
    )
    assert await balance(clients, viewer) == 700
    after = await clients.gifting.GetAudit(gifting_pb2.GetAuditRequest())
    if deployment.suite is not None:  # nobody else uses this suite's gifting at the same time
        assert after.gifts_cancelled == before.gifts_cancelled  # refused before a gift was even recorded
    if restriction == {"blocked": True}:
        # A refusal is not remembered by gifting's cache: lifted, the next gift goes through at once.
        await clients.wallet.SetAccountRestrictions(
            wallet_pb2.SetAccountRestrictionsRequest(
                user_id=viewer if who == "sender" else creator, blocked=False, idempotency_key=uid("r")
            ),
            metadata=deployment.operator_metadata,
        )
        sent = await clients.gifting.SendGift(gift(stream.stream_id, viewer))
        assert sent.status == gifting_pb2.GIFT_STATUS_SENT


@pytest.mark.parametrize("who", ["sender", "creator"])
async def test_a_restriction_set_after_gifting_started_stops_the_coins_at_once(clients, deployment, who) -> None:  # type: ignore[no-untyped-def]
    """Gifting's pre-check remembers a user's restrictions (ELIGIBILITY_CACHE_S); the wallet does not."""
    viewer, creator = uid("viewer"), uid("creator")
    await buy_coins(clients.wallet, deployment.webhook_secret, viewer)
    stream = await live_stream(clients.gifting, creator)
    first = await clients.gifting.SendGift(gift(stream.stream_id, viewer))  # both now cached as eligible
    assert first.status == gifting_pb2.GIFT_STATUS_SENT
    await clients.wallet.SetAccountRestrictions(
        wallet_pb2.SetAccountRestrictionsRequest(
            user_id=viewer if who == "sender" else creator, blocked=True, idempotency_key=uid("r")
        ),
        metadata=deployment.operator_metadata,
    )
    before = await balance(clients, viewer)
    refused = gift(stream.stream_id, viewer)
    await expect_error(clients.gifting.SendGift(refused), grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_BLOCKED")
    assert await balance(clients, viewer) == before
    # The refusal was settled in the spend's transaction: the same key now starts a new gift.
    err = await expect_error(clients.gifting.SendGift(refused), grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_BLOCKED")
    assert await balance(clients, viewer) == before
    assert error_info(err).metadata["role"] == who  # named as the pre-check names it
    # Unblocked: gifting does not remember a refusal, so the very next gift goes through.
    await clients.wallet.SetAccountRestrictions(
        wallet_pb2.SetAccountRestrictionsRequest(
            user_id=viewer if who == "sender" else creator, blocked=False, idempotency_key=uid("r")
        ),
        metadata=deployment.operator_metadata,
    )
    assert (await clients.gifting.SendGift(gift(stream.stream_id, viewer))).status == gifting_pb2.GIFT_STATUS_SENT


async def test_watch_stream_receives_gifts_from_two_concurrent_senders_in_order_and_ends_with_the_stream(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    alice, bob, creator = uid("alice"), uid("bob"), uid("creator")
    await asyncio.gather(*(buy_coins(clients.wallet, deployment.webhook_secret, u) for u in (alice, bob)))
    stream = await live_stream(clients.gifting, creator)
    call = clients.gifting.WatchStream(gifting_pb2.WatchStreamRequest(stream_id=stream.stream_id))
    await asyncio.wait_for(call.initial_metadata(), 10)  # the feed is listening from here on

    sent: dict[str, list[str]] = {alice: [], bob: []}

    async def send(sender: str, gift_id: str, n: int) -> None:
        for _ in range(n):
            receipt = await clients.gifting.SendGift(gift(stream.stream_id, sender, gift_id))
            sent[sender].append(receipt.gift_event_id)

    received_items: list[gifting_pb2.StreamFeedItem] = []

    async def read(n: int) -> None:
        while len(received_items) < n:
            item = await call.read()
            assert item is not grpc.aio.EOF
            received_items.append(item)

    reader = asyncio.create_task(read(17))
    await asyncio.gather(send(alice, "rose", 8), send(bob, "panda", 8))
    tip = await clients.gifting.SendTip(
        gifting_pb2.SendTipRequest(
            stream_id=stream.stream_id, sender_id=bob, coins=9, message="hi", idempotency_key=uid("t")
        )
    )
    sent[bob].append(tip.gift_event_id)
    # A liveness bound only (how fast the feed is, is bench/'s to measure): every gift, the last
    # tip too, reaches the watcher without a later publish to push it out.
    await asyncio.wait_for(reader, 15)
    for sender in (alice, bob):
        assert [i.gift_event_id for i in received_items if i.sender_id == sender] == sent[sender]
    alice_items = [i for i in received_items if i.sender_id == alice]
    assert [i.combo_count for i in alice_items] == list(range(1, 9))  # one streak of roses
    assert all((i.gift_id, i.quantity, i.coins) == ("rose", 1, 1) for i in alice_items)
    assert received_items[-1].kind == events_pb2.GIFT_KIND_TIP and received_items[-1].message == "hi"

    await clients.gifting.EndStream(
        gifting_pb2.EndStreamRequest(stream_id=stream.stream_id, idempotency_key=uid("end"))
    )
    async with asyncio.timeout(10):
        last = await call.read()
        assert last.stream_ended
        assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_an_overlay_that_reconnects_with_its_last_cursor_gets_the_gifts_it_missed_then_the_live_ones(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    viewer, creator = uid("viewer"), uid("creator")
    await buy_coins(clients.wallet, deployment.webhook_secret, viewer)
    stream = await live_stream(clients.gifting, creator)

    async def watch(cursor: str = ""):  # type: ignore[no-untyped-def]
        call = clients.gifting.WatchStream(
            gifting_pb2.WatchStreamRequest(stream_id=stream.stream_id, resume_cursor=cursor)
        )
        await asyncio.wait_for(call.initial_metadata(), 10)  # the feed is listening from here on
        return call

    async def sent(n: int) -> list[str]:
        return [(await clients.gifting.SendGift(gift(stream.stream_id, viewer))).gift_event_id for _ in range(n)]

    async def items(call, n: int) -> list[gifting_pb2.StreamFeedItem]:  # type: ignore[no-untyped-def]
        async with asyncio.timeout(15):  # a liveness bound only
            return [await call.read() for _ in range(n)]

    first = await watch()
    before = await sent(3)
    seen = await items(first, 3)
    assert [i.gift_event_id for i in seen] == [i.cursor for i in seen] == before
    first.cancel()  # the overlay drops off; gifts go on
    missed = await sent(5)

    again = await watch(seen[-1].cursor)
    caught_up = await items(again, 5)
    assert [i.gift_event_id for i in caught_up] == missed  # exactly the missed ones, in order
    assert [i.occurred_at.ToMicroseconds() for i in caught_up] == sorted(
        i.occurred_at.ToMicroseconds() for i in caught_up
    )
    live = await sent(2)
    assert [i.gift_event_id for i in await items(again, 2)] == live  # then the live ones, none twice
    await clients.gifting.EndStream(
        gifting_pb2.EndStreamRequest(stream_id=stream.stream_id, idempotency_key=uid("end"))
    )
    assert (await items(again, 1))[0].stream_ended  # nothing in between: no gift came twice
    assert await again.code() == grpc.StatusCode.OK

    # A cursor that is no item of this stream's feed: refused before the feed listens.
    other = await live_stream(clients.gifting, uid("creator"))
    for cursor in (uid("no-such-gift"), missed[0]):
        call = clients.gifting.WatchStream(
            gifting_pb2.WatchStreamRequest(stream_id=other.stream_id, resume_cursor=cursor)
        )
        await expect_error(call.read(), grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_CURSOR")


async def test_watching_an_unknown_stream_fails_and_an_ended_one_ends_at_once(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    call = clients.gifting.WatchStream(gifting_pb2.WatchStreamRequest(stream_id="no-such-stream"))
    await expect_error(call.read(), grpc.StatusCode.NOT_FOUND, "UNKNOWN_STREAM")
    stream = await live_stream(clients.gifting, uid("creator"))
    await clients.gifting.EndStream(
        gifting_pb2.EndStreamRequest(stream_id=stream.stream_id, idempotency_key=uid("end"))
    )
    items = [i async for i in clients.gifting.WatchStream(gifting_pb2.WatchStreamRequest(stream_id=stream.stream_id))]
    assert [i.stream_ended for i in items] == [True]


async def test_a_thousand_gifts_from_a_hundred_senders_add_up_on_the_leaderboards(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    creator = uid("creator")
    senders = [uid(f"fan{i:03d}") for i in range(100)]
    sem = asyncio.Semaphore(20)

    async def bounded(start):  # type: ignore[no-untyped-def]
        async with sem:  # a gRPC call starts when it is created: create it inside the semaphore
            return await start()

    await asyncio.gather(
        *(bounded(lambda s=s: buy_coins(clients.wallet, deployment.webhook_secret, s)) for s in senders)
    )
    stream = await live_stream(clients.gifting, creator)
    rng = random.Random(4)
    plan = [
        (senders[i % 100], rng.choice(["rose", "finger-heart", "hand-wave"]), rng.randint(1, 3)) for i in range(1000)
    ]
    receipts = await asyncio.gather(
        *(bounded(lambda r=gift(stream.stream_id, s, g, q): clients.gifting.SendGift(r)) for s, g, q in plan)
    )
    spent: dict[str, int] = {}
    for (sender, _, _), r in zip(plan, receipts, strict=True):
        assert r.status == gifting_pb2.GIFT_STATUS_SENT
        spent[sender] = spent.get(sender, 0) + r.coins
    total = sum(spent.values())
    for sender in senders[:5]:
        assert await balance(clients, sender) == 700 - spent[sender]

    by_stream = gifting_pb2.GetLeaderboardRequest(stream_id=stream.stream_id, limit=100, sender_id=senders[7])
    board = await eventually(lambda: clients.gifting.GetLeaderboard(by_stream), lambda b: b.coins_total >= total, 60)
    assert (board.coins_total, board.senders) == (total, 100)
    assert {e.sender_id: e.coins for e in board.entries} == spent
    assert [e.coins for e in board.entries] == sorted(spent.values(), reverse=True)
    assert board.entries[0].rank == 1
    ahead = sum(1 for c in spent.values() if c > spent[senders[7]])
    assert (board.own.sender_id, board.own.coins, board.own.rank) == (senders[7], spent[senders[7]], ahead + 1)

    for req in (
        gifting_pb2.GetLeaderboardRequest(creator_id=creator, limit=3),
        gifting_pb2.GetLeaderboardRequest(
            stream_id=stream.stream_id, window=gifting_pb2.LEADERBOARD_WINDOW_LAST_7_DAYS, limit=3
        ),
    ):
        top = await clients.gifting.GetLeaderboard(req)
        assert (top.coins_total, top.senders, len(top.entries)) == (total, 100, 3)
        assert [e.coins for e in top.entries] == sorted(spent.values(), reverse=True)[:3]

    stats = await clients.gifting.GetCreatorStats(gifting_pb2.GetCreatorStatsRequest(creator_id=creator))
    assert stats.coins_total == total
    assert [(s.key, s.coins, s.count) for s in stats.by_stream] == [(stream.stream_id, total, 1000)]
    by_gift: dict[str, int] = {}
    for (_, g, _), r in zip(plan, receipts, strict=True):
        by_gift[g] = by_gift.get(g, 0) + r.coins
    assert {s.key: s.coins for s in stats.by_gift} == by_gift
    assert sum(h.coins for h in stats.by_hour) == total and sum(h.count for h in stats.by_hour) == 1000
    earned = await received_by(clients, creator, total)
    assert earned.coins_received == total


async def test_leaderboard_and_stats_requests_are_bounded(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    code = grpc.StatusCode.INVALID_ARGUMENT
    await expect_error(clients.gifting.GetLeaderboard(gifting_pb2.GetLeaderboardRequest()), code, "MISSING_FIELD")
    await expect_error(
        clients.gifting.GetLeaderboard(gifting_pb2.GetLeaderboardRequest(creator_id="c", limit=101)),
        code,
        "INVALID_LIMIT",
    )
    wide = gifting_pb2.GetCreatorStatsRequest(creator_id="c")
    getattr(wide, "from").FromSeconds(0)
    await expect_error(clients.gifting.GetCreatorStats(wide), code, "INVALID_WINDOW")
    empty = await clients.gifting.GetLeaderboard(gifting_pb2.GetLeaderboardRequest(stream_id=uid("s"), sender_id="x"))
    assert (empty.coins_total, empty.senders, len(empty.entries), empty.HasField("own")) == (0, 0, 0, False)


async def test_a_key_whose_gift_was_cancelled_stays_its_requests_and_its_retry_sends_it_once(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    """A gift refused for coins is cancelled; its key may send that gift later, never another request."""
    viewer, creator = uid("viewer"), uid("creator")
    await buy_coins(clients.wallet, deployment.webhook_secret, viewer)  # 700 coins
    stream = await live_stream(clients.gifting, creator)
    galaxy = gift(stream.stream_id, viewer, "galaxy")  # 1000 coins
    await expect_error(clients.gifting.SendGift(galaxy), grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_COINS")
    # Another request under the cancelled gift's key, one the coins would pay for: refused, not charged.
    rose = gifting_pb2.SendGiftRequest()
    rose.CopyFrom(galaxy)
    rose.gift_id = "rose"
    await expect_error(clients.gifting.SendGift(rose), grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    batch = await clients.gifting.SendGifts(gifting_pb2.SendGiftsRequest(gifts=[rose]))
    assert batch.results[0].error.reason == "IDEMPOTENCY_KEY_REUSED"
    tip = gifting_pb2.SendTipRequest(
        stream_id=stream.stream_id, sender_id=viewer, coins=5, idempotency_key=galaxy.idempotency_key
    )
    await expect_error(clients.gifting.SendTip(tip), grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    assert await balance(clients, viewer) == 700
    # The same request after a top-up: a new gift, sent once however often (and however) it is retried.
    await buy_coins(clients.wallet, deployment.webhook_secret, viewer)
    sent = await asyncio.gather(*(clients.gifting.SendGift(galaxy) for _ in range(3)))
    assert {r.gift_event_id for r in sent} == {sent[0].gift_event_id}
    assert sent[0].status == gifting_pb2.GIFT_STATUS_SENT and sent[0].sender_balance == 400
    again = await clients.gifting.SendGifts(gifting_pb2.SendGiftsRequest(gifts=[galaxy]))
    assert again.results[0].receipt.gift_event_id == sent[0].gift_event_id
    await expect_error(clients.gifting.SendGift(rose), grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    assert await balance(clients, viewer) == 400
    assert (await received_by(clients, creator, 1000)).coins_received == 1000


async def test_a_resume_after_any_item_of_a_batch_of_gifts_sends_exactly_the_ones_after_it(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    """One SendGifts marks its gifts SENT in one transaction, at one time: the feed must still send
    them in the order a resume reads them, or a resume in the middle loses some and doubles others."""
    viewer, creator = uid("viewer"), uid("creator")
    await buy_coins(clients.wallet, deployment.webhook_secret, viewer)
    stream = await live_stream(clients.gifting, creator)

    async def feed(cursor: str = "") -> list[gifting_pb2.StreamFeedItem]:
        call = clients.gifting.WatchStream(
            gifting_pb2.WatchStreamRequest(stream_id=stream.stream_id, resume_cursor=cursor)
        )
        return [item async for item in call]  # up to the end item (the stream ends first)

    watch = clients.gifting.WatchStream(gifting_pb2.WatchStreamRequest(stream_id=stream.stream_id))
    await asyncio.wait_for(watch.initial_metadata(), 10)  # the feed is listening from here on
    batch = [gift(stream.stream_id, viewer) for _ in range(12)]
    sent = await clients.gifting.SendGifts(gifting_pb2.SendGiftsRequest(gifts=batch))
    assert all(r.HasField("receipt") for r in sent.results), sent
    async with asyncio.timeout(15):  # a liveness bound only
        live = [(await watch.read()).cursor for _ in batch]
    watch.cancel()
    await clients.gifting.EndStream(gifting_pb2.EndStreamRequest(stream_id=stream.stream_id, idempotency_key=uid("e")))
    async with asyncio.timeout(30):
        for k, cursor in enumerate(live):  # the overlay dropped off right after item k
            resumed = await feed(cursor)
            assert [i.cursor for i in resumed[:-1]] == live[k + 1 :], k
            assert resumed[-1].stream_ended
