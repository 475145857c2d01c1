"""A creator's diamonds and withdrawals through the running suite: gift events published straight
to its JetStream, earnings waited for, a payout method verified by its operator, withdrawals asked
for and waited on until the provider has called back."""

from __future__ import annotations

import asyncio
import uuid

import nats
import pytest

from livegifts.gifting.v1 import events_pb2 as gifting_events
from livegifts.payout.v1 import payout_pb2
from tests.integration.helpers import eventually, uid


def gift_event(creator: str, coins: int, sender: str | None = None) -> gifting_events.GiftSent:
    """A gifting.gift.sent event as gifting publishes it."""
    return gifting_events.GiftSent(
        event_id=uuid.uuid4().hex,
        kind=gifting_events.GIFT_KIND_GIFT,
        stream_id="s-payout",
        creator_id=creator,
        sender_id=sender or uid("viewer"),
        gift_id="rose",
        quantity=coins,
        coins=coins,
    )


async def publish(nats_url: str, events: list[gifting_events.GiftSent], concurrency: int = 256) -> None:
    """Publish events straight to JetStream, each with a fresh Nats-Msg-Id (so only the inbox can dedupe)."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream(timeout=30)
        for i in range(0, len(events), concurrency):
            await asyncio.gather(
                *(
                    js.publish("gifting.gift.sent", e.SerializeToString(), headers={"Nats-Msg-Id": uuid.uuid4().hex})
                    for e in events[i : i + concurrency]
                )
            )
    finally:
        await nc.close()


async def earnings(clients, creator: str) -> payout_pb2.Earnings:  # type: ignore[no-untyped-def]
    """GetEarnings of one creator."""
    return await clients.payout.GetEarnings(payout_pb2.GetEarningsRequest(creator_id=creator))


async def fund(clients, deployment, creator: str, coins: int) -> payout_pb2.Earnings:  # type: ignore[no-untyped-def]
    """Give the creator `coins` worth of diamonds through one gift event, and wait for the credit."""
    if deployment.nats_url is None:
        pytest.skip("needs the deployment's NATS URL (LIVEGIFTS_TEST_TARGET_NATS_URL)")
    await publish(deployment.nats_url, [gift_event(creator, coins)])
    return await eventually(lambda: earnings(clients, creator), lambda e: e.coins_received >= coins)


async def verified_method(clients, deployment, creator: str, email: str = "") -> str:  # type: ignore[no-untyped-def]
    """A verified PayPal method of the creator."""
    method = await clients.payout.AddPayoutMethod(
        payout_pb2.AddPayoutMethodRequest(
            creator_id=creator,
            kind=payout_pb2.PAYOUT_METHOD_KIND_PAYPAL,
            paypal_email=email or f"{creator}@example.com",
            idempotency_key=uid("pm"),
        )
    )
    assert method.verification == payout_pb2.VERIFICATION_STATUS_PENDING
    verified = await clients.payout.VerifyPayoutMethod(
        payout_pb2.VerifyPayoutMethodRequest(method_id=method.method_id, verified=True, idempotency_key=uid("v")),
        metadata=deployment.operator_metadata,
    )
    assert verified.verification == payout_pb2.VERIFICATION_STATUS_VERIFIED
    return method.method_id


def withdraw(creator: str, diamonds: int, method_id: str) -> payout_pb2.RequestWithdrawalRequest:
    """A withdrawal request with a fresh key."""
    return payout_pb2.RequestWithdrawalRequest(
        creator_id=creator, diamonds=diamonds, method_id=method_id, idempotency_key=uid("wd")
    )


async def settled(clients, withdrawal_id: str) -> payout_pb2.Withdrawal:  # type: ignore[no-untyped-def]
    """Wait until the provider has called back (PAID or FAILED)."""
    return await eventually(
        lambda: clients.payout.GetWithdrawal(payout_pb2.GetWithdrawalRequest(withdrawal_id=withdrawal_id)),
        lambda w: w.status in (payout_pb2.WITHDRAWAL_STATUS_PAID, payout_pb2.WITHDRAWAL_STATUS_FAILED),
    )
