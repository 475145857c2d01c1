"""Reversals across wallet and payout: what a refund or chargeback claws back from creators."""

from __future__ import annotations

from livegifts.gifting.v1 import gifting_pb2
from livegifts.payout.v1 import payout_pb2
from livegifts.wallet.v1 import wallet_pb2
from tests.integration.helpers import buy_coins, eventually, live_stream, signed_callback, uid


async def gift_all(clients, viewer: str, creator: str) -> None:  # type: ignore[no-untyped-def]
    """`viewer` gifts 700 coins (500 + 4 x 50) to `creator` on a new stream."""
    stream = await live_stream(clients.gifting, creator)
    for gift_id, quantity in (("concert", 1), ("sun-cream", 4)):
        await clients.gifting.SendGift(
            gifting_pb2.SendGiftRequest(
                stream_id=stream.stream_id,
                sender_id=viewer,
                gift_id=gift_id,
                quantity=quantity,
                idempotency_key=uid("g"),
            )
        )


async def earnings(clients, creator: str) -> payout_pb2.Earnings:  # type: ignore[no-untyped-def]
    """GetEarnings of one creator."""
    return await clients.payout.GetEarnings(payout_pb2.GetEarningsRequest(creator_id=creator))


async def test_refunding_a_purchase_that_only_repaid_a_chargeback_debt_claws_back_no_creator_again(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    viewer, x, y = uid("viewer"), uid("creator-x"), uid("creator-y")
    secret = deployment.webhook_secret
    await buy_coins(clients.wallet, secret, viewer)  # P0: its cash is kept
    await gift_all(clients, viewer, x)
    p1 = await buy_coins(clients.wallet, secret, viewer)
    await gift_all(clients, viewer, y)
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
    await gift_all(clients, other, z)
    await eventually(lambda: earnings(clients, z), lambda e: e.coins_received == 700)
    await clients.wallet.HandlePaymentEvent(signed_callback(secret, "charge.dispute.lost", p3))
    clawed_z = await eventually(lambda: earnings(clients, z), lambda e: e.diamonds_clawed_back > 0)
    assert clawed_z.diamonds_clawed_back == 350

    after_x = await earnings(clients, x)
    assert (after_x.diamonds_clawed_back, after_x.diamonds_available) == (0, 350)
    assert (await earnings(clients, y)).diamonds_clawed_back == 350  # clawed once, not twice
