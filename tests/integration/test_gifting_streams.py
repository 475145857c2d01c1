"""Gifting's stream and content use cases over a real database of their own, on SQLite and PostgreSQL.

What only shows on a real server: two EndStream calls racing (PostgreSQL's row lock), text
PostgreSQL cannot store (a NUL), which must be refused as bad input, not fail as INTERNAL, and two
batches of gifts waiting for each other's keys, or for each other's rows when marking them sent.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import func, insert, select, text

from livegifts.gifting.v1 import gifting_pb2
from livegifts.wallet.v1 import wallet_pb2
from services.common.db import Database
from services.common.errors import InvalidArgument
from services.common.outbox import Outbox
from services.gifting.storage import common, gift_events
from services.gifting.usecases import GIFT_SENT_SUBJECT, STREAM_ENDED_SUBJECT, Gifting
from tests.integration.conftest import gifting_on
from tests.integration.helpers import ReplicasAsking
from tests.integration.pglocks import LOCK_WAIT_S_MAX, wait_for_lock_waiters
from tests.support.gifting import OverloadedWallet


@pytest.fixture
async def gifting(empty_database: str) -> AsyncIterator[Gifting]:
    async with gifting_on(empty_database, pool_size=4) as gifting:
        yield gifting


async def test_two_end_stream_calls_at_once_end_it_once_and_answer_alike(gifting: Gifting) -> None:
    for i in range(5):  # each round races two calls on a new stream
        stream = await gifting.start_stream(
            gifting_pb2.StartStreamRequest(creator_id=f"c{i}", title="t", idempotency_key=f"s{i}")
        )
        end = gifting_pb2.EndStreamRequest(stream_id=stream.stream_id, idempotency_key=f"e{i}")
        # A retry racing its first call, and another caller's end under its own key.
        other = gifting_pb2.EndStreamRequest(stream_id=stream.stream_id, idempotency_key=f"other{i}")
        a, b, c = await asyncio.gather(gifting.end_stream(end), gifting.end_stream(end), gifting.end_stream(other))
        stored = await gifting.get_stream(stream.stream_id)
        assert a == b == c == stored and stored.status == gifting_pb2.STREAM_STATUS_ENDED
    o = common.outbox.c
    async with gifting.db.unit_of_work(readonly=True) as uow:
        ended = (await uow.conn.execute(select(func.count()).where(o.subject == STREAM_ENDED_SUBJECT))).scalar_one()
    assert ended == 5  # one stream.ended event per stream


@pytest.mark.parametrize("title", ["a\x00b", "line\nbreak", "bell\a"])
async def test_a_title_that_is_not_printable_text_is_refused_as_invalid(gifting: Gifting, title: str) -> None:
    with pytest.raises(InvalidArgument) as stream:
        await gifting.start_stream(gifting_pb2.StartStreamRequest(creator_id="c", title=title, idempotency_key="s"))
    with pytest.raises(InvalidArgument) as content:
        await gifting.create_content(
            gifting_pb2.CreateContentRequest(creator_id="c", title=title, price_coins=10, idempotency_key="c")
        )
    assert stream.value.reason == content.value.reason == "INVALID_TITLE"
    # Text of any script is a title, emoji joined by zero-width joiners too.
    text = "Живой эфир 👨\u200d👩\u200d👧"
    live = await gifting.start_stream(gifting_pb2.StartStreamRequest(creator_id="c", title=text, idempotency_key="s2"))
    assert live.title == text and (await gifting.get_stream(live.stream_id)).title == text


class SpendingWallet:
    """Every user may take part and every spend succeeds (step 1 is what is under test)."""

    async def GetAccountRestrictionsMany(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        return wallet_pb2.GetAccountRestrictionsManyResponse(
            restrictions=[wallet_pb2.AccountRestrictions(user_id=u, may_spend=True) for u in req.user_ids]
        )

    async def SpendMany(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        return wallet_pb2.SpendManyResponse(
            results=[
                wallet_pb2.SpendManyResult(spent=wallet_pb2.SpendResponse(spend_id=s.idempotency_key, amount=s.amount))
                for s in req.spends
            ]
        )


async def test_two_batches_holding_the_same_keys_in_opposite_orders_both_record_them(gifting: Gifting) -> None:
    if gifting.db.dialect != "postgresql":
        pytest.skip("SQLite has one writer: batches never wait for each other's keys")
    gifting.wallet = SpendingWallet()
    other = Gifting(gifting.db, Outbox(common.outbox), SpendingWallet(), gifting.settings)  # a second replica
    stream = await gifting.start_stream(gifting_pb2.StartStreamRequest(creator_id="c", title="t", idempotency_key="s"))

    def batch(*keys: str) -> gifting_pb2.SendGiftsRequest:
        return gifting_pb2.SendGiftsRequest(
            gifts=[
                gifting_pb2.SendGiftRequest(
                    stream_id=stream.stream_id, sender_id=f"v-{k}", gift_id="rose", quantity=1, idempotency_key=k
                )
                for k in keys
            ]
        )

    # A third transaction is recording k3 and k4: each batch records its first key, then waits there.
    # When it rolls back, each goes on to the key the other recorded meanwhile (an edge that retried
    # its call on another replica, in another order, makes the same pair of batches).
    g = gift_events.c
    holder = Database(gifting.db.url, pool_size=1, pool_timeout_s=5, application_name="holder")
    try:
        async with holder.unit_of_work() as uow:
            for k in ("k3", "k4"):
                await uow.conn.execute(
                    insert(gift_events).values(
                        event_id=f"e-{k}",
                        idempotency_key=k,
                        client_key=k,
                        request_hash="h",
                        kind="GIFT",
                        stream_id=stream.stream_id,
                        creator_id="c",
                        sender_id="x",
                        gift_id="rose",
                        quantity=1,
                        unit_price_coins=1,
                        coins=1,
                        status="PENDING",
                        created_at_us=0,
                        updated_at_us=0,
                    )
                )
            calls = asyncio.gather(
                gifting.send_gifts(batch("k1", "k3", "k2")),
                other.send_gifts(batch("k2", "k4", "k1")),
                return_exceptions=True,
            )
            await wait_for_lock_waiters(gifting.db, 2)  # both batches are waiting on k3 and k4 now
        a, b = await calls  # the holder rolled back
        assert not isinstance(a, BaseException) and not isinstance(b, BaseException), (a, b)
        for resp in (a, b):
            assert [r.WhichOneof("outcome") for r in resp.results] == ["receipt"] * 3
        async with gifting.db.unit_of_work(readonly=True) as uow:
            recorded = (await uow.conn.execute(select(g.idempotency_key).where(g.status == "SENT"))).scalars().all()
        assert sorted(recorded) == ["k1", "k2", "k3", "k4"]
    finally:
        await holder.dispose()


async def test_two_batches_marking_the_same_gifts_sent_in_opposite_orders_both_finish(gifting: Gifting) -> None:
    if gifting.db.dialect != "postgresql":
        pytest.skip("SQLite has one writer: batches never wait for each other's rows")
    other = Gifting(gifting.db, Outbox(common.outbox), None, gifting.settings)  # a second replica
    stream = await gifting.start_stream(gifting_pb2.StartStreamRequest(creator_id="c", title="t", idempotency_key="s"))
    g = gift_events.c

    def pending(k: str) -> dict[str, Any]:
        return {
            "event_id": f"e-{k}",
            "idempotency_key": k,
            "client_key": k,
            "request_hash": "h",
            "kind": "GIFT",
            "stream_id": stream.stream_id,
            "creator_id": "c",
            "sender_id": f"v-{k}",
            "gift_id": "rose",
            "quantity": 1,
            "unit_price_coins": 1,
            "coins": 1,
            "status": "PENDING",
            "created_at_us": 0,
            "updated_at_us": 0,
        }

    # Two spent gifts, among the many rows a busy table holds (so each batch's UPDATE looks its
    # gifts up by id, in the order it names them).
    async with gifting.db.unit_of_work() as uow:
        await uow.conn.execute(insert(gift_events), [pending(k) for k in ("k1", "k2")])
        filler = [{**pending(f"f{i:04d}"), "status": "SENT"} for i in range(2000)]
        await uow.conn.execute(insert(gift_events), filler)
        await uow.commit()
    async with gifting.db.unit_of_work() as uow:
        await uow.conn.execute(text("ANALYZE gift_events"))
    # A SendGifts retried on another replica with its items in another order: both reach step 3
    # with the same two gifts. A third transaction holds e-k1, so each batch waits there.
    holder = Database(gifting.db.url, pool_size=1, pool_timeout_s=5, application_name="holder")
    try:
        async with holder.unit_of_work() as uow:
            await uow.conn.execute(select(g.event_id).where(g.event_id == "e-k1").with_for_update())
            a = asyncio.create_task(gifting._mark_sent_many({"e-k1": 9, "e-k2": 9}))
            await wait_for_lock_waiters(gifting.db, 1)
            b = asyncio.create_task(other._mark_sent_many({"e-k2": 9, "e-k1": 9}))
            await wait_for_lock_waiters(gifting.db, 2)
        results = await asyncio.wait_for(asyncio.gather(a, b, return_exceptions=True), LOCK_WAIT_S_MAX)
    finally:
        await holder.dispose()
    for r in results:
        assert not isinstance(r, BaseException), r
        assert {k: v["status"] for k, v in r.items()} == {"e-k1": "SENT", "e-k2": "SENT"}
    o = common.outbox.c
    async with gifting.db.unit_of_work(readonly=True) as uow:
        sent = (await uow.conn.execute(select(func.count()).where(o.subject == GIFT_SENT_SUBJECT))).scalar_one()
    assert sent == 2  # one event per gift, whichever batch flipped it


class _SlowArbiter(OverloadedWallet):
    """Every spend's answer is lost (gifts left PENDING); CancelSpend answers SPENT once two calls
    have come: a sweeper asks about one gift at a time, so the first call waits for the other
    sweeper's first, and both have read the stale gifts before either settles one (however late
    the second starts: with a 0.05 s pause instead, one 0.3 s late found them all settled)."""

    def __init__(self) -> None:
        super().__init__()
        self.arbiter_outcome = wallet_pb2.CancelSpendResponse.OUTCOME_SPENT
        self.both_asking = ReplicasAsking()

    async def CancelSpend(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        # Every call a caller of its own: the replicas share this stub, and a sweeper asks about
        # one gift at a time, so a second call while the first waits is the other sweeper's.
        await self.both_asking.wait(object())
        return await super().CancelSpend(req, timeout)


@pytest.mark.parametrize("empty_database", ["postgres"], indirect=True)
async def test_two_replicas_sweeping_the_same_stale_gifts_at_once_send_each_once(empty_database: str) -> None:
    # Each replica runs a sweeper over the one database; both read the same stale PENDING gifts,
    # both ask the wallet, and both mark them: the status's compare-and-set lets one of them.
    wallet = _SlowArbiter()
    fast = {"group_commit": False, "pending_timeout_s": 0.001}
    async with (
        gifting_on(empty_database, pool_size=4, wallet=wallet, **fast) as first,
        gifting_on(empty_database, pool_size=4, wallet=wallet, **fast) as second,
    ):
        stream = await first.start_stream(
            gifting_pb2.StartStreamRequest(creator_id="c", title="t", idempotency_key="s")
        )
        for i in range(5):
            with pytest.raises(Exception) as lost:
                await first.send_gift(
                    gifting_pb2.SendGiftRequest(
                        stream_id=stream.stream_id,
                        sender_id=f"v{i}",
                        gift_id="panda",
                        quantity=1,
                        idempotency_key=f"k{i}",
                    )
                )
            assert getattr(lost.value, "reason", "") == "WALLET_UNAVAILABLE", lost.value
        await asyncio.sleep(0.01)  # past the pending timeout

        async def second_later() -> int:  # its round starts late, as on a loaded machine
            await asyncio.sleep(0.3)
            return await second.sweep_once()

        async with asyncio.timeout(20):
            await asyncio.gather(first.sweep_once(), second_later())
        asked = Counter(wallet.cancel_calls)
        assert len(asked) == 5 and set(asked.values()) == {2}  # both read and asked about each
        g, o = gift_events.c, common.outbox.c
        async with first.db.unit_of_work(readonly=True) as uow:
            statuses = (await uow.conn.execute(select(g.status, func.count()).group_by(g.status))).all()
            sent = (await uow.conn.execute(select(func.count()).where(o.subject == GIFT_SENT_SUBJECT))).scalar_one()
        assert statuses == [("SENT", 5)] and sent == 5  # one gift.sent event each
