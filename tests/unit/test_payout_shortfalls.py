"""Payout's clawback shortfall settler against a real SQLite file: shortfalls that cannot settle
yet never keep the others waiting."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import insert, select

from livegifts.payout.v1 import payout_pb2
from services.payout.storage import clawback_shortfalls
from services.payout.usecases import SHORTFALL_BATCH
from tests.support.payout import consume, gift_event, open_coins_of, reversal

NOW_US = 1_795_305_600_000_000


async def test_shortfalls_that_cannot_settle_do_not_starve_one_that_can(setup) -> None:  # type: ignore[no-untyped-def]
    payout, _provider, _path = setup
    stuck = [f"{i:04d}" + uuid.uuid4().hex[:28] for i in range(SHORTFALL_BATCH)]  # ordered first
    async with payout.db.unit_of_work() as uow:
        rows = [
            {
                "reversal_event_id": rid,
                "purchase_id": f"p-{rid}",
                "sender_id": f"nobody-{rid}",  # whose gifts never arrive
                "kind": "CHARGED_BACK",
                "coins_open": 10,
                "reversed_at_us": NOW_US,
                "created_at_us": NOW_US,
                "updated_at_us": NOW_US,
            }
            for rid in stuck
        ]
        rows.append({**rows[0], "reversal_event_id": "ffff" + uuid.uuid4().hex[:28], "sender_id": "viewer"})
        rows[-1]["purchase_id"] = "p-viewer"
        await uow.conn.execute(insert(clawback_shortfalls), rows)
        # The viewer's gift arrives: 40 coins recorded before the reversal, to creator-c.
        await payout.credit_gifts(uow, [gift_event("creator-c", 40, at_s=NOW_US // 1_000_000 - 60)])
        await uow.commit()

    assert await payout.settle_shortfalls_once() == 0  # the first round: the stuck ones only
    assert await payout.settle_shortfalls_once() == 10  # the next one goes on where it stopped
    earned = await payout.get_earnings("creator-c")
    assert earned.diamonds_clawed_back == 5
    async with payout.db.unit_of_work(readonly=True) as uow:
        still_open = (
            await uow.conn.execute(
                select(clawback_shortfalls.c.reversal_event_id).where(clawback_shortfalls.c.coins_open > 0)
            )
        ).scalars()
        assert sorted(still_open) == sorted(stuck)
    assert earned.coins_received == 40 and isinstance(earned, payout_pb2.Earnings)


async def test_an_older_shortfall_is_settled_before_a_newer_one_takes_the_only_gift_both_may(setup) -> None:  # type: ignore[no-untyped-def]
    payout, _provider, _path = setup
    t = NOW_US // 1_000_000
    # Two chargebacks of the viewer's purchases, consumed before their gifts: the first at t, the
    # second at t + 200 (its id sorts first). Each purchase's 100 coins had gone to a gift: the
    # first's recorded at t - 50, the second's at t + 100, between the two chargebacks.
    await consume(payout, [reversal("b-older", t, 100), reversal("a-newer", t + 200, 100)])
    await consume(payout, gifts=[gift_event("creator-a", 100, at_s=t - 50)])
    await payout.settle_shortfalls_once()
    await consume(payout, gifts=[gift_event("creator-b", 100, at_s=t + 100)])
    await payout.settle_shortfalls_once()

    # The older chargeback can only take the gift recorded before it; the newer one either.
    assert await open_coins_of(payout) == 0
    clawed = [(await payout.get_earnings(c)).diamonds_clawed_back for c in ("creator-a", "creator-b")]
    assert clawed == [50, 50]


async def test_a_new_reversal_leaves_an_open_older_shortfall_the_gift_only_it_may_take(setup) -> None:  # type: ignore[no-untyped-def]
    payout, _provider, _path = setup
    t = NOW_US // 1_000_000
    await consume(payout, [reversal("older", t, 100)])  # its gift not consumed yet: a shortfall
    await consume(payout, gifts=[gift_event("creator-a", 100, at_s=t - 50)])  # it arrives ...
    # ... and, before the settler's round, a second chargeback whose gift (recorded after the
    # first chargeback) is still on its way.
    await consume(payout, [reversal("newer", t + 200, 100)])
    await consume(payout, gifts=[gift_event("creator-b", 100, at_s=t + 100)])
    await payout.settle_shortfalls_once()

    assert await open_coins_of(payout) == 0
    clawed = [(await payout.get_earnings(c)).diamonds_clawed_back for c in ("creator-a", "creator-b")]
    assert clawed == [50, 50]


async def test_the_age_of_the_oldest_open_shortfall_is_exported_and_0_once_none_is_open(setup) -> None:  # type: ignore[no-untyped-def]
    # LivegiftsClawbackShortfallOpen reads it: coins a reversal still owes, for hours, are gift
    # events that never came; an idle suite (none open) reads 0.
    from prometheus_client import REGISTRY
    from sqlalchemy import update

    from services.common.timeutil import now_us

    def oldest() -> float | None:
        return REGISTRY.get_sample_value("livegifts_clawback_shortfall_oldest_seconds")

    payout, _provider, _path = setup
    opened = now_us() - 2 * 3600 * 1_000_000
    row = {
        "purchase_id": "p-1",
        "sender_id": "nobody",  # whose gifts never arrive
        "kind": "CHARGED_BACK",
        "coins_open": 10,
        "reversed_at_us": opened,
        "updated_at_us": opened,
    }
    async with payout.db.unit_of_work() as uow:
        await uow.conn.execute(
            insert(clawback_shortfalls),
            [
                {**row, "reversal_event_id": "r-old", "created_at_us": opened},
                {**row, "reversal_event_id": "r-new", "created_at_us": opened + 3600 * 1_000_000},
                {**row, "reversal_event_id": "r-settled", "created_at_us": opened - 3600 * 1_000_000, "coins_open": 0},
            ],
        )
        await uow.commit()
    assert await payout.settle_shortfalls_once() == 0
    age = oldest()
    assert age is not None and 2 * 3600 <= age < 3 * 3600, age  # r-old's: the settled one counts no more
    async with payout.db.unit_of_work() as uow:
        await uow.conn.execute(update(clawback_shortfalls).values(coins_open=0))
        await uow.commit()
    await payout.settle_shortfalls_once()
    assert oldest() == 0


async def test_a_shortfall_whose_settling_fails_every_round_still_ages_in_the_gauge(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # A shortfall the settler fails on (its round raises, run_every retries it) is one that stays
    # open: LivegiftsClawbackShortfallOpen must see it age. The gauge was set only at the end of a
    # round that went through, so it kept a new pod's 0 (or its last value) for good.
    from prometheus_client import REGISTRY

    from services.common.metrics import CLAWBACK_SHORTFALL_OLDEST, CLAWBACK_SHORTFALL_OPEN
    from services.common.timeutil import now_us

    payout, _provider, _path = setup
    opened = now_us() - 2 * 3600 * 1_000_000
    async with payout.db.unit_of_work() as uow:
        await uow.conn.execute(
            insert(clawback_shortfalls),
            {
                "reversal_event_id": "r-poison",
                "purchase_id": "p-poison",
                "sender_id": "nobody",
                "kind": "CHARGED_BACK",
                "coins_open": 10,
                "reversed_at_us": opened,
                "created_at_us": opened,
                "updated_at_us": opened,
            },
        )
        await uow.commit()

    async def fails(uow: object, reversal_event_id: str) -> int:
        # The database gone as the settling runs (one shortfall's own error no longer ends the round).
        raise sa_exc.OperationalError("SELECT", {}, Exception(f"cannot settle {reversal_event_id}"))

    monkeypatch.setattr(payout, "_settle_shortfall", fails)
    CLAWBACK_SHORTFALL_OLDEST.set(0)  # a new pod's, before its first round
    CLAWBACK_SHORTFALL_OPEN.set(0)
    with pytest.raises(
        sa_exc.OperationalError, match="cannot settle r-poison"
    ):  # the round's own error, for its log line
        await payout.settle_shortfalls_once()
    age = REGISTRY.get_sample_value("livegifts_clawback_shortfall_oldest_seconds")
    assert age is not None and 2 * 3600 <= age < 3 * 3600, age
    assert REGISTRY.get_sample_value("livegifts_clawback_shortfall_open_coins") == 10


async def test_an_older_reversal_applied_after_a_newer_one_still_settles(setup) -> None:  # type: ignore[no-untyped-def]
    payout, _provider, _path = setup
    t = NOW_US // 1_000_000
    # The wallet's view: a gift of 100 coins at t - 50 paid by the first purchase, charged back at
    # t; the second purchase repaid that debt and paid a gift of 100 at t + 100, charged back at
    # t + 200. Each reversal claims 100 coins, 200 in all, and both gifts were sent before t + 200.
    await consume(payout, gifts=[gift_event("creator-a", 100, at_s=t - 50)])
    await consume(payout, [reversal("newer", t + 200, 100)])  # applied first: takes the only gift there is
    await consume(payout, [reversal("older", t, 100)])  # redelivered after it: nothing left before t
    await consume(payout, gifts=[gift_event("creator-b", 100, at_s=t + 100)])
    await payout.settle_shortfalls_once()

    # The older one stands in for the newer one: creator-b's gift, which the newer one would have
    # taken, is taken in its place (before: 100 coins open for good, creator-b kept 50 diamonds).
    assert await open_coins_of(payout) == 0
    clawed = [(await payout.get_earnings(c)).diamonds_clawed_back for c in ("creator-a", "creator-b")]
    assert clawed == [50, 50]


async def test_an_older_reversal_stands_in_only_for_what_newer_ones_took_before_it(setup) -> None:  # type: ignore[no-untyped-def]
    payout, _provider, _path = setup
    t = NOW_US // 1_000_000
    # Gifts of 40 at t - 50 and 60 at t + 150; the newer chargeback (t + 200) applied first takes
    # both, only 40 of them from before the older chargeback (t).
    await consume(payout, gifts=[gift_event("creator-a", 40, at_s=t - 50), gift_event("creator-c", 60, at_s=t + 150)])
    await consume(payout, [reversal("newer", t + 200, 100)])
    await consume(payout, [reversal("older", t, 100)])
    # Gifts between the two arrive late: the older one may take 40 of them in the newer one's
    # place, no more (in order it would have taken the 40 before it, the newer one 100 after).
    await consume(payout, gifts=[gift_event("creator-b", 100, at_s=t + 100)])
    await payout.settle_shortfalls_once()
    await consume(payout, gifts=[gift_event("creator-d", 100, at_s=t + 120)])
    await payout.settle_shortfalls_once()

    assert await open_coins_of(payout) == 60
    clawed = [(await payout.get_earnings(c)).diamonds_clawed_back for c in ("creator-a", "creator-b", "creator-c")]
    assert clawed == [20, 20, 30]
    assert (await payout.get_earnings("creator-d")).diamonds_clawed_back == 0


async def test_a_gift_sent_by_a_clock_behind_its_recording_still_counts_as_clawed_after_a_reversal(setup) -> None:  # type: ignore[no-untyped-def]
    # A gift's recorded_at is its row's creation (gifting's pod), its occurred_at the SENT flip,
    # perhaps by the sweeper on a pod whose clock is behind: recorded can be after occurred. A
    # reversal between the two must still see the gift's clawed coins as taken after it
    # (`_stand_in_takes`), or an older reversal stands in with cover that is already used.
    payout, _provider, _path = setup
    t = NOW_US // 1_000_000
    skewed = gift_event("creator-b", 100, at_s=t + 11)
    skewed.occurred_at.FromSeconds(t + 10)  # flipped by a clock 1 s behind the one that recorded it
    await consume(payout, gifts=[gift_event("creator-a", 100, at_s=t + 5)])
    await consume(payout, [reversal("newest", t + 20, 100)])  # takes the gift at t + 5
    await consume(payout, gifts=[skewed])
    await consume(payout, [reversal("older", t + 9, 100)])  # stands in for "newest": takes the skewed gift
    await consume(payout, gifts=[gift_event("creator-c", 100, at_s=t + 15)])
    # Recorded after it, before t + 11: the only gift it may take (t + 5) is taken, and the
    # newest reversal's 100 coins are all used as cover for the older one.
    await consume(payout, [reversal("between", t + 10, 100)])
    await payout.settle_shortfalls_once()

    # In order: "older" takes the gift at t + 5, "between" finds nothing (100 open), "newest" takes
    # one of the two later gifts. Out of order, each may take another's gift, never more in all.
    clawed = [(await payout.get_earnings(c)).diamonds_clawed_back for c in ("creator-a", "creator-b", "creator-c")]
    assert sum(clawed) == 100, f"{clawed}: a gift clawed back for no reversal after it"
    assert await open_coins_of(payout) == 100


async def test_the_audit_reports_each_reversal_consumed_as_clawed_back_plus_owed(setup) -> None:  # type: ignore[no-untyped-def]
    """What payout's audit holds against the wallet's claims (README "How the audit reads"): the
    coins of the reversals it consumed, clawed back (entries, and the earnings they took from)
    or still owed by an open shortfall, with the entries' units those of the creators' rows."""
    payout, _provider, _path = setup
    t = NOW_US // 1_000_000
    await consume(payout, gifts=[gift_event("creator-a", 61, at_s=t - 50)])
    await consume(payout, [reversal("rv-audit", t, 100)])  # 61 to take, 39 wait for their gift
    a = await payout.audit()
    assert (a.coins_in_clawback_entries, a.coins_in_open_shortfalls, a.earnings_coins_clawed_back) == (61, 39, 61)
    assert a.units_in_clawback_entries == a.clawed_units == 61 * 5000
    await consume(payout, gifts=[gift_event("creator-b", 39, at_s=t - 10)])
    await payout.settle_shortfalls_once()
    a = await payout.audit()
    assert (a.coins_in_clawback_entries, a.coins_in_open_shortfalls, a.earnings_coins_clawed_back) == (100, 0, 100)
    assert a.units_in_clawback_entries == a.clawed_units == 100 * 5000


async def test_a_shortfall_whose_settling_always_raises_keeps_no_other_from_settling(  # type: ignore[no-untyped-def]
    setup,
    monkeypatch,
    caplog,
) -> None:
    # One shortfall's settling raised every time (a bug, a constraint its rows break): the round
    # ended at it, and as a short batch starts again from the first, the shortfall after it never
    # settled, however much its sender's gifts allowed: its coins owed for ever.
    import logging

    payout, _provider, _path = setup
    async with payout.db.unit_of_work() as uow:
        base = {
            "kind": "CHARGED_BACK",
            "coins_open": 10,
            "reversed_at_us": NOW_US,
            "created_at_us": NOW_US,
            "updated_at_us": NOW_US,
        }
        await uow.conn.execute(
            insert(clawback_shortfalls),
            [
                {**base, "reversal_event_id": "a-poison", "purchase_id": "p-poison", "sender_id": "nobody"},
                {**base, "reversal_event_id": "b-viewer", "purchase_id": "p-viewer", "sender_id": "viewer"},
            ],
        )
        await payout.credit_gifts(uow, [gift_event("creator-c", 40, at_s=NOW_US // 1_000_000 - 60)])
        await uow.commit()
    settle = payout._settle_shortfall

    async def fails_for_one(uow: object, reversal_event_id: str) -> int:
        if reversal_event_id == "a-poison":
            raise RuntimeError("a bug met by this shortfall")
        return await settle(uow, reversal_event_id)  # type: ignore[arg-type]

    monkeypatch.setattr(payout, "_settle_shortfall", fails_for_one)
    with caplog.at_level(logging.WARNING, logger="services.payout.usecases"):
        clawed = [await payout.settle_shortfalls_once() for _ in range(2)]  # neither raises for the poison one
    assert clawed == [10, 0], clawed  # the viewer's 10 coins, then the poison one alone again
    assert (await payout.get_earnings("creator-c")).diamonds_clawed_back == 5
    lines = [r for r in caplog.records if r.getMessage().startswith("a clawback shortfall was not settled")]
    assert [r.reversal_event_id for r in lines] == ["a-poison"]  # once: the next within 30 s are counted


async def test_a_settler_stopped_mid_round_starts_no_shortfall_after_the_one_in_hand(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # A SIGTERM during a round: the loop finishes its round within the shutdown grace, and the
    # round went on through its SHORTFALL_BATCH transactions, each up to DB_STATEMENT_TIMEOUT_S a
    # statement against a slow database, and was cancelled in the middle of one. The shortfall
    # under way finishes; the rest wait for the next round (the next process's), from the first left.
    import asyncio

    payout, _provider, _path = setup
    ids = ["a-first", "b-second", "c-third"]
    async with payout.db.unit_of_work() as uow:
        base = {"kind": "CHARGED_BACK", "coins_open": 10, "reversed_at_us": NOW_US, "created_at_us": NOW_US}
        rows = [{**base, "reversal_event_id": r, "purchase_id": f"p-{r}", "sender_id": f"nobody-{r}"} for r in ids]
        await uow.conn.execute(insert(clawback_shortfalls), [{**r, "updated_at_us": NOW_US} for r in rows])
        await uow.commit()
    stop = asyncio.Event()
    tried: list[str] = []
    settle = payout._settle_shortfall

    async def stopped_meanwhile(uow: object, reversal_event_id: str) -> int:
        tried.append(reversal_event_id)
        stop.set()  # the SIGTERM lands while the first is settled
        return await settle(uow, reversal_event_id)  # type: ignore[arg-type]

    monkeypatch.setattr(payout, "_settle_shortfall", stopped_meanwhile)
    await asyncio.wait_for(payout.shortfall_settler(stop), 10)
    assert tried == ids[:1]
    await payout.settle_shortfalls_once()
    assert tried == ids
