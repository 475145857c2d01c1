"""Small helpers shared by the integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from sqlalchemy import func, select

from livegifts.gifting.v1 import events_pb2, gifting_pb2, gifting_pb2_grpc
from livegifts.payout.v1 import payout_pb2, payout_pb2_grpc
from livegifts.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from services.cli.suite import Suite, SuiteConfig, free_port
from services.common import signing
from services.common.bus import Bus
from services.common.clients import error_reason
from services.common.config import ServiceSettings
from services.common.db import Database
from services.common.errors import DomainError
from services.wallet.payments import dev_event_payload
from tests.integration.conftest import WEBHOOK_SECRET

T = TypeVar("T")
# The ERROR a consumer's position check logs at bind when its database lost events its durable acked.
BEHIND = "the database is behind its consumer"


def service_settings(url: str, **kw: object) -> ServiceSettings:
    """The settings every service reads, on `url`, with `kw` set (no bus is reached)."""
    return ServiceSettings(database_url=url, nats_url="nats://127.0.0.1:1", **kw)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def bus_on_own_nats(
    tmp_path: Path, name: str, *, nats_started: bool = True
) -> AsyncIterator[tuple[Suite, Bus, asyncio.Event]]:
    """A suite whose nats-server is the test's own (started unless `nats_started` is False), and
    a Bus named `name` meant for it, not yet connected, with the event that stops it; stops both."""
    suite = Suite(SuiteConfig(var_dir=tmp_path, nats_port=free_port()))
    if nats_started:
        suite.start_nats()
    stop = asyncio.Event()
    settings = ServiceSettings(database_url="sqlite+aiosqlite:///unused.db", nats_url=suite.config.nats_url)  # type: ignore[call-arg]
    bus = Bus(settings, name)
    try:
        yield suite, bus, stop
    finally:
        stop.set()
        await bus.close()
        suite.stop()


def uid(prefix: str) -> str:
    """A unique id for this test's users, creators and keys."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# The ErrorInfo reason of a failed call: the same parser the services use on each other.
reason_of = error_reason


async def domain_reason(call: Awaitable[object]) -> str:
    """The reason of the DomainError `call` (a use case's, not a gRPC call's) is refused with."""
    try:
        await call
    except DomainError as exc:
        return exc.reason
    raise AssertionError("the call succeeded")


async def expect_error(
    call: Awaitable[object], code: grpc.StatusCode, reason: str | None = None
) -> grpc.aio.AioRpcError:
    """Await `call`, assert it fails with `code` (and `reason`), return the error."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == code, f"expected {code}, got {exc.code()}: {exc.details()}"
        if reason is not None:
            assert reason_of(exc) == reason, f"expected reason {reason}, got {reason_of(exc)!r}: {exc.details()}"
        return exc
    raise AssertionError(f"expected {code} {reason or ''}, but the call succeeded")


def signed_callback(
    secret: str, event_type: str, purchase: wallet_pb2.Purchase, event_id: str | None = None, ts: int | None = None
) -> wallet_pb2.HandlePaymentEventRequest:
    """A payment callback as the development provider sends it."""
    payload = dev_event_payload(
        event_id or uid("evt"),
        event_type,
        purchase.purchase_id,
        purchase.price.amount_minor,
        purchase.price.currency_code,
    )
    return wallet_pb2.HandlePaymentEventRequest(
        provider="dev", payload=payload, signature=signing.sign(secret.encode(), payload, ts)
    )


async def buy_coins(wallet, secret: str, user_id: str, package_id: str = "us-usd-700") -> wallet_pb2.Purchase:  # type: ignore[no-untyped-def]
    """Create a purchase and complete it with a signed success callback."""
    purchase = await wallet.CreatePurchase(
        wallet_pb2.CreatePurchaseRequest(
            user_id=user_id,
            package_id=package_id,
            currency_code="USD",
            payment_method=wallet_pb2.PAYMENT_METHOD_CARD,
            idempotency_key=uid("buy"),
        )
    )
    answer = await wallet.HandlePaymentEvent(signed_callback(secret, "payment.succeeded", purchase))
    assert answer.purchase.status == wallet_pb2.PURCHASE_STATUS_SUCCEEDED
    return answer.purchase


async def live_stream(gifting, creator_id: str) -> gifting_pb2.Stream:  # type: ignore[no-untyped-def]
    """Start a stream for `creator_id`."""
    return await gifting.StartStream(
        gifting_pb2.StartStreamRequest(creator_id=creator_id, title="test", idempotency_key=uid("start"))
    )


async def balance_of(wallet, user: str) -> int:  # type: ignore[no-untyped-def]
    """A user's coins."""
    return (await wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))).coins


async def balance(clients, user_id: str) -> int:  # type: ignore[no-untyped-def]
    """The user's coins, asked through the clients' wallet stub."""
    return await balance_of(clients.wallet, user_id)


def spend_req(user: str, amount: int, key: str | None = None) -> wallet_pb2.SpendRequest:
    """A GIFT spend."""
    return wallet_pb2.SpendRequest(
        user_id=user,
        amount=amount,
        reason=wallet_pb2.SPEND_REASON_GIFT,
        reference_id="r",
        idempotency_key=uid("k") if key is None else key,
    )


def gift(
    stream_id: str, sender: str, gift_id: str, quantity: int, key: str | None = None
) -> gifting_pb2.SendGiftRequest:
    """One gift, as an item of a SendGifts batch or a SendGift call."""
    return gifting_pb2.SendGiftRequest(
        stream_id=stream_id,
        sender_id=sender,
        gift_id=gift_id,
        quantity=quantity,
        idempotency_key=uid("gift") if key is None else key,
    )


async def eventually(probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout_s: float = 20.0) -> T:
    """Poll `probe` until `done(result)` or the timeout; returns the last result."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = await probe()
            if done(result) or time.monotonic() > deadline:
                return result
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.1)


async def publish_gift_sent(bus: Bus, subject: str, event_id: str) -> None:
    """Publish a GiftSent of one coin to creator "c" on `subject`, its event id the message id."""
    assert bus.js is not None
    data = events_pb2.GiftSent(event_id=event_id, coins=1, creator_id="c").SerializeToString()
    await bus.js.publish(subject, data, headers={"Nats-Msg-Id": event_id})


async def count_rows(db: Database, table: Any) -> int:
    """How many rows `table` holds now."""
    async with db.unit_of_work(readonly=True) as uow:
        return int((await uow.conn.execute(select(func.count()).select_from(table))).scalar_one())


async def gift_700_coins(gifting, viewer: str, creator: str) -> gifting_pb2.Stream:  # type: ignore[no-untyped-def]
    """`viewer` gifts 700 coins (a concert, 500, and four sun-creams, 4 x 50) to `creator` on a new
    stream, which it returns."""
    stream = await live_stream(gifting, creator)
    for gift_id, quantity in (("concert", 1), ("sun-cream", 4)):
        await gifting.SendGift(
            gifting_pb2.SendGiftRequest(
                stream_id=stream.stream_id,
                sender_id=viewer,
                gift_id=gift_id,
                quantity=quantity,
                idempotency_key=uid("g"),
            )
        )
    return stream


async def gifts_to(suite: Suite, viewer: str, creators: list[str]) -> list[wallet_pb2.Purchase]:
    """`viewer` buys 700 coins and gifts them to each new creator in turn, on a stream that then
    ends: GIFTING's last event is a `gifting.stream.ended`, which payout's durable does not take."""
    channels = [grpc.aio.insecure_channel(suite.addr(s)) for s in ("wallet", "gifting")]
    try:
        wallet = wallet_pb2_grpc.WalletServiceStub(channels[0])
        gifting = gifting_pb2_grpc.GiftingServiceStub(channels[1])
        purchases = []
        for creator in creators:
            purchases.append(await buy_coins(wallet, WEBHOOK_SECRET, viewer))
            stream = await gift_700_coins(gifting, viewer, creator)
            await gifting.EndStream(
                gifting_pb2.EndStreamRequest(stream_id=stream.stream_id, idempotency_key=uid("end"))
            )
        return purchases
    finally:
        for c in channels:
            await c.close()


async def earned(suite: Suite, creators: list[str], timeout_s: float = 20.0) -> list[int]:
    """Each creator's lifetime diamonds, once they all have each gift's 350 or the wait runs out."""
    async with grpc.aio.insecure_channel(suite.addr("payout")) as ch:
        payout = payout_pb2_grpc.PayoutServiceStub(ch)

        async def read() -> list[int]:
            return [
                (await payout.GetEarnings(payout_pb2.GetEarningsRequest(creator_id=c))).diamonds_lifetime
                for c in creators
            ]

        return await eventually(read, lambda d: all(x == 350 for x in d), timeout_s)


async def counted(suite: Suite, creator: str) -> int:
    """The coins gifting's leaderboard counts for `creator`, once it counts all 700 or the wait runs out."""
    async with grpc.aio.insecure_channel(suite.addr("gifting")) as ch:
        gifting = gifting_pb2_grpc.GiftingServiceStub(ch)

        async def read() -> int:
            board = await gifting.GetLeaderboard(gifting_pb2.GetLeaderboardRequest(creator_id=creator))
            return board.coins_total

        return await eventually(read, lambda coins: coins == 700)


def log_since(suite: Suite, svc: str, offset: int) -> str:
    """What `svc` logged from `offset` (characters) on."""
    return (suite.log_dir / f"{svc}.log").read_text(errors="replace")[offset:]


async def logged(suite: Suite, svc: str, text: str, timeout_s: float = 10.0) -> bool:
    """Whether `svc` has logged `text`, waited for up to `timeout_s`: a background round logs its
    line after its commit, so what it did can show before the line does."""

    async def read() -> str:
        return log_since(suite, svc, 0)

    return text in await eventually(read, lambda out: text in out, timeout_s)


class ReplicasAsking:
    """A gate for stand-ins that two (or `callers`) replicas call at once: each call waits here
    until calls from that many different callers have arrived, so that every replica has read its
    work before any of them applies an answer, however late the second starts."""

    def __init__(self, callers: int = 2) -> None:
        self.callers = callers
        self.seen: set[object] = set()
        self.all_asking = asyncio.Event()

    async def wait(self, caller: object) -> None:
        """`caller` asks: wait until the gate's number of callers have."""
        self.seen.add(caller)
        if len(self.seen) >= self.callers:
            self.all_asking.set()
        await self.all_asking.wait()
