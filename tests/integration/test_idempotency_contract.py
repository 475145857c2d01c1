"""The idempotency contract of every mutating RPC of the three services: one table, both backends.

ARCHITECTURE.md: every mutating RPC takes an `idempotency_key` (1..128 characters). For each RPC
the table gives a first request, a later change of state its retry must not see, and a different
request under the same key. Against the running suite, each case checks:

- no key: INVALID_ARGUMENT MISSING_IDEMPOTENCY_KEY; 129 characters: INVALID_IDEMPOTENCY_KEY;
- the same key with the same request answers the first answer, also after the change;
- the same key with a different request fails with ALREADY_EXISTS IDEMPOTENCY_KEY_REUSED and
  changes nothing: the first request's retry still answers as before.

Provider callbacks (HandlePaymentEvent, HandlePayoutEvent) are keyed by the provider's event id
instead (test_wallet.py and test_payout.py cover their duplicates); the items of SendGifts and
SpendMany answer one by one (test_send_gifts.py, test_spend_many.py); the operator's
ReplayDeadLetter takes an optional key (test_dead_letters.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message

from livegifts.gifting.v1 import gifting_pb2
from livegifts.payout.v1 import payout_pb2
from livegifts.wallet.v1 import wallet_pb2
from services.common.clients import error_info
from services.common.timeutil import to_timestamp
from tests.integration.conftest import Clients, Deployment
from tests.integration.helpers import buy_coins, expect_error, live_stream, signed_callback, uid
from tests.integration.payout_calls import fund, settled, verified_method
from tests.support.messages import copy_of

OK = grpc.StatusCode


@dataclass
class Suite:
    """The running suite, for the cases' set-up."""

    clients: Clients
    deployment: Deployment

    def call(self, req: Message) -> Awaitable[Any]:
        """Call the RPC `req` is the request of, with the operator's metadata (others ignore it)."""
        _pkg, service, _version, message = req.DESCRIPTOR.full_name.split(".")
        method = message.removesuffix("Request")
        return getattr(getattr(self.clients, service), method)(req, metadata=self.deployment.operator_metadata)


@dataclass
class Case:
    """`first`; then `change(first's answer)`, a later change of state; then `other` under first's key."""

    first: Message
    other: Message | None  # None: the request is its key and nothing else (CancelSpend)
    change: Callable[[Any], Awaitable[object]] | None = None


CASES: dict[str, Callable[[Suite], Awaitable[Case]]] = {}


def case(name: str) -> Callable[[Callable[[Suite], Awaitable[Case]]], Callable[[Suite], Awaitable[Case]]]:
    """Add a case to the table."""

    def add(prepare: Callable[[Suite], Awaitable[Case]]) -> Callable[[Suite], Awaitable[Case]]:
        CASES[name] = prepare
        return prepare

    return add


def key() -> str:
    """A fresh idempotency key."""
    return uid("idem")


# ---- wallet -------------------------------------------------------------------------------------


@case("CreatePurchase")
async def _create_purchase(s: Suite) -> Case:
    first = wallet_pb2.CreatePurchaseRequest(
        user_id=uid("buyer"),
        package_id="us-usd-70",
        currency_code="USD",
        payment_method=wallet_pb2.PAYMENT_METHOD_CARD,
        idempotency_key=key(),
    )

    async def pay(purchase: wallet_pb2.Purchase) -> None:
        secret = s.deployment.webhook_secret
        await s.clients.wallet.HandlePaymentEvent(signed_callback(secret, "payment.succeeded", purchase))

    return Case(first, copy_of(first, package_id="us-usd-700"), pay)


def _spend(user: str, amount: int, idempotency_key: str = "") -> wallet_pb2.SpendRequest:
    return wallet_pb2.SpendRequest(
        user_id=user,
        amount=amount,
        reason=wallet_pb2.SPEND_REASON_TIP,
        reference_id=uid("ref"),
        idempotency_key=idempotency_key or key(),
    )


@case("Spend")
async def _spend_case(s: Suite) -> Case:
    user = uid("spender")
    await buy_coins(s.clients.wallet, s.deployment.webhook_secret, user)
    first = _spend(user, 10)
    return Case(first, copy_of(first, amount=11), lambda _: s.call(_spend(user, 7)))


@case("CancelSpend")
async def _cancel_spend(s: Suite) -> Case:
    user = uid("spender")
    await buy_coins(s.clients.wallet, s.deployment.webhook_secret, user)
    first = wallet_pb2.CancelSpendRequest(idempotency_key=key())

    async def spend_under_the_key(_: object) -> None:
        await expect_error(s.call(_spend(user, 5, first.idempotency_key)), OK.ABORTED, "SPEND_CANCELLED")

    return Case(first, None, spend_under_the_key)


@case("SetAccountRestrictions")
async def _restrictions(s: Suite) -> Case:
    user = uid("user")
    first = wallet_pb2.SetAccountRestrictionsRequest(
        user_id=user, birth_date="1990-01-01", blocked=False, idempotency_key=key()
    )
    block = wallet_pb2.SetAccountRestrictionsRequest(user_id=user, blocked=True, idempotency_key=key())
    return Case(first, copy_of(first, blocked=True), lambda _: s.call(block))


@case("SetSpendingLimits")
async def _limits(s: Suite) -> Case:
    user = uid("user")
    first = wallet_pb2.SetSpendingLimitsRequest(user_id=user, daily=100, idempotency_key=key())
    lower = wallet_pb2.SetSpendingLimitsRequest(user_id=user, daily=50, idempotency_key=key())
    return Case(first, copy_of(first, daily=200), lambda _: s.call(lower))


def _package(package_id: str, price_minor: int) -> wallet_pb2.UpsertCoinPackageRequest:
    # Inactive, so no other test's list of packages holds it.
    return wallet_pb2.UpsertCoinPackageRequest(
        package_id=package_id,
        region="US",
        currency_code="USD",
        coins=10,
        price_minor=price_minor,
        active=False,
        idempotency_key=key(),
    )


@case("UpsertCoinPackage")
async def _upsert_package(s: Suite) -> Case:
    package_id = uid("pk")
    first = _package(package_id, 15)
    return Case(first, copy_of(first, price_minor=16), lambda _: s.call(_package(package_id, 17)))


@case("UpsertPromotion")
async def _upsert_promotion(s: Suite) -> Case:
    package_id, promotion_id = uid("pk"), uid("promo")
    await s.call(_package(package_id, 15))
    start_us = int(dt.datetime.now(dt.UTC).timestamp()) * 1_000_000

    def promotion(bonus_coins: int) -> wallet_pb2.UpsertPromotionRequest:
        return wallet_pb2.UpsertPromotionRequest(
            promotion=wallet_pb2.Promotion(
                promotion_id=promotion_id,
                package_id=package_id,
                bonus_coins=bonus_coins,
                starts_at=to_timestamp(start_us),
                ends_at=to_timestamp(start_us + 86_400_000_000),
                active=True,
            ),
            idempotency_key=key(),
        )

    first = promotion(5)
    return Case(first, copy_of(promotion(6), idempotency_key=first.idempotency_key), lambda _: s.call(promotion(7)))


# ---- gifting ------------------------------------------------------------------------------------


@case("StartStream")
async def _start_stream(s: Suite) -> Case:
    first = gifting_pb2.StartStreamRequest(creator_id=uid("creator"), title="first", idempotency_key=key())

    async def end(stream: gifting_pb2.Stream) -> None:
        await s.call(gifting_pb2.EndStreamRequest(stream_id=stream.stream_id, idempotency_key=key()))

    return Case(first, copy_of(first, title="other"), end)


@case("EndStream")
async def _end_stream(s: Suite) -> Case:
    stream = await live_stream(s.clients.gifting, uid("creator"))
    another = await live_stream(s.clients.gifting, uid("creator"))
    first = gifting_pb2.EndStreamRequest(stream_id=stream.stream_id, idempotency_key=key())
    return Case(first, copy_of(first, stream_id=another.stream_id))


async def _viewer_on_a_stream(s: Suite) -> tuple[str, str]:
    """A viewer with coins, and a live stream of another creator."""
    viewer = uid("viewer")
    await buy_coins(s.clients.wallet, s.deployment.webhook_secret, viewer)
    return viewer, (await live_stream(s.clients.gifting, uid("creator"))).stream_id


def _tip(stream_id: str, viewer: str, coins: int) -> gifting_pb2.SendTipRequest:
    return gifting_pb2.SendTipRequest(stream_id=stream_id, sender_id=viewer, coins=coins, idempotency_key=key())


@case("SendGift")
async def _send_gift(s: Suite) -> Case:
    viewer, stream_id = await _viewer_on_a_stream(s)

    def gift(quantity: int) -> gifting_pb2.SendGiftRequest:
        return gifting_pb2.SendGiftRequest(
            stream_id=stream_id, sender_id=viewer, gift_id="rose", quantity=quantity, idempotency_key=key()
        )

    first = gift(1)
    return Case(first, copy_of(first, quantity=2), lambda _: s.call(gift(3)))


@case("SendTip")
async def _send_tip(s: Suite) -> Case:
    viewer, stream_id = await _viewer_on_a_stream(s)
    first = _tip(stream_id, viewer, 5)
    return Case(first, copy_of(first, coins=6), lambda _: s.call(_tip(stream_id, viewer, 7)))


def _content(creator: str) -> gifting_pb2.CreateContentRequest:
    return gifting_pb2.CreateContentRequest(creator_id=creator, title="content", price_coins=30, idempotency_key=key())


@case("CreateContent")
async def _create_content(s: Suite) -> Case:
    first = _content(uid("creator"))
    return Case(first, copy_of(first, price_coins=31))


async def _unlock_case(s: Suite, *, unlocked_before: bool, other: str = "unlock") -> Case:
    """An unlock (of content the viewer unlocked before under another key, if `unlocked_before`);
    `other` under its key: an unlock of other content, a "gift" or a "tip" (one key space)."""
    viewer, stream_id = await _viewer_on_a_stream(s)
    creator = uid("creator")
    a, b = [(await s.call(_content(creator))).content_id for _ in range(2)]
    if unlocked_before:
        await s.call(gifting_pb2.UnlockContentRequest(user_id=viewer, content_id=a, idempotency_key=key()))
    first = gifting_pb2.UnlockContentRequest(user_id=viewer, content_id=a, idempotency_key=key())
    others: dict[str, Message] = {
        "unlock": copy_of(first, content_id=b),
        "gift": gifting_pb2.SendGiftRequest(
            stream_id=stream_id, sender_id=viewer, gift_id="rose", quantity=1, idempotency_key=first.idempotency_key
        ),
        "tip": copy_of(_tip(stream_id, viewer, 4), idempotency_key=first.idempotency_key),
    }
    return Case(first, others[other], lambda _: s.call(_tip(stream_id, viewer, 3)))


@case("UnlockContent")
async def _unlock(s: Suite) -> Case:
    return await _unlock_case(s, unlocked_before=False)


@case("UnlockContent, unlocked before under another key")
async def _unlock_again(s: Suite) -> Case:
    return await _unlock_case(s, unlocked_before=True)


@case("UnlockContent, unlocked before under another key; a SendGift under its key")
async def _unlock_again_then_gift(s: Suite) -> Case:
    return await _unlock_case(s, unlocked_before=True, other="gift")


@case("UnlockContent, unlocked before under another key; a SendTip under its key")
async def _unlock_again_then_tip(s: Suite) -> Case:
    return await _unlock_case(s, unlocked_before=True, other="tip")


@case("UpsertGift")
async def _upsert_gift(s: Suite) -> Case:
    gift_id = uid("gift")

    def upsert(price_coins: int) -> gifting_pb2.UpsertGiftRequest:
        # Retired, so no other test's catalog holds it.
        return gifting_pb2.UpsertGiftRequest(
            gift_id=gift_id, name="Idem", price_coins=price_coins, retired=True, idempotency_key=key()
        )

    first = upsert(7)
    return Case(first, copy_of(first, price_coins=8), lambda _: s.call(upsert(9)))


# ---- payout -------------------------------------------------------------------------------------


@case("SetPolicy")
async def _set_policy(s: Suite) -> Case:
    current = await s.clients.payout.GetPolicy(payout_pb2.GetPolicyRequest())

    def policy() -> payout_pb2.SetPolicyRequest:
        # The policy in force, again: the other tests expect it.
        req = payout_pb2.SetPolicyRequest(
            creator_share_bp=current.creator_share_bp, fee_bp=current.fee_bp, idempotency_key=key()
        )
        req.currencies.extend(current.currencies)
        return req

    first = policy()
    return Case(first, copy_of(first, fee_bp=current.fee_bp + 1), lambda _: s.call(policy()))


def _paypal(creator: str) -> payout_pb2.AddPayoutMethodRequest:
    return payout_pb2.AddPayoutMethodRequest(
        creator_id=creator,
        kind=payout_pb2.PAYOUT_METHOD_KIND_PAYPAL,
        paypal_email=f"{creator}@example.com",
        idempotency_key=key(),
    )


def _verify(method_id: str, verified: bool) -> payout_pb2.VerifyPayoutMethodRequest:
    return payout_pb2.VerifyPayoutMethodRequest(method_id=method_id, verified=verified, idempotency_key=key())


@case("AddPayoutMethod")
async def _add_method(s: Suite) -> Case:
    first = _paypal(uid("creator"))
    other = copy_of(first, paypal_email="other@example.com")
    return Case(first, other, lambda method: s.call(_verify(method.method_id, True)))


@case("VerifyPayoutMethod")
async def _verify_method(s: Suite) -> Case:
    method = await s.call(_paypal(uid("creator")))
    first = _verify(method.method_id, True)
    return Case(first, copy_of(first, verified=False), lambda _: s.call(_verify(method.method_id, False)))


async def _withdrawal_request(s: Suite) -> payout_pb2.RequestWithdrawalRequest:
    """A request for all 100,000 diamonds ($500: an operator reviews it) of a new creator."""
    creator = uid("creator")
    await fund(s.clients, s.deployment, creator, 200_000)
    method_id = await verified_method(s.clients, s.deployment, creator)
    return payout_pb2.RequestWithdrawalRequest(
        creator_id=creator, diamonds=100_000, method_id=method_id, idempotency_key=key()
    )


@case("RequestWithdrawal")
async def _request_withdrawal(s: Suite) -> Case:
    first = await _withdrawal_request(s)

    async def reject(withdrawal: payout_pb2.Withdrawal) -> None:
        assert withdrawal.status == payout_pb2.WITHDRAWAL_STATUS_PENDING_REVIEW
        await s.call(payout_pb2.RejectWithdrawalRequest(withdrawal_id=withdrawal.withdrawal_id, idempotency_key=key()))

    return Case(first, copy_of(first, diamonds=99_999), reject)


@case("ApproveWithdrawal")
async def _approve(s: Suite) -> Case:
    withdrawal = await s.call(await _withdrawal_request(s))
    first = payout_pb2.ApproveWithdrawalRequest(withdrawal_id=withdrawal.withdrawal_id, idempotency_key=key())
    other = copy_of(first, withdrawal_id=uid("no-such-withdrawal"))
    return Case(first, other, lambda _: settled(s.clients, withdrawal.withdrawal_id))  # paid: no longer approvable


@case("RejectWithdrawal")
async def _reject(s: Suite) -> Case:
    withdrawal = await s.call(await _withdrawal_request(s))
    first = payout_pb2.RejectWithdrawalRequest(
        withdrawal_id=withdrawal.withdrawal_id, reason="a", idempotency_key=key()
    )
    return Case(first, copy_of(first, reason="b"))


GIFT_KEY_SPACE = {"SendGift", "SendTip", "UnlockContent"}  # and SendGifts' items (test_send_gifts.py)

# Gaps known and not yet closed: each case fails until its fix lands (strict, so a fix must drop it).
KNOWN_GAPS: dict[str, str] = {}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[n])) if n in KNOWN_GAPS else n
        for n in CASES
    ],
)
async def test_a_mutating_rpc_answers_a_key_once_and_refuses_it_for_another_request(
    clients: Clients, deployment: Deployment, name: str
) -> None:
    s = Suite(clients, deployment)
    c = await CASES[name](s)
    for bad, reason in (("", "MISSING_IDEMPOTENCY_KEY"), ("k" * 129, "INVALID_IDEMPOTENCY_KEY")):
        await expect_error(s.call(copy_of(c.first, idempotency_key=bad)), OK.INVALID_ARGUMENT, reason)
    first = await s.call(c.first)
    if c.change is not None:
        await c.change(first)
    assert await s.call(c.first) == first
    if c.other is not None:
        refused = await expect_error(s.call(c.other), OK.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
        # `scope` names the key space the key was used in: the RPC's own, or the one gifts, tips
        # and unlocks share (README "Error reasons").
        method = c.first.DESCRIPTOR.name.removesuffix("Request")
        expected = "SendGift" if method in GIFT_KEY_SPACE else method
        assert error_info(refused).metadata.get("scope") == expected, error_info(refused)
        assert await s.call(c.first) == first


async def test_a_refusal_before_anything_is_recorded_leaves_the_key_free_and_a_wallet_refusal_binds_it(
    clients: Clients, deployment: Deployment
) -> None:
    """README "Which refusals use up a key": a gift refused by gifting's own checks records
    nothing, so a changed request under its key is a first call; one the wallet refused is
    recorded and cancelled, so its key stays that request's (a retry of it is checked anew)."""
    s = Suite(clients, deployment)
    poor, creator = uid("poor"), uid("creator")
    await buy_coins(clients.wallet, deployment.webhook_secret, poor, "us-usd-70")
    stream_id = (await live_stream(clients.gifting, creator)).stream_id

    def gift(sender: str, gift_id: str, k: str) -> gifting_pb2.SendGiftRequest:
        return gifting_pb2.SendGiftRequest(
            stream_id=stream_id, sender_id=sender, gift_id=gift_id, quantity=1, idempotency_key=k
        )

    for refused, reason in (
        (gift(poor, "no-such-gift", key()), "UNKNOWN_GIFT"),
        (gift(creator, "rose", key()), "SELF_GIFT"),
    ):
        await expect_error(
            s.call(refused), OK.NOT_FOUND if reason == "UNKNOWN_GIFT" else OK.FAILED_PRECONDITION, reason
        )
        assert (await s.call(gift(poor, "rose", refused.idempotency_key))).coins == 1
    unknown = wallet_pb2.CreatePurchaseRequest(
        user_id=poor, package_id="no-such-package", currency_code="USD", payment_method=1, idempotency_key=key()
    )
    await expect_error(s.call(unknown), OK.NOT_FOUND, "UNKNOWN_PACKAGE")
    assert (await s.call(copy_of(unknown, package_id="us-usd-70"))).package_id == "us-usd-70"

    galaxy = gift(poor, "galaxy", key())  # 1000 coins: the wallet refuses, the gift is recorded and cancelled
    await expect_error(s.call(galaxy), OK.FAILED_PRECONDITION, "INSUFFICIENT_COINS")
    refused = await expect_error(
        s.call(gift(poor, "rose", galaxy.idempotency_key)), OK.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED"
    )
    assert error_info(refused).metadata["scope"] == "SendGift"
    await expect_error(s.call(galaxy), OK.FAILED_PRECONDITION, "INSUFFICIENT_COINS")  # its own retry: checked anew


TAPS = 3  # calls of one request under one key at once: a double tap and a retry in flight


# Gifts, tips and unlocks racing under one key: test_gift_flow.py, test_gifting.py, test_money_model.py.
RACED = [n for n in CASES if n.split(",")[0] not in GIFT_KEY_SPACE]


@pytest.mark.parametrize("name", RACED)
async def test_calls_racing_under_one_key_all_answer_the_first_answer(
    clients: Clients, deployment: Deployment, name: str
) -> None:
    """README "Idempotency keys": a call under a key whose first call is still running answers
    that call's answer once it commits, never a refusal that call's own effect caused (the
    diamonds it held, the stream it started). On PostgreSQL a racing RequestWithdrawal of all
    the diamonds answered INSUFFICIENT_DIAMONDS `available_diamonds` 0 though its withdrawal was made."""
    s = Suite(clients, deployment)
    c = await CASES[name](s)
    answers = await asyncio.gather(*(s.call(c.first) for _ in range(TAPS)), return_exceptions=True)
    refused = [a for a in answers if isinstance(a, BaseException)]
    assert not refused, [
        (a.code(), error_info(a).reason) if isinstance(a, grpc.aio.AioRpcError) else a for a in refused
    ]
    assert all(a == answers[0] for a in answers), answers
    assert await s.call(c.first) == answers[0]
