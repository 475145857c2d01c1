"""Payout use cases: diamonds credited from gift events in batches, earnings, policy, audit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, insert, select, update

from livegifts.gifting.v1 import events_pb2 as gifting_events
from livegifts.payout.v1 import events_pb2, payout_pb2
from services.common.db import Database, UnitOfWork, insert_ignore
from services.common.errors import NotFound, check, require_id
from services.common.outbox import Outbox, new_event_id
from services.common.timeutil import now_us, to_timestamp
from services.payout import domain
from services.payout.domain import BP_DENOMINATOR, Earning
from services.payout.storage import creators, earnings, policies

_KIND = {
    gifting_events.GIFT_KIND_GIFT: "GIFT",
    gifting_events.GIFT_KIND_TIP: "TIP",
    gifting_events.GIFT_KIND_UNLOCK: "UNLOCK",
}


@dataclass
class Payout:
    """Payout use cases over its database and outbox."""

    db: Database
    outbox: Outbox

    async def _policy(self, uow: UnitOfWork) -> Any:
        row = (await uow.conn.execute(select(policies).order_by(policies.c.version.desc()).limit(1))).first()
        check(row is not None, "a policy row is seeded by migration 0002")
        return row

    async def credit_gifts(self, uow: UnitOfWork, events: list[gifting_events.GiftSent]) -> None:
        """Consumer of gifting.gift.sent: credit each creator once per event, one write per creator."""
        policy = await self._policy(uow)
        share_bp = int(policy.creator_share_bp)
        ts = now_us()
        batch: list[Earning] = []
        rows = []
        for e in events:
            check(e.coins > 0 and bool(e.creator_id), f"gift event {e.event_id} has coins and a creator")
            units = domain.units_for(e.coins, share_bp)
            batch.append(Earning(e.creator_id, e.coins, units))
            rows.append(
                {
                    "event_id": e.event_id,
                    "creator_id": e.creator_id,
                    "kind": _KIND.get(e.kind, "GIFT"),
                    "sender_id": e.sender_id,
                    "stream_id": e.stream_id,
                    "coins": e.coins,
                    "share_bp": share_bp,
                    "units": units,
                    "occurred_at_us": e.occurred_at.ToMicroseconds() if e.HasField("occurred_at") else ts,
                    "credited_at_us": ts,
                }
            )
        await uow.conn.execute(insert(earnings), rows)
        c = creators.c
        credited_events = []
        for creator_id, (coins, units) in sorted(domain.per_creator(batch).items()):
            await uow.conn.execute(
                insert_ignore(self.db.dialect, creators).values(
                    creator_id=creator_id,
                    coins_received=0,
                    earned_units=0,
                    diamonds_credited=0,
                    diamonds_available=0,
                    diamonds_held=0,
                    diamonds_withdrawn=0,
                    diamonds_clawed_back=0,
                    updated_at_us=ts,
                )
            )
            # One atomic statement: the right-hand sides read the old row, so concurrent
            # consumers (several replicas) cannot lose an update.
            whole_after = (c.earned_units + units) // BP_DENOMINATOR
            whole_before = c.earned_units // BP_DENOMINATOR
            row = (
                await uow.conn.execute(
                    update(creators)
                    .where(c.creator_id == creator_id)
                    .values(
                        coins_received=c.coins_received + coins,
                        earned_units=c.earned_units + units,
                        diamonds_credited=c.diamonds_credited + (whole_after - whole_before),
                        diamonds_available=c.diamonds_available + (whole_after - whole_before),
                        updated_at_us=ts,
                    )
                    .returning(c.earned_units, c.diamonds_credited)
                )
            ).one()
            check(row.diamonds_credited == row.earned_units // BP_DENOMINATOR, "diamonds = floor(units / 10000)")
            delta = domain.credit_delta(row.earned_units - units, units)
            eid = new_event_id()
            credited_events.append(
                (
                    "payout.diamonds.credited",
                    eid,
                    events_pb2.DiamondsCredited(
                        event_id=eid,
                        creator_id=creator_id,
                        diamonds=delta,
                        coins=coins,
                        events=sum(1 for b in batch if b.creator_id == creator_id),
                        occurred_at=to_timestamp(ts),
                    ),
                )
            )
        await self.outbox.add_many(uow, credited_events)

    async def get_earnings(self, creator_id: str) -> payout_pb2.Earnings:
        """A creator's diamonds."""
        require_id(creator_id, "creator_id")
        async with self.db.unit_of_work(readonly=True) as uow:
            row = (await uow.conn.execute(select(creators).where(creators.c.creator_id == creator_id))).first()
        if row is None:
            raise NotFound("the creator has no earnings yet", "CREATOR_NOT_FOUND")
        return payout_pb2.Earnings(
            creator_id=creator_id,
            diamonds_available=row.diamonds_available,
            diamonds_held=row.diamonds_held,
            diamonds_withdrawn=row.diamonds_withdrawn,
            diamonds_lifetime=row.diamonds_credited,
            coins_received=row.coins_received,
            remainder_units=row.earned_units % BP_DENOMINATOR,
        )

    async def get_policy(self) -> payout_pb2.Policy:
        """The policy in force."""
        async with self.db.unit_of_work(readonly=True) as uow:
            row = await self._policy(uow)
        return payout_pb2.Policy(version=row.version, creator_share_bp=row.creator_share_bp)

    async def audit(self) -> payout_pb2.PayoutAudit:
        """Totals for invariants 4 and 5."""
        c = creators.c
        async with self.db.unit_of_work(readonly=True) as uow:
            totals = (
                await uow.conn.execute(
                    select(
                        func.coalesce(func.sum(c.coins_received), 0),
                        func.coalesce(func.sum(c.earned_units), 0),
                        func.coalesce(func.sum(c.diamonds_credited), 0),
                        func.coalesce(func.sum(c.earned_units % BP_DENOMINATOR), 0),
                        func.coalesce(func.sum(c.diamonds_available), 0),
                        func.coalesce(func.sum(c.diamonds_held), 0),
                        func.coalesce(func.sum(c.diamonds_withdrawn), 0),
                        func.coalesce(func.sum(c.diamonds_clawed_back), 0),
                    )
                )
            ).one()
            ledger = (
                await uow.conn.execute(
                    select(
                        func.count(),
                        func.coalesce(func.sum(earnings.c.units), 0),
                        func.coalesce(func.sum(earnings.c.coins), 0),
                    )
                )
            ).one()
            pending = await self.outbox.pending(uow)
        events, units_by_event, coins_by_event = ledger
        return payout_pb2.PayoutAudit(
            coins_received=int(totals[0]),
            earned_units=int(totals[1]),
            diamonds_credited=int(totals[2]),
            remainder_units=int(totals[3]),
            diamonds_available=int(totals[4]),
            diamonds_held=int(totals[5]),
            diamonds_withdrawn=int(totals[6]),
            diamonds_clawed_back=int(totals[7]),
            events_consumed=int(events),
            outbox_pending=pending,
            # Creator rows vs the per-event record: 0 when they agree on units and coins.
            ledger_sum=int(totals[1]) - int(units_by_event) + int(totals[0]) - int(coins_by_event),
        )
