"""GetCreatorStats over back-to-back windows (both backends): each hour counted in one window.

Stats are kept per UTC hour. A window `[from, to)` that does not start on the hour (a creator
at UTC+5:30 asking day by day) once took the hour holding `from` and the hour holding `to`, so
the hour between two back-to-back windows was counted in both and a week of daily stats summed
to more than the week.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from livegifts.gifting.v1 import events_pb2, gifting_pb2
from services.common.errors import InvalidArgument
from services.gifting.readmodels import ReadModels
from tests.integration.conftest import gifting_database

HOUR_US = 3_600_000_000
DAY_US = 24 * HOUR_US
MIDNIGHT_US = 1_767_225_600_000_000  # 2026-01-01T00:00Z
IST_US = 5 * HOUR_US + 30 * 60_000_000  # UTC+5:30


@pytest.fixture
async def read_models(empty_database: str) -> AsyncIterator[ReadModels]:
    async with gifting_database(empty_database, pool_size=2, application_name="stats-windows-test") as db:
        yield ReadModels(db)


def _ts(us: int) -> Timestamp:
    t = Timestamp()
    t.FromMicroseconds(us)
    return t


def _stats_request(from_us: int, to_us: int) -> gifting_pb2.GetCreatorStatsRequest:
    req = gifting_pb2.GetCreatorStatsRequest(creator_id="creator", to=_ts(to_us))
    getattr(req, "from").CopyFrom(_ts(from_us))
    return req


async def test_back_to_back_windows_off_the_hour_count_each_gift_once(read_models: ReadModels) -> None:
    # One gift of 1 coin every hour, at 10 past, for three days.
    sent = [
        events_pb2.GiftSent(
            event_id=f"e{h}",
            kind=events_pb2.GIFT_KIND_GIFT,
            stream_id="s",
            creator_id="creator",
            sender_id="viewer",
            gift_id="rose",
            quantity=1,
            coins=1,
            occurred_at=_ts(MIDNIGHT_US + h * HOUR_US + 10 * 60_000_000),
        )
        for h in range(72)
    ]
    async with read_models.db.unit_of_work() as uow:
        await read_models.apply(uow, sent)
        await uow.commit()

    # Local days at UTC+5:30, back to back: each starts and ends at half past a UTC hour.
    days = [(MIDNIGHT_US + d * DAY_US - IST_US, MIDNIGHT_US + (d + 1) * DAY_US - IST_US) for d in (1, 2)]
    totals = [(await read_models.creator_stats(_stats_request(a, b))).coins_total for a, b in days]
    whole = await read_models.creator_stats(_stats_request(days[0][0], days[-1][1]))
    assert sum(totals) == whole.coins_total, (totals, whole.coins_total)
    assert totals == [24, 24]  # a day holds 24 hourly buckets, not 25
    hours = [
        [h.hour_start.ToMicroseconds() for h in (await read_models.creator_stats(_stats_request(a, b))).by_hour]
        for a, b in days
    ]
    assert not set(hours[0]) & set(hours[1])
    # An hour belongs to the window its start falls in: the first day starts at 18:30Z, so the
    # 18:00Z hour (whose gift was at 18:10Z, before the window) is not in it.
    assert min(hours[0]) == MIDNIGHT_US + DAY_US - IST_US + 30 * 60_000_000


@pytest.mark.parametrize(
    ("field", "stamp"),
    [
        ("from", Timestamp(seconds=2**40)),  # past the year 9999
        ("to", Timestamp(seconds=-(2**40))),  # before the year 1
        ("to", Timestamp(seconds=0, nanos=-1)),  # nanos outside 0..999,999,999
    ],
)
async def test_a_window_bound_no_timestamp_can_hold_is_invalid_argument_not_internal(
    read_models: ReadModels, field: str, stamp: Timestamp
) -> None:
    # Timestamp.ToMicroseconds() raises ValueError on these, which the server answered INTERNAL.
    req = _stats_request(MIDNIGHT_US, MIDNIGHT_US + DAY_US)
    getattr(req, field).CopyFrom(stamp)
    with pytest.raises(InvalidArgument) as raised:
        await read_models.creator_stats(req)
    assert raised.value.reason == "INVALID_WINDOW"
    assert raised.value.metadata["field"] == field
