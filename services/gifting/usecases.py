"""Gifting use cases. SendGift is a saga over two services:

1. one transaction records the gift as PENDING (after every check that needs no coins);
2. wallet.Spend with the gift's id as idempotency key (a deadline, retried on UNAVAILABLE and CANCELLED);
3. one transaction flips the gift PENDING -> SENT and writes its `gifting.gift.sent` event.

A crash or timeout between 1 and 3 leaves the gift PENDING: the caller's retry with the same key
resumes it, and the sweeper settles it through wallet.CancelSpend, which either reports that the
spend happened (-> SENT) or forbids it forever (-> CANCELLED). So every gift ends sent once or
cancelled with nothing debited.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from sqlalchemy import bindparam, case, delete, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from livegifts.gifting.v1 import events_pb2, gifting_pb2
from livegifts.wallet.v1 import wallet_pb2
from services.common import faults
from services.common.batching import MicroBatcher
from services.common.clients import error_info
from services.common.db import Database, UnitOfWork
from services.common.dependency_errors import is_unavailable
from services.common.errors import (
    ID_MAX,
    Aborted,
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    InvariantViolation,
    NotFound,
    ResourceExhausted,
    Unavailable,
    check,
    require_id,
    require_key,
    require_positive,
    status_for,
)
from services.common.grpcserver import internal_error
from services.common.idempotency import IdempotentCall, answers_retry, key_reused
from services.common.loops import BatchCursor, ItemFailures, run_every
from services.common.metrics import GIFTS_REFUSED
from services.common.outbox import Outbox, new_event_id
from services.common.sql import bulk_insert, bulk_insert_new, one_of, one_of_param
from services.common.telemetry import background_span, change_fields
from services.common.timeutil import now_us, to_timestamp
from services.gifting import domain
from services.gifting.config import GiftingSettings
from services.gifting.domain import KEY_ONLY, GiftKind, GiftStatus, StreamStatus
from services.gifting.feed import Ended, FeedHub, ShuttingDown
from services.gifting.storage import (
    GIFT_INSERT_COLUMNS,
    KEY_LOST,
    SWEEP_START,
    common,
    content_unlocks,
    contents,
    gift_events,
    gifts,
    keys_lost,
    leaderboard_all_time,
    sent_after,
    sent_before,
    sent_flip_statement,
    stale_pending,
    streams,
)

log = logging.getLogger(__name__)

TITLE_MAX = 200
GIFT_SENT_SUBJECT = "gifting.gift.sent"
STREAM_ENDED_SUBJECT = "gifting.stream.ended"
FEED_STATUS_CHECK_S = 5.0  # an idle feed re-reads its stream's status this often
FEED_RESUME_PAGE = 200  # gifts one read of a resumed feed's catch-up takes
SEND_GIFTS_ITEMS_MAX = 100  # items of one SendGifts call
# The refusals gifting itself decides for a gift, tip or unlock before any spend (step 1), counted
# in livegifts_gifts_refused_total -> the roles each is counted under (whose account the check was
# about: the eligibility pre-check's `role`, else the sender, whose request it is). A fixed set, so
# the series are bounded and all at 0 from the start; any other error of step 1 (WALLET_UNAVAILABLE,
# CONFLICT, a database error) is an answer to retry, not a refusal. The wallet's refusals, which
# come in step 2, are counted by the wallet (livegifts_spends_refused_total), not here.
REFUSALS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        (
            # The request's own fields (before any read), and SendGifts' batch.
            "MISSING_FIELD",
            "INVALID_ID",
            "MISSING_IDEMPOTENCY_KEY",
            "INVALID_IDEMPOTENCY_KEY",
            "INVALID_BATCH_SIZE",
            "DUPLICATE_KEY_IN_BATCH",
            "IDEMPOTENCY_KEY_REUSED",
            # Against the stream, the catalog or the content.
            "UNKNOWN_STREAM",
            "STREAM_NOT_LIVE",
            "SELF_GIFT",
            "UNKNOWN_GIFT",
            "GIFT_RETIRED",
            "INVALID_QUANTITY",
            "INVALID_TIP_AMOUNT",
            "MESSAGE_TOO_LONG",
            "INVALID_MESSAGE",
            "UNKNOWN_CONTENT",
        ),
        ("sender",),
    ),
    # The eligibility pre-check (`_check_parties`), with the wallet's restrictions of both parties.
    "ACCOUNT_BLOCKED": ("sender", "creator"),
    "UNDERAGE": ("sender", "creator"),
}
for _reason, _roles in REFUSALS.items():
    for _role in _roles:
        GIFTS_REFUSED.labels(_reason, _role)  # at 0 from the start: a series first seen at 1 shows no increase
# The `scope` of IDEMPOTENCY_KEY_REUSED for the one key space (gift_events) that SendGift, SendTip,
# UnlockContent and SendGifts items share, as the other RPCs name theirs (idempotency.lookup).
GIFT_KEY_SCOPE = "SendGift"
KEY_RESTORE_BATCH_MAX = 500  # cancelled gifts one round of `restore_keys_once` looks at
# The sweeper ends its round at this many CancelSpends in a row that the wallet did not answer
# within OUTGOING_DEADLINE_S (a hung wallet): each waits the whole deadline, and without it a
# round of SWEEP_BATCH_SIZE_MAX gifts would last 100 x 5 s, holding up newer stale gifts and the
# drain. One gift's spend timing out among answered ones does not end it (an answer resets the
# count).
SWEEP_WALLET_TIMEOUTS_MAX = 3
SWEEP_LOOP = "sweeper"  # the sweeper's `loop` in livegifts_background_item_failures_total
GROUP_COMMIT_SIZE_MAX = 100  # concurrent calls one group-committed transaction takes at most
WALLET_CALLS_CONCURRENT_MAX = 32  # wallet calls one batch has in flight at once
RESTRICTIONS_MANY_IDS_MAX = 500  # users of one wallet.GetAccountRestrictionsMany call (the wallet's limit)
WALLET_SPEND_MANY_MAX = 200  # spends of one wallet.SpendMany call (the wallet takes up to 500)
STREAMS_CACHED_MAX = 100_000  # stream -> creator pairs gifting remembers (cleared when full)
ELIGIBILITY_CACHE_ENTRIES_MAX = 100_000  # users whose restrictions gifting remembers at once (least recent dropped)
ELIGIBILITY_REFRESH_AT = 0.75  # a cached answer is asked again in the background after this share of its life
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
_CODES = {c.value[0]: c for c in grpc.StatusCode}
_DEFINITE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
}


@dataclass(frozen=True)
class _Party:
    """Where coins go: a stream ("" for unlocks) and its creator."""

    stream_id: str
    creator_id: str


@dataclass(frozen=True)
class _Plan:
    """A new gift row to record, or the gift an earlier unlock of the same content already holds.

    `needs_key`: that earlier unlock is under another key, and this request's key is not known
    to be recorded: step 1 records it (`_key_only`), so that it answers this unlock and no other request.
    """

    row: dict[str, Any]
    existing: bool = False
    needs_key: bool = False


Plan = Callable[[UnitOfWork], Awaitable[_Plan]]
_Begin = gifting_pb2.SendGiftRequest | gifting_pb2.SendTipRequest | gifting_pb2.UnlockContentRequest  # step 1 batches


@dataclass
class Gifting:
    """Gifting use cases over its database, outbox and the wallet client."""

    db: Database
    outbox: Outbox
    wallet: Any  # WalletServiceStub
    settings: GiftingSettings
    feed: FeedHub | None = None

    def __post_init__(self) -> None:
        self._sweep_failures = ItemFailures(log, "a pending gift was not settled; tried again next round", SWEEP_LOOP)
        # Where the sweeper's next round starts, by (updated_at_us, event_id) (`sweep_once`).
        self._sweep_cursor: BatchCursor[tuple[int, str]] = BatchCursor(SWEEP_START)
        # Group commit of steps 1 and 3 across concurrent SendGift/SendTip/UnlockContent calls.
        self._begin_batcher: MicroBatcher[_Begin, dict[str, Any]] = MicroBatcher(
            self._begin_batch, GROUP_COMMIT_SIZE_MAX, "gifting_begin"
        )
        self._spend_batcher: MicroBatcher[dict[str, Any], int | None] = MicroBatcher(
            self._spend_many,
            WALLET_SPEND_MANY_MAX,  # type: ignore[arg-type]
            "gifting_spend",
        )
        # Step 3's items carry their caller's trace context: its gift's event continues that trace.
        # A gift whose caller went away is still flipped: its coins are spent, and the flip now is
        # one row of a shared transaction where the sweeper's would be a wallet call, minutes later.
        self._sent_batcher: MicroBatcher[tuple[str, int | None, Any], dict[str, Any]] = MicroBatcher(
            self._mark_sent_batch, GROUP_COMMIT_SIZE_MAX, "gifting_sent", skip_abandoned=False
        )
        self._flip_sent = sent_flip_statement() if self.db.dialect == "postgresql" else None
        # Resumed feeds' catch-up reads hold at most this many pool connections (config.py).
        self._resume_reads = asyncio.Semaphore(self.settings.watch_resume_reads_max)
        # Step 1's reads, built once (one cache key, one prepared statement for any batch size).
        d = self.db.dialect
        self._by_keys = select(gift_events).where(one_of_param(d, gift_events.c.idempotency_key, "ids"))
        self._streams_of = select(streams).where(one_of_param(d, streams.c.stream_id, "ids"))
        # Step 1's write transaction holds its streams' rows (FOR SHARE on PostgreSQL; SQLite has
        # one writer): EndStream's update waits for the gifts being recorded, and a gift recorded
        # after it sees the stream ENDED. A plain read saw the last committed LIVE and recorded a
        # gift on a stream whose end committed meanwhile. Shared locks do not wait for each other.
        # In id order, so that two transactions holding several never wait for each other in a cycle.
        self._streams_held = self._streams_of.order_by(streams.c.stream_id).with_for_update(read=True)
        self._gifts_of = select(gifts).where(one_of_param(d, gifts.c.gift_id, "ids"))
        # A key already recorded (a retry, or a concurrent call's) is skipped: the ids it returns
        # are the gifts this batch recorded.
        self._insert_gifts = bulk_insert_new(d, gift_events, GIFT_INSERT_COLUMNS, gift_events.c.event_id)
        self._contents_of = select(contents).where(one_of_param(d, contents.c.content_id, "ids"))
        u = content_unlocks.c
        self._claims_of = select(u.content_id, u.user_id, u.event_id).where(
            one_of_param(d, u.content_id, "cids"), one_of_param(d, u.user_id, "uids")
        )
        self._gifts_by_id = select(gift_events).where(one_of_param(d, gift_events.c.event_id, "ids"))
        self._insert_unlocks = bulk_insert(d, content_unlocks, ["content_id", "user_id", "event_id", "created_at_us"])
        # user id -> (expires at, refresh from, answer), monotonic seconds; the oldest answer first
        self._eligibility_cache: OrderedDict[str, tuple[float, float, Any]] = OrderedDict()
        self._refreshing: set[str] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._stream_creators: dict[str, str] = {}  # stream id -> creator id (never changes)
        self._content_creators: dict[str, str] = {}  # content id -> creator id (never changes)

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

    @answers_retry(common.idempotency, "StartStream", gifting_pb2.Stream)
    async def start_stream(
        self, req: gifting_pb2.StartStreamRequest, *, idem: IdempotentCall[gifting_pb2.Stream]
    ) -> gifting_pb2.Stream:
        """Go live; one live stream per creator."""
        require_id(req.creator_id, "creator_id")
        domain.title(req.title, TITLE_MAX, required=False, too_long="TITLE_TOO_LONG")

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

        return await idem.run(work)

    @answers_retry(common.idempotency, "EndStream", gifting_pb2.Stream)
    async def end_stream(
        self, req: gifting_pb2.EndStreamRequest, *, idem: IdempotentCall[gifting_pb2.Stream]
    ) -> gifting_pb2.Stream:
        """End a live stream once per key (ending an ended stream returns it unchanged).

        The key is recorded with the end in one transaction, as for every mutating RPC: a retry
        answers what the first call did, and the key sent again for another stream is refused
        with IDEMPOTENCY_KEY_REUSED instead of ending that stream too.
        """
        require_id(req.stream_id, "stream_id")
        the_stream = select(streams).where(streams.c.stream_id == req.stream_id)

        async def work(uow: UnitOfWork) -> gifting_pb2.Stream:
            row = (await uow.conn.execute(the_stream)).first()
            if row is None:
                raise NotFound("unknown stream", "UNKNOWN_STREAM")
            if row.status == StreamStatus.ENDED.value:
                return _stream_pb(row._asdict())
            ts = now_us()
            ended_now = await uow.conn.execute(
                update(streams)
                .where(streams.c.stream_id == req.stream_id, streams.c.status == StreamStatus.LIVE.value)
                .values(status=StreamStatus.ENDED.value, ended_at_us=ts)
            )
            if ended_now.rowcount != 1:
                # A concurrent EndStream committed first (on PostgreSQL the update waited for it,
                # then found the stream ended; READ COMMITTED lets this read see its end): answer
                # as it did, with one stream.ended event in all.
                ended = (await uow.conn.execute(the_stream)).one()
                return _stream_pb(ended._asdict())
            event_id = new_event_id()
            event = events_pb2.StreamEnded(
                event_id=event_id, stream_id=row.stream_id, creator_id=row.creator_id, ended_at=to_timestamp(ts)
            )
            await self.outbox.add(uow, STREAM_ENDED_SUBJECT, event_id, event)  # closes live feeds
            return _stream_pb({**row._asdict(), "status": StreamStatus.ENDED.value, "ended_at_us": ts})

        return await idem.run(work)

    async def get_stream(self, stream_id: str) -> gifting_pb2.Stream:
        """One stream."""
        require_id(stream_id, "stream_id")
        async with self.db.unit_of_work(readonly=True) as uow:
            row = (await uow.conn.execute(select(streams).where(streams.c.stream_id == stream_id))).first()
        if row is None:
            raise NotFound("unknown stream", "UNKNOWN_STREAM")
        return _stream_pb(row._asdict())

    @answers_retry(common.idempotency, "UpsertGift", gifting_pb2.Gift)
    async def upsert_gift(
        self, req: gifting_pb2.UpsertGiftRequest, operator: str, *, idem: IdempotentCall[gifting_pb2.Gift]
    ) -> gifting_pb2.Gift:
        """Add a gift, reprice it or retire it; gifts already sent keep the price they were sent at."""
        require_id(req.gift_id, "gift_id")
        if len(req.name) > domain.GIFT_NAME_MAX or not req.name.isprintable():
            raise InvalidArgument(f"name is 1..{domain.GIFT_NAME_MAX} printable characters", "INVALID_NAME")
        if req.price_coins != 0:
            require_positive(req.price_coins, "price_coins", domain.GIFT_PRICE_COINS_MAX)

        async def work(uow: UnitOfWork) -> gifting_pb2.Gift:
            # Held (PostgreSQL) until the commit: the trail line's previous values are the ones replaced.
            held = select(gifts).where(gifts.c.gift_id == req.gift_id).with_for_update()
            row = (await uow.conn.execute(held)).first()
            if row is None and (not req.name or not req.price_coins):
                # Before the lock below: a malformed call holds no other catalog write up.
                raise InvalidArgument("a new gift needs a name and a price", "MISSING_FIELD")
            if row is None:
                # A new id: none of the catalog's may fold to it (GIFT_ID_TAKEN). On PostgreSQL the
                # table is locked against writers first (reads of the catalog go on), so two
                # concurrent twins cannot both pass; SQLite serializes writers already.
                if self.db.dialect == "postgresql":
                    await uow.conn.execute(text("LOCK TABLE gifts IN SHARE ROW EXCLUSIVE MODE"))
                    row = (await uow.conn.execute(held)).first()
                if row is None:
                    domain.check_new_gift_id(
                        req.gift_id, list((await uow.conn.execute(select(gifts.c.gift_id))).scalars())
                    )
            values = {"active": not req.retired, "updated_at_us": now_us(), "updated_by": operator}
            if req.name:
                values["name"] = req.name
            if req.price_coins:
                values["price_coins"] = req.price_coins
            if row is None:
                await uow.conn.execute(insert(gifts).values(gift_id=req.gift_id, **values))
            else:
                await uow.conn.execute(update(gifts).where(gifts.c.gift_id == req.gift_id).values(**values))
            g = (await uow.conn.execute(select(gifts).where(gifts.c.gift_id == req.gift_id))).one()
            # After the commit: a change rolled back (a concurrent first call with this key won,
            # PostgreSQL) must leave no trail line.
            trail = change_fields(None if row is None else _catalog_fields(row), _catalog_fields(g)) | {
                "gift_id": g.gift_id,
                "operator": operator,
            }
            uow.after_commit(lambda: log.info("gift catalog changed", extra=trail))
            return gifting_pb2.Gift(gift_id=g.gift_id, name=g.name, price_coins=g.price_coins, active=g.active)

        return await idem.run(work)

    # ---- exclusive content ---------------------------------------------------------------

    @answers_retry(common.idempotency, "CreateContent", gifting_pb2.Content)
    async def create_content(
        self, req: gifting_pb2.CreateContentRequest, *, idem: IdempotentCall[gifting_pb2.Content]
    ) -> gifting_pb2.Content:
        """Publish content (or a paid feature) that users unlock for coins."""
        require_id(req.creator_id, "creator_id")
        domain.title(req.title, TITLE_MAX, required=True)
        require_positive(req.price_coins, "price_coins", self.settings.content_price_coins_max)

        async def work(uow: UnitOfWork) -> gifting_pb2.Content:
            row = {
                "content_id": uuid.uuid4().hex,
                "creator_id": req.creator_id,
                "title": req.title,
                "price_coins": req.price_coins,
                "created_at_us": now_us(),
            }
            await uow.conn.execute(insert(contents).values(**row))
            return _content_pb(row)

        return await idem.run(work)

    async def check_access(self, user_id: str, content_id: str) -> gifting_pb2.Access:
        """Whether the user has unlocked the content (an unlock still in flight does not count)."""
        require_id(user_id, "user_id")
        require_id(content_id, "content_id")
        u, g = content_unlocks.c, gift_events.c
        async with self.db.unit_of_work(readonly=True) as uow:
            if (
                await uow.conn.execute(select(contents.c.content_id).where(contents.c.content_id == content_id))
            ).first() is None:
                raise NotFound("unknown content", "UNKNOWN_CONTENT")
            row = (
                await uow.conn.execute(
                    select(g.updated_at_us)
                    .select_from(content_unlocks.join(gift_events, u.event_id == g.event_id))
                    .where(u.content_id == content_id, u.user_id == user_id, g.status == GiftStatus.SENT.value)
                )
            ).first()
        return gifting_pb2.Access(
            user_id=user_id,
            content_id=content_id,
            has_access=row is not None,
            unlocked_at=to_timestamp(row.updated_at_us) if row is not None else None,
        )

    # ---- the gift saga ---------------------------------------------------------------------

    async def send_gift(self, req: gifting_pb2.SendGiftRequest) -> gifting_pb2.GiftReceipt:
        """Send `quantity` of a gift to a live stream, once per idempotency key."""
        return _receipt(await self._settle(await self._begin_one(req, lambda: _checked_gift_key(req))))

    async def _begin_one(self, req: _Begin, checks: Callable[[], str]) -> dict[str, Any]:
        """Step 1 of one gift, tip or unlock, after `checks` (those made before any read), which
        return its key; a request they refuse gets the gift its key recorded, if it is a retry
        of that request (`_recorded_or_refused`), else their refusal.

        Every refusal leaving here is gifting's own (the wallet is asked nothing before step 2):
        each is counted once, as it is answered (`_count_refused`)."""
        try:
            try:
                key = checks()
            except InvalidArgument as refusal:
                return await self._recorded_or_refused(refusal, req)
            if self.settings.group_commit:
                return await self._begin_batcher.submit(req)  # the batch computes each digest once
            digest = _digest(req)
            gift, _own = await self._begin(key, digest, self._planner(req, key, digest))
            return gift
        except DomainError as exc:
            _count_refused(exc)
            raise

    async def _begin_batch(self, reqs: list[_Begin]) -> list[Any]:
        """Step 1 of concurrent SendGift, SendTip and UnlockContent calls together (repeats go alone after)."""
        digests = [_digest(r) for r in reqs]
        seen: set[str] = set()
        first: list[int] = []
        again: list[int] = []
        for i, r in enumerate(reqs):
            # A key twice, or one user's unlock of one content twice (an unlock's digest names the
            # content and the user): the second goes alone after (it finds the first's gift).
            marks = [r.idempotency_key]
            if isinstance(r, gifting_pb2.UnlockContentRequest):
                marks.append(digests[i])
            (again if any(m in seen for m in marks) else first).append(i)
            seen.update(marks)
        out: list[Any] = [None] * len(reqs)
        begun = await self._begin_many([reqs[i] for i in first], [digests[i] for i in first])
        for i, r in zip(first, begun, strict=True):
            out[i] = r
        for i in again:
            key, digest = reqs[i].idempotency_key, digests[i]
            try:
                out[i] = (await self._begin(key, digest, self._planner(reqs[i], key, digest)))[0]
            except DomainError as exc:
                out[i] = exc
        return out

    async def _mark_sent_batch(self, items: list[tuple[str, int | None, Any]]) -> list[Any]:
        """Step 3 of concurrent calls together: each gift's SENT row, or its caller's `_not_sent` INTERNAL.

        The batch runs in its first caller's trace; each gift's event carries its own caller's.
        """
        balances: dict[str, int | None] = {}
        contexts: dict[str, Any] = {}
        for event_id, balance, ctx in items:
            balances.setdefault(event_id, balance)
            contexts.setdefault(event_id, ctx)
        rows = await self._mark_sent_many(balances, contexts)
        return [_not_sent(rows[event_id]) or rows[event_id] for event_id, _, _ in items]

    def _planner(self, req: _Begin, key: str, digest: str) -> Plan:
        """The plan of one gift, tip or unlock: read its rows, then `_plan` (`_plan_unlock`)."""
        if isinstance(req, gifting_pb2.UnlockContentRequest):
            return self._unlock_planner(req, key, digest)

        async def plan(uow: UnitOfWork) -> _Plan:
            streams_of = self._streams_of if uow.readonly else self._streams_held  # see __init__
            stream = (await uow.conn.execute(streams_of, {"ids": [req.stream_id]})).first()
            g = None
            if isinstance(req, gifting_pb2.SendGiftRequest):
                g = (await uow.conn.execute(select(gifts).where(gifts.c.gift_id == req.gift_id))).first()
            return self._plan(req, key, digest, stream, g)

        return plan

    def _unlock_planner(self, req: gifting_pb2.UnlockContentRequest, key: str, digest: str) -> Plan:
        async def plan(uow: UnitOfWork) -> _Plan:
            # The batched step's statements, for one content and one user.
            content = (await uow.conn.execute(self._contents_of, {"ids": [req.content_id]})).first()
            claim = (await uow.conn.execute(self._claims_of, {"cids": [req.content_id], "uids": [req.user_id]})).first()
            claimed = None
            if claim is not None:
                claimed = (await uow.conn.execute(self._gifts_by_id, {"ids": [claim.event_id]})).one()._asdict()
            return self._plan_unlock(req, key, digest, content, claimed)

        return plan

    def _plan_unlock(
        self,
        req: gifting_pb2.UnlockContentRequest,
        key: str,
        digest: str,
        content: Any,
        claimed: dict[str, Any] | None,
    ) -> _Plan:
        """The checks of an unlock, and the gift of the user's earlier unlock or the PENDING row to record."""
        if content is None:
            raise NotFound("unknown content", "UNKNOWN_CONTENT")
        if content.creator_id == req.user_id:
            raise FailedPrecondition("creators cannot unlock their own content", "SELF_GIFT")
        if claimed is not None:
            return _Plan(claimed, existing=True)
        to = _Party(stream_id="", creator_id=content.creator_id)
        price = content.price_coins
        return _Plan(_new_gift(key, digest, GiftKind.UNLOCK, to, req.user_id, content.content_id, 1, price, price))

    def _plan(self, req: _Begin, key: str, digest: str, stream: Any, g: Any) -> _Plan:
        if isinstance(req, gifting_pb2.SendTipRequest):
            return self._plan_tip(req, key, digest, stream)
        check(isinstance(req, gifting_pb2.SendGiftRequest), "unlocks are planned by _plan_unlock")
        return self._plan_gift(req, key, digest, stream, g)  # type: ignore[arg-type]

    def _plan_tip(self, req: gifting_pb2.SendTipRequest, key: str, digest: str, stream: Any) -> _Plan:
        """The checks of a tip against its stream row, and the PENDING row to record."""
        if stream is None:
            raise NotFound("unknown stream", "UNKNOWN_STREAM")
        domain.check_can_gift(stream.status, stream.creator_id, req.sender_id)
        coins = domain.tip_coins(req.coins, self.settings.tip_coins_max)
        message = domain.tip_message(req.message, self.settings.tip_message_chars_max)
        to = _Party(stream_id=stream.stream_id, creator_id=stream.creator_id)
        row = _new_gift(key, digest, GiftKind.TIP, to, req.sender_id, "", 1, coins, coins)
        row["message"] = message or None
        return _Plan(row)

    def _plan_gift(self, req: gifting_pb2.SendGiftRequest, key: str, digest: str, stream: Any, g: Any) -> _Plan:
        """The checks of a gift against its stream and catalog rows, and the PENDING row to record."""
        if stream is None:
            raise NotFound("unknown stream", "UNKNOWN_STREAM")
        domain.check_can_gift(stream.status, stream.creator_id, req.sender_id)
        if g is None:
            raise NotFound("unknown gift", "UNKNOWN_GIFT")
        if not g.active:
            raise FailedPrecondition("this gift is retired", "GIFT_RETIRED")
        coins = domain.gift_cost(g.price_coins, req.quantity, self.settings.quantity_max)
        to = _Party(stream_id=stream.stream_id, creator_id=stream.creator_id)
        # The price at send time is kept with the gift: a later reprice does not change it.
        return _Plan(
            _new_gift(key, digest, GiftKind.GIFT, to, req.sender_id, g.gift_id, req.quantity, g.price_coins, coins)
        )

    async def send_gifts(self, req: gifting_pb2.SendGiftsRequest) -> gifting_pb2.SendGiftsResponse:
        """Many gifts in one call, each with its own key and result; the work is batched, the outcome is not.

        The same saga as SendGift, three steps for the whole batch: one transaction records every
        new gift PENDING, the wallet spends run concurrently (each keyed by its gift id, as one
        SendGift would), one transaction marks every spent gift SENT with its outbox event. An
        item that fails (a check, the wallet's refusal, a reused key) fails alone; an item whose
        spend has no answer stays PENDING for the sweeper, exactly like a single gift. An item
        uses the same key space and request hash as SendGift, so either call may retry the other.
        """
        items = list(req.gifts)
        if not 1 <= len(items) <= SEND_GIFTS_ITEMS_MAX:
            refusal = InvalidArgument(f"gifts must hold 1..{SEND_GIFTS_ITEMS_MAX} items", "INVALID_BATCH_SIZE")
            _count_refused(refusal)
            raise refusal
        out: list[dict[str, Any] | DomainError | None] = [None] * len(items)
        keys: dict[str, int] = {}  # key -> index of the item that owns it in this call
        refused: dict[str, int] = {}  # key -> first item under it a check refused (maybe a retry)
        digests: list[str] = [""] * len(items)
        for i, it in enumerate(items):
            try:
                key = _checked_gift_key(it)
                if key in keys:
                    raise InvalidArgument("idempotency_key is repeated within the batch", "DUPLICATE_KEY_IN_BATCH")
                keys[key] = i
                digests[i] = _gift_digest(it)
            except DomainError as exc:
                out[i] = exc
                if isinstance(exc, InvalidArgument) and exc.reason != "DUPLICATE_KEY_IN_BATCH":
                    refused.setdefault(it.idempotency_key, i)
        if refused:
            # An item today's checks refuse, a retry of one that took effect: its gift, as SendGift.
            again = [i for key, i in refused.items() if key not in keys]
            for i, row in zip(again, await self._answered_by_key([items[i] for i in again]), strict=True):
                if row is not None:
                    out[i] = row
        todo = [i for i in range(len(items)) if out[i] is None]
        if todo:
            begun = await self._begin_many([items[i] for i in todo], [digests[i] for i in todo])
            for i, r in zip(todo, begun, strict=True):
                out[i] = r
        # Step 1's refusals are final here (a retry answered from its key's gift is not one) and
        # all gifting's own: counted once each. The wallet's, from step 2 on, it counts itself.
        pending: list[int] = []
        for i, r in enumerate(out):
            if isinstance(r, DomainError):
                _count_refused(r)
            elif isinstance(r, dict) and r["status"] == GiftStatus.PENDING.value:
                pending.append(i)
        # Steps 2 and 3 for the batch.
        spent = await self._spend_many([out[i] for i in pending])  # type: ignore[misc]
        to_mark: dict[str, int | None] = {}
        for i, outcome in zip(pending, spent, strict=True):
            if isinstance(outcome, DomainError):
                out[i] = outcome
            else:
                to_mark[out[i]["event_id"]] = outcome  # type: ignore[index]
        marked = await self._mark_sent_many(to_mark)
        for i in pending:
            row = out[i]
            if isinstance(row, dict):
                m = marked[row["event_id"]]
                # Not SENT: a broken invariant (`_not_sent`), INTERNAL as on SendGift; this item fails alone.
                out[i] = _not_sent(m) or m
        results = []
        for r in out:
            if isinstance(r, InvariantViolation):
                # The INTERNAL the error interceptor answers SendGift with, for this item only (the
                # others stand), and logged as it logs one.
                log.error("unexpected error in a SendGifts item", exc_info=r)
                message, metadata = internal_error()
                results.append(
                    gifting_pb2.SendGiftResult(
                        error=gifting_pb2.ItemError(
                            code=grpc.StatusCode.INTERNAL.value[0],
                            reason="INTERNAL",
                            message=message,
                            metadata=metadata,
                        )
                    )
                )
            elif isinstance(r, DomainError):
                results.append(
                    gifting_pb2.SendGiftResult(
                        error=gifting_pb2.ItemError(
                            code=status_for(r).value[0], reason=r.reason, message=r.message, metadata=r.metadata
                        )
                    )
                )
            else:
                check(isinstance(r, dict), "every item has a gift or an error")
                results.append(gifting_pb2.SendGiftResult(receipt=_receipt(r)))  # type: ignore[arg-type]
        return gifting_pb2.SendGiftsResponse(results=results)

    async def _begin_many(self, items: list[_Begin], digests: list[str]) -> list[Any]:
        """Step 1 for many gifts, tips and unlocks (validated, keys distinct, one unlock per user and
        content): each one's gift row (for an unlock, maybe the user's earlier one) or its DomainError.

        Like `_begin`, batched: one read-only transaction plans every item, the wallet is asked
        about each distinct user once, one transaction re-plans and inserts every new gift.
        """
        out: list[dict[str, Any] | DomainError | None] = [None] * len(items)

        async def by_keys(uow: UnitOfWork, indexes: list[int]) -> dict[str, dict[str, Any]]:
            ks = [items[i].idempotency_key for i in indexes]
            return {r.idempotency_key: r._asdict() for r in await uow.conn.execute(self._by_keys, {"ids": ks})}

        async def plan_all(uow: UnitOfWork, indexes: list[int], *, keys_first: bool = True) -> dict[int, _Plan]:
            """Existing gifts by key (unless not `keys_first`), else a checked plan, per item;
            failures land in `out`."""
            existing = await by_keys(uow, indexes) if keys_first else {}
            unlocks = [it for i in indexes if isinstance(it := items[i], gifting_pb2.UnlockContentRequest)]
            stream_ids = list(
                {it.stream_id for i in indexes if not isinstance(it := items[i], gifting_pb2.UnlockContentRequest)}
            )
            streams_of = self._streams_of if uow.readonly else self._streams_held
            stream_rows = (
                {r.stream_id: r for r in await uow.conn.execute(streams_of, {"ids": stream_ids})} if stream_ids else {}
            )
            if len(self._stream_creators) + len(stream_rows) > STREAMS_CACHED_MAX:
                self._stream_creators.clear()
            self._stream_creators |= {sid: r.creator_id for sid, r in stream_rows.items()}
            content_rows: dict[str, Any] = {}
            claimed: dict[tuple[str, str], dict[str, Any]] = {}
            if unlocks:
                cids, uids = list({u.content_id for u in unlocks}), list({u.user_id for u in unlocks})
                content_rows = {r.content_id: r for r in await uow.conn.execute(self._contents_of, {"ids": cids})}
                if len(self._content_creators) + len(content_rows) > STREAMS_CACHED_MAX:
                    self._content_creators.clear()
                self._content_creators |= {cid: r.creator_id for cid, r in content_rows.items()}
                claims = {
                    r.event_id: (r.content_id, r.user_id)
                    for r in await uow.conn.execute(self._claims_of, {"cids": cids, "uids": uids})
                }
                if claims:
                    rows = await uow.conn.execute(self._gifts_by_id, {"ids": list(claims)})
                    claimed = {claims[r.event_id]: r._asdict() for r in rows}
            gift_items = [it for i in indexes if isinstance(it := items[i], gifting_pb2.SendGiftRequest)]
            gift_rows = (
                {
                    r.gift_id: r
                    for r in await uow.conn.execute(self._gifts_of, {"ids": list({g.gift_id for g in gift_items})})
                }
                if gift_items
                else {}
            )
            plans: dict[int, _Plan] = {}
            for i in indexes:
                it = items[i]
                try:
                    row = existing.get(it.idempotency_key)
                    if row is not None and not _restarts(row, digests[i]):
                        plans[i] = _Plan(row, existing=True)
                    elif isinstance(it, gifting_pb2.UnlockContentRequest):
                        p = self._plan_unlock(
                            it,
                            it.idempotency_key,
                            digests[i],
                            content_rows.get(it.content_id),
                            claimed.get((it.content_id, it.user_id)),
                        )
                        # Found under its key (KEY_ONLY, or its own cancelled unlock): recorded already.
                        needs_key = row is None and _answered_elsewhere(p, it.idempotency_key)
                        plans[i] = _Plan(p.row, p.existing, needs_key)
                    else:
                        g = gift_rows.get(it.gift_id) if isinstance(it, gifting_pb2.SendGiftRequest) else None
                        plans[i] = self._plan(it, it.idempotency_key, digests[i], stream_rows.get(it.stream_id), g)
                except DomainError as exc:
                    out[i] = exc
            return plans

        async def alone(indexes: list[int]) -> None:
            """Step 1 of these items one by one (`_begin`)."""
            for i in indexes:
                try:
                    key = items[i].idempotency_key
                    out[i] = (await self._begin(key, digests[i], self._planner(items[i], key, digests[i])))[0]
                except DomainError as exc:
                    out[i] = exc

        # No transaction is held across a wallet call: the eligibility answers are gathered first
        # (a stream's creator never changes, so known streams need no read for that), then one
        # transaction re-plans every item against the current rows and inserts the new gifts.
        todo = list(range(len(items)))
        if any(self._creator_known(items[i]) is None for i in todo):
            async with self.db.unit_of_work(readonly=True) as uow:
                for i, p in (await plan_all(uow, todo)).items():
                    if p.existing and not p.needs_key:
                        out[i] = p.row
            todo = [i for i in todo if out[i] is None]
        if todo:
            parties = {_sender(items[i]) for i in todo}
            parties |= {c for i in todo if (c := self._creator_known(items[i])) is not None}
            answers = await self._restrictions(parties)
            try:
                async with self.db.unit_of_work() as uow:
                    # No look-up of the keys first: the insert skips a key already recorded, and
                    # only such keys, and items refused by a check, are looked up after it (a
                    # retry gets its gift even if a check would now refuse it). In normal traffic
                    # that is none: one statement fewer per batch.
                    plans = await plan_all(uow, todo, keys_first=False)
                    new_rows: dict[int, dict[str, Any]] = {}
                    # Unlocks answered by the user's unlock under another key: their keys, recorded
                    # in the same statement (a key someone holds is skipped and looked up below).
                    key_only: dict[int, dict[str, Any]] = {}
                    for i, p in plans.items():
                        if p.existing:
                            if p.needs_key:
                                key_only[i] = _key_only(p.row, items[i].idempotency_key, digests[i])
                            continue
                        try:
                            _check_parties(p.row, answers)
                        except DomainError as exc:
                            out[i] = exc
                            continue
                        new_rows[i] = p.row
                    recorded: set[str] = set()
                    if new_rows or key_only:
                        # In key order: an insert waits for a key another transaction is recording,
                        # so two batches holding the same keys in different orders (a call retried
                        # on another replica) would each wait for the other's (a deadlock). In one
                        # order, the second waits for the first and then skips the keys it recorded.
                        rows = sorted([*new_rows.values(), *key_only.values()], key=lambda r: r["idempotency_key"])
                        recorded = set(
                            (await uow.conn.execute(self._insert_gifts.stmt, self._insert_gifts.params(rows))).scalars()
                        )
                    again = [i for i in todo if isinstance(out[i], DomainError)]
                    again += [i for i, r in [*new_rows.items(), *key_only.items()] if r["event_id"] not in recorded]
                    # Keys of cancelled gifts (or KEY_ONLY), retried: each starts a new gift below.
                    restart: list[int] = []
                    if again:
                        earlier = await by_keys(uow, again)
                        for i in again:
                            row = earlier.get(items[i].idempotency_key)
                            if row is not None:
                                try:
                                    if _restarts(row, digests[i]):
                                        # Answered by the earlier unlock, as recorded under the key;
                                        # or a new gift, which moves the key.
                                        if i not in key_only:
                                            restart.append(i)
                                        out[i] = None  # a check's refusal of the new gift is found again there
                                    else:
                                        out[i] = row
                                except AlreadyExists as exc:
                                    out[i] = exc
                            elif i in new_rows or i in key_only:
                                # Skipped, yet not there: the key was a KEY_ONLY row past the
                                # retention, deleted meanwhile (keyrows.py); a retry goes through.
                                out[i] = Aborted("the gift is being recorded concurrently, retry", "CONFLICT")
                            new_rows.pop(i, None)
                    claims_new = sorted(  # in (content, user) order, for the same reason as the gifts
                        (_claim(r) for r in new_rows.values() if r["kind"] == GiftKind.UNLOCK.value),
                        key=lambda c: (c["content_id"], c["user_id"]),
                    )
                    if claims_new:
                        # A concurrent unlock of the same content by the same user: IntegrityError below.
                        await uow.conn.execute(self._insert_unlocks.stmt, self._insert_unlocks.params(claims_new))
                    await uow.commit()
                await alone(restart)  # rare: retries of cancelled gifts
                for i, p in plans.items():
                    if out[i] is None:
                        out[i] = p.row
            except IntegrityError:
                await alone(todo)  # a concurrent call inserted one of these keys first: resume item by item
        check(all(r is not None for r in out), "every item has a gift or an error")
        return out

    def _creator_known(self, req: _Begin) -> str | None:
        """The creator a gift, tip or unlock goes to, if its stream (content) was seen before."""
        if isinstance(req, gifting_pb2.UnlockContentRequest):
            return self._content_creators.get(req.content_id)
        return self._stream_creators.get(req.stream_id)

    async def _restrictions(self, user_ids: set[str]) -> dict[str, Any]:
        """Each user's wallet restrictions (None if the wallet did not answer), from the cache when fresh.

        An answer in the last quarter of its life is still used, and asked again in the
        background: a busy stream's viewers do not all expire at once and stall a batch on
        wallet calls (which showed as the p99 of SendGift's first step under load).
        """
        now = time.monotonic()
        answers: dict[str, Any] = {}
        due: list[str] = []
        for u in user_ids:
            hit = self._eligibility_cache.get(u)
            if hit is not None and hit[0] > now:
                answers[u] = hit[2]
                if hit[1] <= now and u not in self._refreshing:
                    due.append(u)
        if due:
            self._refreshing.update(due)
            task = asyncio.create_task(self._refresh_restrictions(due))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        missing = sorted(user_ids - answers.keys())
        for u, a in zip(missing, await self._ask_restrictions(missing), strict=True):
            answers[u] = a
            self._remember(u, a)
        return answers

    async def _ask_restrictions(self, user_ids: list[str]) -> list[Any]:
        """Each user's answer (None where the wallet did not answer), in one call per chunk of users."""
        chunks = [
            user_ids[i : i + RESTRICTIONS_MANY_IDS_MAX] for i in range(0, len(user_ids), RESTRICTIONS_MANY_IDS_MAX)
        ]
        return [a for part in await asyncio.gather(*(self._ask_chunk(c) for c in chunks)) for a in part]

    async def _ask_chunk(self, user_ids: list[str]) -> list[Any]:
        try:
            resp = await self.wallet.GetAccountRestrictionsMany(
                wallet_pb2.GetAccountRestrictionsManyRequest(user_ids=user_ids),
                timeout=self.settings.outgoing_deadline_s,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                return [None] * len(user_ids)
            # A wallet older than the batched call (a rolling upgrade): ask user by user.
            return await self._ask_each(user_ids)
        check(len(resp.restrictions) == len(user_ids), "the wallet answers every user")
        return list(resp.restrictions)

    async def _ask_each(self, user_ids: list[str]) -> list[Any]:
        sem = asyncio.Semaphore(WALLET_CALLS_CONCURRENT_MAX)

        async def ask(user_id: str) -> Any:
            async with sem:
                try:
                    return await self.wallet.GetAccountRestrictions(
                        wallet_pb2.GetAccountRestrictionsRequest(user_id=user_id),
                        timeout=self.settings.outgoing_deadline_s,
                    )
                except grpc.aio.AioRpcError:
                    return None

        return list(await asyncio.gather(*(ask(u) for u in user_ids)))

    async def _refresh_restrictions(self, user_ids: list[str]) -> None:
        try:
            for u, a in zip(user_ids, await self._ask_restrictions(user_ids), strict=True):
                if a is not None:
                    self._remember(u, a)  # no answer: the entry ages out and is asked in the request
        finally:
            self._refreshing.difference_update(user_ids)

    def _remember(self, user_id: str, answer: Any) -> None:
        """Keep "may take part" answers for ELIGIBILITY_CACHE_S; forget anything else."""
        ttl = self.settings.eligibility_cache_s
        # Only "may take part" is remembered: the wallet re-checks that inside the spend. A
        # refusal is asked again next time, so an unblock or an age fix applies at once.
        if answer is None or ttl <= 0 or not answer.may_spend or answer.blocked:
            self._eligibility_cache.pop(user_id, None)
            return
        cache = self._eligibility_cache
        now = time.monotonic()
        cache[user_id] = (now + ttl, now + ttl * ELIGIBILITY_REFRESH_AT, answer)
        cache.move_to_end(user_id)
        # Expired answers are never used again. All live as long and the newest is at the end, so
        # they are at the front: dropped here, the cache holds the users of the last ttl. It kept
        # them until ELIGIBILITY_CACHE_ENTRIES_MAX users had come, then forgot everyone at once,
        # and every user still gifting was asked again in the same moment.
        while len(cache) > 1:
            oldest = next(iter(cache))
            if cache[oldest][0] > now and len(cache) <= ELIGIBILITY_CACHE_ENTRIES_MAX:
                break
            del cache[oldest]

    async def _spend_many(self, gifts_: list[dict[str, Any]]) -> list[int | None | DomainError]:
        """Step 2 for many gifts: wallet.SpendMany, each keyed by its gift id; a balance or the item's error.

        The wallet settles a refusal in the same transaction (`settle_refusals`), so a refused
        gift is cancelled here at once; a refusal it could not settle goes through the arbiter
        like a single spend's. No answer at all leaves every gift PENDING (retry or sweeper).
        """
        out: list[int | None | DomainError] = []
        for start in range(0, len(gifts_), WALLET_SPEND_MANY_MAX):
            out += await self._spend_chunk(gifts_[start : start + WALLET_SPEND_MANY_MAX])
        return out

    async def _spend_chunk(self, chunk: list[dict[str, Any]]) -> list[int | None | DomainError]:
        try:
            resp = await self.wallet.SpendMany(
                wallet_pb2.SpendManyRequest(spends=[_spend_request(g) for g in chunk], settle_refusals=True),
                timeout=self.settings.outgoing_deadline_s,
            )
        except grpc.aio.AioRpcError as exc:
            return [_wallet_unavailable(g["event_id"], exc.code()) for g in chunk]
        check(len(resp.results) == len(chunk), "the wallet answers every item")
        out: list[int | None | DomainError] = [None] * len(chunk)
        cancel: dict[str, str] = {}
        unsettled: list[int] = []
        for i, (g, r) in enumerate(zip(chunk, resp.results, strict=True)):
            if r.WhichOneof("outcome") == "spent":
                out[i] = r.spent.balance_after
            elif r.error.settled:
                cancel[g["event_id"]] = r.error.reason
                out[i] = _refusal(r.error)
            else:
                unsettled.append(i)
        if cancel:
            await self._cancel_many(cancel)

        async def arbitrate(i: int) -> int | None | DomainError:
            e = resp.results[i].error
            try:
                return (
                    await self._refused(chunk[i], _CODES.get(e.code), e.reason, e.message, dict(e.metadata))
                ).balance_after
            except DomainError as exc:
                return exc

        # return_exceptions: cancelled (the client's deadline, the drain's grace), the call ends only
        # once every arbitration has. Without it gather ended at the first and left the others running:
        # one caught in `_cancel` was still closing its database connection after the handler had
        # returned, as the sweeper's loop was (see `sweeper`). Not a TaskGroup: its ExceptionGroup
        # would turn a database error (UNAVAILABLE, or ABORTED to retry) into INTERNAL.
        results = await asyncio.gather(*(arbitrate(i) for i in unsettled), return_exceptions=True)
        for i, res in zip(unsettled, results, strict=True):
            if isinstance(res, BaseException) and not isinstance(res, DomainError):
                raise res  # as gather did (the first in order here), now that every other has ended
            out[i] = res
        return out

    async def _mark_sent_many(
        self, balances: dict[str, int | None], contexts: dict[str, Any] | None = None
    ) -> dict[str, dict[str, Any]]:
        """Step 3 for many gifts: PENDING -> SENT and their events in one transaction and one UPDATE.

        UPDATE ... RETURNING names exactly the rows this transaction flipped, so each gets one
        event even when a retry or the sweeper settles the same gift concurrently. Each event
        carries the trace context `contexts` gives its gift (by event id), else the current one.
        """
        if not balances:
            return {}
        # In id order: the UPDATE locks the rows in the order it is given them (it looks each id up
        # in turn), and two batches with the same gifts (a SendGifts retried on another replica
        # with its items in another order) each waited for a row the other held (a deadlock).
        ids = sorted(balances)
        g = gift_events.c
        async with self.db.unit_of_work() as uow:
            ts = now_us()
            if self._flip_sent is not None:
                # PostgreSQL: status and balance in one UPDATE (one new row version per gift,
                # one statement text for any batch), the balances paired by unnest.
                rows_in = [{"eid": i, "bal": balances[i]} for i in ids]
                params = self._flip_sent.params(rows_in) | {"ts": ts}  # type: ignore[operator]
                flipped = [r._asdict() for r in await uow.conn.execute(self._flip_sent.stmt, params)]
            else:
                flipped = [
                    r._asdict()
                    for r in await uow.conn.execute(
                        update(gift_events)
                        .where(one_of(self.db.dialect, g.event_id, ids), g.status == GiftStatus.PENDING.value)
                        .values(status=GiftStatus.SENT.value, updated_at_us=ts)
                        .returning(*gift_events.c)
                    )
                ]
                # SQLite: each balance by itself (an executemany by key).
                for r in flipped:
                    r["sender_balance_after"] = balances[r["event_id"]]
                known = [{"eid": r["event_id"], "bal": r["sender_balance_after"]} for r in flipped]
                if known:
                    await uow.conn.execute(
                        update(gift_events)
                        .where(g.event_id == bindparam("eid"))
                        .values(sender_balance_after=bindparam("bal")),
                        known,
                    )
            # Their events in feed order, (sent time, event id): they share `ts`, and the relay
            # publishes in outbox order. RETURNING's order is the plan's (SQLite's was the rows'
            # insertion order), and a feed resumed after one of them read the ones "after" it by id:
            # it lost those published later with smaller ids and got those published earlier twice.
            flipped.sort(key=lambda r: r["event_id"])
            await self.outbox.add_many(
                uow,
                [(GIFT_SENT_SUBJECT, r["event_id"], _gift_sent_event(r)) for r in flipped],
                [contexts[r["event_id"]] for r in flipped] if contexts is not None else None,
            )
            rows = {r["event_id"]: r for r in flipped}
            others = [i for i in ids if i not in rows]
            if others:
                rows |= {
                    r.event_id: r._asdict()
                    for r in await uow.conn.execute(
                        select(gift_events).where(one_of(self.db.dialect, g.event_id, others))
                    )
                }
            await uow.commit()
        return rows

    async def send_tip(self, req: gifting_pb2.SendTipRequest) -> gifting_pb2.GiftReceipt:
        """Tip a live stream a free amount of coins with an optional short message, once per key."""

        def checks() -> str:
            require_id(req.stream_id, "stream_id")
            require_id(req.sender_id, "sender_id")
            key = require_key(req.idempotency_key)
            # Checked here so a bad tip fails before it joins a batch (and again when planned).
            domain.tip_coins(req.coins, self.settings.tip_coins_max)
            domain.tip_message(req.message, self.settings.tip_message_chars_max)
            return key

        return _receipt(await self._settle(await self._begin_one(req, checks)))

    async def unlock_content(self, req: gifting_pb2.UnlockContentRequest) -> gifting_pb2.UnlockReceipt:
        """Unlock content for coins; charged once per user, a second unlock returns the existing access."""

        def checks() -> str:
            require_id(req.user_id, "user_id")
            require_id(req.content_id, "content_id")
            return require_key(req.idempotency_key)

        gift = await self._begin_one(req, checks)
        # This call's own unlock (new, or a retry of its key), or the user's earlier unlock of this
        # content under another key (not charged again).
        own = gift["idempotency_key"] == req.idempotency_key
        settled = await self._settle(gift)
        return gifting_pb2.UnlockReceipt(
            content_id=req.content_id,
            user_id=req.user_id,
            gift_event_id=settled["event_id"],
            coins=settled["coins"],
            sender_balance=(settled["sender_balance_after"] or 0) if own else 0,
            status=_STATUS_PB[GiftStatus(settled["status"])],
            already_unlocked=not own,
        )

    async def _check_eligible(self, sender_id: str, creator_id: str) -> None:
        """UNDERAGE or ACCOUNT_BLOCKED unless the wallet says both sender and creator may take part."""
        _check_parties(
            {"sender_id": sender_id, "creator_id": creator_id}, await self._restrictions({sender_id, creator_id})
        )

    async def _begin(self, key: str, digest: str, plan: Plan) -> tuple[dict[str, Any], bool]:
        """Step 1: record the gift PENDING, or find the one this key (or this unlock) already started.

        Returns the gift and whether it is this key's own. Every check runs first without
        writing, then the eligibility check asks the wallet (no transaction is held open across
        that call), then the checks run again in the transaction that records the gift.
        """
        async with self.db.unit_of_work(readonly=True) as uow:
            existing = await self._by_key(uow, key)
            if existing is not None and not _restarts(existing, digest):
                return existing, True
            probe = await plan(uow)
        # An unlock answered by the user's unlock under another key records this key first
        # (below), unless it is recorded already (KEY_ONLY, or this key's cancelled unlock).
        if probe.existing and (existing is not None or not _answered_elsewhere(probe, key)):
            return probe.row, False
        if not probe.existing:
            await self._check_eligible(probe.row["sender_id"], probe.row["creator_id"])
        for _ in range(3):
            try:
                async with self.db.unit_of_work() as uow:
                    existing = await self._by_key(uow, key)
                    if existing is not None:
                        if not _restarts(existing, digest):
                            return existing, True
                        # This request's gift was cancelled: the key moves to the new gift. A
                        # concurrent retry that moved it first makes the insert below conflict.
                        # key_moved_at_us tells `restore_keys_once` the old gift gave its key away.
                        await uow.conn.execute(
                            update(gift_events)
                            .where(gift_events.c.event_id == existing["event_id"], gift_events.c.idempotency_key == key)
                            .values(idempotency_key=None, key_moved_at_us=now_us())
                        )
                    p = await plan(uow)
                    if p.existing:
                        if existing is None and _answered_elsewhere(p, key):
                            await uow.conn.execute(insert(gift_events).values(**_key_only(p.row, key, digest)))
                            await uow.commit()
                        return p.row, False  # else uncommitted: the key stays where it was
                    await uow.conn.execute(insert(gift_events).values(**p.row))
                    if p.row["kind"] == GiftKind.UNLOCK.value:
                        await uow.conn.execute(insert(content_unlocks).values(**_claim(p.row)))
                    await uow.commit()
                    return p.row, True
            except IntegrityError:
                continue  # a concurrent call with this key (or this unlock) inserted first: resume it
        raise Aborted("the gift is being created concurrently, retry", "CONFLICT")

    async def _recorded_or_refused(self, refusal: InvalidArgument, req: _Begin) -> dict[str, Any]:
        """The gift a refused request's key recorded (`_answered_by_key`), else `refusal`."""
        row = (await self._answered_by_key([req]))[0]
        if row is None:
            raise refusal
        return row

    async def _answered_by_key(self, reqs: list[_Begin]) -> list[dict[str, Any] | None]:
        """For gifts, tips and unlocks today's checks refuse (distinct keys): the gift each one's key
        recorded when the request is a retry of the one recorded (an older release, or a looser
        limit, accepted it), else None. Read only on the refusal path, with the digest the request
        was recorded with; a malformed key, a different request under the key, a cancelled gift or
        a KEY_ONLY row (a retry of those is checked anew) leave the refusal standing."""
        keys = []
        for r in reqs:
            with contextlib.suppress(InvalidArgument):
                keys.append(require_key(r.idempotency_key))
        rows: dict[str, dict[str, Any]] = {}
        if keys:
            async with self.db.unit_of_work(readonly=True) as uow:
                rows = {r.idempotency_key: r._asdict() for r in await uow.conn.execute(self._by_keys, {"ids": keys})}
        out: list[dict[str, Any] | None] = []
        for r in reqs:
            row, digest = rows.get(r.idempotency_key), _digest(r)
            out.append(
                row if row is not None and row["request_hash"] == digest and not _restarts(row, digest) else None
            )
        return out

    async def _by_key(self, uow: UnitOfWork, key: str) -> dict[str, Any] | None:
        """The gift recorded under `key` (maybe cancelled); `_restarts` checks it against the request."""
        row = (await uow.conn.execute(select(gift_events).where(gift_events.c.idempotency_key == key))).first()
        return None if row is None else row._asdict()

    async def _settle(self, gift: dict[str, Any]) -> dict[str, Any]:
        """Steps 2 and 3: spend the coins, then mark the gift sent with its event (gifts, tips, unlocks).

        The call's span gets an event as each step ends ("gift recorded", "coins spent"), so a slow
        call's trace shows which step it waited in (a no-op when spans are not recorded).
        """
        span = trace.get_current_span()
        span.add_event("gift recorded")
        if gift["status"] == GiftStatus.SENT.value:
            return gift
        if self.settings.group_commit:
            balance = await self._spend_batcher.submit(gift)
        else:
            balance = (await self._spend(gift)).balance_after
        span.add_event("coins spent")
        faults.point("gifting.after_spend_before_commit")
        if self.settings.group_commit:
            # This call's trace context (a contextvar read): the batch may run in another caller's.
            return await self._sent_batcher.submit((gift["event_id"], balance, otel_context.get_current()))
        return await self._mark_sent(gift["event_id"], balance)

    async def _spend(self, gift: dict[str, Any]) -> Any:
        """Step 2 of one gift: wallet.Spend keyed by the gift id; a definite refusal is settled by the arbiter."""
        try:
            return await self.wallet.Spend(_spend_request(gift), timeout=self.settings.outgoing_deadline_s)
        except grpc.aio.AioRpcError as exc:
            info = error_info(exc)
            if not info.reason:
                # Not the wallet's answer to this spend: a status its handlers give always names a
                # reason; this one came from gRPC or a proxy on the way (the wallet's concurrent-call
                # limit answers RESOURCE_EXHAUSTED, a message too large INVALID_ARGUMENT) and says
                # nothing of the spend. Its outcome is unknown, as on SpendMany's path: the gift
                # stays PENDING for a retry under its key or the sweeper, no arbiter call is added
                # to a wallet already refusing calls, and the caller is told to retry.
                raise _wallet_unavailable(gift["event_id"], exc.code()) from None
            return await self._refused(gift, exc.code(), info.reason, exc.details() or "", dict(info.metadata))

    async def _refused(
        self,
        gift: dict[str, Any],
        code: grpc.StatusCode | None,
        reason: str,
        message: str,
        metadata: dict[str, str] | None = None,
    ) -> Any:
        """The wallet did not spend: settle through its arbiter, or leave the gift PENDING if unsure.

        A definite refusal fails as `_refusal` names it (its metadata kept, a refused recipient
        named the creator), whichever path, Spend or SpendMany, it came from."""
        definite = _DEFINITE.get(code) if code is not None else None
        if definite is not None or reason == "SPEND_CANCELLED":
            # The wallet refused this attempt, but a concurrent retry with the same key may have
            # spent since (e.g. after a top-up). Only the wallet's arbiter may decide: settle
            # through CancelSpend as the sweeper does, never cancel on our own word.
            answer = await self._arbiter(gift["event_id"])
            if answer.outcome == wallet_pb2.CancelSpendResponse.OUTCOME_SPENT:
                return answer.spend  # it happened after all: the caller marks the gift sent
            await self._cancel(gift["event_id"], reason or (code.name if code else "REFUSED"))
            if definite is None:
                raise Aborted("the gift was cancelled; retry to send it anew", "GIFT_CANCELLED")
            check(code is not None, "a definite refusal has its status code")
            raise _refusal(
                wallet_pb2.SpendItemError(
                    code=code.value[0],  # type: ignore[union-attr]
                    reason=reason or code.name,  # type: ignore[union-attr]
                    message=message,
                    metadata=metadata or {},
                )
            )
        # UNAVAILABLE, DEADLINE_EXCEEDED, ...: the outcome is unknown; the gift stays PENDING.
        raise _wallet_unavailable(gift["event_id"], code)

    async def _arbiter(self, event_id: str) -> wallet_pb2.CancelSpendResponse:
        """wallet.CancelSpend: whether the spend happened (it stands) or never may; UNAVAILABLE if no answer.

        If the wallet cannot answer, the gift stays PENDING for a retry or the sweeper.
        """
        try:
            return await self.wallet.CancelSpend(
                wallet_pb2.CancelSpendRequest(idempotency_key=event_id), timeout=self.settings.outgoing_deadline_s
            )
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(
                "the wallet did not answer; retry with the same key",
                "WALLET_UNAVAILABLE",
                gift_event_id=event_id,
                wallet_code=exc.code().name,
            ) from None

    async def _mark_sent(self, event_id: str, balance_after: int | None) -> dict[str, Any]:
        """PENDING -> SENT and the gift.sent event, in one transaction; exactly one caller wins."""
        async with self.db.unit_of_work() as uow:
            ts = now_us()
            changed = await uow.conn.execute(
                update(gift_events)
                .where(gift_events.c.event_id == event_id, gift_events.c.status == GiftStatus.PENDING.value)
                .values(status=GiftStatus.SENT.value, sender_balance_after=balance_after, updated_at_us=ts)
            )
            row = (
                (await uow.conn.execute(select(gift_events).where(gift_events.c.event_id == event_id))).one()._asdict()
            )
            if changed.rowcount == 1:
                await self.outbox.add(uow, GIFT_SENT_SUBJECT, event_id, _gift_sent_event(row))
                await uow.commit()
        broken = _not_sent(row)
        if broken is not None:
            raise broken
        return row

    async def _cancel(self, event_id: str, reason: str) -> None:
        """PENDING -> CANCELLED; frees an unlock's claim. The gift keeps its key: a retry of the same
        request starts a new gift under it (`_restarts`), a different request is refused."""
        await self._cancel_many({event_id: reason})

    async def _cancel_many(self, reasons: dict[str, str]) -> None:
        """`_cancel` for many gifts in one transaction."""
        g = gift_events.c
        async with self.db.unit_of_work() as uow:
            cancelled = (
                (
                    await uow.conn.execute(
                        update(gift_events)
                        .where(one_of(self.db.dialect, g.event_id, list(reasons)), g.status == GiftStatus.PENDING.value)
                        .values(
                            status=GiftStatus.CANCELLED.value,
                            cancel_reason=case({k: v[:64] for k, v in reasons.items()}, value=g.event_id),
                            updated_at_us=now_us(),
                        )
                        .returning(g.event_id)
                    )
                )
                .scalars()
                .all()
            )
            if cancelled:
                await uow.conn.execute(
                    delete(content_unlocks).where(one_of(self.db.dialect, content_unlocks.c.event_id, cancelled))
                )
            await uow.commit()

    async def sweep_once(self, stop: asyncio.Event | None = None) -> int:
        """Settle gifts left PENDING past the timeout; returns how many were settled.

        Oldest first (by updated_at_us, then event_id), SWEEP_BATCH_SIZE_MAX a round, from where
        the last round stopped (`BatchCursor`): after a full batch, after its last gift; after a
        short one, from the oldest again. A gift's error (the wallet refusing or timing out on
        that one spend, a broken invariant) is logged with its id and the round goes on to the
        others (`ItemFailures`); it is tried again when the cursor comes back round to it, so gifts
        that always fail, a batch of them or the three oldest timing out, keep no newer gift
        from being settled. The wallet or the database down ends the round, as every gift would
        fail alike, and so do SWEEP_WALLET_TIMEOUTS_MAX (3) CancelSpends in a row that the wallet
        did not answer in time (DEADLINE_EXCEEDED): a hung wallet made a round last
        SWEEP_BATCH_SIZE_MAX x OUTGOING_DEADLINE_S (100 x 5 s). A round that ends so is started
        again by the next from the gift it ended at (`rewind`), not after it. One gift's spend
        timing out is that gift's failure; the next answer resets the count. Once `stop` is set
        (a SIGTERM) no further gift of the round is settled (`BatchCursor.stopped`): a wallet
        answering just within OUTGOING_DEADLINE_S made a round outlast the shutdown grace."""
        cutoff = now_us() - int(self.settings.pending_timeout_s * 1_000_000)
        batch = self.settings.sweep_batch_size_max
        async with self.db.unit_of_work(readonly=True) as uow:
            stale = stale_pending(cutoff, batch, self._sweep_cursor.at)
            keys = [(r.updated_at_us, r.event_id) for r in await uow.conn.execute(stale)]
        self._sweep_cursor.advance(keys, batch)
        settled = 0
        timeouts = 0  # the wallet's CancelSpends in a row that timed out
        for i, (_, event_id) in enumerate(keys):
            if self._sweep_cursor.stopped(stop, i):
                break
            # A trace per gift: its CancelSpend, and the gift.sent event with payout's credit.
            with background_span("sweep gift", **{"gift.event_id": event_id}):
                try:
                    answer = await self._arbiter(event_id)
                    timeouts = 0
                    if answer.outcome == wallet_pb2.CancelSpendResponse.OUTCOME_SPENT:
                        await self._mark_sent(event_id, answer.spend.balance_after)
                    else:
                        await self._cancel(event_id, "SWEPT")
                except Exception as exc:  # noqa: BLE001 - this gift's error; the round goes on
                    wallet_code = exc.metadata.get("wallet_code") if isinstance(exc, Unavailable) else None
                    timeouts = timeouts + 1 if wallet_code == "DEADLINE_EXCEEDED" else 0
                    # The wallet down (every gift would fail alike) or hung (each gift after would
                    # wait out the deadline too) ends the round, as the database unavailable does
                    # (`failed` raises it): the next round starts from this gift, not after it.
                    ends_round = wallet_code == "UNAVAILABLE" or timeouts >= SWEEP_WALLET_TIMEOUTS_MAX
                    if ends_round or is_unavailable(exc):
                        self._sweep_cursor.rewind(i)
                    if ends_round:
                        raise
                    self._sweep_failures.failed(exc, event_id, gift_event_id=event_id)
                    continue
            settled += 1
        return settled

    async def sweeper(self, stop: asyncio.Event) -> None:
        """Background loops around `sweep_once` and `restore_keys_once` (errors are logged and retried next round)."""
        # Wallet or database down: the gifts stay PENDING until a later round. Two loops, so a
        # wallet outage does not hold up the key restorer, which needs the database only.
        # A TaskGroup, not gather: cancelled (the service's drain), it returns once both loops have
        # ended. gather returned at the first, leaving the other to finish closing its database
        # connection unawaited; the event loop's final cancellation then caught it mid-close, and
        # aiosqlite's close waited forever for its stopped thread (the service never exited).
        interval_s = self.settings.sweep_interval_s
        async with asyncio.TaskGroup() as loops:
            loops.create_task(run_every(stop, interval_s, lambda: self.sweep_once(stop), "settled pending gifts"))
            loops.create_task(run_every(stop, interval_s, self.restore_keys_once, "restored cancelled gifts' keys"))

    async def restore_keys_once(self) -> int:
        """Give back their key to cancelled gifts an older release left without it; returns how many it settled.

        A release before 4f92b45 cleared the key of every gift it cancelled. Migration 0007 gave
        the keys back once, but during the rolling update the old pods keep cancelling that way,
        and a key left NULL lets a different request under it be accepted and charged. So every
        round does what 0007 did for the rows still in `ix_gift_events_key_lost` (empty once old
        pods are gone): for each key, its latest such gift takes it back from client_key, unless
        a gift holds it now; then the gift is marked as having moved its key, and leaves the index.

        A request under one of these keys that arrives meanwhile races on the unique key: if it
        is recorded first, the restore of that key fails and the gift is marked instead; if the
        restore is first, the request finds the cancelled gift (its retry moves the key on, a
        different request is refused). No check decides alone: the pre-check only spares the
        common case a failed statement.
        """
        async with self.db.unit_of_work(readonly=True) as uow:
            rows = (await uow.conn.execute(keys_lost(self.db.dialect, KEY_RESTORE_BATCH_MAX))).all()
        if not rows:
            return 0
        latest: dict[str, str] = {}  # key -> its newest keyless gift of this round (rows come newest first)
        older: list[str] = []  # the others: their key goes to (or is held by) a later gift
        for event_id, key in rows:
            if key in latest:
                older.append(event_id)
            else:
                latest[key] = event_id
        g = gift_events.c
        try:
            async with self.db.unit_of_work() as uow:
                held = (
                    await uow.conn.execute(
                        select(g.idempotency_key).where(one_of(self.db.dialect, g.idempotency_key, list(latest)))
                    )
                ).scalars()
                moved = older + [latest.pop(k) for k in set(held)]
                await self._set_lost_keys(uow, moved, restore=False)
                await self._set_lost_keys(uow, list(latest.values()), restore=True)
                await uow.commit()
        except IntegrityError:
            # A request under one of these keys was recorded since the look-up: gift by gift.
            async with self.db.unit_of_work() as uow:
                await self._set_lost_keys(uow, older, restore=False)
                await uow.commit()
            for event_id in latest.values():
                try:
                    async with self.db.unit_of_work() as uow:
                        await self._set_lost_keys(uow, [event_id], restore=True)
                        await uow.commit()
                except IntegrityError:
                    async with self.db.unit_of_work() as uow:
                        await self._set_lost_keys(uow, [event_id], restore=False)
                        await uow.commit()
        return len(rows)

    async def _set_lost_keys(self, uow: UnitOfWork, event_ids: list[str], restore: bool) -> None:
        """Keyless cancelled gifts take their key back (`restore`) or are marked as having moved it."""
        if not event_ids:
            return
        g = gift_events.c
        values = {"idempotency_key": g.client_key} if restore else {"key_moved_at_us": now_us()}
        # Still keyless and unmarked: a retry may have moved a restored key on meanwhile.
        await uow.conn.execute(
            update(gift_events).where(one_of(self.db.dialect, g.event_id, event_ids), text(KEY_LOST)).values(**values)
        )

    # ---- live feed ---------------------------------------------------------------------------

    async def watch_stream(
        self, stream_id: str, on_ready: Callable[[], Awaitable[None]], resume_cursor: str = ""
    ) -> AsyncIterator[gifting_pb2.StreamFeedItem]:
        """Each gift and tip of a stream as it lands, after the ones sent since `resume_cursor` if
        given; a last item when the stream ends."""
        require_id(stream_id, "stream_id")
        check(self.feed is not None, "self.feed is not None")
        ended = gifting_pb2.StreamFeedItem(stream_ended=True)
        # Registered before the status and catch-up reads: a gift committed after this point comes
        # live, one committed before it is in those reads, so none falls in between.
        with self.feed.watch(stream_id) as watcher:
            stream = await self.get_stream(stream_id)
            after = await self._resume_point(stream_id, resume_cursor) if resume_cursor else None
            await on_ready()
            combos = domain.ComboTracker(int(self.settings.combo_window_s * 1_000_000))
            # A resumed feed's streaks go on from where the watcher left them: ids of the gifts
            # before the cursor counted into them (one that also comes live, committed late with
            # an earlier sent time, is sent as a streak of its own, not counted twice).
            counted = await self._seed_combos(combos, stream_id, after) if after is not None else set()
            caught_up: set[str] = set()  # ids the catch-up sent, dropped when they also come live
            if after is not None:
                async for event in self._sent_after(stream_id, after):
                    caught_up.add(event.event_id)
                    yield _feed_item(event, combos)
            if stream.status == gifting_pb2.STREAM_STATUS_ENDED:
                yield ended
                return
            while True:
                item = await watcher.next(FEED_STATUS_CHECK_S)
                if item is None:
                    if (await self.get_stream(stream_id)).status == gifting_pb2.STREAM_STATUS_ENDED:
                        yield ended  # the end event was missed (core NATS is at most once)
                        return
                    continue
                if item is Ended:
                    yield ended
                    return
                if item is ShuttingDown:
                    raise Unavailable("this replica is stopping; watch again", "SHUTTING_DOWN")
                check(isinstance(item, events_pb2.GiftSent), "isinstance(item, events_pb2.GiftSent)")
                if item.event_id in caught_up:
                    continue
                yield _feed_item(item, None if item.event_id in counted else combos)

    async def _resume_point(self, stream_id: str, cursor: str) -> tuple[int, str]:
        """The feed position (sent at, event id) of a resume cursor, checked: an item of this stream,
        within the resume window."""
        unknown = InvalidArgument("resume_cursor is not an item of this stream's feed", "UNKNOWN_CURSOR")
        if len(cursor) > ID_MAX or not cursor.isprintable():
            raise unknown
        g = gift_events.c
        async with self._resume_reads, self.db.unit_of_work(readonly=True) as uow:
            row = (
                await uow.conn.execute(select(g.stream_id, g.status, g.updated_at_us).where(g.event_id == cursor))
            ).one_or_none()
            # Another stream's gift is unknown too: the answer tells nothing of other streams.
            if row is None or row.stream_id != stream_id or row.status != GiftStatus.SENT.value:
                raise unknown
            too_old = FailedPrecondition(
                "resume_cursor is beyond the resume window; watch again without it", "RESUME_TOO_OLD"
            )
            if now_us() - row.updated_at_us > self.settings.watch_resume_window_s * 1_000_000:
                raise too_old
            items_max = self.settings.watch_resume_items_max
            missed = sent_after(stream_id, row.updated_at_us, cursor, items_max + 1).with_only_columns(g.event_id)
            count = (await uow.conn.execute(select(func.count()).select_from(missed.subquery()))).scalar_one()
            if count > items_max:
                raise too_old
        return row.updated_at_us, cursor

    async def _seed_combos(self, combos: domain.ComboTracker, stream_id: str, cursor: tuple[int, str]) -> set[str]:
        """Count into `combos` the streaks still open at `cursor`, as a watcher that saw the feed up
        to it holds them; the ids of the gifts counted.

        The stream's SENT gifts are read back from the cursor (that gift included), a page at a
        time, until no earlier gift can count: past COMBO_WINDOW_S before the cursor (a sender
        quiet that long starts a new streak) and before every streak still open there (each
        gift of a streak is within the window of the next). Then they are counted in feed
        order. At most WATCH_RESUME_ITEMS_MAX gifts, on the pages and permits of the catch-up:
        a streak reaching back further counts only its part in them.
        """
        window_us = combos.window_us
        horizon_us = cursor[0] - window_us  # a sender's last gift before this: no streak open
        opened: dict[str, tuple[str, int]] = {}  # sender -> (gift, first sent at) of a streak open
        closed: set[str] = set()  # senders none of whose earlier gifts counts at the cursor
        earliest_us = cursor[0]  # at most the first gift of every streak open (closing one keeps it)
        read: list[Any] = []  # newest first
        before, inclusive, left = cursor, True, self.settings.watch_resume_items_max
        while left > 0:
            limit = min(left, FEED_RESUME_PAGE)
            async with self._resume_reads, self.db.unit_of_work(readonly=True) as uow:
                page = (await uow.conn.execute(sent_before(stream_id, *before, limit, inclusive=inclusive))).all()
            for row in page:
                at_us = row.updated_at_us
                if earliest_us - at_us > window_us:  # so also before the horizon
                    return self._count(combos, read)  # every streak open at the cursor began later
                read.append(row)
                sender = row.sender_id
                if row.kind != GiftKind.GIFT.value or sender in closed:
                    continue  # tips and unlocks are no part of a streak
                streak = opened.get(sender)
                if (streak is None and at_us >= horizon_us) or (
                    streak is not None and streak[0] == row.gift_id and streak[1] - at_us <= window_us
                ):
                    opened[sender] = (row.gift_id, at_us)
                    earliest_us = min(earliest_us, at_us)
                else:
                    opened.pop(sender, None)
                    closed.add(sender)
            if len(page) < limit:
                break
            left -= len(page)
            before, inclusive = (page[-1].updated_at_us, page[-1].event_id), False
        return self._count(combos, read)

    @staticmethod
    def _count(combos: domain.ComboTracker, read: list[Any]) -> set[str]:
        """Count the gifts of `read` (newest first) into `combos` in feed order; their ids."""
        for row in reversed(read):
            if row.kind == GiftKind.GIFT.value:
                combos.add(row.sender_id, row.gift_id, row.quantity, row.updated_at_us)
        return {row.event_id for row in read}

    async def _sent_after(self, stream_id: str, after: tuple[int, str]) -> AsyncIterator[events_pb2.GiftSent]:
        """The stream's SENT gifts after `after` in feed order, a page (one short read) at a time.

        At most WATCH_RESUME_ITEMS_MAX: `_resume_point` counted at most that many after the watcher
        was registered, and any gift committed since comes live."""
        left = self.settings.watch_resume_items_max
        while left > 0:
            async with self._resume_reads, self.db.unit_of_work(readonly=True) as uow:
                page = (await uow.conn.execute(sent_after(stream_id, *after, min(left, FEED_RESUME_PAGE)))).all()
            for row in page:
                yield _gift_sent_event(row._asdict())
            if len(page) < min(left, FEED_RESUME_PAGE):
                return
            left -= len(page)
            after = (page[-1].updated_at_us, page[-1].event_id)

    # ---- audit -------------------------------------------------------------------------------

    async def audit(self) -> gifting_pb2.GiftingAudit:
        """Gifts by status, sent coins and counts by kind, pending coins, what the leaderboards counted,
        parked events and the outbox's cut-off marks."""
        g = gift_events.c
        lb = leaderboard_all_time.c
        async with self.db.unit_of_work(readonly=True, snapshot=True) as uow:
            counts = dict((await uow.conn.execute(select(g.status, func.count()).group_by(g.status))).all())
            by_kind = {
                r.kind: (int(r.coins), int(r.n))
                for r in await uow.conn.execute(
                    select(g.kind, func.sum(g.coins).label("coins"), func.count().label("n"))
                    .where(g.status == GiftStatus.SENT.value)
                    .group_by(g.kind)
                )
            }
            coins_pending = (
                await uow.conn.execute(
                    select(func.coalesce(func.sum(g.coins), 0)).where(g.status == GiftStatus.PENDING.value)
                )
            ).scalar_one()
            leaderboard_coins = (
                await uow.conn.execute(
                    select(func.coalesce(func.sum(lb.coins), 0)).where(lb.scope == domain.Scope.CREATOR.value)
                )
            ).scalar_one()
            pending = await self.outbox.pending(uow)
            first_pending, last = await self.outbox.marks(uow)
            parked = (await uow.conn.execute(select(func.count()).select_from(common.dead_letters))).scalar_one()
        return gifting_pb2.GiftingAudit(
            gifts_sent=int(counts.get(GiftStatus.SENT.value, 0)),
            gifts_pending=int(counts.get(GiftStatus.PENDING.value, 0)),
            gifts_cancelled=int(counts.get(GiftStatus.CANCELLED.value, 0)),
            coins_sent=sum(c for c, _ in by_kind.values()),
            coins_by_kind={k: c for k, (c, _) in by_kind.items()},
            outbox_pending=pending,
            sent_by_kind={k: n for k, (_, n) in by_kind.items()},
            coins_pending=int(coins_pending),
            leaderboard_coins=int(leaderboard_coins),
            dead_letters=int(parked),
            outbox_first_pending_id=first_pending,
            outbox_last_id=last,
        )


def _restarts(row: dict[str, Any], digest: str) -> bool:
    """Whether a retry of the gift recorded under its key is planned anew (the gift was cancelled, or
    the row is KEY_ONLY), or is answered by it; IDEMPOTENCY_KEY_REUSED if `digest` is not the request
    it was recorded for.

    A cancelled gift keeps its key, so the key stays its request's: a different request under it
    is refused, as under a gift pending or sent. So does a KEY_ONLY row: its unlock, planned anew,
    is answered by the user's unlock of that content again, or (that one cancelled since) starts
    a new unlock, which moves the key to it.
    """
    if row["request_hash"] != digest:
        raise key_reused(scope=GIFT_KEY_SCOPE)
    return row["status"] in (GiftStatus.CANCELLED.value, KEY_ONLY)


def _answered_elsewhere(plan: _Plan, key: str) -> bool:
    """Whether `plan` is an unlock answered by the user's unlock of the content under another key."""
    return plan.existing and plan.row["idempotency_key"] != key


def _key_only(answer: dict[str, Any], key: str, digest: str) -> dict[str, Any]:
    """The KEY_ONLY row that records `key` for an unlock `answer`ed by the user's earlier unlock.

    No coins, no stream: nothing reads it but a look-up by key (domain.KEY_ONLY), and it is
    deleted after IDEMPOTENCY_RETENTION_DAYS (services/gifting/keyrows.py).
    """
    to = _Party(stream_id="", creator_id=answer["creator_id"])
    row = _new_gift(key, digest, GiftKind.UNLOCK, to, answer["sender_id"], answer["gift_id"], 0, 0, 0)
    return row | {"status": KEY_ONLY}


def _fields_digest(*fields: object) -> str:
    """sha256 of the fields joined by "|", with "\\" and "|" escaped in each, so no two requests
    share a text (ids may hold "|", a tip message anything). A field with neither character reads
    as it did before the escaping, so the digests recorded then still match their retries."""
    text = "|".join(str(f).replace("\\", "\\\\").replace("|", "\\|") for f in fields)
    return hashlib.sha256(text.encode()).hexdigest()


def _checked_gift_key(req: gifting_pb2.SendGiftRequest) -> str:
    """The key of a gift whose fields pass the checks made before any read (SendGift, SendGifts items)."""
    require_id(req.stream_id, "stream_id")
    require_id(req.sender_id, "sender_id")
    require_id(req.gift_id, "gift_id")
    return require_key(req.idempotency_key)


def _gift_digest(req: gifting_pb2.SendGiftRequest) -> str:
    return _fields_digest(req.stream_id, req.sender_id, req.gift_id, req.quantity)


def _digest(req: _Begin) -> str:
    """What an idempotency key stands for: a gift's, a tip's (amount and message as sent) or an unlock's request."""
    if isinstance(req, gifting_pb2.SendTipRequest):
        return _fields_digest("TIP", req.stream_id, req.sender_id, req.coins, req.message)
    if isinstance(req, gifting_pb2.UnlockContentRequest):
        return _fields_digest("UNLOCK", req.content_id, req.user_id)
    return _gift_digest(req)


def _sender(req: _Begin) -> str:
    return req.user_id if isinstance(req, gifting_pb2.UnlockContentRequest) else req.sender_id


def _claim(row: dict[str, Any]) -> dict[str, Any]:
    """The content_unlocks row of an unlock's gift row: the user's one unlock of that content."""
    return {
        "content_id": row["gift_id"],
        "user_id": row["sender_id"],
        "event_id": row["event_id"],
        "created_at_us": row["created_at_us"],
    }


def _catalog_fields(g: Any) -> dict[str, Any]:
    """A gifts row as the catalog's trail line shows it (`name` is a LogRecord attribute)."""
    return {"gift_name": g.name, "price_coins": g.price_coins, "active": g.active}


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


def _feed_item(event: events_pb2.GiftSent, combos: domain.ComboTracker | None) -> gifting_pb2.StreamFeedItem:
    """A gift as a WatchStream item, counted into `combos` (None: a streak of its own); its cursor
    is its event id (the feed position is looked up by it)."""
    combo = (
        combos.add(event.sender_id, event.gift_id, event.quantity, event.occurred_at.ToMicroseconds())
        if event.kind == events_pb2.GIFT_KIND_GIFT and combos is not None
        else event.quantity
    )
    return gifting_pb2.StreamFeedItem(
        gift_event_id=event.event_id,
        kind=event.kind,
        sender_id=event.sender_id,
        gift_id=event.gift_id,
        quantity=event.quantity,
        combo_count=combo,
        coins=event.coins,
        message=event.message,
        occurred_at=event.occurred_at,
        cursor=event.event_id,
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
        message=r.get("message") or "",
        recorded_at=to_timestamp(r.get("created_at_us")),
    )


def _new_gift(
    key: str,
    digest: str,
    kind: GiftKind,
    to: _Party,
    sender_id: str,
    gift_id: str,
    quantity: int,
    unit_price_coins: int,
    coins: int,
) -> dict[str, Any]:
    ts = now_us()
    return {
        "event_id": new_event_id(),
        "idempotency_key": key,
        "client_key": key,
        "request_hash": digest,
        "kind": kind.value,
        "stream_id": to.stream_id,
        "creator_id": to.creator_id,
        "sender_id": sender_id,
        "gift_id": gift_id,
        "quantity": quantity,
        "unit_price_coins": unit_price_coins,
        "coins": coins,
        "status": GiftStatus.PENDING.value,
        "cancel_reason": None,
        "sender_balance_after": None,
        "message": None,
        "created_at_us": ts,
        "updated_at_us": ts,
    }


def _content_pb(r: dict[str, Any]) -> gifting_pb2.Content:
    return gifting_pb2.Content(
        content_id=r["content_id"],
        creator_id=r["creator_id"],
        title=r["title"],
        price_coins=r["price_coins"],
        created_at=to_timestamp(r["created_at_us"]),
    )


def _spend_request(gift: dict[str, Any]) -> wallet_pb2.SpendRequest:
    """The wallet spend of a gift, keyed by its id; the creator must be allowed to receive it too."""
    return wallet_pb2.SpendRequest(
        user_id=gift["sender_id"],
        amount=gift["coins"],
        reason=_SPEND_REASON[GiftKind(gift["kind"])],
        reference_id=gift["event_id"],
        idempotency_key=gift["event_id"],
        recipient_user_id=gift["creator_id"],
    )


def _wallet_unavailable(gift_event_id: str, code: grpc.StatusCode | None) -> Unavailable:
    """A spend whose outcome is unknown: the gift stays PENDING; retry with the same key."""
    return Unavailable(
        "the wallet did not answer; retry with the same key",
        "WALLET_UNAVAILABLE",
        gift_event_id=gift_event_id,
        wallet_code=code.name if code else "UNKNOWN",
    )


def _not_sent(row: dict[str, Any]) -> InvariantViolation | None:
    """None if a gift whose spend the wallet confirmed is SENT, else the broken invariant it fails with.

    Only a spend the wallet confirmed leads to marking a gift sent, and a gift is cancelled only
    after the wallet forbade its spend: a cancelled gift with a spend means coins were taken for
    nothing. Every path (SendGift alone or group-committed, a SendGifts item) fails it with this
    one check, INTERNAL. Never GIFT_CANCELLED, which tells the client to retry: a retry restarts a
    cancelled gift under its key and would charge the sender again.
    """
    if row["status"] == GiftStatus.SENT.value:
        return None
    return InvariantViolation(f"gift {row['event_id']} was cancelled but its spend happened")


def _count_refused(error: DomainError) -> None:
    """Count one of gifting's own refusals of a gift, tip or unlock (REFUSALS); other errors are not refusals."""
    roles = REFUSALS.get(error.reason)
    if roles is not None:
        role = error.metadata.get("role", roles[0])
        GIFTS_REFUSED.labels(error.reason, role if role in roles else roles[0]).inc()


def _refusal(error: wallet_pb2.SpendItemError) -> DomainError:
    """The error a gift fails with after the wallet refused (and settled) its spend.

    A refused party is named as gifting's pre-check names it: the wallet's recipient is the creator.
    """
    definite = _DEFINITE.get(_CODES.get(error.code))  # type: ignore[arg-type]
    if definite is None:
        return Aborted("the gift was cancelled; retry to send it anew", "GIFT_CANCELLED")
    meta = dict(error.metadata)
    if meta.get("role") == "recipient":
        meta["role"] = "creator"
        text = (
            "the creator's account is blocked"
            if error.reason == "ACCOUNT_BLOCKED"
            else "the creator is under the required age"
        )
        return definite(text, error.reason, **meta)
    return definite(error.message or "wallet refused the spend", error.reason, **meta)


def _check_parties(row: dict[str, Any], answers: dict[str, Any]) -> None:
    """The eligibility pre-check of one gift: UNDERAGE or ACCOUNT_BLOCKED, or UNAVAILABLE without an answer.

    Answers come from `_restrictions` (cached for `eligibility_cache_s`); the wallet checks both
    parties again inside the spend itself.
    """
    for role, user_id in (("sender", row["sender_id"]), ("creator", row["creator_id"])):
        a = answers.get(user_id)
        if a is None:
            raise Unavailable(
                "the wallet did not answer the eligibility check; retry with the same key", "WALLET_UNAVAILABLE"
            )
        domain.check_eligible(role, a.may_spend, a.blocked)
