"""A creator's yearly statement as a tax accountant files it, on each backend: each month's
earnings are the earnings `ListEarnings` lists with a `credited_at` in that UTC month (to the
microsecond at the year's edge), its payments the PAID withdrawals `ListWithdrawals` shows with
a `paid_at` in it, at the amounts (currency, fee) they were requested at; what happens later (a
chargeback, a returned payout reported after PAID) never rewrites a filed month; and a year
with nothing in it, before the creator or not yet begun, answers what payout.proto says.
Payout's clock is moved by hand (tests/unit/test_payout_statement.py's Clock).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from livegifts.payout.v1 import payout_pb2
from services.common.errors import FailedPrecondition, InvalidArgument
from services.payout import usecases
from services.payout.usecases import Payout
from tests.support.payout import Clock, callback, consume, gift_event, month_moves, payout_on, reversal, verified_method

CREATOR = "creator-books"


def us(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0) -> int:
    """Unix microseconds of that UTC instant."""
    return int(dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC).timestamp()) * 1_000_000 + micro


@pytest.fixture
async def payout(empty_database: str) -> AsyncIterator[Payout]:
    async with payout_on(empty_database) as (p, _provider):
        yield p


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(usecases, "now_us", c)
    return c


def reading(clock: Clock, at_us: int) -> None:
    """Payout's next clock reading is `at_us`."""
    clock.us = at_us - 1


def terms(code: str, amount_minor: int, fee_fixed_minor: int) -> payout_pb2.CurrencyTerms:
    """`code` at 200 diamonds = amount_minor, every withdrawal approved at once."""
    return payout_pb2.CurrencyTerms(
        currency_code=code,
        diamonds=200,
        amount_minor=amount_minor,
        withdrawal_min_minor=100,
        daily_max_minor=10**9,
        fee_fixed_minor=fee_fixed_minor,
        auto_approve_below_minor=10**9,
    )


async def every_page(list_call: Callable[[Any], Awaitable[Any]], request: Any, field: str) -> list[Any]:
    """The `field` items of every page `list_call` answers `request` with, two a page."""
    out: list[Any] = []
    request.page_size = 2
    while True:
        page = await list_call(request)
        out += getattr(page, field)
        if not (token := page.next_page_token):
            return out
        request.page_token = token


async def listed_earnings(payout: Payout, creator: str) -> list[payout_pb2.EarningEntry]:
    return await every_page(payout.list_earnings, payout_pb2.ListEarningsRequest(creator_id=creator), "entries")


async def listed_withdrawals(payout: Payout, creator: str) -> list[payout_pb2.Withdrawal]:
    return await every_page(
        payout.list_withdrawals, payout_pb2.ListWithdrawalsRequest(creator_id=creator), "withdrawals"
    )


def month_of(ts: object) -> tuple[int, int]:
    d = ts.ToDatetime(dt.UTC)  # type: ignore[attr-defined]
    return d.year, d.month


async def test_each_month_is_the_earnings_listed_with_a_credit_time_in_it_to_the_microsecond(
    payout: Payout, clock: Clock
) -> None:
    # 3 coins credited at the year's last microsecond, sent a second before; 5 at the next year's
    # first; 1 earlier in 2025 (0.5 diamond) so the half of the 3 coins makes a whole one in December.
    reading(clock, us(2025, 7, 1))
    await consume(payout, gifts=[gift_event(CREATOR, 1, at_s=us(2025, 7, 1) // 1_000_000)])
    sent_last = gift_event(CREATOR, 3, at_s=us(2025, 12, 31, 23, 59, 58) // 1_000_000)
    reading(clock, us(2025, 12, 31, 23, 59, 59, 999_999))
    await consume(payout, gifts=[sent_last])
    reading(clock, us(2026, 1, 1))
    await consume(payout, gifts=[gift_event(CREATOR, 5, at_s=us(2025, 12, 31, 23, 59, 59) // 1_000_000)])
    reading(clock, us(2026, 3, 31, 23, 59, 59, 999_999))
    await consume(payout, gifts=[gift_event(CREATOR, 7), gift_event(CREATOR, 11)])

    entries = await listed_earnings(payout, CREATOR)
    # The gift's own time is kept beside the credit time: the edge gift was sent in 2025 and
    # credited in 2026, and counts in January 2026 (the statement's time is the credit's).
    edge = next(e for e in entries if e.coins == 5)
    assert month_of(edge.occurred_at) == (2025, 12) and month_of(edge.credited_at) == (2026, 1)
    assert next(e for e in entries if e.coins == 3).credited_at.ToMicroseconds() == us(
        2025, 12, 31, 23, 59, 59, 999_999
    )
    by_month: dict[tuple[int, int], list[int]] = defaultdict(lambda: [0, 0])
    for e in entries:
        by_month[month_of(e.credited_at)][0] += e.coins
        by_month[month_of(e.credited_at)][1] += e.units
    earned = 0
    for year in (2024, 2025, 2026):
        statement = await payout.get_statement(CREATOR, year)
        assert [m.month for m in statement.months] == list(range(1, 13))
        for m in statement.months:
            assert [m.coins_received, m.earned_units] == by_month.get((year, m.month), [0, 0]), (year, m.month)
        year_units = sum(m.earned_units for m in statement.months)
        assert year_units == sum(u for (y, _), (_, u) in by_month.items() if y == year)
        earned += sum(m.diamonds_earned for m in statement.months)
    dec25 = (await payout.get_statement(CREATOR, 2025)).months[11]
    assert (dec25.coins_received, dec25.diamonds_earned) == (3, 2)  # 0.5 + 1.5 diamonds: 2 whole
    earnings = await payout.get_earnings(CREATOR)
    assert earned == earnings.diamonds_lifetime == (1 + 3 + 5 + 7 + 11) // 2


async def test_withdrawals_count_in_the_month_paid_at_the_amounts_they_were_requested_at(
    payout: Payout, clock: Clock
) -> None:
    """Requested in December under one policy (USD and EUR, each with its fees), paid in January
    after the policy changed: January's `paid` is the two, by currency, at their own amounts, and
    is the PAID withdrawals with a paid_at in January. A FAILED one is no payment; a FAILED
    reported after PAID (a payout the bank returned) is refused and changes no month."""
    reading(clock, us(2025, 11, 2))
    await consume(payout, gifts=[gift_event(CREATOR, 100_000)])  # 50,000 diamonds
    await payout.set_policy(
        payout_pb2.SetPolicyRequest(
            creator_share_bp=5_000,
            fee_bp=100,
            currencies=[terms("USD", 100, 30), terms("EUR", 90, 25)],
            idempotency_key=uuid.uuid4().hex,
        ),
        "ops",
    )
    usd = await verified_method(payout, CREATOR)
    eur = (
        await payout.add_payout_method(
            payout_pb2.AddPayoutMethodRequest(
                creator_id=CREATOR,
                kind=payout_pb2.PAYOUT_METHOD_KIND_PAYPAL,
                paypal_email="books@example.com",
                currency_code="EUR",
                idempotency_key=uuid.uuid4().hex,
            )
        )
    ).method_id
    await payout.verify_payout_method(
        payout_pb2.VerifyPayoutMethodRequest(method_id=eur, verified=True, idempotency_key=uuid.uuid4().hex),
        "ops",
    )

    async def request(diamonds: int, method_id: str) -> payout_pb2.Withdrawal:
        return await payout.request_withdrawal(
            payout_pb2.RequestWithdrawalRequest(
                creator_id=CREATOR, diamonds=diamonds, method_id=method_id, idempotency_key=uuid.uuid4().hex
            )
        )

    reading(clock, us(2025, 12, 31, 23))
    w_usd, w_eur, w_failed = await request(10_000, usd), await request(6_000, eur), await request(2_000, usd)
    assert (w_usd.gross.amount_minor, w_usd.fee.amount_minor, w_usd.net.amount_minor) == (5_000, 80, 4_920)
    assert (w_eur.gross.amount_minor, w_eur.fee.amount_minor, w_eur.net.amount_minor) == (2_700, 52, 2_648)
    assert await payout.dispatch_once() == 3
    # A new year and a new policy (dearer, USD only) before the provider reports.
    reading(clock, us(2026, 1, 1))
    await payout.set_policy(
        payout_pb2.SetPolicyRequest(
            creator_share_bp=5_000, fee_bp=900, currencies=[terms("USD", 50, 0)], idempotency_key=uuid.uuid4().hex
        ),
        "ops",
    )
    await callback(payout, w_usd.withdrawal_id, "evt-usd", "payout.paid")
    await callback(payout, w_eur.withdrawal_id, "evt-eur", "payout.paid")
    await callback(payout, w_failed.withdrawal_id, "evt-failed", "payout.failed")
    filed = {year: await payout.get_statement(CREATOR, year) for year in (2025, 2026)}

    dec, jan = filed[2025].months[11], filed[2026].months[0]
    assert dec.paid == [] and dec.closing_diamonds == 50_000  # requested, not paid: still on the books
    assert [(p.currency_code, p.diamonds, p.gross_minor, p.fee_minor, p.net_minor) for p in jan.paid] == [
        ("EUR", 6_000, 2_700, 52, 2_648),
        ("USD", 10_000, 5_000, 80, 4_920),
    ]
    assert (jan.opening_diamonds, jan.closing_diamonds) == (50_000, 34_000)
    paid_by_month: dict[tuple[int, int, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for w in await listed_withdrawals(payout, CREATOR):
        if w.status != payout_pb2.WITHDRAWAL_STATUS_PAID:
            assert not w.HasField("paid_at")
            continue
        sums = paid_by_month[(*month_of(w.paid_at), w.gross.currency_code)]
        for i, v in enumerate((w.diamonds, w.gross.amount_minor, w.fee.amount_minor, w.net.amount_minor)):
            sums[i] += v
    for year, statement in filed.items():
        for m in statement.months:
            got = {p.currency_code: [p.diamonds, p.gross_minor, p.fee_minor, p.net_minor] for p in m.paid}
            want = {code: v for (y, mo, code), v in paid_by_month.items() if (y, mo) == (year, m.month)}
            assert got == want, (year, m.month)

    # The bank returns the USD payout in February: not modelled, refused, and no month moves.
    reading(clock, us(2026, 2, 3))
    with pytest.raises(FailedPrecondition) as err:
        await callback(payout, w_usd.withdrawal_id, "evt-returned", "payout.failed")
    assert err.value.reason == "INVALID_WITHDRAWAL_TRANSITION"
    assert {year: await payout.get_statement(CREATOR, year) for year in (2025, 2026)} == filed


async def test_a_chargeback_counts_in_its_own_month_and_a_filed_month_answers_the_same(
    payout: Payout, clock: Clock
) -> None:
    reading(clock, us(2025, 12, 31, 23, 59, 59, 999_999))
    await consume(payout, gifts=[gift_event(CREATOR, 4_001, at_s=us(2025, 12, 31, 23, 59, 59) // 1_000_000)])
    filed = await payout.get_statement(CREATOR, 2025)
    assert filed.months[11].diamonds_earned == 2_000
    reading(clock, us(2026, 2, 14))  # the viewer's bank takes the money back weeks later
    await consume(payout, reversals=[reversal("rv-books", clock.us // 1_000_000, 4_001)])

    assert await payout.get_statement(CREATOR, 2025) == filed
    months = (await payout.get_statement(CREATOR, 2026)).months
    assert (months[1].diamonds_clawed_back, months[1].opening_diamonds, months[1].closing_diamonds) == (2_000, 2_000, 0)
    assert all(m.diamonds_clawed_back == 0 for i, m in enumerate(months) if i != 1)
    last = filed.months[11]
    for m in months:
        assert (m.opening_diamonds, m.closing_diamonds) == (last.closing_diamonds, m.opening_diamonds + month_moves(m))
        last = m
    # The earning lists what was taken of it, the month it was taken in is the statement's.
    (entry,) = await listed_earnings(payout, CREATOR)
    assert entry.coins_clawed_back == 4_001


async def test_years_with_nothing_in_them_and_years_out_of_range(payout: Payout, clock: Clock) -> None:
    """Before the creator's first earning every month is 0; a month not yet begun moves nothing
    and opens and closes with the balance now; a year outside 2000..2200 is INVALID_YEAR."""
    reading(clock, us(2026, 5, 20))
    await consume(payout, gifts=[gift_event(CREATOR, 200)])  # 100 diamonds
    empty = [payout_pb2.StatementMonth(month=m) for m in range(1, 13)]
    for year in (2000, 2025):
        assert list((await payout.get_statement(CREATOR, year)).months) == empty, year
    now = (await payout.get_statement(CREATOR, 2026)).months
    assert [(m.opening_diamonds, m.closing_diamonds) for m in now] == [(0, 0)] * 4 + [(0, 100)] + [(100, 100)] * 7
    assert all(month_moves(m) == 0 and m.coins_received == 0 for m in now[5:])
    for year in (2027, 2200):
        later = (await payout.get_statement(CREATOR, year)).months
        assert [(m.opening_diamonds, m.closing_diamonds, month_moves(m)) for m in later] == [(100, 100, 0)] * 12
    for year in (0, 1999, 2201, -2026):
        with pytest.raises(InvalidArgument) as err:
            await payout.get_statement(CREATOR, year)
        assert (err.value.reason, err.value.message) == ("INVALID_YEAR", "year must be 2000..2200"), year
