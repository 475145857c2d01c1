"""A bounded, seeded, mixed load against a running suite, retrying like a well-behaved client.

Every mutating call carries an idempotency key and is retried with the same key on the
retryable codes (UNAVAILABLE, ABORTED, DEADLINE_EXCEEDED) until it gets a definite answer or
its time budget runs out. Any other error is recorded as a wrong answer: during a fault a
client may see delays and retryable errors, never a wrong result.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from livegifts.gifting.v1 import gifting_pb2, gifting_pb2_grpc
from livegifts.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from tests.integration.helpers import signed_callback, uid

T = TypeVar("T")
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED}
CALL_BUDGET_S = 60.0  # one logical operation may take this long across retries
CHEAP_GIFTS = [("rose", 1), ("gg", 1), ("finger-heart", 5), ("panda", 5), ("hand-wave", 9), ("lollipop", 10)]


@dataclass
class LoadReport:
    """What the clients saw."""

    seed: int
    purchases: int = 0
    callbacks_replayed: int = 0
    gifts_sent: int = 0
    coins_gifted: int = 0
    reversals: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    wrong_answers: list[str] = field(default_factory=list)
    coins_by_viewer: dict[str, int] = field(default_factory=dict)  # what each viewer should hold now
    gift_ids: set[str] = field(default_factory=set)
    purchases_by_viewer: dict[str, list[wallet_pb2.Purchase]] = field(default_factory=dict)


async def with_retries(report: LoadReport, op: Callable[[int], Awaitable[T]]) -> T | None:
    """Run `op(attempt)` until it succeeds or fails definitely; None on a definite failure."""
    deadline = time.monotonic() + CALL_BUDGET_S
    attempt = 0
    while True:
        try:
            return await op(attempt)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in RETRYABLE and time.monotonic() < deadline:
                report.retries[exc.code().name] += 1
                attempt += 1
                await asyncio.sleep(min(0.05 * 2 ** min(attempt, 5), 1.0))
                continue
            report.wrong_answers.append(f"{exc.code().name}: {exc.details()}")
            return None


async def run_load(
    wallet_addr: str,
    gifting_addr: str,
    webhook_secret: str,
    *,
    seed: int,
    viewers: int,
    creators: int,
    gifts: int,
    concurrency: int,
) -> LoadReport:
    """Purchases (with replayed callbacks), streams, gifts (some with deadlines too short), one chargeback."""
    rnd = random.Random(seed)
    report = LoadReport(seed=seed)
    w_ch, g_ch = grpc.aio.insecure_channel(wallet_addr), grpc.aio.insecure_channel(gifting_addr)
    wallet, gifting = wallet_pb2_grpc.WalletServiceStub(w_ch), gifting_pb2_grpc.GiftingServiceStub(g_ch)
    try:
        viewer_ids = [uid(f"v{seed}") for _ in range(viewers)]
        creator_ids = [uid(f"c{seed}") for _ in range(creators)]
        for v in viewer_ids:
            report.coins_by_viewer[v] = 0
            for package_id in ("us-usd-700", "us-usd-350"):
                await _buy(report, wallet, webhook_secret, v, package_id, replay=rnd.random() < 0.5)
        streams = []
        for c in creator_ids:
            key = uid("start")
            s = await with_retries(
                report,
                lambda _a, c=c, key=key: gifting.StartStream(
                    gifting_pb2.StartStreamRequest(creator_id=c, title="fault load", idempotency_key=key), timeout=5
                ),
            )
            assert s is not None, report.wrong_answers
            streams.append(s.stream_id)

        # The chargeback victim gifts only in the first half; then its first purchase is reversed.
        victim = viewer_ids[0]
        plan = [
            (rnd.choice(viewer_ids), rnd.choice(streams), *rnd.choice(CHEAP_GIFTS), rnd.randint(1, 3))
            for _ in range(gifts)
        ]
        half = len(plan) // 2
        second = [(viewer_ids[1] if p[0] == victim else p[0], *p[1:]) for p in plan[half:]]
        sem = asyncio.Semaphore(concurrency)

        async def one_gift(viewer: str, stream: str, gift_id: str, price: int, qty: int) -> None:
            key = uid("gift")
            tight = rnd.random() < 0.1  # a first attempt whose deadline is too short: the client retries
            async with sem:
                receipt = await with_retries(
                    report,
                    lambda attempt: gifting.SendGift(
                        gifting_pb2.SendGiftRequest(
                            stream_id=stream, sender_id=viewer, gift_id=gift_id, quantity=qty, idempotency_key=key
                        ),
                        timeout=0.002 if (tight and attempt == 0) else 10,
                    ),
                )
            if receipt is not None:
                report.gifts_sent += 1
                report.coins_gifted += receipt.coins
                report.coins_by_viewer[viewer] -= receipt.coins
                report.gift_ids.add(receipt.gift_event_id)
                if receipt.coins != price * qty:
                    report.wrong_answers.append(f"gift {key} charged {receipt.coins}, expected {price * qty}")

        await asyncio.gather(*(one_gift(*p) for p in plan[:half]))
        await _chargeback(report, wallet, webhook_secret, victim)
        await asyncio.gather(*(one_gift(*p) for p in second))
        return report
    finally:
        await asyncio.gather(w_ch.close(), g_ch.close())


async def _buy(report: LoadReport, wallet, secret: str, viewer: str, package_id: str, replay: bool) -> None:  # type: ignore[no-untyped-def]
    key = uid("buy")
    purchase = await with_retries(
        report,
        lambda _a: wallet.CreatePurchase(
            wallet_pb2.CreatePurchaseRequest(
                user_id=viewer,
                package_id=package_id,
                currency_code="USD",
                payment_method=wallet_pb2.PAYMENT_METHOD_CARD,
                idempotency_key=key,
            ),
            timeout=5,
        ),
    )
    assert purchase is not None, report.wrong_answers
    event_id = uid("evt")
    for _ in range(2 if replay else 1):  # the provider re-sends the same callback
        answer = await with_retries(
            report,
            lambda _a: wallet.HandlePaymentEvent(
                signed_callback(secret, "payment.succeeded", purchase, event_id=event_id), timeout=5
            ),
        )
        if answer is None or answer.purchase.status != wallet_pb2.PURCHASE_STATUS_SUCCEEDED:
            report.wrong_answers.append(f"purchase {purchase.purchase_id} did not succeed: {answer}")
    report.callbacks_replayed += 1 if replay else 0
    report.purchases += 1
    report.coins_by_viewer[viewer] += purchase.coins
    report.purchases_by_viewer.setdefault(viewer, []).append(purchase)


async def _chargeback(report: LoadReport, wallet, secret: str, viewer: str) -> None:  # type: ignore[no-untyped-def]
    purchase = report.purchases_by_viewer[viewer][0]
    event_id = uid("evt")
    for _ in range(2):  # replayed too
        answer = await with_retries(
            report,
            lambda _a: wallet.HandlePaymentEvent(
                signed_callback(secret, "charge.dispute.lost", purchase, event_id=event_id), timeout=5
            ),
        )
        if answer is None or answer.purchase.status != wallet_pb2.PURCHASE_STATUS_CHARGED_BACK:
            report.wrong_answers.append(f"chargeback of {purchase.purchase_id} failed: {answer}")
    report.reversals += 1
    report.coins_by_viewer[viewer] -= purchase.coins


async def balances(wallet_addr: str, viewers: list[str]) -> dict[str, int]:
    """Every viewer's coins as the wallet reports them."""
    async with grpc.aio.insecure_channel(wallet_addr) as ch:
        stub = wallet_pb2_grpc.WalletServiceStub(ch)
        return {v: (await stub.GetBalance(wallet_pb2.GetBalanceRequest(user_id=v), timeout=5)).coins for v in viewers}
