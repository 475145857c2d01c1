"""Payout's use cases over a migrated database with a recording development provider, and the
withdrawals, credits and stand-in providers the payout tests build on."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from sqlalchemy import func, select

from livegifts.gifting.v1 import events_pb2 as gifting_events
from livegifts.payout.v1 import payout_pb2
from livegifts.wallet.v1 import events_pb2 as wallet_events
from services.common import signing
from services.common.db import Database
from services.common.migrate import upgrade_head
from services.common.outbox import Outbox
from services.common.provider_calls import ProviderError, ProviderRefused
from services.common.timeutil import now_us
from services.payout.config import PayoutSettings
from services.payout.providers import DevPayoutProvider, Submission, dev_payout_payload
from services.payout.storage import clawback_shortfalls, common
from services.payout.usecases import Payout

SECRET = b"dispatch-test-secret"
MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "payout" / "migrations"


class RecordingProvider(DevPayoutProvider):
    """The development provider as a dev suite has it (its look-up settles the transfers it made),
    no callbacks; runs `on_submit` before answering each submission."""

    def __init__(self) -> None:
        super().__init__(SECRET, 300, auto_callback=False, settles_payouts=True)
        self.submitted: list[str] = []
        self.on_submit: list[object] = []

    async def submit(self, withdrawal_id: str, token: str, amount_minor: int, currency_code: str) -> Submission:
        self.submitted.append(withdrawal_id)
        for hook in self.on_submit:
            hook()  # type: ignore[operator]
        return await super().submit(withdrawal_id, token, amount_minor, currency_code)


@contextlib.asynccontextmanager
async def payout_on(url: str, pool_size: int = 2) -> AsyncIterator[tuple[Payout, RecordingProvider]]:
    """Payout's use cases over a migrated database at `url`: no wallet, no NATS, no background loops."""
    await upgrade_head(MIGRATIONS, url)
    settings = PayoutSettings(
        database_url=url,
        nats_url="nats://127.0.0.1:1",
        wallet_addr="127.0.0.1:1",
        payout_webhook_secret=SECRET.decode(),
        dev_provider_auto_callback=False,
    )
    db = Database(url, pool_size=pool_size, pool_timeout_s=5, application_name="payout-test")
    provider = RecordingProvider()
    try:
        yield Payout(db, Outbox(common.outbox), provider, None, settings), provider
    finally:
        await db.dispose()


def gift_event(creator: str, coins: int, at_s: int | None = None) -> gifting_events.GiftSent:
    """A gift of `coins` from "viewer" to `creator`, recorded and sent at `at_s` (unset: when credited)."""
    when = {} if at_s is None else {"occurred_at": {"seconds": at_s}, "recorded_at": {"seconds": at_s}}
    return gifting_events.GiftSent(
        event_id=uuid.uuid4().hex,
        kind=gifting_events.GIFT_KIND_GIFT,
        stream_id="s",
        creator_id=creator,
        sender_id="viewer",
        gift_id="rose",
        quantity=coins,
        coins=coins,
        **when,
    )


async def consume(
    payout: Payout,
    reversals: Sequence[wallet_events.PurchaseReversed] = (),
    gifts: Sequence[gifting_events.GiftSent] = (),
) -> None:
    """One consumer batch, as the inbox runs it: one transaction."""
    async with payout.db.unit_of_work() as uow:
        if reversals:
            await payout.claw_back(uow, list(reversals))
        if gifts:
            await payout.credit_gifts(uow, list(gifts))
        await uow.commit()


async def verified_method(payout: Payout, creator: str, domain: str = "example.com") -> str:
    """Add a PayPal payout method for `creator` (at `domain`: fail.invalid fails) and verify it; its id."""
    method = await payout.add_payout_method(
        payout_pb2.AddPayoutMethodRequest(
            creator_id=creator,
            kind=payout_pb2.PAYOUT_METHOD_KIND_PAYPAL,
            paypal_email=f"{creator}@{domain}",
            idempotency_key=uuid.uuid4().hex,
        )
    )
    await payout.verify_payout_method(
        payout_pb2.VerifyPayoutMethodRequest(
            method_id=method.method_id, verified=True, idempotency_key=uuid.uuid4().hex
        ),
        "test",
    )
    return method.method_id


async def requested_withdrawal(
    payout: Payout, creator: str, coins: int, diamonds: int, method_id: str = "", domain: str = "example.com"
) -> payout_pb2.Withdrawal:
    """Credit `creator` a gift of `coins` (diamonds at 50%), then request `diamonds` to `method_id`
    (unset: a PayPal method at `domain` added and verified after the credit)."""
    await consume(payout, gifts=[gift_event(creator, coins)])
    return await payout.request_withdrawal(
        payout_pb2.RequestWithdrawalRequest(
            creator_id=creator,
            diamonds=diamonds,
            method_id=method_id or await verified_method(payout, creator, domain),
            idempotency_key=uuid.uuid4().hex,
        )
    )


async def approved_withdrawal(payout: Payout, creator: str, domain: str = "example.com") -> str:
    """Credit `creator` 20,000 diamonds (40,000 coins at 50%) and request a $100 withdrawal (auto-approved)."""
    wd = await requested_withdrawal(payout, creator, 40_000, 20_000, domain=domain)
    assert wd.status == payout_pb2.WITHDRAWAL_STATUS_APPROVED
    return wd.withdrawal_id


async def reviewed_withdrawal(payout: Payout, creator: str) -> payout_pb2.Withdrawal:
    """Credit `creator` 120,000 diamonds and request a $600 withdrawal, above the $500 review threshold."""
    wd = await requested_withdrawal(payout, creator, 240_000, 120_000)
    assert wd.status == payout_pb2.WITHDRAWAL_STATUS_PENDING_REVIEW
    return wd


async def status_of(payout: Payout, withdrawal_id: str) -> int:
    return (await payout.get_withdrawal(withdrawal_id)).status


async def open_coins_of(payout: Payout) -> int:
    """The coins clawback shortfalls still have open, all senders together."""
    sf = clawback_shortfalls.c
    async with payout.db.unit_of_work(readonly=True) as uow:
        return int((await uow.conn.execute(select(func.coalesce(func.sum(sf.coins_open), 0)))).scalar_one())


class SlowProvider(RecordingProvider):
    """Transfers still under way at the provider, but for `done`; answers `amount_minor` if set."""

    def __init__(self) -> None:
        super().__init__()
        self.done: set[str] = set()
        self.asked: list[str] = []
        self.amount_minor: int | None = None

    async def status(self, provider_ref, withdrawal_id, token, amount_minor, currency_code):  # type: ignore[no-untyped-def]
        self.asked.append(withdrawal_id)
        if withdrawal_id not in self.done:
            return None
        return await super().status(
            provider_ref, withdrawal_id, token, self.amount_minor or amount_minor, currency_code
        )


def reconcile_due(payout: Payout) -> int:
    """A time (microseconds) by which the reconciler looks up a withdrawal handed to the provider now."""
    assert payout.settings is not None
    return now_us() + int((payout.settings.reconcile_after_s + 1) * 1_000_000)


class StuckProvider(SlowProvider):
    """Calls for the ids in `stuck` hang (`hang`) or raise (`fail`); the others answer at once.
    `entered` is set when a stuck call starts, and `gate` lets a hanging call go on when set."""

    def __init__(self, how: str = "hang") -> None:
        super().__init__()
        self.how = how
        self.stuck: set[str] = set()
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def _stuck(self, key: str) -> None:
        if key not in self.stuck:
            return
        self.entered.set()
        if self.how == "fail":
            raise ProviderError("503 from the provider")
        await self.gate.wait()

    async def submit(self, withdrawal_id, token, amount_minor, currency_code):  # type: ignore[no-untyped-def]
        await self._stuck(withdrawal_id)
        return await super().submit(withdrawal_id, token, amount_minor, currency_code)

    async def status(self, provider_ref, withdrawal_id, token, amount_minor, currency_code):  # type: ignore[no-untyped-def]
        await self._stuck(withdrawal_id)
        return await super().status(provider_ref, withdrawal_id, token, amount_minor, currency_code)

    async def tokenize(self, kind: str, account: str) -> str:
        await self._stuck(account)
        return await super().tokenize(kind, account)


def method_request(creator: str, key: str) -> payout_pb2.AddPayoutMethodRequest:
    return payout_pb2.AddPayoutMethodRequest(
        creator_id=creator,
        kind=payout_pb2.PAYOUT_METHOD_KIND_PAYPAL,
        paypal_email=f"{creator}@example.com",
        idempotency_key=key,
    )


class RefusingProvider(RecordingProvider):
    """A provider that answers a submission for `refused` ids with a refusal for good (a 4xx)."""

    def __init__(self) -> None:
        super().__init__()
        self.refused: set[str] = set()

    async def submit(self, withdrawal_id: str, token: str, amount_minor: int, currency_code: str) -> Submission:
        if withdrawal_id in self.refused:
            self.submitted.append(withdrawal_id)
            raise ProviderRefused("account closed")
        return await super().submit(withdrawal_id, token, amount_minor, currency_code)


def max_clawable(reversals: list[tuple[int, int]], gifts: list[tuple[int, int]]) -> int:
    """The most coins reversals (time, coins) can take from gifts (recorded at, coins), each only
    of gifts recorded before it: applied in time order, each taking any it may (nested choices)."""
    left = sorted(gifts)
    total = 0
    for t, want in sorted(reversals):
        for i, (at, n) in enumerate(left):
            if at <= t and want:
                take = min(want, n)
                left[i], want, total = (at, n - take), want - take, total + take
    return total


async def callback(
    payout: Payout, withdrawal_id: str, event_id: str, event_type: str
) -> payout_pb2.HandlePayoutEventResponse:
    """Deliver a signed callback of the development provider for the withdrawal's own amount."""
    row = await payout.get_withdrawal(withdrawal_id)
    payload = dev_payout_payload(event_id, event_type, withdrawal_id, row.net.amount_minor, row.net.currency_code)
    return await payout.handle_payout_event(
        payout_pb2.HandlePayoutEventRequest(provider="dev", payload=payload, signature=signing.sign(SECRET, payload))
    )


def reversal(event_id: str, at_s: int, coins: int) -> wallet_events.PurchaseReversed:
    """A chargeback of "viewer"'s purchase at `at_s`, all of whose `coins` had reached creators."""
    return wallet_events.PurchaseReversed(
        event_id=event_id,
        purchase_id=f"p-{event_id}",
        user_id="viewer",
        coins=coins,
        coins_already_spent=coins,
        kind="CHARGED_BACK",
        occurred_at={"seconds": at_s},
    )


class Clock:
    """Payout's now_us: set by the test, a microsecond later at each reading, as a real clock."""

    def __init__(self) -> None:
        self.us = 0

    def __call__(self) -> int:
        self.us += 1
        return self.us


def month_moves(m: payout_pb2.StatementMonth) -> int:
    return m.diamonds_earned - m.diamonds_clawed_back - sum(p.diamonds for p in m.paid)
