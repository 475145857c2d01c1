"""An operator changes the gift catalog while gifts for it are in flight, on SQLite and PostgreSQL.

A gift is charged the price it was recorded at (step 1 of the saga), whatever the catalog says
when the wallet answers or when the event is published: the receipt, the wallet's spend and the
`gifting.gift.sent` event agree, and a retry under the gift's key answers the first gift, never a
new charge at the new price. The operator's mistakes are refused with stable reasons.
"""

from __future__ import annotations

import asyncio
import unicodedata
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select

from livegifts.gifting.v1 import events_pb2, gifting_pb2
from services.common.errors import DomainError
from services.gifting.storage import common
from services.gifting.usecases import Gifting
from tests.integration.conftest import gifting_on
from tests.integration.helpers import domain_reason
from tests.support.gifting import Ledger


class GatedLedger(Ledger):
    """The ledger, whose spends wait for `gate` once `hold` is set (a wallet slow to answer)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.hold = False
        self.waiting = asyncio.Event()
        self.amounts: dict[str, int] = {}  # spend key -> amount asked

    async def _wait(self, reqs: list[Any]) -> None:
        for r in reqs:
            self.amounts.setdefault(r.idempotency_key, r.amount)
        if self.hold:
            self.waiting.set()
            await self.gate.wait()

    async def Spend(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        await self._wait([req])
        return await super().Spend(req, timeout)

    async def SpendMany(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        await self._wait(list(req.spends))
        return await super().SpendMany(req, timeout)


@pytest.fixture(params=[True, False], ids=["group-commit", "one-by-one"])
async def gifting(empty_database: str, request: pytest.FixtureRequest) -> AsyncIterator[Gifting]:
    async with gifting_on(empty_database, pool_size=8, wallet=GatedLedger(), group_commit=request.param) as gifting:
        yield gifting


async def _upsert(g: Gifting, key: str, **fields: Any) -> gifting_pb2.Gift:
    return await g.upsert_gift(gifting_pb2.UpsertGiftRequest(idempotency_key=key, **fields), "ops-alice")


async def _sent_events(g: Gifting) -> dict[str, events_pb2.GiftSent]:
    o = common.outbox.c
    async with g.db.unit_of_work(readonly=True) as uow:
        rows = (await uow.conn.execute(select(o.payload).where(o.subject == "gifting.gift.sent"))).all()
    events = [events_pb2.GiftSent.FromString(r.payload) for r in rows]
    return {e.event_id: e for e in events}


async def _stream(g: Gifting) -> str:
    req = gifting_pb2.StartStreamRequest(creator_id="c", title="t", idempotency_key="s")
    return (await g.start_stream(req)).stream_id


@pytest.mark.parametrize("change", ["reprice", "retire"])
async def test_a_gift_in_flight_when_its_price_changes_is_charged_and_published_at_its_recorded_price(
    gifting: Gifting, change: str
) -> None:
    wallet: GatedLedger = gifting.wallet
    wallet.coins["v"] = 1_000
    await _upsert(gifting, "add", gift_id="comet", name="Comet", price_coins=7)
    stream_id = await _stream(gifting)
    send = gifting_pb2.SendGiftRequest(
        stream_id=stream_id, sender_id="v", gift_id="comet", quantity=3, idempotency_key="k"
    )
    wallet.hold = True
    call = asyncio.create_task(gifting.send_gift(send))
    await asyncio.wait_for(wallet.waiting.wait(), 10)  # recorded PENDING at 7, the wallet not yet answered
    if change == "reprice":
        await _upsert(gifting, "op", gift_id="comet", price_coins=50)
    else:
        await _upsert(gifting, "op", gift_id="comet", retired=True)
    wallet.gate.set()
    receipt = await asyncio.wait_for(call, 10)
    assert receipt.coins == 21 and receipt.status == gifting_pb2.GIFT_STATUS_SENT
    assert wallet.amounts[receipt.gift_event_id] == 21 and wallet.coins["v"] == 979
    event = (await _sent_events(gifting))[receipt.gift_event_id]
    assert (event.coins, event.quantity, event.gift_id) == (21, 3, "comet")

    # A retry under the key after the change: the first gift's answer, no second charge.
    again = await gifting.send_gift(send)
    assert (again.gift_event_id, again.coins) == (receipt.gift_event_id, 21)
    batch = await gifting.send_gifts(gifting_pb2.SendGiftsRequest(gifts=[send]))
    assert (batch.results[0].receipt.gift_event_id, batch.results[0].receipt.coins) == (receipt.gift_event_id, 21)
    assert wallet.coins["v"] == 979 and len(wallet.spent) == 1
    assert len(await _sent_events(gifting)) == 1


async def test_a_batch_in_flight_when_its_gift_is_repriced_charges_each_item_its_recorded_price(
    gifting: Gifting,
) -> None:
    wallet: GatedLedger = gifting.wallet
    wallet.coins["v"] = 1_000
    await _upsert(gifting, "add", gift_id="comet", name="Comet", price_coins=7)
    stream_id = await _stream(gifting)
    items = [
        gifting_pb2.SendGiftRequest(
            stream_id=stream_id, sender_id="v", gift_id="comet", quantity=q, idempotency_key=f"k{q}"
        )
        for q in (1, 2)
    ]
    wallet.hold = True
    call = asyncio.create_task(gifting.send_gifts(gifting_pb2.SendGiftsRequest(gifts=items)))
    await asyncio.wait_for(wallet.waiting.wait(), 10)
    await _upsert(gifting, "op", gift_id="comet", price_coins=50)
    wallet.gate.set()
    results = (await asyncio.wait_for(call, 10)).results
    assert [r.receipt.coins for r in results] == [7, 14]
    events = await _sent_events(gifting)
    assert sorted(e.coins for e in events.values()) == [7, 14]
    assert wallet.coins["v"] == 1_000 - 21
    # The batch again: the same gifts.
    again = (await gifting.send_gifts(gifting_pb2.SendGiftsRequest(gifts=items))).results
    assert [r.receipt.gift_event_id for r in again] == [r.receipt.gift_event_id for r in results]
    assert wallet.coins["v"] == 1_000 - 21


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"name": "Zero", "price_coins": 0}, "MISSING_FIELD"),
        ({"name": "Negative", "price_coins": -5}, "AMOUNT_NOT_POSITIVE"),
        ({"name": "Huge", "price_coins": 2**63 - 1}, "AMOUNT_TOO_LARGE"),
        ({"name": "Min", "price_coins": -(2**63)}, "AMOUNT_NOT_POSITIVE"),
    ],
)
async def test_a_new_gifts_bad_price_is_refused_with_a_stable_reason(
    gifting: Gifting, fields: dict[str, Any], reason: str
) -> None:
    assert await domain_reason(_upsert(gifting, "bad", gift_id="g1", **fields)) == reason
    listed = await gifting.list_gifts(include_retired=True)
    assert "g1" not in {g.gift_id for g in listed.gifts}


async def test_the_dearest_gift_at_the_most_quantity_is_refused_not_overflowed(gifting: Gifting) -> None:
    wallet: GatedLedger = gifting.wallet
    wallet.coins["v"] = 2**62
    top = await _upsert(gifting, "add", gift_id="max", name="Max", price_coins=1_000_000)
    stream_id = await _stream(gifting)
    send = gifting_pb2.SendGiftRequest(
        stream_id=stream_id, sender_id="v", gift_id="max", quantity=gifting.settings.quantity_max, idempotency_key="k"
    )
    assert top.price_coins == 1_000_000
    assert await domain_reason(gifting.send_gift(send)) == "INVALID_QUANTITY"


@pytest.mark.parametrize(
    "twin",
    ["COMET", "Comet", unicodedata.normalize("NFD", "comèt"), "ｃｏｍｅｔ"],
)
async def test_a_new_gift_id_that_only_differs_by_case_or_normalization_is_refused(gifting: Gifting, twin: str) -> None:
    first = "comèt" if "è" in unicodedata.normalize("NFC", twin) else "comet"
    await _upsert(gifting, "add", gift_id=first, name="Comet", price_coins=7)
    reason = await domain_reason(_upsert(gifting, "twin", gift_id=twin, name="Comet 2", price_coins=9))
    assert reason == "GIFT_ID_TAKEN"
    listed = await gifting.list_gifts(include_retired=True)
    assert twin not in {g.gift_id for g in listed.gifts}


async def test_two_concurrent_twins_create_one_gift(gifting: Gifting) -> None:
    for n in range(5):
        twins = [f"twin{n}", f"TWIN{n}", f"Twin{n}"]
        outcomes = await asyncio.gather(
            *(_upsert(gifting, f"t{n}-{t}", gift_id=t, name="Twin", price_coins=3) for t in twins),
            return_exceptions=True,
        )
        refused = [o for o in outcomes if isinstance(o, DomainError)]
        assert [o.reason for o in refused] == ["GIFT_ID_TAKEN"] * 2, outcomes
        listed = await gifting.list_gifts(include_retired=True)
        assert len({g.gift_id for g in listed.gifts} & set(twins)) == 1


async def test_each_catalog_change_logs_who_changed_what_from_what(
    gifting: Gifting, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="services.gifting.usecases"):
        await _upsert(gifting, "add", gift_id="comet", name="Comet", price_coins=7)
        await _upsert(gifting, "reprice", gift_id="comet", price_coins=9)
        await _upsert(gifting, "reprice", gift_id="comet", price_coins=9)  # a retry: no second line
        await _upsert(gifting, "retire", gift_id="comet", retired=True)
    lines = [r.__dict__ for r in caplog.records if r.getMessage() == "gift catalog changed"]
    fields = (
        "operator",
        "gift_id",
        "added",
        "changed",
        "price_coins",
        "previous_price_coins",
        "active",
        "previous_active",
    )
    assert [tuple(line.get(f) for f in fields) for line in lines] == [
        ("ops-alice", "comet", True, "gift_name,price_coins,active", 7, None, True, None),
        ("ops-alice", "comet", False, "price_coins", 9, 7, True, None),
        ("ops-alice", "comet", False, "active", 9, None, False, True),
    ]
