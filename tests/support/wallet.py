"""The wallet's use cases as the wallet tests drive them: signed development-provider callbacks,
purchases, spends and the reversal events they leave in the outbox."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from sqlalchemy import select, update

from livegifts.wallet.v1 import events_pb2, wallet_pb2
from services.common import signing
from services.common.db import Database
from services.common.migrate import upgrade_head
from services.common.outbox import Outbox
from services.wallet.config import WalletSettings
from services.wallet.payments import DevProvider, PaymentRouter, dev_event_payload, parse_routes
from services.wallet.storage import common, purchases
from services.wallet.usecases import Wallet

SECRET = b"reversal-test-secret"
MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "wallet" / "migrations"


@contextlib.asynccontextmanager
async def wallet_on(
    url: str,
    application_name: str,
    *,
    pool_size: int = 2,
    pool_timeout_s: float = 5,
    clock: Callable[[], int] | None = None,
) -> AsyncIterator[Wallet]:
    """The wallet's use cases over a migrated database at `url`, its development provider signing
    with SECRET (no NATS, no background loops), at `clock` if given; the database disposed after."""
    await upgrade_head(MIGRATIONS, url)
    cfg = WalletSettings(database_url=url, nats_url="nats://127.0.0.1:1", payment_webhook_secret=SECRET.decode())
    db = Database(url, pool_size=pool_size, pool_timeout_s=pool_timeout_s, application_name=application_name)
    router = PaymentRouter([DevProvider(SECRET, 300)], parse_routes(cfg.payment_routes))
    try:
        yield Wallet(db, Outbox(common.outbox), router, cfg, **({} if clock is None else {"clock": clock}))
    finally:
        await db.dispose()


def callback_request(purchase: wallet_pb2.Purchase, event_type: str) -> wallet_pb2.HandlePaymentEventRequest:
    """The development provider's signed callback of `event_type` for `purchase`, under a new event id."""
    payload = dev_event_payload(
        uuid.uuid4().hex, event_type, purchase.purchase_id, purchase.price.amount_minor, purchase.price.currency_code
    )
    return wallet_pb2.HandlePaymentEventRequest(
        provider="dev", payload=payload, signature=signing.sign(SECRET, payload)
    )


async def callback(w: Wallet, purchase: wallet_pb2.Purchase, event_type: str) -> None:
    await w.handle_payment_event(callback_request(purchase, event_type))


async def pending_purchase(w: Wallet, user: str, package: str = "us-usd-70") -> wallet_pb2.Purchase:
    """`user`'s purchase of `package`, PENDING (its checkout not paid yet)."""
    return await w.create_purchase(
        wallet_pb2.CreatePurchaseRequest(
            user_id=user,
            package_id=package,
            currency_code="USD",
            payment_method=wallet_pb2.PAYMENT_METHOD_PAYPAL,
            idempotency_key=uuid.uuid4().hex,
        )
    )


async def buy(w: Wallet, user: str, package: str = "us-usd-70") -> wallet_pb2.Purchase:
    """`user`'s purchase of `package`, its success called back."""
    p = await pending_purchase(w, user, package)
    await callback(w, p, "payment.succeeded")
    return p


async def spend(w: Wallet, user: str, amount: int) -> None:
    await w.spend(
        wallet_pb2.SpendRequest(
            user_id=user,
            amount=amount,
            reason=wallet_pb2.SPEND_REASON_GIFT,
            reference_id="gift",
            idempotency_key=uuid.uuid4().hex,
        )
    )


async def reversal_of(w: Wallet, purchase_id: str) -> events_pb2.PurchaseReversed:
    o = common.outbox.c
    async with w.db.unit_of_work(readonly=True) as uow:
        payloads = (await uow.conn.execute(select(o.payload).where(o.subject == "wallet.purchase.reversed"))).scalars()
        events = [events_pb2.PurchaseReversed.FromString(p) for p in payloads]
    (event,) = [e for e in events if e.purchase_id == purchase_id]
    return event


async def forget(w: Wallet, purchase_id: str, column: str) -> None:
    """As if the purchase was credited (or reversed) before migrations 0006/0007, or by the previous release."""
    async with w.db.unit_of_work() as uow:
        await uow.conn.execute(update(purchases).where(purchases.c.purchase_id == purchase_id).values({column: None}))
        await uow.commit()
