"""Gifting use cases. SendGift is a saga over two services:

1. one transaction records the gift as PENDING (after every check that needs no coins);
2. wallet.Spend with the gift's id as idempotency key (a deadline, retried on UNAVAILABLE);
3. one transaction flips the gift PENDING -> SENT and writes its `gifting.gift.sent` event.

A crash or timeout between 1 and 3 leaves the gift PENDING: the caller's retry with the same key
resumes it, and the sweeper settles it through wallet.CancelSpend, which either reports that the
spend happened (-> SENT) or forbids it forever (-> CANCELLED). So every gift ends sent once or
cancelled with nothing debited.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from livegifts.gifting.v1 import events_pb2, gifting_pb2
from livegifts.wallet.v1 import wallet_pb2
from services.common import faults
from services.common.clients import error_reason
from services.common.db import Database, UnitOfWork
from services.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    require_id,
    require_key,
)
from services.common.idempotency import run_idempotent
from services.common.outbox import Outbox
from services.common.timeutil import now_us, to_timestamp
from services.gifting import domain
from services.gifting.config import GiftingSettings
from services.gifting.domain import GiftKind, GiftStatus, StreamStatus
from services.gifting.storage import common, gift_events, gifts, streams

log = logging.getLogger(__name__)

TITLE_MAX = 200
_KIND_PB = {
    GiftKind.GIFT: events_pb2.GIFT_KIND_GIFT,
    GiftKind.TIP: events_pb2.GIFT_KIND_TIP,
    GiftKind.UNLOCK: events_pb2.GIFT_KIND_UNLOCK,
}
_SPEND_REASON = {
    GiftKind.GIFT: wallet_pb2.SPEND_REASON_GIFT,
    GiftKind.TIP: wallet_pb2.SPEND_REASON_TIP,
    GiftKind.UNLOCK: wallet_pb2.SPEND_REASON_UNLOCK,
}
_STATUS_PB = {
    GiftStatus.PENDING: gifting_pb2.GIFT_STATUS_PENDING,
    GiftStatus.SENT: gifting_pb2.GIFT_STATUS_SENT,
    GiftStatus.CANCELLED: gifting_pb2.GIFT_STATUS_CANCELLED,
}
# Wallet answers that mean "this spend did not and will not happen": the gift is cancelled.
_DEFINITE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
}


@dataclass
class Gifting:
    """Gifting use cases over its database, outbox and the wallet client."""

    db: Database
    outbox: Outbox
    wallet: Any  # WalletServiceStub
    settings: GiftingSettings

    # ---- catalog and streams -------------------------------------------------------------

    async def list_gifts(self, include_retired: bool) -> gifting_pb2.ListGiftsResponse:
        """The catalog, cheapest first."""
        q = select(gifts)
        if not include_retired:
            q = q.where(gifts.c.active.is_(True))
        async with self.db.unit_of_work(readonly=True) as uow:
            rows = (await uow.conn.execute(q.order_by(gifts.c.price_coins, gifts.c.gift_id))).all()
        return gifting_pb2.ListGiftsResponse(
            gifts=[
                gifting_pb2.Gift(gift_id=r.gift_id, name=r.name, price_coins=r.price_coins, active=r.active)
                for r in rows
            ]
        )

    async def start_stream(self, req: gifting_pb2.StartStreamRequest) -> gifting_pb2.Stream:
        """Go live; one live stream per creator."""
        require_id(req.creator_id, "creator_id")
        if len(req.title) > TITLE_MAX:
            raise InvalidArgument(f"title is at most {TITLE_MAX} characters", "TITLE_TOO_LONG")

        async def work(uow: UnitOfWork) -> gifting_pb2.Stream:
            live = (
                await uow.conn.execute(
                    select(streams.c.stream_id).where(
                        streams.c.creator_id == req.creator_id, streams.c.status == StreamStatus.LIVE.value
                    )
                )
            ).first()
            if live is not None:
                raise FailedPrecondition("the creator is already live", "STREAM_ALREADY_LIVE", stream_id=live.stream_id)
            row = {
                "stream_id": uuid.uuid4().hex,
                "creator_id": req.creator_id,
                "title": req.title,
                "status": StreamStatus.LIVE.value,
                "started_at_us": now_us(),
                "ended_at_us": None,
            }
            await uow.conn.execute(insert(streams).values(**row))
            return _stream_pb(row)

        return await run_idempotent(self.db, common.idempotency, "StartStream", req, gifting_pb2.Stream, work)

    async def end_stream(self, req: gifting_pb2.EndStreamRequest) -> gifting_pb2.Stream:
        """End a live stream (ending an ended stream returns it unchanged)."""
        require_id(req.stream_id, "stream_id")
        async with self.db.unit_of_work() as uow:
            row = (await uow.conn.execute(select(streams).where(streams.c.stream_id == req.stream_id))).first()
            if row is None:
                raise NotFound("unknown stream", "UNKNOWN_STREAM")
            if row.status == StreamStatus.ENDED.value:
                return _stream_pb(row._asdict())
            ts = now_us()
            await uow.conn.execute(
                update(streams)
                .where(streams.c.stream_id == req.stream_id)
                .values(status=StreamStatus.ENDED.value, ended_at_us=ts)
            )
            await uow.commit()
        return _stream_pb({**row._asdict(), "status": StreamStatus.ENDED.value, "ended_at_us": ts})

    async def get_stream(self, stream_id: str) -> gifting_pb2.Stream:
        """One stream."""
        require_id(stream_id, "stream_id")
        async with self.db.unit_of_work(readonly=True) as uow:
            row = (await uow.conn.execute(select(streams).where(streams.c.stream_id == stream_id))).first()
        if row is None:
            raise NotFound("unknown stream", "UNKNOWN_STREAM")
        return _stream_pb(row._asdict())

    # ---- the gift saga ---------------------------------------------------------------------

    async def send_gift(self, req: gifting_pb2.SendGiftRequest) -> gifting_pb2.GiftReceipt:
        """Send `quantity` of a gift to a live stream, once per idempotency key."""
        require_id(req.stream_id, "stream_id")
        require_id(req.sender_id, "sender_id")
        require_id(req.gift_id, "gift_id")
        key = require_key(req.idempotency_key)
        digest = hashlib.sha256(f"{req.stream_id}|{req.sender_id}|{req.gift_id}|{req.quantity}".encode()).hexdigest()
        gift = await self._begin(key, digest, req)
        if gift["status"] == GiftStatus.SENT.value:
            return _receipt(gift)
        return await self._settle(gift)

    async def _begin(self, key: str, digest: str, req: gifting_pb2.SendGiftRequest) -> dict[str, Any]:
        """Step 1: record the gift PENDING, or find the one this key already started."""
        for _ in range(2):
            try:
                async with self.db.unit_of_work() as uow:
                    existing = await self._by_key(uow, key, digest)
                    if existing is not None:
                        return existing
                    stream = (
                        await uow.conn.execute(select(streams).where(streams.c.stream_id == req.stream_id))
                    ).first()
                    if stream is None:
                        raise NotFound("unknown stream", "UNKNOWN_STREAM")
                    domain.check_can_gift(stream.status, stream.creator_id, req.sender_id)
                    g = (await uow.conn.execute(select(gifts).where(gifts.c.gift_id == req.gift_id))).first()
                    if g is None:
                        raise NotFound("unknown gift", "UNKNOWN_GIFT")
                    if not g.active:
                        raise FailedPrecondition("this gift is retired", "GIFT_RETIRED")
                    coins = domain.gift_cost(g.price_coins, req.quantity, self.settings.quantity_max)
                    ts = now_us()
                    row = {
                        "event_id": uuid.uuid4().hex,
                        "idempotency_key": key,
                        "client_key": key,
                        "request_hash": digest,
                        "kind": GiftKind.GIFT.value,
                        "stream_id": stream.stream_id,
                        "creator_id": stream.creator_id,
                        "sender_id": req.sender_id,
                        "gift_id": g.gift_id,
                        "quantity": req.quantity,
                        "unit_price_coins": g.price_coins,  # the price at send time
                        "coins": coins,
                        "status": GiftStatus.PENDING.value,
                        "cancel_reason": None,
                        "sender_balance_after": None,
                        "created_at_us": ts,
                        "updated_at_us": ts,
                    }
                    await uow.conn.execute(insert(gift_events).values(**row))
                    await uow.commit()
                    return row
            except IntegrityError:
                continue  # a concurrent call with this key inserted first: resume its gift
        raise Aborted("the gift is being created concurrently, retry", "CONFLICT")

    async def _by_key(self, uow: UnitOfWork, key: str, digest: str) -> dict[str, Any] | None:
        row = (await uow.conn.execute(select(gift_events).where(gift_events.c.idempotency_key == key))).first()
        if row is None:
            return None
        if row.request_hash != digest:
            raise AlreadyExists("idempotency key was already used with a different request", "IDEMPOTENCY_KEY_REUSED")
        return row._asdict()

    async def _settle(self, gift: dict[str, Any]) -> gifting_pb2.GiftReceipt:
        """Steps 2 and 3: spend the coins, then mark the gift sent with its event."""
        kind = GiftKind(gift["kind"])
        try:
            spent = await self.wallet.Spend(
                wallet_pb2.SpendRequest(
                    user_id=gift["sender_id"],
                    amount=gift["coins"],
                    reason=_SPEND_REASON[kind],
                    reference_id=gift["event_id"],
                    idempotency_key=gift["event_id"],
                ),
                timeout=self.settings.outgoing_deadline_s,
            )
        except grpc.aio.AioRpcError as exc:
            reason = error_reason(exc)
            definite = _DEFINITE.get(exc.code())
            if definite is not None or reason == "SPEND_CANCELLED":
                await self._cancel(gift["event_id"], reason or exc.code().name)
                if definite is None:
                    raise Aborted("the gift was cancelled; retry to send it anew", "GIFT_CANCELLED") from None
                raise definite(exc.details() or "wallet refused the spend", reason or exc.code().name) from None
            # UNAVAILABLE, DEADLINE_EXCEEDED, ...: the outcome is unknown; the gift stays PENDING.
            raise Unavailable(
                "the wallet did not answer; retry with the same key",
                "WALLET_UNAVAILABLE",
                gift_event_id=gift["event_id"],
            ) from None
        faults.point("gifting.after_spend_before_commit")
        return _receipt(await self._mark_sent(gift["event_id"], spent.balance_after))

    async def _mark_sent(self, event_id: str, balance_after: int | None) -> dict[str, Any]:
        """PENDING -> SENT and the gift.sent event, in one transaction; exactly one caller wins."""
        async with self.db.unit_of_work() as uow:
            ts = now_us()
            changed = await uow.conn.execute(
                update(gift_events)
                .where(gift_events.c.event_id == event_id, gift_events.c.status == GiftStatus.PENDING.value)
                .values(status=GiftStatus.SENT.value, sender_balance_after=balance_after, updated_at_us=ts)
            )
            row = (await uow.conn.execute(select(gift_events).where(gift_events.c.event_id == event_id))).one()
            if changed.rowcount == 1:
                await self.outbox.add(uow, "gifting.gift.sent", event_id, _gift_sent_event(row._asdict()))
                await uow.commit()
            elif row.status != GiftStatus.SENT.value:
                raise FailedPrecondition("the gift was cancelled", "GIFT_CANCELLED")
        return row._asdict()

    async def _cancel(self, event_id: str, reason: str) -> None:
        """PENDING -> CANCELLED; frees the client's key so a retry may start a new gift."""
        async with self.db.unit_of_work() as uow:
            await uow.conn.execute(
                update(gift_events)
                .where(gift_events.c.event_id == event_id, gift_events.c.status == GiftStatus.PENDING.value)
                .values(
                    status=GiftStatus.CANCELLED.value,
                    cancel_reason=reason[:64],
                    idempotency_key=None,
                    updated_at_us=now_us(),
                )
            )
            await uow.commit()

    async def sweep_once(self) -> int:
        """Settle gifts left PENDING past the timeout; returns how many were settled."""
        cutoff = now_us() - int(self.settings.pending_timeout_s * 1_000_000)
        async with self.db.unit_of_work(readonly=True) as uow:
            ids = (
                (
                    await uow.conn.execute(
                        select(gift_events.c.event_id)
                        .where(
                            gift_events.c.status == GiftStatus.PENDING.value,
                            gift_events.c.updated_at_us < cutoff,
                        )
                        .order_by(gift_events.c.updated_at_us)
                        .limit(self.settings.sweep_batch_size_max)
                    )
                )
                .scalars()
                .all()
            )
        settled = 0
        for event_id in ids:
            answer = await self.wallet.CancelSpend(
                wallet_pb2.CancelSpendRequest(idempotency_key=event_id),
                timeout=self.settings.outgoing_deadline_s,
            )
            if answer.outcome == wallet_pb2.CancelSpendResponse.OUTCOME_SPENT:
                await self._mark_sent(event_id, answer.spend.balance_after)
            else:
                await self._cancel(event_id, "SWEPT")
            settled += 1
        return settled

    async def sweeper(self, stop: asyncio.Event) -> None:
        """Background loop around `sweep_once` (errors are logged and retried next round)."""
        while not stop.is_set():
            try:
                n = await self.sweep_once()
                if n:
                    log.info("settled pending gifts", extra={"gifts": n})
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - wallet or database down: the gifts stay PENDING
                log.warning("sweep failed, retrying next round", extra={"error": repr(exc)})
            try:
                await asyncio.wait_for(stop.wait(), self.settings.sweep_interval_s)
            except TimeoutError:
                pass

    # ---- audit -------------------------------------------------------------------------------

    async def audit(self) -> gifting_pb2.GiftingAudit:
        """Gifts by status and coins by kind."""
        g = gift_events.c
        async with self.db.unit_of_work(readonly=True) as uow:
            counts = dict((await uow.conn.execute(select(g.status, func.count()).group_by(g.status))).all())
            by_kind = dict(
                (
                    await uow.conn.execute(
                        select(g.kind, func.sum(g.coins)).where(g.status == GiftStatus.SENT.value).group_by(g.kind)
                    )
                ).all()
            )
            pending = await self.outbox.pending(uow)
        return gifting_pb2.GiftingAudit(
            gifts_sent=int(counts.get(GiftStatus.SENT.value, 0)),
            gifts_pending=int(counts.get(GiftStatus.PENDING.value, 0)),
            gifts_cancelled=int(counts.get(GiftStatus.CANCELLED.value, 0)),
            coins_sent=int(sum(by_kind.values())),
            coins_by_kind={k: int(v) for k, v in by_kind.items()},
            outbox_pending=pending,
        )


def _stream_pb(r: dict[str, Any]) -> gifting_pb2.Stream:
    return gifting_pb2.Stream(
        stream_id=r["stream_id"],
        creator_id=r["creator_id"],
        title=r["title"],
        status=gifting_pb2.STREAM_STATUS_LIVE
        if r["status"] == StreamStatus.LIVE.value
        else gifting_pb2.STREAM_STATUS_ENDED,
        started_at=to_timestamp(r["started_at_us"]),
        ended_at=to_timestamp(r["ended_at_us"]),
    )


def _receipt(r: dict[str, Any]) -> gifting_pb2.GiftReceipt:
    return gifting_pb2.GiftReceipt(
        gift_event_id=r["event_id"],
        stream_id=r["stream_id"],
        gift_id=r["gift_id"],
        quantity=r["quantity"],
        coins=r["coins"],
        sender_balance=r["sender_balance_after"] or 0,
        status=_STATUS_PB[GiftStatus(r["status"])],
    )


def _gift_sent_event(r: dict[str, Any]) -> events_pb2.GiftSent:
    return events_pb2.GiftSent(
        event_id=r["event_id"],
        kind=_KIND_PB[GiftKind(r["kind"])],
        stream_id=r["stream_id"],
        creator_id=r["creator_id"],
        sender_id=r["sender_id"],
        gift_id=r["gift_id"],
        quantity=r["quantity"],
        coins=r["coins"],
        occurred_at=to_timestamp(r["updated_at_us"]),
    )
