"""Daily leaderboard rows of days older than LEADERBOARD_DAILY_RETENTION_DAYS are deleted, and the
days the 7-day boards read are never (SQLite and PostgreSQL).

The boards read only the last LEADERBOARD_WINDOW_DAYS of leaderboard_daily; kept, the table grew
by a row per stream and sender and per creator and sender every day, for good.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from sqlalchemy import insert, select

from services.common import pruning
from services.common.db import Database
from services.gifting.config import GiftingSettings
from services.gifting.domain import LEADERBOARD_WINDOW_DAYS
from services.gifting.readmodels import LeaderboardDailyPruner
from services.gifting.storage import leaderboard_daily

DAY_US = 86_400 * 1_000_000
TODAY = 20_000  # days since the epoch
NOW_US = TODAY * DAY_US + 3_600 * 1_000_000  # 01:00 UTC of that day


def _settings(url: str, **kw: object) -> GiftingSettings:
    return GiftingSettings(database_url=url, nats_url="nats://127.0.0.1:1", wallet_addr="127.0.0.1:1", **kw)  # type: ignore[arg-type]


async def _days(db: Database) -> list[int]:
    async with db.unit_of_work(readonly=True) as uow:
        return sorted((await uow.conn.execute(select(leaderboard_daily.c.day))).scalars())


async def test_days_past_the_retention_go_in_chunks_and_the_boards_days_stay(
    gifting_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pruning, "PRUNE_CHUNK", 3)
    ages = list(range(0, 20))  # today back to 19 days ago, two rows a day (stream and creator scope)
    async with gifting_db.unit_of_work() as uow:
        await uow.conn.execute(
            insert(leaderboard_daily),
            [
                {"scope": scope, "scope_id": "x", "day": TODAY - age, "sender_id": "v", "coins": 1}
                for age in ages
                for scope in ("STREAM", "CREATOR")
            ],
        )
        await uow.commit()
    pruner = LeaderboardDailyPruner(gifting_db, _settings(gifting_db.url))
    # The default keeps 8 days back (one more than the boards' 7): days 9 to 19 ago go, 22 rows.
    assert await pruner.prune_once(now=NOW_US) == 22
    assert await _days(gifting_db) == sorted(TODAY - age for age in range(0, 9) for _ in range(2))
    assert await pruner.prune_once(now=NOW_US) == 0


def test_a_retention_that_would_delete_days_the_boards_read_is_refused() -> None:
    with pytest.raises(ValidationError, match="leaderboard_daily_retention_days"):
        _settings("sqlite+aiosqlite:///x.db", leaderboard_daily_retention_days=LEADERBOARD_WINDOW_DAYS)
