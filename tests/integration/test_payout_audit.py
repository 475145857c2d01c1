"""Payout's GetAudit reports what the reconciliation needs to catch a wrong share or a parked
event: earnings whose units are not coins x share, earnings at a share no policy set, dead
letters, and the outbox's cut-off marks (both backends, a real database)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import event, insert, update

from livegifts.gifting.v1 import gifting_pb2
from livegifts.wallet.v1 import wallet_pb2
from services.cli.audit import FAILED, Totals, check_invariants
from services.common.timeutil import now_us
from services.payout.storage import common, creators, earnings, withdrawals
from services.payout.usecases import Payout
from tests.support.payout import gift_event, payout_on


@pytest.fixture
async def payout(empty_database: str) -> AsyncIterator[Payout]:
    async with payout_on(empty_database) as (p, _provider):
        yield p


async def test_the_audit_counts_earnings_at_a_wrong_share_and_parked_events(payout: Payout) -> None:
    events = [gift_event("creator-a", 7), gift_event("creator-a", 10), gift_event("creator-b", 3)]
    async with payout.db.unit_of_work() as uow:
        await payout.credit_gifts(uow, events)
        await uow.commit()
    clean = await payout.audit()
    assert (clean.earnings_units_mismatch, clean.earnings_unknown_share, clean.dead_letters) == (0, 0, 0)
    assert clean.HasField("outbox_last_id") and clean.outbox_first_pending_id <= clean.outbox_last_id

    e = earnings.c
    async with payout.db.unit_of_work() as uow:
        # One credited at units a share would not give, one at a share no policy version ever set.
        await uow.conn.execute(update(earnings).where(e.event_id == events[0].event_id).values(units=e.units + 1))
        await uow.conn.execute(
            update(earnings).where(e.event_id == events[1].event_id).values(share_bp=7000, units=e.coins * 7000)
        )
        await uow.conn.execute(
            insert(common.dead_letters).values(
                consumer="payout-gift-sent",
                subject="gifting.gift.sent",
                event_id="x",
                payload=b"",
                error="test",
                received_at_us=now_us(),
            )
        )
        await uow.commit()
    tampered = await payout.audit()
    assert (tampered.earnings_units_mismatch, tampered.earnings_unknown_share, tampered.dead_letters) == (1, 1, 1)


async def test_the_audit_reports_creator_rows_apart_from_the_entries_they_must_match(payout: Payout) -> None:
    """Checks 4 and 5 compare the creators' columns with the records behind them (earnings,
    open and paid withdrawals, clawback entries): each side must be read from its own table, or a
    creator row changed with no record behind it passes every audit."""
    events = [gift_event("creator-a", 400), gift_event("creator-b", 400)]
    async with payout.db.unit_of_work() as uow:
        await payout.credit_gifts(uow, events)
        await uow.commit()
    clean = await payout.audit()
    assert clean.ledger_sum == 0
    assert (clean.diamonds_held, clean.diamonds_withdrawn, clean.diamonds_clawed_back) == (0, 0, 0)

    c = creators.c
    async with payout.db.unit_of_work() as uow:
        # Coins received with no earning behind them; diamonds moved from available to held,
        # withdrawn and clawed back with no withdrawal or clawback entry behind them.
        await uow.conn.execute(update(creators).where(c.creator_id == "creator-a").values(coins_received=401))
        await uow.conn.execute(
            update(creators)
            .where(c.creator_id == "creator-b")
            .values(
                diamonds_available=c.diamonds_available - 9,
                diamonds_held=5,
                diamonds_withdrawn=3,
                diamonds_clawed_back=1,
            )
        )
        await uow.commit()
    tampered = await payout.audit()
    assert tampered.ledger_sum == 1
    assert (tampered.diamonds_held, tampered.diamonds_withdrawn, tampered.diamonds_clawed_back) == (5, 3, 1)
    assert (
        tampered.diamonds_in_open_withdrawals,
        tampered.diamonds_in_paid_withdrawals,
        tampered.diamonds_in_clawback_entries,
    ) == (0, 0, 0)


async def test_creator_units_and_coins_off_in_opposite_directions_are_reported_apart(payout: Payout) -> None:
    """A creator row one unit over its earnings and one coin under them: ledger_sum, their sum
    (kept for older CLIs), is 0, and the row's diamonds and remainder still add up to its units,
    so only the two differences reported apart tell, and the audit's check 4 must fail on them."""
    events = [gift_event("creator-a", 400), gift_event("creator-b", 400)]
    async with payout.db.unit_of_work() as uow:
        await payout.credit_gifts(uow, events)
        await uow.commit()
    clean = await payout.audit()
    assert (clean.ledger_sum, clean.creator_units_minus_earnings, clean.creator_coins_minus_earnings) == (0, 0, 0)

    c = creators.c
    async with payout.db.unit_of_work() as uow:
        await uow.conn.execute(
            update(creators)
            .where(c.creator_id == "creator-a")
            .values(earned_units=c.earned_units + 1, coins_received=c.coins_received - 1)
        )
        await uow.commit()
    tampered = await payout.audit()
    assert tampered.ledger_sum == 0  # the old field keeps its meaning
    assert (tampered.creator_units_minus_earnings, tampered.creator_coins_minus_earnings) == (1, -1)
    assert tampered.diamonds_credited * 10_000 + tampered.remainder_units == tampered.earned_units

    sent = gifting_pb2.GiftingAudit(gifts_sent=2, coins_sent=800)
    for detail_records in (None, {}):  # totals alone, and with (empty) per-id records
        t = Totals(wallet_pb2.WalletAudit(), sent, tampered, detail_records, detail_records, detail_records)
        check = next(c for c in check_invariants(t) if c.name.startswith("4. diamonds"))
        assert check.status == FAILED and "1 units, -1 coins" in check.detail, check


async def test_a_withdrawal_holding_more_than_was_credited_fails_though_every_sum_adds_up(payout: Payout) -> None:
    """A creator's balance goes below zero by clawbacks only. Diamonds held by a withdrawal that
    overdrew (available -100, held 300 of 200 credited) keep invariant 5: credited = available +
    held, and held = the open withdrawal's diamonds; only the creator row read against what was
    ever credited to it tells."""
    async with payout.db.unit_of_work() as uow:
        await payout.credit_gifts(uow, [gift_event("creator-a", 400)])  # 200 diamonds
        await uow.commit()
    assert (await payout.audit()).creators_overdrawn == 0
    c = creators.c
    async with payout.db.unit_of_work() as uow:
        await uow.conn.execute(
            insert(withdrawals).values(
                withdrawal_id="wd_overdrawn",
                creator_id="creator-a",
                method_id="pm_x",
                diamonds=300,
                currency_code="USD",
                gross_minor=150,
                fee_minor=0,
                net_minor=150,
                status="PENDING_REVIEW",
                policy_version=1,
                day="2026-12-07",
                requested_at_us=now_us(),
                updated_at_us=now_us(),
            )
        )
        await uow.conn.execute(
            update(creators)
            .where(c.creator_id == "creator-a")
            .values(diamonds_available=c.diamonds_available - 300, diamonds_held=c.diamonds_held + 300)
        )
        await uow.commit()
    tampered = await payout.audit()
    assert tampered.creators_overdrawn == 1
    assert tampered.diamonds_credited == tampered.diamonds_available + tampered.diamonds_held
    assert tampered.diamonds_held == tampered.diamonds_in_open_withdrawals == 300

    sent = gifting_pb2.GiftingAudit(gifts_sent=1, coins_sent=400, leaderboard_coins=400)
    charged = wallet_pb2.WalletAudit(coins_issued=400, coins_spent=400, spends=1)
    report = check_invariants(Totals(charged, sent, tampered))
    assert [c.name for c in report if c.status == FAILED] == ["6. no negative balance without a reversal"], report


async def test_the_audit_reads_the_earnings_clawed_back_coins_with_their_totals(payout: Payout) -> None:
    """earnings, one row per gift, is payout's largest table and the audit runs hourly: the coins
    clawed back of it (the reversals' side of the tie-out) are summed by the read that counts and
    sums the earnings, not by a read of the whole table of their own."""
    async with payout.db.unit_of_work() as uow:
        await payout.credit_gifts(uow, [gift_event("creator-a", 400)])
        await uow.commit()
    sent: list[str] = []

    def record(_conn, _cursor, statement, _params, _context, _many) -> None:  # type: ignore[no-untyped-def]
        sent.append(statement)

    event.listen(payout.db.engine.sync_engine, "before_cursor_execute", record)
    try:
        audit = await payout.audit()
    finally:
        event.remove(payout.db.engine.sync_engine, "before_cursor_execute", record)
    assert (audit.events_consumed, audit.earnings_coins_clawed_back) == (1, 0)
    reads = [s for s in sent if "earnings.coins_clawed_back" in s]
    assert len(reads) == 1 and "count(*)" in reads[0] and "sum(earnings.units)" in reads[0], reads
