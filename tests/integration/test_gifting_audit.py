"""Gifting's GetAudit against its leaderboards, over a real database (both backends): the coins
the creator leaderboards counted are exactly the coins of SENT gifts, tips and unlocks once their
events are applied, so the audit can hold the read model to them and catch an event counted
twice or lost."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import delete, insert, select, update

from livegifts.gifting.v1 import gifting_pb2
from livegifts.payout.v1 import payout_pb2
from livegifts.wallet.v1 import wallet_pb2
from services.cli import audit
from services.cli.audit import FAILED, IN_FLIGHT, OK, Totals
from services.gifting.readmodels import ReadModels
from services.gifting.storage import gift_events, leaderboard_all_time
from services.gifting.usecases import Gifting, _gift_sent_event
from tests.integration.conftest import gifting_on


@pytest.fixture
async def gifting(empty_database: str) -> AsyncIterator[Gifting]:
    async with gifting_on(empty_database, pool_size=4, application_name="gifting-audit-test") as gifting:
        yield gifting


def _gift(n: int, kind: str, stream_id: str, coins: int, status: str = "SENT") -> dict[str, Any]:
    return {
        "event_id": f"e{n}",
        "idempotency_key": f"k{n}",
        "client_key": f"k{n}",
        "request_hash": "h",
        "kind": kind,
        "stream_id": stream_id,
        "creator_id": "creator",
        "sender_id": f"viewer-{n % 2}",
        "gift_id": "rose" if kind == "GIFT" else "",
        "quantity": 1,
        "unit_price_coins": coins,
        "coins": coins,
        "status": status,
        "created_at_us": 1_000_000,
        "updated_at_us": 1_000_000,
    }


def _leaderboards(ga: gifting_pb2.GiftingAudit) -> audit.Check:
    """The audit's leaderboard line on this gifting answer (the other services' books empty)."""
    report = audit.check_invariants(Totals(wallet_pb2.WalletAudit(), ga, payout_pb2.PayoutAudit()))
    return next(c for c in report if c.name == audit.LEADERBOARDS_LINE)


async def test_the_leaderboards_count_sent_gifts_tips_and_unlocks_and_the_audit_holds_them_to_it(
    gifting: Gifting,
) -> None:
    sent = [_gift(1, "GIFT", "s1", 10), _gift(2, "TIP", "s1", 3), _gift(3, "UNLOCK", "", 25), _gift(4, "GIFT", "s2", 7)]
    others = [_gift(5, "GIFT", "s1", 100, "PENDING"), _gift(6, "TIP", "s2", 50, "CANCELLED")]
    async with gifting.db.unit_of_work() as uow:
        await uow.conn.execute(insert(gift_events), sent + others)
        await uow.commit()
    read = ReadModels(gifting.db)
    async with gifting.db.unit_of_work() as uow:
        await read.apply(uow, [_gift_sent_event(g) for g in sent[:3]])  # the unlock and a gift, a tip
        await uow.commit()

    behind = await gifting.audit()
    assert (behind.coins_sent, behind.leaderboard_coins) == (45, 38)
    assert _leaderboards(behind).status == IN_FLIGHT  # one event not yet consumed

    async with gifting.db.unit_of_work() as uow:
        await read.apply(uow, [_gift_sent_event(sent[3])])
        await uow.commit()
    caught_up = await gifting.audit()
    assert caught_up.leaderboard_coins == caught_up.coins_sent == 45
    assert _leaderboards(caught_up).status == OK

    t = leaderboard_all_time.c
    creator = (t.scope == "CREATOR", t.scope_id == "creator", t.sender_id == "viewer-0")
    async with gifting.db.unit_of_work() as uow:  # the tip's event applied twice
        await uow.conn.execute(update(leaderboard_all_time).where(*creator).values(coins=t.coins + 3))
        await uow.commit()
    twice = await gifting.audit()
    assert _leaderboards(twice).status == FAILED, twice

    async with gifting.db.unit_of_work() as uow:  # viewer-0's events (the tip, the gift of 7) lost instead
        await uow.conn.execute(delete(leaderboard_all_time).where(*creator))
        await uow.commit()
    async with gifting.db.unit_of_work(readonly=True) as uow:
        left = (await uow.conn.execute(select(t.coins).where(t.scope == "CREATOR"))).scalars().all()
    assert left == [35]  # viewer-1's gift of 10 and unlock of 25
    lost = await gifting.audit()
    assert _leaderboards(lost).status == IN_FLIGHT  # lag or loss: the wait tells them apart
