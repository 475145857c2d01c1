"""Answers read in several statements see one moment, on SQLite and on PostgreSQL.

On PostgreSQL each statement of a READ COMMITTED transaction sees its own moment: a consumer
batch committing between a leaderboard's page and its totals answered entries that did not add
up to `coins_total` (seen in CI). Here a write commits between the two, every time.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, update

from livegifts.gifting.v1 import gifting_pb2
from services.common.db import Database
from services.gifting.readmodels import ReadModels
from services.gifting.storage import leaderboard_all_time
from tests.integration import pg
from tests.integration.conftest import gifting_database


class _WriteAfterFirstStatement:
    """A connection that lets `write` commit (on another connection) right after its first statement."""

    def __init__(self, conn: Any, write: Any) -> None:
        self._conn, self._write, self._done = conn, write, False

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        result = await self._conn.execute(*args, **kwargs)
        if not self._done:
            self._done = True
            await self._write()
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@contextlib.contextmanager
def _database_url(backend: str, tmp_path: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'gifting.db'}"
        return
    with pg.service_databases("lgsnap") as urls:
        yield urls["gifting"]


@pytest.fixture(params=["sqlite", "postgres"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    with _database_url(request.param, tmp_path) as url:
        async with gifting_database(url, pool_size=2, application_name="snapshots") as database:
            yield database


async def test_a_leaderboard_page_adds_up_to_its_totals_while_a_batch_commits(db: Database) -> None:
    t = leaderboard_all_time.c
    async with db.unit_of_work() as uow:
        await uow.conn.execute(
            insert(leaderboard_all_time),
            [{"scope": "STREAM", "scope_id": "s1", "sender_id": s, "coins": c} for s, c in (("a", 10), ("b", 20))],
        )
        await uow.commit()

    opened = db.unit_of_work

    async def a_batch_commits() -> None:
        async with opened() as other:
            await other.conn.execute(
                update(leaderboard_all_time)
                .where(t.scope == "STREAM", t.scope_id == "s1", t.sender_id == "a")
                .values(coins=t.coins + 5)
            )
            await other.commit()

    @contextlib.asynccontextmanager
    async def interleaved(**kwargs: Any) -> AsyncIterator[Any]:
        async with opened(**kwargs) as uow:
            uow.conn = _WriteAfterFirstStatement(uow.conn, a_batch_commits)  # type: ignore[assignment]
            yield uow

    read = ReadModels(db)
    db.unit_of_work = interleaved  # type: ignore[method-assign]
    try:
        board = await read.leaderboard(gifting_pb2.GetLeaderboardRequest(stream_id="s1", limit=10, sender_id="a"))
    finally:
        db.unit_of_work = opened  # type: ignore[method-assign]
    assert board.coins_total == sum(e.coins for e in board.entries), board
    assert board.own.coins == next(e.coins for e in board.entries if e.sender_id == "a")
    # The write did commit: the next read sees it.
    after = await read.leaderboard(gifting_pb2.GetLeaderboardRequest(stream_id="s1", limit=10))
    assert (after.coins_total, [e.coins for e in after.entries]) == (35, [20, 15])
