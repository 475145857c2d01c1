"""Payout's clawback shortfall settler against a real SQLite file: shortfalls that cannot settle
yet never keep the others waiting."""

from __future__ import annotations

import uuid

from sqlalchemy import insert, select

from livegifts.payout.v1 import payout_pb2
from services.payout.storage import clawback_shortfalls
from services.payout.usecases import SHORTFALL_BATCH
from tests.unit.test_payout_dispatch import gift_event, setup  # noqa: F401 - setup is the fixture

NOW_US = 1_795_305_600_000_000


async def test_shortfalls_that_cannot_settle_do_not_starve_one_that_can(setup) -> None:  # noqa: F811  # type: ignore[no-untyped-def]
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
