"""A bounded, seeded, mixed load against a running suite, retrying like a well-behaved client.

Every mutating call carries an idempotency key and is retried with the same key on the
retryable codes (UNAVAILABLE, ABORTED, DEADLINE_EXCEEDED, CANCELLED) until it gets a definite answer or
its time budget runs out. Any other error is recorded as a wrong answer: during a fault a
client may see delays and retryable errors, never a wrong result.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
import nats
import nats.js.errors

from livegifts.gifting.v1 import gifting_pb2, gifting_pb2_grpc
from livegifts.payout.v1 import events_pb2 as payout_events
from livegifts.payout.v1 import payout_pb2, payout_pb2_grpc
from livegifts.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from tests.integration.helpers import signed_callback, uid

T = TypeVar("T")
# CANCELLED: a server that stops cancels the calls it had not handed to a handler yet (docs/sre.md).
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}
CALL_BUDGET_S = 60.0  # one logical operation may take this long across retries
UNLOCK_PRICE_COINS = 15  # every creator's one piece of content
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
    ops_done: int = 0
    withdrawals: int = 0
    withdrawal_ids: list[str] = field(default_factory=list)
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
    payout_addr: str,
    webhook_secret: str,
    operator_md: tuple[tuple[str, str], ...],
    *,
    seed: int,
    viewers: int,
    creators: int,
    gifts: int,
    concurrency: int,
    report: LoadReport | None = None,
    pause_s: float = 0.0,
) -> LoadReport:
    """Purchases (with replayed callbacks), streams, gifts, tips and unlocks (some with deadlines too short),
    one chargeback halfway, then a withdrawal per creator.

    `report`, when given, is filled as the load goes: a fault injected meanwhile can read how far it got.
    `pause_s` paces it: each client waits that long after each gift, tip or unlock, so that a load
    lasts through faults that take a while (a cluster electing leaders)."""
    rnd = random.Random(seed)
    report = LoadReport(seed=seed) if report is None else report
    # Round robin: an address listing a service's replicas (Suite.addr) spreads the calls over them.
    spread = [("grpc.lb_policy_name", "round_robin")]
    chans = [grpc.aio.insecure_channel(a, options=spread) for a in (wallet_addr, gifting_addr, payout_addr)]
    wallet = wallet_pb2_grpc.WalletServiceStub(chans[0])
    gifting = gifting_pb2_grpc.GiftingServiceStub(chans[1])
    payout = payout_pb2_grpc.PayoutServiceStub(chans[2])
    try:
        await _low_minimum_policy(report, payout, operator_md)
        viewer_ids = [uid(f"v{seed}") for _ in range(viewers)]
        creator_ids = [uid(f"c{seed}") for _ in range(creators)]
        for v in viewer_ids:
            report.coins_by_viewer[v] = 0
            for package_id in ("us-usd-700", "us-usd-350"):
                await _buy(report, wallet, webhook_secret, v, package_id, replay=rnd.random() < 0.5)
        streams, contents = [], []
        for c in creator_ids:
            key, ckey = uid("start"), uid("content")
            s = await with_retries(
                report,
                lambda _a, c=c, key=key: gifting.StartStream(
                    gifting_pb2.StartStreamRequest(creator_id=c, title="fault load", idempotency_key=key), timeout=5
                ),
            )
            content = await with_retries(
                report,
                lambda _a, c=c, ckey=ckey: gifting.CreateContent(
                    gifting_pb2.CreateContentRequest(
                        creator_id=c, title="extra", price_coins=UNLOCK_PRICE_COINS, idempotency_key=ckey
                    ),
                    timeout=5,
                ),
            )
            assert s is not None and content is not None, report.wrong_answers
            streams.append(s.stream_id)
            contents.append(content.content_id)

        # The chargeback victim acts only in the first half; then its first purchase is reversed.
        victim = viewer_ids[0]
        plan = [
            (rnd.random(), rnd.choice(viewer_ids), rnd.randrange(creators), rnd.choice(CHEAP_GIFTS))
            for _ in range(gifts)
        ]
        half = len(plan) // 2
        second = [(p[0], viewer_ids[1] if p[1] == victim else p[1], *p[2:]) for p in plan[half:]]
        sem = asyncio.Semaphore(concurrency)
        # Each definite unlock answer per (viewer, content): (charged, gift_event_id). Exactly one
        # per pair may charge, the price; every other says already_unlocked, charges nothing and
        # names that same unlock. Checked once all ops are done: two concurrent unlocks of a pair
        # may answer in either order, so "the first answer charges" is not what a client can see.
        unlock_answers: dict[tuple[str, str], list[tuple[int, str]]] = {}

        async def one_op(dice: float, viewer: str, creator: int, gift: tuple[str, int]) -> None:
            key = uid("op")
            tight = rnd.random() < 0.1  # a first attempt whose deadline is too short: the client retries

            def deadline(attempt: int) -> float:
                return 0.002 if (tight and attempt == 0) else 10.0

            async with sem:
                if dice < 0.1:  # a tip
                    coins = 1 + int(dice * 100)
                    r = await with_retries(
                        report,
                        lambda a: gifting.SendTip(
                            gifting_pb2.SendTipRequest(
                                stream_id=streams[creator],
                                sender_id=viewer,
                                coins=coins,
                                message="gg",
                                idempotency_key=key,
                            ),
                            timeout=deadline(a),
                        ),
                    )
                    charged, expected, event_id = (r.coins, coins, r.gift_event_id) if r else (0, 0, "")
                elif dice < 0.2:  # an unlock: charged once per (viewer, content)
                    r = await with_retries(
                        report,
                        lambda a: gifting.UnlockContent(
                            gifting_pb2.UnlockContentRequest(
                                user_id=viewer, content_id=contents[creator], idempotency_key=key
                            ),
                            timeout=deadline(a),
                        ),
                    )
                    charged = 0 if (r is None or r.already_unlocked) else r.coins
                    # The price when this answer is the pair's unlock, nothing when it was already.
                    expected = 0 if (r is None or r.already_unlocked) else UNLOCK_PRICE_COINS
                    event_id = r.gift_event_id if r else ""
                    if r is not None:
                        unlock_answers.setdefault((viewer, contents[creator]), []).append((charged, event_id))
                else:  # a gift
                    gift_id, price = gift
                    qty = 1 + int(dice * 10) % 3
                    r = await with_retries(
                        report,
                        lambda a: gifting.SendGift(
                            gifting_pb2.SendGiftRequest(
                                stream_id=streams[creator],
                                sender_id=viewer,
                                gift_id=gift_id,
                                quantity=qty,
                                idempotency_key=key,
                            ),
                            timeout=deadline(a),
                        ),
                    )
                    charged, expected, event_id = (r.coins, price * qty, r.gift_event_id) if r else (0, 0, "")
                await asyncio.sleep(pause_s)
            if r is None:
                return
            report.ops_done += 1
            report.gifts_sent += 1 if charged else 0
            report.coins_gifted += charged
            report.coins_by_viewer[viewer] -= charged
            if charged:
                report.gift_ids.add(event_id)
            if charged != expected:
                report.wrong_answers.append(f"{key} charged {charged}, expected {expected}")

        await asyncio.gather(*(one_op(*p) for p in plan[:half]))
        await _chargeback(report, wallet, webhook_secret, victim)
        await asyncio.gather(*(one_op(*p) for p in second))
        for pair, answers in unlock_answers.items():
            charges = [c for c, _ in answers if c]
            if charges != [UNLOCK_PRICE_COINS]:
                report.wrong_answers.append(f"unlock {pair}: charged {charges}, expected once {UNLOCK_PRICE_COINS}")
            if len({e for _, e in answers}) != 1:
                report.wrong_answers.append(f"unlock {pair}: answers name different unlocks {answers}")
        for c in creator_ids:
            await _withdraw(report, payout, operator_md, c)
        return report
    finally:
        await asyncio.gather(*(c.close() for c in chans))


async def _low_minimum_policy(report: LoadReport, payout, operator_md) -> None:  # type: ignore[no-untyped-def]
    """A 50-cent minimum so a small load's creators can withdraw (200 diamonds = $1, as DOMAIN.md)."""
    key = uid("policy")
    terms = payout_pb2.CurrencyTerms(
        currency_code="USD",
        diamonds=200,
        amount_minor=100,
        withdrawal_min_minor=50,
        daily_max_minor=100_000,
        fee_fixed_minor=0,
        auto_approve_below_minor=50_000,
    )
    r = await with_retries(
        report,
        lambda _a: payout.SetPolicy(
            payout_pb2.SetPolicyRequest(creator_share_bp=5000, fee_bp=0, currencies=[terms], idempotency_key=key),
            metadata=operator_md,
            timeout=5,
        ),
    )
    assert r is not None, report.wrong_answers


async def _withdraw(report: LoadReport, payout, operator_md, creator: str) -> None:  # type: ignore[no-untyped-def]
    """A PayPal method, verified, then 100 diamonds (50 cents) withdrawn if the creator has earned them."""
    e = await _earnings_at_least(payout, creator, 100)
    if e is None:
        return
    mkey, vkey, wkey = uid("method"), uid("verify"), uid("withdraw")
    method = await with_retries(
        report,
        lambda _a: payout.AddPayoutMethod(
            payout_pb2.AddPayoutMethodRequest(
                creator_id=creator,
                kind=payout_pb2.PAYOUT_METHOD_KIND_PAYPAL,
                paypal_email=f"{creator}@example.com",
                currency_code="USD",
                idempotency_key=mkey,
            ),
            timeout=5,
        ),
    )
    if method is None:
        return
    await with_retries(
        report,
        lambda _a: payout.VerifyPayoutMethod(
            payout_pb2.VerifyPayoutMethodRequest(method_id=method.method_id, verified=True, idempotency_key=vkey),
            metadata=operator_md,
            timeout=5,
        ),
    )
    w = await with_retries(
        report,
        lambda _a: payout.RequestWithdrawal(
            payout_pb2.RequestWithdrawalRequest(
                creator_id=creator, diamonds=100, method_id=method.method_id, idempotency_key=wkey
            ),
            timeout=5,
        ),
    )
    if w is not None:
        report.withdrawals += 1
        report.withdrawal_ids.append(w.withdrawal_id)


async def _earnings_at_least(payout, creator: str, diamonds: int, timeout_s: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            e = await payout.GetEarnings(payout_pb2.GetEarningsRequest(creator_id=creator), timeout=5)
            if e.diamonds_available >= diamonds:
                return e
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.2)
    return None


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


async def replay_events(nats_url: str, stream: str, count_max: int) -> int:
    """Republish up to `count_max` stored events of `stream` with fresh Nats-Msg-Ids (past JetStream's dedup)."""
    nc = await nats.connect(nats_url.split(","))
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        replayed = 0
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            if replayed >= count_max:
                break
            msg = await js.get_msg(stream, seq)
            await js.publish(msg.subject, msg.data, headers={"Nats-Msg-Id": uuid.uuid4().hex})
            replayed += 1
        return replayed
    finally:
        await nc.close()


async def msg_ids_stored_twice(nats_url: str, stream: str, count_max: int = 10_000) -> dict[str, int]:
    """The Nats-Msg-Ids `stream` holds more than once, with how many copies: events its
    de-duplication let through (`replay_events`' fresh ids are each stored once)."""
    nc = await nats.connect(nats_url.split(","))
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        assert info.state.messages <= count_max, f"{stream} holds {info.state.messages} events: raise count_max"
        ids: Counter[str] = Counter()
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                msg = await js.get_msg(stream, seq)
            except nats.js.errors.NotFoundError:
                continue
            ids[(msg.headers or {}).get("Nats-Msg-Id", "")] += 1
        return {i: n for i, n in ids.items() if n > 1}
    finally:
        await nc.close()


async def withdrawal_statuses(payout_addr: str, ids: list[str], want: int, timeout_s: float) -> dict[str, int]:
    """Each withdrawal's status once all are `want`, or as they stand when `timeout_s` runs out
    (a read answered with a retryable code, a connection the fault dropped, is read again)."""
    got: dict[str, int] = {}
    async with grpc.aio.insecure_channel(payout_addr) as ch:
        stub = payout_pb2_grpc.PayoutServiceStub(ch)
        deadline = time.monotonic() + timeout_s
        while True:
            for i in ids:
                try:
                    got[i] = (
                        await stub.GetWithdrawal(payout_pb2.GetWithdrawalRequest(withdrawal_id=i), timeout=5)
                    ).status
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in RETRYABLE or time.monotonic() > deadline:
                        raise
            if (len(got) == len(ids) and all(s == want for s in got.values())) or time.monotonic() > deadline:
                return got
            await asyncio.sleep(0.2)


async def events_by_withdrawal(nats_url: str, subject: str, count_max: int = 10_000) -> Counter[str]:
    """How many `subject` events (payout.withdrawal.*) the PAYOUT stream holds per withdrawal id."""
    nc = await nats.connect(nats_url.split(","))
    try:
        js = nc.jetstream()
        out: Counter[str] = Counter()
        seq = 1
        for _ in range(count_max):
            try:
                msg = await js.get_msg("PAYOUT", seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                return out
            out[payout_events.WithdrawalChanged.FromString(msg.data).withdrawal_id] += 1
            seq = msg.seq + 1
        raise AssertionError(f"more than {count_max} {subject} events: raise count_max")
    finally:
        await nc.close()
