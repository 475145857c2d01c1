"""Payout's reads of a creator it has never credited, on each backend: every amount 0 and empty
pages, as gifting's GetCreatorStats and GetLeaderboard answer for them; NOT_FOUND only for an id
that names a thing that must exist (a withdrawal, a payout method).

GetEarnings answered NOT_FOUND / CREATOR_NOT_FOUND for a creator with no earnings yet while
GetStatement and the lists answered zeros or nothing, so a dashboard had to special-case it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from livegifts.common.v1 import common_pb2
from livegifts.payout.v1 import payout_pb2
from services.common.errors import InvalidArgument, NotFound
from services.payout.usecases import PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX, Payout
from tests.support.payout import gift_event, payout_on

NEW = "creator-never-credited"


@pytest.fixture
async def payout(empty_database: str) -> AsyncIterator[Payout]:
    async with payout_on(empty_database) as (payout, _provider):
        yield payout


async def test_a_creator_payout_never_credited_reads_as_zeros_and_empty_pages(payout: Payout) -> None:
    policy = await payout.get_policy()
    earnings = await payout.get_earnings(NEW)
    assert earnings == payout_pb2.Earnings(
        creator_id=NEW,
        cash_available=[common_pb2.Money(currency_code=t.currency_code, amount_minor=0) for t in policy.currencies],
    ), earnings
    assert earnings.cash_available  # one entry per payout currency, as for a creator with diamonds

    listed = await payout.list_earnings(payout_pb2.ListEarningsRequest(creator_id=NEW))
    assert listed == payout_pb2.ListEarningsResponse()
    withdrawals = await payout.list_withdrawals(payout_pb2.ListWithdrawalsRequest(creator_id=NEW))
    assert withdrawals == payout_pb2.ListWithdrawalsResponse()
    methods = await payout.list_payout_methods(payout_pb2.ListPayoutMethodsRequest(creator_id=NEW))
    assert methods == payout_pb2.ListPayoutMethodsResponse()
    statement = await payout.get_statement(NEW, 2026)
    assert statement == payout_pb2.Statement(
        creator_id=NEW, year=2026, months=[payout_pb2.StatementMonth(month=m) for m in range(1, 13)]
    )


async def test_an_id_that_names_nothing_is_still_not_found(payout: Payout) -> None:
    with pytest.raises(NotFound) as err:
        await payout.get_withdrawal("wd_none")
    assert err.value.reason == "UNKNOWN_WITHDRAWAL"
    with pytest.raises(NotFound) as err:
        await payout.verify_payout_method(
            payout_pb2.VerifyPayoutMethodRequest(method_id="pm_none", verified=True, idempotency_key="v"), "ops"
        )
    assert err.value.reason == "UNKNOWN_PAYOUT_METHOD"
    with pytest.raises(NotFound) as err:
        await payout.request_withdrawal(
            payout_pb2.RequestWithdrawalRequest(creator_id=NEW, diamonds=200, method_id="pm_none", idempotency_key="w")
        )
    assert err.value.reason == "UNKNOWN_PAYOUT_METHOD"


async def test_list_earnings_takes_a_page_size_of_1_to_the_maximum_and_0_for_the_default(payout: Payout) -> None:
    """page_size 0 (unset) is the default, 50; 1..PAGE_SIZE_MAX as asked; anything else is refused,
    and its message says the range payout.proto documents."""
    async with payout.db.unit_of_work() as uow:
        await payout.credit_gifts(uow, [gift_event("creator-a", 2) for _ in range(PAGE_SIZE_DEFAULT + 1)])
        await uow.commit()
    for size, rows in ((0, PAGE_SIZE_DEFAULT), (1, 1), (PAGE_SIZE_MAX, PAGE_SIZE_DEFAULT + 1)):
        page = await payout.list_earnings(payout_pb2.ListEarningsRequest(creator_id="creator-a", page_size=size))
        assert (len(page.entries), bool(page.next_page_token)) == (rows, rows <= PAGE_SIZE_DEFAULT), size
    for size in (-1, PAGE_SIZE_MAX + 1):
        with pytest.raises(InvalidArgument) as err:
            await payout.list_earnings(payout_pb2.ListEarningsRequest(creator_id=NEW, page_size=size))
        assert err.value.reason == "INVALID_PAGE_SIZE"
        assert err.value.message == f"page_size must be 1..{PAGE_SIZE_MAX}"
