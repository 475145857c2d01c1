"""A WatchStream that resumes after a cursor, over a real database of its own, on SQLite and PostgreSQL.

The gifts are rows written here with the sent times each test needs (ties, a gift committed late
with an earlier time), and the live feed is a FeedHub without NATS that the test hands events to,
as its subscription would: what is under test is the catch-up read and how it meets the live items.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from sqlalchemy import insert

from livegifts.gifting.v1 import gifting_pb2
from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.common.timeutil import now_us
from services.gifting import usecases
from services.gifting.config import GiftingSettings
from services.gifting.feed import FeedHub
from services.gifting.storage import gift_events
from services.gifting.usecases import Gifting, _gift_sent_event
from tests.integration.conftest import gifting_on

STEP_S = 5.0  # a bound on each item's wait: a feed that stalls fails the test, it does not hang it


@dataclass
class _Msg:
    """What FeedHub reads of a NATS message."""

    data: bytes
    subject: str = "gifting.gift.sent"


@pytest.fixture
async def gifting(empty_database: str) -> AsyncIterator[Gifting]:
    hub = FeedHub(None, watchers_max=10, queue_size_max=100)  # type: ignore[arg-type] # no bus: the test publishes
    hub.ready.set()
    async with gifting_on(
        empty_database,
        pool_size=4,
        hub=hub,
        watch_resume_items_max=20,
        watch_queue_size_max=10,  # at most half the resume limit (GiftingSettings)
        watch_resume_reads_max=2,  # under the pool's 4: what the bound leaves to other calls shows
    ) as gifting:
        yield gifting


async def _stream(gifting: Gifting, creator: str) -> str:
    req = gifting_pb2.StartStreamRequest(creator_id=creator, title="t", idempotency_key=f"s-{creator}")
    return (await gifting.start_stream(req)).stream_id


async def _sent(
    gifting: Gifting,
    stream_id: str,
    event_id: str,
    sent_at_us: int,
    status: str = "SENT",
    *,
    sender: str = "viewer",
    gift: str = "rose",
    kind: str = "GIFT",
) -> None:
    """A gift of `stream_id` recorded with `status` at `sent_at_us`, committed now."""
    async with gifting.db.unit_of_work() as uow:
        await uow.conn.execute(
            insert(gift_events).values(
                event_id=event_id,
                idempotency_key=event_id,
                client_key=event_id,
                request_hash="h",
                kind=kind,
                stream_id=stream_id,
                creator_id="c",
                sender_id=sender,
                gift_id=gift,
                quantity=1,
                unit_price_coins=1,
                coins=1,
                status=status,
                created_at_us=sent_at_us - 1_000,
                updated_at_us=sent_at_us,
            )
        )
        await uow.commit()


async def _publish(
    gifting: Gifting,
    stream_id: str,
    event_id: str,
    sent_at_us: int,
    *,
    sender: str = "viewer",
    gift: str = "rose",
    kind: str = "GIFT",
) -> None:
    """Hand the gift to the live feed, as the relay's publish reaches the hub's subscription."""
    row = {"event_id": event_id, "kind": kind, "stream_id": stream_id, "creator_id": "c", "sender_id": sender}
    row |= {"gift_id": gift, "quantity": 1, "coins": 1, "updated_at_us": sent_at_us, "created_at_us": 0}
    assert gifting.feed is not None
    await gifting.feed._on_gift(_Msg(_gift_sent_event(row).SerializeToString()))  # type: ignore[arg-type]


async def _no_op() -> None:
    pass


def _watch(gifting: Gifting, stream_id: str, cursor: str = "") -> AsyncIterator[gifting_pb2.StreamFeedItem]:
    return gifting.watch_stream(stream_id, _no_op, cursor)


async def _take(feed: AsyncIterator[gifting_pb2.StreamFeedItem], n: int) -> list[str]:
    """The cursors of the next `n` items (each within STEP_S)."""
    return [(await asyncio.wait_for(anext(feed), STEP_S)).cursor for _ in range(n)]


async def test_a_resume_sends_the_gifts_after_the_cursor_in_feed_order_then_the_live_ones_each_once(
    gifting: Gifting, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(usecases, "FEED_RESUME_PAGE", 2)  # several pages, so gifts land between reads
    stream = await _stream(gifting, "c1")
    t = now_us() - 60_000_000
    # Feed order is (sent time, event id): "e3a" and "e3b" were sent in the same microsecond.
    for event_id, at in [("e1", t), ("e2", t + 1), ("e3b", t + 2), ("e3a", t + 2), ("e4", t + 3), ("e5", t + 4)]:
        await _sent(gifting, stream, event_id, at)
    feed = _watch(gifting, stream, "e2")  # the watcher received e1 and e2, then left
    assert await _take(feed, 1) == ["e3a"]  # the first page is read: the watcher listens
    # Committed during the catch-up: a gift after the pages read so far (read by a later page, and
    # live), one sent before the cursor's position but committed only now (live only), and a
    # second publish of one the catch-up already sent.
    await _sent(gifting, stream, "e6", t + 5)
    await _sent(gifting, stream, "d-late", t + 1)
    for event_id, at in [("e6", t + 5), ("d-late", t + 1), ("e3a", t + 2)]:
        await _publish(gifting, stream, event_id, at)
    assert await _take(feed, 4) == ["e3b", "e4", "e5", "e6"]  # the rest of the catch-up, in order
    await _publish(gifting, stream, "e7", t + 6)
    assert await _take(feed, 2) == ["d-late", "e7"]  # then the live items, without those already sent
    await feed.aclose()  # type: ignore[attr-defined]


async def test_a_resume_of_a_stream_that_ended_meanwhile_sends_what_was_missed_then_the_end(gifting: Gifting) -> None:
    stream = await _stream(gifting, "c2")
    t = now_us() - 1_000_000
    for i in range(3):
        await _sent(gifting, stream, f"g{i}", t + i)
    await gifting.end_stream(gifting_pb2.EndStreamRequest(stream_id=stream, idempotency_key="end"))
    items = [i async for i in _watch(gifting, stream, "g0")]
    assert [(i.cursor, i.stream_ended) for i in items] == [("g1", False), ("g2", False), ("", True)]
    # Without a cursor, as before: the end at once.
    assert [i.stream_ended for i in [i async for i in _watch(gifting, stream)]] == [True]


@pytest.mark.parametrize("case", ["unknown", "another stream", "pending", "cancelled", "not printable", "too long"])
async def test_a_cursor_that_is_not_a_gift_of_this_streams_feed_is_refused_as_unknown(
    gifting: Gifting, case: str
) -> None:
    stream, other = await _stream(gifting, "c3"), await _stream(gifting, "c4")
    t = now_us()
    await _sent(gifting, other, "theirs", t)
    await _sent(gifting, stream, "pending", t, status="PENDING")
    await _sent(gifting, stream, "cancelled", t, status="CANCELLED")
    cursor = {
        "unknown": "no-such-gift",
        "another stream": "theirs",
        "pending": "pending",
        "cancelled": "cancelled",
        "not printable": "a\x00b",
        "too long": "x" * 129,
    }[case]
    with pytest.raises(InvalidArgument) as refused:
        await asyncio.wait_for(anext(_watch(gifting, stream, cursor)), STEP_S)
    assert refused.value.reason == "UNKNOWN_CURSOR"


async def test_a_resume_beyond_its_window_or_past_too_many_gifts_is_refused_as_too_old(gifting: Gifting) -> None:
    window_us = int(gifting.settings.watch_resume_window_s * 1_000_000)
    t = now_us()
    quiet = await _stream(gifting, "c5")  # one gift after the cursor, but the cursor is too old
    await _sent(gifting, quiet, "old", t - window_us - 5_000_000)
    await _sent(gifting, quiet, "next", t)
    with pytest.raises(FailedPrecondition) as too_old:
        await asyncio.wait_for(anext(_watch(gifting, quiet, "old")), STEP_S)
    assert too_old.value.reason == "RESUME_TOO_OLD"

    busy = await _stream(gifting, "c6")  # a recent cursor, followed by exactly items_max gifts: resumable
    await _sent(gifting, busy, "recent", t - window_us + 60_000_000)
    items_max = gifting.settings.watch_resume_items_max
    for i in range(items_max):
        await _sent(gifting, busy, f"g{i:03d}", t + i)
    feed = _watch(gifting, busy, "recent")
    assert await _take(feed, items_max) == [f"g{i:03d}" for i in range(items_max)]
    await feed.aclose()  # type: ignore[attr-defined]
    await _sent(gifting, busy, "one-more", t + items_max)  # one more: the catch-up would be too long
    with pytest.raises(FailedPrecondition) as too_many:
        await asyncio.wait_for(anext(_watch(gifting, busy, "recent")), STEP_S)
    assert too_many.value.reason == "RESUME_TOO_OLD"


async def test_resumes_all_at_once_read_on_at_most_watch_resume_reads_max_connections(
    gifting: Gifting, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A replica drains and its overlays all resume here together: their catch-up reads must leave
    # the rest of the pool to SendGift's transactions, not queue ahead of them.
    monkeypatch.setattr(usecases, "FEED_RESUME_PAGE", 2)
    stream = await _stream(gifting, "c7")
    t = now_us() - 1_000_000
    for i in range(9):
        await _sent(gifting, stream, f"g{i}", t + i)
    held, peak = 0, 0
    unit_of_work = gifting.db.unit_of_work

    @contextlib.asynccontextmanager
    async def counted(*args: object, **kwargs: object) -> AsyncIterator[object]:
        nonlocal held, peak
        async with unit_of_work(*args, **kwargs) as uow:  # type: ignore[arg-type]
            held += 1
            peak = max(peak, held)
            try:
                await asyncio.sleep(0.05)  # long enough for the other resumes' reads to overlap it
                yield uow
            finally:
                held -= 1

    status = await gifting.get_stream(stream)

    async def status_read(stream_id: str) -> object:  # the catch-up's reads are the ones counted
        return status

    monkeypatch.setattr(gifting, "get_stream", status_read)
    monkeypatch.setattr(gifting.db, "unit_of_work", counted)

    async def resume() -> list[str]:
        feed = _watch(gifting, stream, "g0")
        try:
            return await _take(feed, 8)
        finally:
            await feed.aclose()  # type: ignore[attr-defined]

    caught_up = await asyncio.wait_for(asyncio.gather(*(resume() for _ in range(8))), 8 * STEP_S)
    assert caught_up == [[f"g{i}" for i in range(1, 9)]] * 8
    assert peak == gifting.settings.watch_resume_reads_max, peak


async def _combos(feed: AsyncIterator[gifting_pb2.StreamFeedItem], n: int) -> dict[str, int]:
    """Cursor -> combo_count of the next `n` items (each within STEP_S)."""
    items = [await asyncio.wait_for(anext(feed), STEP_S) for _ in range(n)]
    return {i.cursor: i.combo_count for i in items}


async def test_a_resumed_feed_counts_combos_on_as_a_watcher_that_never_left_does(gifting: Gifting) -> None:
    """The streaks open at the cursor go on: a reconnect does not start an overlay's combo at 1."""
    stream = await _stream(gifting, "c8")
    s = 1_000_000
    t = now_us() - 120 * s
    # (event id, sender, gift, kind, sent at) in feed order; the combo window is 10 s.
    gifts = [
        ("c1", "carol", "rose", "GIFT", t - 30 * s),  # long before: carol's next gift starts anew
        ("a1", "alice", "rose", "GIFT", t),  # alice's streak spans 15 s, longer than the window
        ("d1", "dave", "lily", "GIFT", t + 2 * s),
        ("a2", "alice", "rose", "GIFT", t + 4 * s),
        ("b1", "bob", "panda", "GIFT", t + 5 * s),
        ("bt", "bob", "", "TIP", t + 6 * s),  # a tip is no part of a streak, nor does it end one
        ("a3", "alice", "rose", "GIFT", t + 8 * s),
        ("d2", "dave", "rose", "GIFT", t + 9 * s),  # another gift: dave's streak starts again
        ("b2", "bob", "panda", "GIFT", t + 12 * s),
        ("a4", "alice", "rose", "GIFT", t + 15 * s),  # the cursor: the overlay saw up to here
        ("a5", "alice", "rose", "GIFT", t + 20 * s),
        ("b3", "bob", "panda", "GIFT", t + 21 * s),
        ("c2", "carol", "rose", "GIFT", t + 22 * s),
        ("d3", "dave", "rose", "GIFT", t + 18 * s),
    ]
    gifts.sort(key=lambda g: (g[4], g[0]))
    ready = asyncio.Event()

    async def listening() -> None:
        ready.set()

    never_left = gifting.watch_stream(stream, listening)
    first = asyncio.ensure_future(anext(never_left))
    await asyncio.wait_for(ready.wait(), STEP_S)
    for event_id, sender, gift, kind, at in gifts:
        await _sent(gifting, stream, event_id, at, sender=sender, gift=gift, kind=kind)
        await _publish(gifting, stream, event_id, at, sender=sender, gift=gift, kind=kind)
    item = await asyncio.wait_for(first, STEP_S)
    seen = {item.cursor: item.combo_count} | await _combos(never_left, len(gifts) - 1)

    resumed = _watch(gifting, stream, "a4")
    after_cursor = await _combos(resumed, 4)  # the catch-up
    await _sent(gifting, stream, "a6", t + 24 * s, sender="alice")
    await _publish(gifting, stream, "a6", t + 24 * s, sender="alice")
    after_cursor |= await _combos(resumed, 1)  # and a live one
    seen |= await _combos(never_left, 1)
    assert after_cursor == {"d3": 2, "a5": 5, "b3": 3, "c2": 1, "a6": 6}
    assert after_cursor == {k: seen[k] for k in after_cursor}
    await resumed.aclose()  # type: ignore[attr-defined]
    await never_left.aclose()  # type: ignore[attr-defined]


async def test_a_streak_longer_than_the_resume_limit_counts_on_from_its_last_items_max_gifts(gifting: Gifting) -> None:
    """The read back is bounded like the catch-up: a streak reaching further back counts only the
    WATCH_RESUME_ITEMS_MAX gifts up to the cursor, the cursor's included."""
    stream = await _stream(gifting, "c9")
    items_max = gifting.settings.watch_resume_items_max
    t = now_us() - 300_000_000
    for i in range(items_max + 10):  # one streak of roses, a second apart
        await _sent(gifting, stream, f"g{i:03d}", t + i * 1_000_000)
    cursor = f"g{items_max + 8:03d}"
    assert await _combos(_watch(gifting, stream, cursor), 1) == {f"g{items_max + 9:03d}": items_max + 1}


async def test_a_gift_counted_before_the_cursor_that_comes_live_after_the_resume_is_not_counted_twice(
    gifting: Gifting,
) -> None:
    """A gift committed late with a sent time before the cursor is in the read back and, once, live."""
    stream = await _stream(gifting, "c10")
    t = now_us() - 60_000_000
    ready = asyncio.Event()

    async def listening() -> None:
        ready.set()

    never_left = gifting.watch_stream(stream, listening)
    first = asyncio.ensure_future(anext(never_left))
    await asyncio.wait_for(ready.wait(), STEP_S)
    for event_id, at in [("e1", t), ("e2", t + 1)]:
        await _sent(gifting, stream, event_id, at)
        await _publish(gifting, stream, event_id, at)
    seen = {(await asyncio.wait_for(first, STEP_S)).cursor: 1} | await _combos(never_left, 1)
    await _sent(gifting, stream, "d-late", t + 1)  # committed as the overlay left after e2
    resuming = asyncio.Event()

    async def resumed_listening() -> None:
        resuming.set()

    resumed = gifting.watch_stream(stream, resumed_listening, "e2")
    first = asyncio.ensure_future(anext(resumed))
    await asyncio.wait_for(resuming.wait(), STEP_S)  # listening: the publishes below reach it live
    await _publish(gifting, stream, "d-late", t + 1)
    await _sent(gifting, stream, "e7", t + 2)
    await _publish(gifting, stream, "e7", t + 2)
    seen |= await _combos(never_left, 2)
    item = await asyncio.wait_for(first, STEP_S)
    after_cursor = {item.cursor: item.combo_count} | await _combos(resumed, 1)
    assert seen == {"e1": 1, "e2": 2, "d-late": 3, "e7": 4}
    assert after_cursor == {"d-late": 1, "e7": 4}  # a streak of its own, then the streak goes on
    await resumed.aclose()  # type: ignore[attr-defined]
    await never_left.aclose()  # type: ignore[attr-defined]


async def test_a_feed_ended_too_slow_resumes_from_its_last_item_under_the_default_settings(
    empty_database: str,
) -> None:
    """FEED_TOO_SLOW tells the overlay to watch again with its cursor. The feed is ended when
    WATCH_QUEUE_SIZE_MAX gifts wait for it and one more comes, so the overlay's last item is
    followed by that many, and by those sent while it reconnects: the resume must take them all
    (with a queue as long as the resume limit, 1,000 and 1,000, it never could: RESUME_TOO_OLD)."""
    defaults = GiftingSettings(database_url=empty_database, nats_url="nats://127.0.0.1:1", wallet_addr="127.0.0.1:1")
    hub = FeedHub(None, defaults.watchers_max, defaults.watch_queue_size_max)  # type: ignore[arg-type]
    hub.ready.set()
    async with gifting_on(empty_database, pool_size=4, hub=hub) as gifting:
        stream = await _stream(gifting, "c-slow")
        ready = asyncio.Event()

        async def listening() -> None:
            ready.set()

        feed = gifting.watch_stream(stream, listening)
        first = asyncio.ensure_future(anext(feed))
        await asyncio.wait_for(ready.wait(), STEP_S)
        t = now_us() - 1_000_000
        await _sent(gifting, stream, "a-last-read", t)
        await _publish(gifting, stream, "a-last-read", t)
        assert (await asyncio.wait_for(first, STEP_S)).cursor == "a-last-read"
        # The overlay reads nothing more: its queue fills, and the next gift ends the feed.
        behind = [(f"b{i:06d}", t + 1 + i) for i in range(defaults.watch_queue_size_max + 1)]
        await _sent_many(gifting, stream, behind)
        for event_id, at in behind:
            await _publish(gifting, stream, event_id, at)
        with pytest.raises(ResourceExhausted) as slow:
            await asyncio.wait_for(anext(feed), STEP_S)
        assert slow.value.reason == "FEED_TOO_SLOW"
        # The stream goes on while the overlay reconnects.
        meanwhile = [(f"c{i:06d}", t + 10_000 + i) for i in range(100)]
        await _sent_many(gifting, stream, meanwhile)
        resumed = _watch(gifting, stream, "a-last-read")
        expected = [event_id for event_id, _ in behind + meanwhile]
        assert await _take(resumed, len(expected)) == expected
        await resumed.aclose()  # type: ignore[attr-defined]


async def _sent_many(gifting: Gifting, stream_id: str, gifts: list[tuple[str, int]]) -> None:
    """Gifts of `stream_id` (event id, sent at) recorded SENT in one transaction."""
    rows = [
        {
            "event_id": event_id,
            "idempotency_key": event_id,
            "client_key": event_id,
            "request_hash": "h",
            "kind": "GIFT",
            "stream_id": stream_id,
            "creator_id": "c",
            "sender_id": "viewer",
            "gift_id": "rose",
            "quantity": 1,
            "unit_price_coins": 1,
            "coins": 1,
            "status": "SENT",
            "created_at_us": at - 1_000,
            "updated_at_us": at,
        }
        for event_id, at in gifts
    ]
    async with gifting.db.unit_of_work() as uow:
        await uow.conn.execute(insert(gift_events), rows)
        await uow.commit()
