"""A cancelled gift keeps its idempotency key, on SQLite and PostgreSQL, on both saga paths.

A gift the wallet refused is cancelled. A retry of the same request may send it later (after a
top-up, say), as a new gift under the same key; a different request under that key is refused
as IDEMPOTENCY_KEY_REUSED, never charged. Concurrent retries of a cancelled gift send one gift.

Gifting's use cases over a real database of their own; the wallet is a small in-memory ledger
with the wallet's contract for these calls (each spend keyed by the gift's id, a cancelled key
refused for good), so the test can refuse a spend and then allow it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import delete, false, select, update

from livegifts.gifting.v1 import gifting_pb2
from services.common.errors import DomainError
from services.common.outbox import Outbox
from services.common.sql import one_of
from services.gifting import usecases
from services.gifting.keyrows import KeyOnlyPruner
from services.gifting.storage import common, content_unlocks, gift_events, streams
from services.gifting.usecases import Gifting
from tests.integration.conftest import gifting_on
from tests.integration.helpers import domain_reason
from tests.integration.pglocks import wait_for_a_lock_waiter_or_the_end
from tests.support.gifting import Ledger


@pytest.fixture(params=[True, False], ids=["group-commit", "one-by-one"])
async def gifting(empty_database: str, request: pytest.FixtureRequest) -> AsyncIterator[Gifting]:
    async with gifting_on(empty_database, pool_size=8, wallet=Ledger(), group_commit=request.param) as gifting:
        yield gifting


async def _rows_of(g: Gifting, key: str) -> list[tuple[str, str | None]]:
    """(status, idempotency key) of every gift first recorded under `key`, oldest first."""
    e = gift_events.c
    async with g.db.unit_of_work(readonly=True) as uow:
        rows = await uow.conn.execute(
            select(e.status, e.idempotency_key).where(e.client_key == key).order_by(e.created_at_us, e.event_id)
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]


async def _three_pandas_refused(gifting: Gifting) -> tuple[gifting_pb2.Stream, gifting_pb2.SendGiftRequest]:
    """A new stream, and three pandas (15 coins) to it from "v", who holds 10, under key "k":
    refused, the gift recorded CANCELLED. The stream and the request, to retry."""
    wallet: Ledger = gifting.wallet
    wallet.coins["v"] = 10
    stream = await gifting.start_stream(gifting_pb2.StartStreamRequest(creator_id="c", title="t", idempotency_key="s"))
    panda3 = gifting_pb2.SendGiftRequest(
        stream_id=stream.stream_id, sender_id="v", gift_id="panda", quantity=3, idempotency_key="k"
    )
    assert await domain_reason(gifting.send_gift(panda3)) == "INSUFFICIENT_COINS"
    return stream, panda3


async def test_a_cancelled_gifts_key_refuses_other_requests_and_sends_its_own_once(gifting: Gifting) -> None:
    wallet: Ledger = gifting.wallet
    stream, panda3 = await _three_pandas_refused(gifting)
    assert await _rows_of(gifting, "k") == [("CANCELLED", "k")]

    panda1 = gifting_pb2.SendGiftRequest()
    panda1.CopyFrom(panda3)
    panda1.quantity = 1  # 5 coins: the ledger would pay for it
    tip = gifting_pb2.SendTipRequest(stream_id=stream.stream_id, sender_id="v", coins=5, idempotency_key="k")
    spends = len(wallet.attempts)
    assert await domain_reason(gifting.send_gift(panda1)) == "IDEMPOTENCY_KEY_REUSED"
    assert await domain_reason(gifting.send_tip(tip)) == "IDEMPOTENCY_KEY_REUSED"
    batch = await gifting.send_gifts(gifting_pb2.SendGiftsRequest(gifts=[panda1]))
    assert batch.results[0].error.reason == "IDEMPOTENCY_KEY_REUSED"
    assert len(wallet.attempts) == spends and wallet.coins["v"] == 10  # nothing was even asked

    # After a top-up, five concurrent retries and a batch retry: one new gift, charged once.
    wallet.coins["v"] = 100
    sent = await asyncio.gather(*(gifting.send_gift(panda3) for _ in range(5)))
    assert {r.gift_event_id for r in sent} == {sent[0].gift_event_id}
    assert sent[0].status == gifting_pb2.GIFT_STATUS_SENT and sent[0].sender_balance == 85
    again = await gifting.send_gifts(gifting_pb2.SendGiftsRequest(gifts=[panda3]))
    assert again.results[0].receipt.gift_event_id == sent[0].gift_event_id
    assert await domain_reason(gifting.send_gift(panda1)) == "IDEMPOTENCY_KEY_REUSED"
    assert wallet.coins["v"] == 85 and len(wallet.spent) == 1
    assert await _rows_of(gifting, "k") == [("CANCELLED", None), ("SENT", "k")]


async def test_a_retry_of_a_cancelled_gift_is_checked_anew_and_keeps_the_key_when_refused(gifting: Gifting) -> None:
    wallet: Ledger = gifting.wallet
    stream = await gifting.start_stream(gifting_pb2.StartStreamRequest(creator_id="c", title="t", idempotency_key="s"))
    tip = gifting_pb2.SendTipRequest(stream_id=stream.stream_id, sender_id="v", coins=7, idempotency_key="k")
    assert await domain_reason(gifting.send_tip(tip)) == "INSUFFICIENT_COINS"
    await gifting.end_stream(gifting_pb2.EndStreamRequest(stream_id=stream.stream_id, idempotency_key="e"))
    wallet.coins["v"] = 100
    items = gifting_pb2.SendGiftsRequest(
        gifts=[
            gifting_pb2.SendGiftRequest(
                stream_id=stream.stream_id, sender_id="v", gift_id="rose", quantity=1, idempotency_key="k"
            )
        ]
    )
    assert await domain_reason(gifting.send_tip(tip)) == "STREAM_NOT_LIVE"  # checked as a new tip would be
    assert (await gifting.send_gifts(items)).results[0].error.reason == "IDEMPOTENCY_KEY_REUSED"
    assert await _rows_of(gifting, "k") == [("CANCELLED", "k")]
    assert wallet.coins["v"] == 100


async def test_a_cancelled_unlocks_key_unlocks_only_its_own_content(gifting: Gifting) -> None:
    wallet: Ledger = gifting.wallet

    async def content(n: int) -> str:
        req = gifting_pb2.CreateContentRequest(creator_id="c", title="t", price_coins=30, idempotency_key=f"c{n}")
        return (await gifting.create_content(req)).content_id

    first, second = await content(1), await content(2)
    unlock = gifting_pb2.UnlockContentRequest(user_id="v", content_id=first, idempotency_key="k")
    assert await domain_reason(gifting.unlock_content(unlock)) == "INSUFFICIENT_COINS"
    wallet.coins["v"] = 100
    other = gifting_pb2.UnlockContentRequest(user_id="v", content_id=second, idempotency_key="k")
    assert await domain_reason(gifting.unlock_content(other)) == "IDEMPOTENCY_KEY_REUSED"
    receipt = await gifting.unlock_content(unlock)
    assert (receipt.already_unlocked, receipt.sender_balance) == (False, 70)
    assert (await gifting.check_access("v", first)).has_access
    assert not (await gifting.check_access("v", second)).has_access
    assert await _rows_of(gifting, "k") == [("CANCELLED", None), ("SENT", "k")]


async def test_an_unlock_answered_by_an_earlier_unlock_keeps_its_key_from_other_requests(gifting: Gifting) -> None:
    wallet: Ledger = gifting.wallet
    wallet.coins["v"] = 100
    stream = await gifting.start_stream(gifting_pb2.StartStreamRequest(creator_id="c", title="t", idempotency_key="s"))
    first, second = [
        (
            await gifting.create_content(
                gifting_pb2.CreateContentRequest(creator_id="c", title="t", price_coins=30, idempotency_key=f"c{n}")
            )
        ).content_id
        for n in (1, 2)
    ]
    await gifting.unlock_content(gifting_pb2.UnlockContentRequest(user_id="v", content_id=first, idempotency_key="k1"))
    again = gifting_pb2.UnlockContentRequest(user_id="v", content_id=first, idempotency_key="k2")
    receipt = await gifting.unlock_content(again)
    assert (receipt.already_unlocked, receipt.sender_balance) == (True, 0)

    # Gifts, tips and unlocks share one key space: "k2" answered that unlock, and nothing else.
    rose = gifting_pb2.SendGiftRequest(stream_id=stream.stream_id, sender_id="v", gift_id="rose", quantity=1)
    rose.idempotency_key = "k2"
    tip = gifting_pb2.SendTipRequest(stream_id=stream.stream_id, sender_id="v", coins=5, idempotency_key="k2")
    other = gifting_pb2.UnlockContentRequest(user_id="v", content_id=second, idempotency_key="k2")
    assert await domain_reason(gifting.send_gift(rose)) == "IDEMPOTENCY_KEY_REUSED"
    assert (await gifting.send_gifts(gifting_pb2.SendGiftsRequest(gifts=[rose]))).results[
        0
    ].error.reason == "IDEMPOTENCY_KEY_REUSED"
    assert await domain_reason(gifting.send_tip(tip)) == "IDEMPOTENCY_KEY_REUSED"
    assert await domain_reason(gifting.unlock_content(other)) == "IDEMPOTENCY_KEY_REUSED"
    assert await gifting.unlock_content(again) == receipt
    assert wallet.coins["v"] == 70
    assert not (await gifting.check_access("v", second)).has_access
    audit = await gifting.audit()
    assert (audit.gifts_sent, audit.gifts_pending, audit.gifts_cancelled, audit.coins_sent) == (1, 0, 0, 30)

    # Were the earlier unlock cancelled after all (as `_cancel` leaves a gift the wallet never
    # charged: CANCELLED, its claim gone), the retry unlocks anew, under its own key.
    e = gift_events.c
    async with gifting.db.unit_of_work() as uow:
        await uow.conn.execute(update(gift_events).where(e.client_key == "k1").values(status="CANCELLED"))
        await uow.conn.execute(delete(content_unlocks))
        await uow.commit()
    anew = await gifting.unlock_content(again)
    assert (anew.already_unlocked, anew.sender_balance) == (False, 40)
    assert await domain_reason(gifting.send_tip(tip)) == "IDEMPOTENCY_KEY_REUSED"
    assert await gifting.unlock_content(again) == anew
    assert [status for status, _ in await _rows_of(gifting, "k2")] == ["KEY_ONLY", "SENT"]


async def test_replicas_racing_unlocks_answered_elsewhere_and_tips_under_their_keys_give_each_key_one_request(
    gifting: Gifting,
) -> None:
    # Two replicas (their own batchers) on one database; every request twice, in one shuffled burst.
    other = Gifting(gifting.db, Outbox(common.outbox), gifting.wallet, gifting.settings)
    wallet: Ledger = gifting.wallet
    wallet.coins["v"] = 1000
    stream = await gifting.start_stream(gifting_pb2.StartStreamRequest(creator_id="c", title="t", idempotency_key="s"))
    content = await gifting.create_content(
        gifting_pb2.CreateContentRequest(creator_id="c", title="t", price_coins=30, idempotency_key="c")
    )
    first = await gifting.unlock_content(
        gifting_pb2.UnlockContentRequest(user_id="v", content_id=content.content_id, idempotency_key="k")
    )
    keys = [f"k{n}" for n in range(8)]
    unlocks = [
        gifting_pb2.UnlockContentRequest(user_id="v", content_id=content.content_id, idempotency_key=k) for k in keys
    ]
    tips = [
        gifting_pb2.SendTipRequest(stream_id=stream.stream_id, sender_id="v", coins=5, idempotency_key=k) for k in keys
    ]
    burst = [*unlocks, *tips] * 2
    random.Random(7).shuffle(burst)

    async def call(n: int, req: Any) -> tuple[str, str]:
        g = (gifting, other)[n % 2]
        try:
            if isinstance(req, gifting_pb2.UnlockContentRequest):
                receipt = await g.unlock_content(req)
                assert (receipt.already_unlocked, receipt.gift_event_id) == (True, first.gift_event_id)
                return req.idempotency_key, "unlock"
            await g.send_tip(req)
            return req.idempotency_key, "tip"
        except DomainError as exc:
            assert exc.reason == "IDEMPOTENCY_KEY_REUSED"
            return req.idempotency_key, ""

    answered = await asyncio.wait_for(asyncio.gather(*(call(n, r) for n, r in enumerate(burst))), 60)
    winners = {k: {what for key, what in answered if key == k and what} for k in keys}
    assert all(len(w) == 1 for w in winners.values()), winners  # one request per key, whichever came first
    tipped = sum(1 for w in winners.values() if w == {"tip"})
    assert wallet.coins["v"] == 1000 - 30 - 5 * tipped


async def _old_release_cancels(g: Gifting, key: str) -> None:
    """What a pod of the release before 4f92b45 leaves when it cancels the gift under `key`: no key.

    During a rolling update such pods keep serving after the init container ran migration 0007.
    """
    e = gift_events.c
    async with g.db.unit_of_work() as uow:
        await uow.conn.execute(
            update(gift_events).where(e.idempotency_key == key, e.status == "CANCELLED").values(idempotency_key=None)
        )
        await uow.commit()


async def test_a_gift_an_old_release_cancels_during_the_rollout_gets_its_key_back(gifting: Gifting) -> None:
    wallet: Ledger = gifting.wallet
    stream, panda3 = await _three_pandas_refused(gifting)
    await _old_release_cancels(gifting, "k")
    assert await _rows_of(gifting, "k") == [("CANCELLED", None)]

    assert await gifting.restore_keys_once() == 1  # the background loop's round, after start and periodically
    assert await _rows_of(gifting, "k") == [("CANCELLED", "k")]
    tip = gifting_pb2.SendTipRequest(stream_id=stream.stream_id, sender_id="v", coins=5, idempotency_key="k")
    assert await domain_reason(gifting.send_tip(tip)) == "IDEMPOTENCY_KEY_REUSED"
    assert wallet.coins["v"] == 10

    # Its own retry still sends it, once; the cancelled gift then gave its key away for good.
    wallet.coins["v"] = 100
    assert (await gifting.send_gift(panda3)).sender_balance == 85
    assert await _rows_of(gifting, "k") == [("CANCELLED", None), ("SENT", "k")]
    assert await gifting.restore_keys_once() == 0  # nothing left to look at


async def test_the_key_restorer_leaves_a_key_to_the_gift_that_holds_it_and_gives_it_to_the_latest(
    gifting: Gifting,
) -> None:
    wallet: Ledger = gifting.wallet
    stream = await gifting.start_stream(gifting_pb2.StartStreamRequest(creator_id="c", title="t", idempotency_key="s"))
    rose = gifting_pb2.SendGiftRequest(
        stream_id=stream.stream_id, sender_id="v", gift_id="rose", quantity=1, idempotency_key="h"
    )
    tip = gifting_pb2.SendTipRequest(stream_id=stream.stream_id, sender_id="v", coins=5, idempotency_key="l")
    # "h": cancelled by an old pod, then a retry sent before the restorer's round: the sent gift keeps it.
    assert await domain_reason(gifting.send_gift(rose)) == "INSUFFICIENT_COINS"
    await _old_release_cancels(gifting, "h")
    wallet.coins["v"] = 100
    await gifting.send_gift(rose)
    # "l": cancelled twice by old pods (a different request the old release took under it): the latest gets it.
    wallet.coins["v"] = 0
    rose_l = gifting_pb2.SendGiftRequest(
        stream_id=stream.stream_id, sender_id="v", gift_id="rose", quantity=1, idempotency_key="l"
    )
    assert await domain_reason(gifting.send_gift(rose_l)) == "INSUFFICIENT_COINS"
    await _old_release_cancels(gifting, "l")
    assert await domain_reason(gifting.send_tip(tip)) == "INSUFFICIENT_COINS"
    await _old_release_cancels(gifting, "l")

    assert await gifting.restore_keys_once() == 3
    assert await _rows_of(gifting, "h") == [("CANCELLED", None), ("SENT", "h")]
    assert await _rows_of(gifting, "l") == [("CANCELLED", None), ("CANCELLED", "l")]
    assert await gifting.restore_keys_once() == 0  # every row settled leaves the index
    wallet.coins["v"] = 100
    assert (await gifting.send_tip(tip)).sender_balance == 95  # the latest request's retry sends it


async def test_a_request_recorded_during_the_key_restorers_round_keeps_the_key(
    gifting: Gifting, monkeypatch: pytest.MonkeyPatch
) -> None:
    wallet: Ledger = gifting.wallet
    stream = await gifting.start_stream(gifting_pb2.StartStreamRequest(creator_id="c", title="t", idempotency_key="s"))
    rose = gifting_pb2.SendGiftRequest(
        stream_id=stream.stream_id, sender_id="v", gift_id="rose", quantity=1, idempotency_key="k"
    )
    assert await domain_reason(gifting.send_gift(rose)) == "INSUFFICIENT_COINS"
    await _old_release_cancels(gifting, "k")

    # The retry is recorded right after the restorer's look-up, and (as a commit on PostgreSQL
    # between two statements can) after its pre-check too, which is blinded here: the unique key
    # decides, the restore of that key fails and the cancelled gift is marked instead.
    wallet.coins["v"] = 100
    opened = gifting.db.unit_of_work
    raced: list[Any] = []

    @asynccontextmanager
    async def unit_of_work(**kw: Any) -> AsyncIterator[Any]:
        async with opened(**kw) as uow:
            yield uow
        if kw.get("readonly") and not raced:
            raced.append(None)
            raced[0] = await gifting.send_gift(rose)

    def blind_pre_check(dialect: str, column: Any, values: Any) -> Any:
        return false() if column is gift_events.c.idempotency_key else one_of(dialect, column, values)

    monkeypatch.setattr(gifting.db, "unit_of_work", unit_of_work)
    monkeypatch.setattr(usecases, "one_of", blind_pre_check)
    assert await gifting.restore_keys_once() == 1
    monkeypatch.undo()
    assert raced and raced[0].status == gifting_pb2.GIFT_STATUS_SENT
    assert await _rows_of(gifting, "k") == [("CANCELLED", None), ("SENT", "k")]
    assert await gifting.restore_keys_once() == 0  # the cancelled gift is marked: its key moved on
    assert wallet.coins["v"] == 99 and len(wallet.spent) == 1


async def test_no_gift_is_recorded_on_a_stream_whose_end_committed_while_it_was_being_recorded(
    gifting: Gifting,
) -> None:
    """EndStream's update is under way (uncommitted) when a gift's step 1 reads the stream: on
    PostgreSQL, a plain read sees it LIVE and records the gift, which becomes a gift on a stream
    that had ended by then. Step 1 holds the stream's row, so it waits for the end and refuses."""
    wallet: Ledger = gifting.wallet
    wallet.coins["v"] = 10
    stream = await gifting.start_stream(gifting_pb2.StartStreamRequest(creator_id="c", title="t", idempotency_key="s"))
    # Known already (its creator and the sender's eligibility), so step 1 is one write transaction.
    first = gifting_pb2.SendGiftRequest(stream_id=stream.stream_id, sender_id="v", gift_id="rose", quantity=1)
    await gifting.send_gift(gifting_pb2.SendGiftRequest(idempotency_key="g0", **_fields(first)))

    async with gifting.db.unit_of_work() as ending:  # EndStream, between its update and its commit
        await ending.conn.execute(
            update(streams).where(streams.c.stream_id == stream.stream_id).values(status="ENDED", ended_at_us=1)
        )
        late = asyncio.ensure_future(
            domain_reason(gifting.send_gift(gifting_pb2.SendGiftRequest(idempotency_key="g1", **_fields(first))))
        )
        if gifting.db.dialect == "postgresql":
            # Step 1 waits for the stream's row: seen, not assumed after a pause it may outlast.
            await wait_for_a_lock_waiter_or_the_end(gifting.db, late, 10)
            assert not late.done(), "the gift's step 1 did not wait for the stream's row"
        else:
            await asyncio.sleep(0.5)  # the gift's step 1 runs meanwhile (or waits for the write lock)
        await ending.commit()
    assert await asyncio.wait_for(late, 10) == "STREAM_NOT_LIVE"
    assert await _rows_of(gifting, "g1") == []


def _fields(req: gifting_pb2.SendGiftRequest) -> dict[str, Any]:
    return {f.name: v for f, v in req.ListFields()}


async def test_an_answered_unlocks_key_row_goes_after_the_retention_and_a_retry_then_gets_the_same_answer(
    gifting: Gifting,
) -> None:
    """KEY_ONLY rows are idempotency records: deleted after IDEMPOTENCY_RETENTION_DAYS, and only they
    (the ledger stays however old); nothing but the key's look-up notices."""
    wallet: Ledger = gifting.wallet
    wallet.coins["v"] = 100
    stream = await gifting.start_stream(gifting_pb2.StartStreamRequest(creator_id="c", title="t", idempotency_key="s"))
    content = (
        await gifting.create_content(
            gifting_pb2.CreateContentRequest(creator_id="c", title="t", price_coins=30, idempotency_key="c")
        )
    ).content_id

    def unlock(key: str) -> gifting_pb2.UnlockContentRequest:
        return gifting_pb2.UnlockContentRequest(user_id="v", content_id=content, idempotency_key=key)

    await gifting.unlock_content(unlock("k1"))  # charged: SENT
    answered = await gifting.unlock_content(unlock("k2"))  # answered by k1's: KEY_ONLY
    tip = gifting_pb2.SendTipRequest(stream_id=stream.stream_id, sender_id="v", coins=500, idempotency_key="k3")
    assert await domain_reason(gifting.send_tip(tip)) == "INSUFFICIENT_COINS"  # CANCELLED
    rose = gifting_pb2.SendGiftRequest(stream_id=stream.stream_id, sender_id="v", gift_id="rose", quantity=1)
    rose.idempotency_key = "k4"
    await gifting.send_gift(rose)  # SENT
    # All of them past the retention; then one more answered unlock, within it.
    retention_us = int(gifting.settings.idempotency_retention_days * 86_400 * 1_000_000)
    e = gift_events.c
    async with gifting.db.unit_of_work() as uow:
        await uow.conn.execute(update(gift_events).values(created_at_us=e.created_at_us - retention_us - 1))
        await uow.commit()
    await gifting.unlock_content(unlock("k5"))
    audit = await gifting.audit()

    pruner = KeyOnlyPruner(gifting.db, gifting.settings)
    before = REGISTRY.get_sample_value("livegifts_key_only_rows_pruned_total") or 0.0
    assert await pruner.prune_once() == 1
    assert REGISTRY.get_sample_value("livegifts_key_only_rows_pruned_total") == before + 1
    assert {k: await _rows_of(gifting, k) for k in ("k1", "k2", "k3", "k4", "k5")} == {
        "k1": [("SENT", "k1")],
        "k2": [],
        "k3": [("CANCELLED", "k3")],
        "k4": [("SENT", "k4")],
        "k5": [("KEY_ONLY", "k5")],
    }
    assert await gifting.audit() == audit
    assert (await gifting.check_access("v", content)).has_access

    # A retry after the retention is answered by the earlier unlock again, and records its key again.
    assert await gifting.unlock_content(unlock("k2")) == answered
    assert await _rows_of(gifting, "k2") == [("KEY_ONLY", "k2")]
    assert wallet.coins["v"] == 69 and len(wallet.spent) == 2  # k1's 30 and k4's rose, nothing more
    assert await pruner.prune_once() == 0
