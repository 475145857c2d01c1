"""Payout's gift credits over a real database (both backends): each gift earns the creator share
in force when it was sent, however late its event is consumed."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from livegifts.payout.v1 import payout_pb2
from services.common.timeutil import now_us
from services.payout.usecases import Payout
from tests.support.payout import gift_event, payout_on


@pytest.fixture
async def payout(empty_database: str) -> AsyncIterator[Payout]:
    async with payout_on(empty_database) as (p, _provider):
        yield p


def policy(share_bp: int) -> payout_pb2.SetPolicyRequest:
    terms = payout_pb2.CurrencyTerms(
        currency_code="USD",
        diamonds=200,
        amount_minor=100,
        withdrawal_min_minor=10_000,
        daily_max_minor=100_000,
        auto_approve_below_minor=50_000,
    )
    return payout_pb2.SetPolicyRequest(
        creator_share_bp=share_bp, fee_bp=0, currencies=[terms], idempotency_key=uuid.uuid4().hex
    )


async def test_a_gift_sent_before_a_share_change_and_consumed_after_it_earns_the_share_it_was_sent_under(
    payout: Payout,
) -> None:
    sent_s = now_us() // 1_000_000 - 60  # sent a minute ago; its event waited (consumer behind, or parked)
    await payout.set_policy(policy(4_000), "operator")  # the share is cut now, for gifts from now on
    late, new = gift_event("creator-a", 100, at_s=sent_s), gift_event("creator-b", 100)
    async with payout.db.unit_of_work() as uow:
        await payout.credit_gifts(uow, [late, new])
        await uow.commit()

    listed = {
        c: (await payout.list_earnings(payout_pb2.ListEarningsRequest(creator_id=c))).entries[0].share_bp
        for c in ("creator-a", "creator-b")
    }
    assert listed == {"creator-a": 5_000, "creator-b": 4_000}
    assert (await payout.get_earnings("creator-a")).diamonds_lifetime == 50
    assert (await payout.get_earnings("creator-b")).diamonds_lifetime == 40
