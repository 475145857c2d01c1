"""Payout's dispatcher against a real SQLite file: what it hands to the payout provider, and when not.

Withdrawals are held while a creator's balance is negative after a clawback. The dispatcher
reads a round of APPROVED withdrawals, then submits them one by one; a clawback that commits
while an earlier one is being submitted must hold the later ones too.
"""

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from livegifts.gifting.v1 import events_pb2 as gifting_events
from livegifts.payout.v1 import payout_pb2
from services.common import signing
from services.common.db import Database
from services.common.migrate import upgrade_head
from services.common.outbox import Outbox
from services.payout.config import PayoutSettings
from services.payout.providers import DevPayoutProvider, Submission, dev_payout_payload
from services.payout.storage import common
from services.payout.usecases import Payout

SECRET = b"dispatch-test-secret"
MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "payout" / "migrations"


class RecordingProvider(DevPayoutProvider):
    """The development provider, no callbacks; runs `on_submit` before answering each submission."""

    def __init__(self) -> None:
        super().__init__(SECRET, 300, auto_callback=False)
        self.submitted: list[str] = []
        self.on_submit: list[object] = []

    def submit(self, withdrawal_id: str, token: str, amount_minor: int, currency_code: str) -> Submission:
        self.submitted.append(withdrawal_id)
        for hook in self.on_submit:
            hook()  # type: ignore[operator]
        return super().submit(withdrawal_id, token, amount_minor, currency_code)


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


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[Payout, RecordingProvider, Path]]:
    path = tmp_path / "payout.db"
    async with payout_on(f"sqlite+aiosqlite:///{path}") as (payout, provider):
        yield payout, provider, path


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


async def verified_method(payout: Payout, creator: str) -> str:
    """Add a PayPal payout method for `creator` and verify it; its id."""
    method = await payout.add_payout_method(
        payout_pb2.AddPayoutMethodRequest(
            creator_id=creator,
            kind=payout_pb2.PAYOUT_METHOD_KIND_PAYPAL,
            paypal_email=f"{creator}@example.com",
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


async def approved_withdrawal(payout: Payout, creator: str) -> str:
    """Credit `creator` 20,000 diamonds (40,000 coins at 50%) and request a $100 withdrawal (auto-approved)."""
    async with payout.db.unit_of_work() as uow:
        await payout.credit_gifts(uow, [gift_event(creator, 40_000)])
        await uow.commit()
    wd = await payout.request_withdrawal(
        payout_pb2.RequestWithdrawalRequest(
            creator_id=creator,
            diamonds=20_000,
            method_id=await verified_method(payout, creator),
            idempotency_key=uuid.uuid4().hex,
        )
    )
    assert wd.status == payout_pb2.WITHDRAWAL_STATUS_APPROVED
    return wd.withdrawal_id


def set_available(path: Path, creator: str, diamonds: int) -> None:
    """Another transaction commits a balance (a clawback, or its repayment), outside the dispatcher's."""
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE creators SET diamonds_available = ? WHERE creator_id = ?", (diamonds, creator))


async def status_of(payout: Payout, withdrawal_id: str) -> int:
    return (await payout.get_withdrawal(withdrawal_id)).status


async def test_a_clawback_committed_during_a_round_holds_the_withdrawals_not_yet_submitted(setup) -> None:  # type: ignore[no-untyped-def]
    payout, provider, path = setup
    first = await approved_withdrawal(payout, "creator-a")
    second = await approved_withdrawal(payout, "creator-b")
    # While the first is with the provider, a clawback takes creator-b below zero.
    provider.on_submit.append(lambda: set_available(path, "creator-b", -1))

    assert await payout.dispatch_once() == 1
    assert provider.submitted == [first]
    assert await status_of(payout, first) == payout_pb2.WITHDRAWAL_STATUS_PROCESSING
    assert await status_of(payout, second) == payout_pb2.WITHDRAWAL_STATUS_APPROVED  # held, not lost

    provider.on_submit.clear()
    set_available(path, "creator-b", 0)  # repaid: the held withdrawal goes in the next round
    assert await payout.dispatch_once() == 1
    assert provider.submitted == [first, second]
    assert await status_of(payout, second) == payout_pb2.WITHDRAWAL_STATUS_PROCESSING


def gauge(name: str) -> float:
    value = REGISTRY.get_sample_value(name)
    assert value is not None, name
    return value


async def test_withdrawals_waiting_for_the_providers_callback_are_counted_with_their_age(setup) -> None:  # type: ignore[no-untyped-def]
    payout, _provider, path = setup
    withdrawal_id = await approved_withdrawal(payout, "creator-a")
    assert await payout.dispatch_once() == 1  # submitted; no callback comes (auto_callback off)
    with sqlite3.connect(path) as conn:  # handed over an hour ago
        conn.execute("UPDATE withdrawals SET updated_at_us = updated_at_us - 3600000000")
    assert await payout.dispatch_once() == 0
    assert gauge("livegifts_withdrawals_processing") == 1
    assert 3600 <= gauge("livegifts_withdrawal_processing_oldest_seconds") < 3700

    row = await payout.get_withdrawal(withdrawal_id)
    payload = dev_payout_payload("evt-1", "payout.paid", withdrawal_id, row.net.amount_minor, row.net.currency_code)
    await payout.handle_payout_event(
        payout_pb2.HandlePayoutEventRequest(provider="dev", payload=payload, signature=signing.sign(SECRET, payload))
    )
    assert await status_of(payout, withdrawal_id) == payout_pb2.WITHDRAWAL_STATUS_PAID
    await payout.dispatch_once()
    assert gauge("livegifts_withdrawals_processing") == 0
    assert gauge("livegifts_withdrawal_processing_oldest_seconds") == 0
