"""Leaderboards and creator stats: read models fed from gifting.gift.sent events in batches.

Choices: A) update the totals in the gift's own transaction (one hot row per stream written by
every gift, contending with the saga); B) recompute on read from gift_events (cheap writes, a
scan of a hot stream per read); C) a durable consumer folds each batch to one delta per key and
writes it with the batch's inbox records. We take C: a hot stream costs one write per sender
per batch, reads are index look-ups, and a redelivered event is a no-op through the inbox.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, desc, func, select

from livegifts.gifting.v1 import events_pb2, gifting_pb2
from services.common.consumers import GIFTING_LEADERBOARDS
from services.common.db import Database, UnitOfWork
from services.common.errors import InvalidArgument, require_id
from services.common.inbox import Subscription
from services.common.metrics import LEADERBOARD_DAILY_ROWS_PRUNED
from services.common.pruning import AgePruner
from services.common.timeutil import US_PER_DAY, now_us, to_timestamp
from services.gifting import domain
from services.gifting.config import GiftingSettings
from services.gifting.domain import GiftKind, Scope
from services.gifting.storage import creator_stats_hourly, leaderboard_all_time, leaderboard_daily, upsert_add

# The leaderboards' old days go once an hour: a day's rows become prunable once a day, so a
# shorter interval would only find nothing more often.
LEADERBOARD_PRUNE_INTERVAL_S = 3600.0

_KIND = {
    events_pb2.GIFT_KIND_GIFT: GiftKind.GIFT.value,
    events_pb2.GIFT_KIND_TIP: GiftKind.TIP.value,
    events_pb2.GIFT_KIND_UNLOCK: GiftKind.UNLOCK.value,
}


def _window_bound_us(req: gifting_pb2.GetCreatorStatsRequest, name: str) -> int | None:
    """A stats window's `from` or `to` in microseconds (None when unset), or INVALID_ARGUMENT/INVALID_WINDOW.

    Timestamp.ToMicroseconds() raises ValueError for a value no Timestamp may hold (seconds
    outside the years 1..9999, nanos outside 0..999,999,999): the caller's mistake, not INTERNAL.
    """
    if not req.HasField(name):
        return None
    try:
        return getattr(req, name).ToMicroseconds()
    except ValueError:
        raise InvalidArgument(f"{name} is not a valid timestamp", "INVALID_WINDOW", field=name) from None


@dataclass
class ReadModels:
    """Applies batches of sent gifts to the read models and answers leaderboard and stats queries."""

    db: Database
    # The upserts of all time, daily and hourly totals, built once (their cache keys are computed once).
    _upserts: list[Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        dialect = self.db.dialect
        self._upserts = [
            upsert_add(dialect, leaderboard_all_time, ["scope", "scope_id", "sender_id"], ["coins"]),
            upsert_add(dialect, leaderboard_daily, ["scope", "scope_id", "day", "sender_id"], ["coins"]),
            upsert_add(
                dialect,
                creator_stats_hourly,
                ["creator_id", "hour", "stream_id", "kind", "gift_id"],
                ["coins", "events"],
            ),
        ]

    def subscription(self) -> Subscription[events_pb2.GiftSent]:
        """The durable consumer that keeps the read models up to date."""
        return Subscription(
            durable=GIFTING_LEADERBOARDS,
            stream="GIFTING",
            subject="gifting.gift.sent",
            event_type=events_pb2.GiftSent,
            handle=self.apply,
        )

    async def apply(self, uow: UnitOfWork, events: list[events_pb2.GiftSent]) -> None:
        """Fold a batch of new events and write one delta per key (in a stable order: no deadlocks)."""
        totals = domain.fold(
            [
                domain.SentCoins(
                    kind=_KIND.get(e.kind, GiftKind.GIFT.value),
                    stream_id=e.stream_id,
                    creator_id=e.creator_id,
                    sender_id=e.sender_id,
                    gift_id=e.gift_id,
                    coins=e.coins,
                    occurred_at_us=e.occurred_at.ToMicroseconds() if e.HasField("occurred_at") else now_us(),
                )
                for e in events
            ]
        )
        all_time = [
            {"scope": s, "scope_id": i, "sender_id": u, "coins": c} for (s, i, u), c in sorted(totals.all_time.items())
        ]
        daily = [
            {"scope": s, "scope_id": i, "day": d, "sender_id": u, "coins": c}
            for (s, i, d, u), c in sorted(totals.daily.items())
        ]
        hourly = [
            {"creator_id": cr, "hour": h, "stream_id": st, "kind": k, "gift_id": g, "coins": v[0], "events": v[1]}
            for (cr, h, st, k, g), v in sorted(totals.hourly.items())
        ]
        # One statement per table (one execution on PostgreSQL), rows sorted by key so
        # concurrent consumers lock rows in the same order.
        for bulk, rows in zip(self._upserts, (all_time, daily, hourly), strict=True):
            if rows:
                await uow.conn.execute(bulk.stmt, bulk.params(rows))

    async def leaderboard(self, req: gifting_pb2.GetLeaderboardRequest) -> gifting_pb2.Leaderboard:
        """Top senders of a stream or a creator, all time or the last 7 days, and the sender's own rank."""
        which = req.WhichOneof("scope")
        if which is None:
            raise InvalidArgument("stream_id or creator_id is required", "MISSING_FIELD", field="scope")
        scope = Scope.STREAM if which == "stream_id" else Scope.CREATOR
        scope_id = require_id(getattr(req, which), which)
        limit = domain.leaderboard_limit(req.limit)
        if req.sender_id:
            require_id(req.sender_id, "sender_id")
        ranked = self._ranked(scope, scope_id, req.window)
        # One snapshot for the page, the totals and the caller's rank: on PostgreSQL each statement
        # of a READ COMMITTED transaction sees its own moment, and a batch of the consumer committing
        # between them answered entries that did not add up to `coins_total`.
        async with self.db.unit_of_work(readonly=True, snapshot=True) as uow:
            top = (
                await uow.conn.execute(
                    select(ranked.c.sender_id, ranked.c.coins)
                    .order_by(desc(ranked.c.coins), ranked.c.sender_id)
                    .limit(limit)
                )
            ).all()
            senders, coins_total = (
                await uow.conn.execute(select(func.count(), func.coalesce(func.sum(ranked.c.coins), 0)))
            ).one()
            own = None
            if req.sender_id:
                mine = (
                    await uow.conn.execute(select(ranked.c.coins).where(ranked.c.sender_id == req.sender_id))
                ).scalar_one_or_none()
                if mine is not None:
                    above = (await uow.conn.execute(select(func.count()).where(ranked.c.coins > mine))).scalar_one()
                    own = gifting_pb2.LeaderboardEntry(rank=int(above) + 1, sender_id=req.sender_id, coins=int(mine))
        entries: list[gifting_pb2.LeaderboardEntry] = []
        for i, r in enumerate(top):
            # Competition ranking: equal coins share a rank (1, 2, 2, 4).
            rank = entries[-1].rank if entries and entries[-1].coins == r.coins else i + 1
            entries.append(gifting_pb2.LeaderboardEntry(rank=rank, sender_id=r.sender_id, coins=int(r.coins)))
        return gifting_pb2.Leaderboard(entries=entries, own=own, senders=int(senders), coins_total=int(coins_total))

    def _ranked(self, scope: Scope, scope_id: str, window: int) -> Any:
        """A subquery of (sender_id, coins) for the scope and window."""
        if window in (gifting_pb2.LEADERBOARD_WINDOW_UNSPECIFIED, gifting_pb2.LEADERBOARD_WINDOW_ALL_TIME):
            t = leaderboard_all_time.c
            q: Select[Any] = select(t.sender_id, t.coins).where(t.scope == scope.value, t.scope_id == scope_id)
            return q.subquery()
        if window != gifting_pb2.LEADERBOARD_WINDOW_LAST_7_DAYS:
            raise InvalidArgument("unknown leaderboard window", "INVALID_WINDOW")
        d = leaderboard_daily.c
        first_day = now_us() // domain.US_PER_DAY - (domain.LEADERBOARD_WINDOW_DAYS - 1)
        return (
            select(d.sender_id, func.sum(d.coins).label("coins"))
            .where(d.scope == scope.value, d.scope_id == scope_id, d.day >= first_day)
            .group_by(d.sender_id)
            .subquery()
        )

    async def creator_stats(self, req: gifting_pb2.GetCreatorStatsRequest) -> gifting_pb2.CreatorStats:
        """Coins a creator received in [from, to), by gift, by stream and by hour: the UTC hours
        that start in the window (`domain.stats_hours`)."""
        require_id(req.creator_id, "creator_id")
        start_us, end_us = domain.stats_window_us(_window_bound_us(req, "from"), _window_bound_us(req, "to"), now_us())
        h = creator_stats_hourly.c
        first_hour, end_hour = domain.stats_hours(start_us, end_us)
        where = (h.creator_id == req.creator_id, h.hour >= first_hour, h.hour < end_hour)
        coins, events = func.sum(h.coins).label("coins"), func.sum(h.events).label("events")
        async with self.db.unit_of_work(readonly=True, snapshot=True) as uow:  # the three sections agree
            by_gift = (
                await uow.conn.execute(
                    select(h.kind, h.gift_id, coins, events)
                    .where(*where)
                    .group_by(h.kind, h.gift_id)
                    .order_by(desc("coins"), h.kind, h.gift_id)
                    .limit(domain.STATS_ROWS_MAX)
                )
            ).all()
            by_stream = (
                await uow.conn.execute(
                    select(h.stream_id, coins, events)
                    .where(*where, h.stream_id != "")
                    .group_by(h.stream_id)
                    .order_by(desc("coins"), h.stream_id)
                    .limit(domain.STATS_ROWS_MAX)
                )
            ).all()
            by_hour = (
                await uow.conn.execute(
                    select(h.hour, coins, events)
                    .where(*where)
                    .group_by(h.hour)
                    .order_by(h.hour)
                    .limit(domain.STATS_WINDOW_DAYS_MAX * 24 + 1)
                )
            ).all()
        return gifting_pb2.CreatorStats(
            creator_id=req.creator_id,
            coins_total=sum(int(r.coins) for r in by_hour),
            by_gift=[
                gifting_pb2.StatsRow(key=r.gift_id, kind=r.kind, coins=int(r.coins), count=int(r.events))
                for r in by_gift
            ],
            by_stream=[
                gifting_pb2.StatsRow(key=r.stream_id, coins=int(r.coins), count=int(r.events)) for r in by_stream
            ],
            by_hour=[
                gifting_pb2.HourStats(
                    hour_start=to_timestamp(int(r.hour) * domain.US_PER_HOUR), coins=int(r.coins), count=int(r.events)
                )
                for r in by_hour
            ],
        )


class LeaderboardDailyPruner(AgePruner):
    """Deletes daily leaderboard rows of days older than LEADERBOARD_DAILY_RETENTION_DAYS, a chunk
    per transaction, every hour, on ix_leaderboard_daily_day.

    Nothing reads a day before the last LEADERBOARD_WINDOW_DAYS (`_ranked`), and the all-time
    boards and creator stats have their own tables; kept, these rows grew by about one per
    stream and sender and one per creator and sender each day, for good.
    """

    def __init__(self, db: Database, settings: GiftingSettings) -> None:
        super().__init__(
            db,
            leaderboard_daily,
            leaderboard_daily.c.day,
            name="leaderboard_daily",
            retention_days=settings.leaderboard_daily_retention_days,
            interval_s=LEADERBOARD_PRUNE_INTERVAL_S,
            pause_s=settings.prune_pause_s,
            counter=LEADERBOARD_DAILY_ROWS_PRUNED,
            done_line="daily leaderboard rows pruned",
            progress_line="pruning the daily leaderboard rows",
            age_unit_us=US_PER_DAY,
        )
