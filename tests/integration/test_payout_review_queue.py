"""ListWithdrawals as the operators' review queue, on each backend: every creator's withdrawals in
one status, oldest requested first, a page at a time; a creator's own list as it always was.

Operators had no way to list withdrawals across creators: ListWithdrawals required creator_id,
and docs/sre.md sent them to SQL to find the ones waiting for review or held APPROVED.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import grpc
import pytest
from sqlalchemy import update

from livegifts.payout.v1 import payout_pb2
from services.common.clients import error_info
from services.common.errors import InvalidArgument
from services.payout.storage import withdrawals
from services.payout.usecases import Payout
from tests.integration.helpers import expect_error, uid
from tests.integration.payout_calls import fund, withdraw
from tests.integration.payout_calls import verified_method as verified_method_of
from tests.support.payout import approved_withdrawal, payout_on, requested_withdrawal

W = payout_pb2
REVIEW = W.WITHDRAWAL_STATUS_PENDING_REVIEW
APPROVED = W.WITHDRAWAL_STATUS_APPROVED


@pytest.fixture
async def payout(empty_database: str) -> AsyncIterator[Payout]:
    async with payout_on(empty_database) as (payout, _provider):
        yield payout


async def reviewed_withdrawal(payout: Payout, creator: str) -> str:
    """Credit `creator` 120,000 diamonds and request them all ($600: waits for review); its id."""
    wd = await requested_withdrawal(payout, creator, 240_000, 120_000)
    assert wd.status == REVIEW
    return wd.withdrawal_id


async def requested_at(payout: Payout, when_us: dict[str, int]) -> None:
    """Set withdrawals' request instants (two in one microsecond: the id breaks the tie)."""
    async with payout.db.unit_of_work() as uow:
        for withdrawal_id, ts in when_us.items():
            await uow.conn.execute(
                update(withdrawals).where(withdrawals.c.withdrawal_id == withdrawal_id).values(requested_at_us=ts)
            )
        await uow.commit()


async def every_page(payout: Payout, page_size: int, **filters: object) -> list[list[str]]:
    """The ids of each page of a list, following next_page_token to the end."""
    pages: list[list[str]] = []
    token = ""
    while True:
        page = await payout.list_withdrawals(W.ListWithdrawalsRequest(page_token=token, page_size=page_size, **filters))  # type: ignore[arg-type]
        pages.append([w.withdrawal_id for w in page.withdrawals])
        if not page.next_page_token:
            return pages
        token = page.next_page_token


async def test_every_creators_withdrawals_in_one_status_are_listed_oldest_first_a_page_at_a_time(
    payout: Payout,
) -> None:
    review = [await reviewed_withdrawal(payout, f"creator-{i}") for i in range(5)]
    held = [await approved_withdrawal(payout, f"creator-{i}") for i in (5, 6)]
    # Requested out of creation order, two of them in one microsecond.
    at = {review[0]: 5_000, review[1]: 1_000, review[2]: 3_000, review[3]: 3_000, review[4]: 2_000}
    await requested_at(payout, at | {held[0]: 4_000, held[1]: 500})
    oldest_first = sorted(review, key=lambda w: (at[w], w))

    pages = await every_page(payout, 2, status=REVIEW)
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [w for p in pages for w in p] == oldest_first
    assert [w for p in await every_page(payout, 500, status=APPROVED) for w in p] == [held[1], held[0]]
    listed = await payout.list_withdrawals(W.ListWithdrawalsRequest(status=REVIEW))
    assert {w.status for w in listed.withdrawals} == {REVIEW}
    assert {w.creator_id for w in listed.withdrawals} == {f"creator-{i}" for i in range(5)}

    # Rows requested after the queue was read join its end; a page read before stays put.
    first = await payout.list_withdrawals(W.ListWithdrawalsRequest(status=REVIEW, page_size=2))
    late = await reviewed_withdrawal(payout, "creator-late")
    rest = await every_page_from(payout, first.next_page_token, status=REVIEW, page_size=2)
    assert [w.withdrawal_id for w in first.withdrawals] + rest == oldest_first + [late]


async def every_page_from(payout: Payout, token: str, **filters: object) -> list[str]:
    """The ids of a list from `token` to its end."""
    out: list[str] = []
    while token:
        page = await payout.list_withdrawals(W.ListWithdrawalsRequest(page_token=token, **filters))  # type: ignore[arg-type]
        out += [w.withdrawal_id for w in page.withdrawals]
        token = page.next_page_token
    return out


async def test_a_creators_own_list_stays_newest_first_with_its_tokens_of_before_and_may_take_a_status(
    payout: Payout,
) -> None:
    review = await reviewed_withdrawal(payout, "creator-a")
    held = [await approved_withdrawal(payout, "creator-a") for _ in range(2)]
    other = await reviewed_withdrawal(payout, "creator-b")
    await requested_at(payout, {review: 1_000, held[0]: 2_000, held[1]: 3_000, other: 1_500})

    pages = await every_page(payout, 2, creator_id="creator-a")
    assert pages == [[held[1], held[0]], [review]]
    first = await payout.list_withdrawals(W.ListWithdrawalsRequest(creator_id="creator-a", page_size=2))
    # The form its tokens always had, so one a client holds across the upgrade still works.
    assert base64.urlsafe_b64decode(first.next_page_token).decode() == f"2000:{held[0]}"
    assert await every_page(payout, 1, creator_id="creator-a", status=APPROVED) == [[held[1]], [held[0]]]
    assert await every_page(payout, 50, creator_id="creator-a", status=REVIEW) == [[review]]
    assert await every_page(payout, 50, creator_id="creator-a", status=W.WITHDRAWAL_STATUS_PAID) == [[]]


async def test_a_page_token_is_good_only_for_the_list_and_filters_that_made_it(payout: Payout) -> None:
    for creator in ("creator-a", "creator-b"):
        for _ in range(2):
            await approved_withdrawal(payout, creator)
        await reviewed_withdrawal(payout, creator)

    async def token(**filters: object) -> str:
        page = await payout.list_withdrawals(W.ListWithdrawalsRequest(page_size=1, **filters))  # type: ignore[arg-type]
        assert page.next_page_token
        return page.next_page_token

    queue = await token(status=APPROVED)
    own = await token(creator_id="creator-a")
    own_approved = await token(creator_id="creator-a", status=APPROVED)
    # The queue's own token with its instant written another way int() takes: never given.
    scope, _, place = base64.urlsafe_b64decode(queue).decode().partition("/")
    plus = base64.urlsafe_b64encode(f"{scope}/+{place}".encode()).decode()
    misuses = [
        (plus, {"status": APPROVED}),
        (queue, {"status": REVIEW}),  # another status
        (queue, {"creator_id": "creator-a", "status": APPROVED}),  # the queue's, for a creator's list
        (queue, {"creator_id": "creator-a"}),
        (own, {"status": APPROVED}),  # a creator's, for the queue
        (own, {"creator_id": "creator-a", "status": APPROVED}),
        (own_approved, {"creator_id": "creator-b", "status": APPROVED}),  # another creator
        (own_approved, {"creator_id": "creator-a", "status": REVIEW}),
        (own_approved, {"creator_id": "creator-a"}),
        (own_approved, {"status": APPROVED}),
    ]
    for page_token, filters in misuses:
        with pytest.raises(InvalidArgument) as refused:
            await payout.list_withdrawals(W.ListWithdrawalsRequest(page_token=page_token, **filters))  # type: ignore[arg-type]
        assert refused.value.reason == "INVALID_PAGE_TOKEN", filters
    # Each one where it came from.
    await payout.list_withdrawals(W.ListWithdrawalsRequest(page_token=queue, status=APPROVED))
    await payout.list_withdrawals(W.ListWithdrawalsRequest(page_token=own, creator_id="creator-a"))
    await payout.list_withdrawals(
        W.ListWithdrawalsRequest(page_token=own_approved, creator_id="creator-a", status=APPROVED)
    )


@pytest.mark.parametrize(
    ("filters", "reason"),
    [
        pytest.param({"status": 42}, "INVALID_STATUS", id="a status payout does not know"),
        pytest.param({"creator_id": "creator-a", "status": -1}, "INVALID_STATUS", id="a negative status"),
        pytest.param({}, "MISSING_FIELD", id="every creator's, every status"),
    ],
)
async def test_a_filter_payout_cannot_answer_is_refused_with_a_stable_reason(
    payout: Payout, filters: dict[str, object], reason: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        await payout.list_withdrawals(W.ListWithdrawalsRequest(**filters))  # type: ignore[arg-type]
    assert (refused.value.reason, refused.value.metadata) == (reason, {"field": "status"})


async def test_the_list_across_creators_needs_the_operator_token_and_a_creators_own_does_not(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    creator = uid("creator")
    await fund(clients, deployment, creator, 240_000)  # 120,000 diamonds = $600: reviewed
    method_id = await verified_method_of(clients, deployment, creator)
    waiting = await clients.payout.RequestWithdrawal(withdraw(creator, 120_000, method_id))
    queue = W.ListWithdrawalsRequest(status=REVIEW, page_size=500)
    missing = await expect_error(clients.payout.ListWithdrawals(queue), grpc.StatusCode.UNAUTHENTICATED)
    assert error_info(missing).reason == "OPERATOR_TOKEN_MISSING"
    wrong = await expect_error(
        clients.payout.ListWithdrawals(queue, metadata=(("authorization", "Bearer not-the-token"),)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert error_info(wrong).reason == "NOT_AN_OPERATOR"
    # Checked before the filters: no probing of what the queue holds without the token.
    await expect_error(
        clients.payout.ListWithdrawals(W.ListWithdrawalsRequest(status=42)), grpc.StatusCode.UNAUTHENTICATED
    )
    listed: list[payout_pb2.Withdrawal] = []
    token = ""
    while True:  # other tests' withdrawals wait too: every page, a few at a time
        page = await clients.payout.ListWithdrawals(
            W.ListWithdrawalsRequest(status=REVIEW, page_size=3, page_token=token),
            metadata=deployment.operator_metadata,
        )
        listed += page.withdrawals
        if not (token := page.next_page_token):
            break
    assert waiting.withdrawal_id in [w.withdrawal_id for w in listed]
    assert {w.status for w in listed} == {REVIEW}
    order = [(w.requested_at.ToMicroseconds(), w.withdrawal_id) for w in listed]
    assert order == sorted(order) and len(set(order)) == len(order)
    own = await clients.payout.ListWithdrawals(W.ListWithdrawalsRequest(creator_id=creator, status=REVIEW))
    assert [w.withdrawal_id for w in own.withdrawals] == [waiting.withdrawal_id]
