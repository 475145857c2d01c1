"""A data team's consumer rebuilds the books from the events alone (README "Events, for the teams
that consume them", "Rebuilding the books"): a new durable of its own on each stream, deliver
policy all, reads every event from the start, de-duplicates by `event_id`, and its totals are the
services' own audit totals and each creator's earnings, and its cash the purchases' and
withdrawals'. It also holds the section's retention claims to the streams the services made.

A suite of its own per backend (real processes, real nats-server, SQLite files or PostgreSQL),
so its books hold only this test's traffic: purchases in two currencies, a gift, a tip and an
unlock, a refund of coins already gifted (a clawback), a withdrawal paid and one rejected.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator

import grpc
import nats
import pytest
from google.protobuf.message import Message
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType

from livegifts.gifting.v1 import events_pb2 as gifting_events
from livegifts.gifting.v1 import gifting_pb2 as G
from livegifts.gifting.v1 import gifting_pb2_grpc
from livegifts.payout.v1 import events_pb2 as payout_events
from livegifts.payout.v1 import payout_pb2 as P
from livegifts.payout.v1 import payout_pb2_grpc
from livegifts.wallet.v1 import events_pb2 as wallet_events
from livegifts.wallet.v1 import wallet_pb2 as W
from livegifts.wallet.v1 import wallet_pb2_grpc
from services.cli.suite import Suite
from services.common.config import STREAM_MAX_AGE_S
from tests.integration.auditing import audit_cli
from tests.integration.conftest import BACKENDS, OPERATOR_TOKEN, WEBHOOK_SECRET, running_suite
from tests.integration.helpers import buy_coins, eventually, live_stream, signed_callback, uid

OPERATOR = (("authorization", f"Bearer {OPERATOR_TOKEN}"), ("x-operator", "event-totals-test"))
PAYLOADS: dict[str, type[Message]] = {
    "wallet.purchase.completed": wallet_events.PurchaseCompleted,
    "wallet.purchase.reversed": wallet_events.PurchaseReversed,
    "gifting.gift.sent": gifting_events.GiftSent,
    "gifting.stream.ended": gifting_events.StreamEnded,
    "payout.diamonds.credited": payout_events.DiamondsCredited,
    "payout.diamonds.clawed_back": payout_events.DiamondsClawedBack,
    "payout.withdrawal.requested": payout_events.WithdrawalChanged,
    "payout.withdrawal.paid": payout_events.WithdrawalChanged,
    "payout.withdrawal.failed": payout_events.WithdrawalChanged,
}


@pytest.fixture(scope="module", params=BACKENDS)
def suite(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    if os.environ.get("LIVEGIFTS_TEST_TARGET_WALLET"):
        pytest.skip("needs books of its own: not run against an external deployment")
    var_dir = tmp_path_factory.mktemp(f"event-totals-{request.param}")
    with running_suite(request.param, var_dir, "lgevents") as s:
        yield s


async def read_every_event(nats_url: str) -> list[tuple[str, Message]]:
    """Every event of the three streams from the start, once each: (subject, payload)."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    seen: set[str] = set()
    out = []
    try:
        for stream in ("WALLET", "GIFTING", "PAYOUT"):
            info = await js.stream_info(stream)
            # README "Retention": limits retention, a file store, 30 days, no message or byte limit.
            assert info.config.retention == RetentionPolicy.LIMITS and info.config.storage == StorageType.FILE
            assert info.config.max_age == STREAM_MAX_AGE_S
            assert info.config.max_msgs in (None, -1) and info.config.max_bytes in (None, -1)
            config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT)
            sub = await js.pull_subscribe("", durable="datateam-totals", stream=stream, config=config)
            last = 0
            while last < info.state.last_seq:
                for msg in await sub.fetch(100, timeout=5):
                    # The services delete none: the sequence has no gap (README "Retention").
                    assert msg.metadata.sequence.stream == last + 1, (stream, last, msg.metadata.sequence)
                    last = msg.metadata.sequence.stream
                    event = PAYLOADS[msg.subject].FromString(msg.data)
                    assert (msg.headers or {}).get("Nats-Msg-Id") == event.event_id  # type: ignore[attr-defined]
                    if event.event_id not in seen:  # type: ignore[attr-defined]
                        seen.add(event.event_id)  # type: ignore[attr-defined]
                        out.append((msg.subject, event))
                    await msg.ack()
    finally:
        await nc.close()
    return out


def totals(events: list[tuple[str, Message]]) -> tuple[Counter[str], Counter[tuple[str, str]], dict[str, Counter[str]]]:
    """The books from the events (README "Rebuilding the books"): coin and diamond totals, cash by
    (what, currency), and each creator's diamonds."""
    t: Counter[str] = Counter()
    cash: Counter[tuple[str, str]] = Counter()
    creators: dict[str, Counter[str]] = {}
    last_of: dict[str, payout_events.WithdrawalChanged] = {}
    for subject, e in events:
        if isinstance(e, wallet_events.PurchaseCompleted):
            t["coins_issued"] += e.coins
            cash["bought", e.price.currency_code] += e.price.amount_minor
        elif isinstance(e, wallet_events.PurchaseReversed):
            t["coins_reversed"] += e.coins
            t["coins_claimed"] += e.coins_already_spent
            cash[e.kind, e.price.currency_code] += e.price.amount_minor
        elif isinstance(e, gifting_events.GiftSent):
            t["coins_sent"] += e.coins
            t["gifts_sent"] += 1
        elif isinstance(e, payout_events.DiamondsCredited):
            t["coins_received"] += e.coins
            creators.setdefault(e.creator_id, Counter())["credited"] += e.diamonds
        elif isinstance(e, payout_events.DiamondsClawedBack):
            t["coins_clawed"] += e.coins
            creators.setdefault(e.creator_id, Counter())["clawed"] += e.diamonds
        elif isinstance(e, payout_events.WithdrawalChanged):
            last_of[e.withdrawal_id] = e  # one withdrawal's events come in order
            if subject == "payout.withdrawal.paid":
                for what, money in (("gross", e.gross), ("fee", e.fee), ("net", e.net)):
                    cash["paid " + what, money.currency_code] += money.amount_minor
    for e in last_of.values():
        state = {"PAID": "withdrawn", "FAILED": "", "REJECTED": ""}.get(e.status, "held")
        if state:
            creators.setdefault(e.creator_id, Counter())[state] += e.diamonds
    for c in creators.values():
        c["available"] = c["credited"] - c["clawed"] - c["held"] - c["withdrawn"]
        for what in ("credited", "clawed", "held", "withdrawn", "available"):
            t["diamonds_" + what] += c[what]
    t["coins_in_balances"] = t["coins_issued"] - t["coins_sent"] - t["coins_reversed"]
    return t, cash, creators


async def test_the_events_alone_rebuild_the_audit_totals_each_creators_diamonds_and_the_cash(suite: Suite) -> None:
    async with (
        grpc.aio.insecure_channel(suite.addr("wallet")) as wc,
        grpc.aio.insecure_channel(suite.addr("gifting")) as gc,
        grpc.aio.insecure_channel(suite.addr("payout")) as pc,
    ):
        wallet = wallet_pb2_grpc.WalletServiceStub(wc)
        gifting = gifting_pb2_grpc.GiftingServiceStub(gc)
        payout = payout_pb2_grpc.PayoutServiceStub(pc)
        star, other = uid("creator"), uid("creator")
        rich, briton = uid("viewer"), uid("viewer")
        stream = await live_stream(gifting, star)
        content = await gifting.CreateContent(
            G.CreateContentRequest(creator_id=other, title="t", price_coins=333, idempotency_key=uid("c"))
        )
        usd = await buy_coins(wallet, WEBHOOK_SECRET, rich, "us-usd-7000")
        gbp = await wallet.CreatePurchase(
            W.CreatePurchaseRequest(
                user_id=briton,
                package_id="gb-gbp-660",
                currency_code="GBP",
                region="GB",
                payment_method=W.PAYMENT_METHOD_CARD,
                idempotency_key=uid("buy"),
            )
        )
        await wallet.HandlePaymentEvent(signed_callback(WEBHOOK_SECRET, "payment.succeeded", gbp))
        for sender, gift_id, quantity in ((rich, "galaxy", 3), (briton, "panda", 3)):
            await gifting.SendGift(
                G.SendGiftRequest(
                    stream_id=stream.stream_id,
                    sender_id=sender,
                    gift_id=gift_id,
                    quantity=quantity,
                    idempotency_key=uid("g"),
                )
            )
            await gifting.SendTip(
                G.SendTipRequest(stream_id=stream.stream_id, sender_id=sender, coins=17, idempotency_key=uid("t"))
            )
            await gifting.UnlockContent(
                G.UnlockContentRequest(user_id=sender, content_id=content.content_id, idempotency_key=uid("u"))
            )
        # Refunded after its coins went to both creators: clawbacks, and a balance below zero.
        await wallet.HandlePaymentEvent(signed_callback(WEBHOOK_SECRET, "charge.refunded", gbp))
        await gifting.EndStream(G.EndStreamRequest(stream_id=stream.stream_id, idempotency_key=uid("e")))

        # A fee, and a low minimum and auto-approval, so the star's diamonds pay a withdrawal.
        policy = await payout.GetPolicy(P.GetPolicyRequest())
        change = P.SetPolicyRequest(creator_share_bp=policy.creator_share_bp, fee_bp=250, idempotency_key=uid("p"))
        for terms in policy.currencies:
            change.currencies.add().CopyFrom(terms)
            change.currencies[-1].MergeFrom(
                P.CurrencyTerms(withdrawal_min_minor=100, auto_approve_below_minor=300, fee_fixed_minor=7)
            )
        await payout.SetPolicy(change, metadata=OPERATOR)
        await eventually(
            lambda: payout.GetEarnings(P.GetEarningsRequest(creator_id=star)),
            lambda e: e.diamonds_available >= 1_200,
        )
        method = await payout.AddPayoutMethod(
            P.AddPayoutMethodRequest(
                creator_id=star,
                kind=P.PAYOUT_METHOD_KIND_PAYPAL,
                paypal_email="star@example.com",
                idempotency_key=uid("pm"),
            )
        )
        await payout.VerifyPayoutMethod(
            P.VerifyPayoutMethodRequest(method_id=method.method_id, verified=True, idempotency_key=uid("v")),
            metadata=OPERATOR,
        )
        paid, rejected = [
            await payout.RequestWithdrawal(
                P.RequestWithdrawalRequest(
                    creator_id=star, diamonds=diamonds, method_id=method.method_id, idempotency_key=uid("wd")
                )
            )
            for diamonds in (400, 800)
        ]
        assert rejected.status == P.WITHDRAWAL_STATUS_PENDING_REVIEW
        await payout.RejectWithdrawal(
            P.RejectWithdrawalRequest(withdrawal_id=rejected.withdrawal_id, reason="test", idempotency_key=uid("r")),
            metadata=OPERATOR,
        )
        paid = await eventually(
            lambda: payout.GetWithdrawal(P.GetWithdrawalRequest(withdrawal_id=paid.withdrawal_id)),
            lambda w: w.status == P.WITHDRAWAL_STATUS_PAID,
        )
        assert paid.status == P.WITHDRAWAL_STATUS_PAID

        # Everything consumed and every outbox row published: the books and the streams are whole.
        report = audit_cli(suite, "--wait", "30")
        assert report.returncode == 0, report.stdout + report.stderr
        t, cash, creators = totals(await read_every_event(suite.config.nats_url))
        wa = await wallet.GetAudit(W.GetAuditRequest())
        ga = await gifting.GetAudit(G.GetAuditRequest())
        pa = await payout.GetAudit(P.GetAuditRequest())
        earnings = {c: await payout.GetEarnings(P.GetEarningsRequest(creator_id=c)) for c in sorted(creators)}

    assert t["coins_reversed"] > 0 and t["diamonds_clawed"] > 0 and t["diamonds_withdrawn"] > 0  # the flows ran
    assert {
        "coins_issued": wa.coins_issued,
        "coins_reversed": wa.coins_reversed,
        "coins_claimed": wa.coins_claimed_by_reversals,
        "coins_in_balances": wa.coins_in_user_balances,
        "coins_sent": wa.coins_spent,
        "gifts_sent": ga.gifts_sent,
        "coins_received": pa.coins_received,
        "coins_clawed": pa.coins_in_clawback_entries,
        "diamonds_credited": pa.diamonds_credited,
        "diamonds_clawed": pa.diamonds_clawed_back,
        "diamonds_held": pa.diamonds_held,
        "diamonds_withdrawn": pa.diamonds_withdrawn,
        "diamonds_available": pa.diamonds_available,
    } == {name: t[name] for name in (
        "coins_issued", "coins_reversed", "coins_claimed", "coins_in_balances", "coins_sent", "gifts_sent",
        "coins_received", "coins_clawed", "diamonds_credited", "diamonds_clawed", "diamonds_held",
        "diamonds_withdrawn", "diamonds_available",
    )}  # fmt: skip
    assert ga.coins_sent == t["coins_sent"]
    assert set(creators) == {star, other}
    for creator_id, e in earnings.items():
        c = creators[creator_id]
        got = (e.diamonds_lifetime, e.diamonds_clawed_back, e.diamonds_held, e.diamonds_withdrawn, e.diamonds_available)
        assert got == (c["credited"], c["clawed"], c["held"], c["withdrawn"], c["available"]), creator_id

    assert dict(cash) == {
        ("bought", "USD"): usd.price.amount_minor,
        ("bought", "GBP"): gbp.price.amount_minor,
        ("REFUNDED", "GBP"): gbp.price.amount_minor,
        ("paid gross", paid.gross.currency_code): paid.gross.amount_minor,
        ("paid fee", paid.fee.currency_code): paid.fee.amount_minor,
        ("paid net", paid.net.currency_code): paid.net.amount_minor,
    }
    assert paid.fee.amount_minor > 0 and paid.net.amount_minor == paid.gross.amount_minor - paid.fee.amount_minor
