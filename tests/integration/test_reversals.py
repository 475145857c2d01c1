"""Reversals across wallet and payout: what a refund or chargeback claws back from creators."""

from __future__ import annotations

import time
import uuid

import nats
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from livegifts.gifting.v1 import events_pb2 as gifting_events
from livegifts.payout.v1 import payout_pb2
from livegifts.wallet.v1 import events_pb2 as wallet_events
from livegifts.wallet.v1 import wallet_pb2
from tests.integration.helpers import buy_coins, eventually, gift_700_coins, signed_callback, uid


async def earnings(clients, creator: str) -> payout_pb2.Earnings:  # type: ignore[no-untyped-def]
    """GetEarnings of one creator."""
    return await clients.payout.GetEarnings(payout_pb2.GetEarningsRequest(creator_id=creator))


async def test_refunding_a_purchase_that_only_repaid_a_chargeback_debt_claws_back_no_creator_again(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    viewer, x, y = uid("viewer"), uid("creator-x"), uid("creator-y")
    secret = deployment.webhook_secret
    await buy_coins(clients.wallet, secret, viewer)  # P0: its cash is kept
    await gift_700_coins(clients.gifting, viewer, x)
    p1 = await buy_coins(clients.wallet, secret, viewer)
    await gift_700_coins(clients.gifting, viewer, y)
    await eventually(lambda: earnings(clients, y), lambda e: e.coins_received == 700)
    await eventually(lambda: earnings(clients, x), lambda e: e.coins_received == 700)

    # P1 is charged back after its coins went to Y: Y's diamonds are clawed back, the viewer owes 700.
    await clients.wallet.HandlePaymentEvent(signed_callback(secret, "charge.dispute.lost", p1))
    clawed_y = await eventually(lambda: earnings(clients, y), lambda e: e.diamonds_clawed_back > 0)
    assert clawed_y.diamonds_clawed_back == 350

    # P2 repays the debt, then is refunded: the debt is owed again, and no creator loses anything,
    # since P2's coins never reached one (X's gift was paid for by P0).
    p2 = await buy_coins(clients.wallet, secret, viewer)
    assert (await clients.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=viewer))).coins == 0
    await clients.wallet.HandlePaymentEvent(signed_callback(secret, "charge.refunded", p2))
    balance = await clients.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=viewer))
    assert (balance.coins, balance.debt_coins) == (-700, 700)

    # A marker: payout consumes wallet.purchase.reversed in order, so once a later reversal's
    # clawback shows, P2's refund has been handled too.
    other, z = uid("viewer"), uid("creator-z")
    p3 = await buy_coins(clients.wallet, secret, other)
    await gift_700_coins(clients.gifting, other, z)
    await eventually(lambda: earnings(clients, z), lambda e: e.coins_received == 700)
    await clients.wallet.HandlePaymentEvent(signed_callback(secret, "charge.dispute.lost", p3))
    clawed_z = await eventually(lambda: earnings(clients, z), lambda e: e.diamonds_clawed_back > 0)
    assert clawed_z.diamonds_clawed_back == 350

    after_x = await earnings(clients, x)
    assert (after_x.diamonds_clawed_back, after_x.diamonds_available) == (0, 350)
    assert (await earnings(clients, y)).diamonds_clawed_back == 350  # clawed once, not twice


def at(us: int) -> Timestamp:
    """A Timestamp of `us` microseconds since the epoch."""
    out = Timestamp()
    out.FromMicroseconds(us)
    return out


def gift_sent(
    sender: str, creator: str, coins: int, occurred_us: int, recorded_us: int | None = None
) -> gifting_events.GiftSent:
    """A gifting.gift.sent event as gifting publishes it: recorded PENDING at `recorded_us`, SENT at `occurred_us`."""
    return gifting_events.GiftSent(
        event_id=uuid.uuid4().hex,
        kind=gifting_events.GIFT_KIND_GIFT,
        stream_id="s-reversals",
        creator_id=creator,
        sender_id=sender,
        gift_id="rose",
        quantity=coins,
        coins=coins,
        occurred_at=at(occurred_us),
        recorded_at=at(occurred_us if recorded_us is None else recorded_us),
    )


def reversed_purchase(sender: str, coins: int, occurred_us: int) -> wallet_events.PurchaseReversed:
    """A wallet.purchase.reversed event for coins all spent, as the wallet publishes it."""
    return wallet_events.PurchaseReversed(
        event_id=uuid.uuid4().hex,
        purchase_id=uid("purchase"),
        user_id=sender,
        coins=coins,
        kind="CHARGED_BACK",
        occurred_at=at(occurred_us),
        coins_already_spent=coins,
        balance_after=-coins,
    )


async def test_a_reversal_consumed_before_its_gifts_claws_them_back_when_they_arrive(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    if deployment.nats_url is None:
        pytest.skip("needs the deployment's NATS URL (LIVEGIFTS_TEST_TARGET_NATS_URL) to publish events in order")
    now = int(time.time() * 1_000_000)
    viewer, creator = uid("viewer"), uid("creator")
    marker_viewer, marker_creator = uid("viewer"), uid("creator")
    nc = await nats.connect(deployment.nats_url)
    try:
        js = nc.jetstream(timeout=30)

        async def publish(subject: str, event) -> None:  # type: ignore[no-untyped-def]
            await js.publish(subject, event.SerializeToString(), headers={"Nats-Msg-Id": uuid.uuid4().hex})

        # The marker's gift is credited first, so its reversal has something to claw back.
        await publish("gifting.gift.sent", gift_sent(marker_viewer, marker_creator, 700, now - 60_000_000))
        await eventually(lambda: earnings(clients, marker_creator), lambda e: e.coins_received == 700)
        # The viewer's reversal arrives before any of the viewer's gifts: nothing to take yet.
        await publish("wallet.purchase.reversed", reversed_purchase(viewer, 700, now))
        await publish("wallet.purchase.reversed", reversed_purchase(marker_viewer, 700, now))
        marker = await eventually(lambda: earnings(clients, marker_creator), lambda e: e.diamonds_clawed_back > 0)
        assert marker.diamonds_clawed_back == 350  # so the viewer's reversal, consumed before it, is handled
        # Then the gifts the reversed coins paid for: recorded (and paid) before the reversal, one
        # SENT at once, one settled by the sweeper only after the reversal. And one recorded after
        # it, paid for by other coins, which no reversal may touch.
        await publish("gifting.gift.sent", gift_sent(viewer, creator, 500, now - 30_000_000))
        await publish("gifting.gift.sent", gift_sent(viewer, creator, 200, now + 10_000_000, now - 20_000_000))
        await publish("gifting.gift.sent", gift_sent(viewer, creator, 100, now + 30_000_000))
    finally:
        await nc.close()

    # Waited for whole: the shortfall settler (every CLAWBACK_SETTLE_INTERVAL_S) claws from the gifts
    # credited when its round runs, and a round between two credits takes the 500 alone, the 200 at
    # the next round (seen with a pause between the publishes: 250 clawed, then 350).
    settled = await eventually(
        lambda: earnings(clients, creator),
        lambda e: e.coins_received >= 800 and e.diamonds_clawed_back >= 350,
        timeout_s=30,
    )
    assert (settled.coins_received, settled.diamonds_clawed_back, settled.diamonds_available) == (800, 350, 50)
    assert settled.withdrawals_held is False
    listed = await clients.payout.ListEarnings(payout_pb2.ListEarningsRequest(creator_id=creator, page_size=10))
    assert sorted((e.coins, e.coins_clawed_back) for e in listed.entries) == [(100, 0), (200, 200), (500, 500)]
    audit = await clients.payout.GetAudit(payout_pb2.GetAuditRequest())
    assert audit.diamonds_clawed_back == audit.diamonds_in_clawback_entries
