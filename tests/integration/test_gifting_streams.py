"""Gifting's stream and content use cases over a real database of their own, on SQLite and PostgreSQL.

What only shows on a real server: two EndStream calls racing (PostgreSQL's row lock), and text
PostgreSQL cannot store (a NUL), which must be refused as bad input, not fail as INTERNAL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from livegifts.gifting.v1 import gifting_pb2
from services.common.db import Database
from services.common.errors import InvalidArgument
from services.common.migrate import upgrade_head
from services.common.outbox import Outbox
from services.gifting.config import GiftingSettings
from services.gifting.storage import common
from services.gifting.usecases import STREAM_ENDED_SUBJECT, Gifting

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "gifting" / "migrations"


@pytest.fixture
async def gifting(empty_database: str) -> AsyncIterator[Gifting]:
    await upgrade_head(MIGRATIONS, empty_database)
    db = Database(empty_database, pool_size=4, pool_timeout_s=5, application_name="gifting-test")
    settings = GiftingSettings(database_url=empty_database, nats_url="nats://127.0.0.1:1", wallet_addr="127.0.0.1:1")
    try:
        yield Gifting(db, Outbox(common.outbox), None, settings)
    finally:
        await db.dispose()


async def test_two_end_stream_calls_at_once_end_it_once_and_answer_alike(gifting: Gifting) -> None:
    for i in range(5):  # each round races two calls on a new stream
        stream = await gifting.start_stream(
            gifting_pb2.StartStreamRequest(creator_id=f"c{i}", title="t", idempotency_key=f"s{i}")
        )
        end = gifting_pb2.EndStreamRequest(stream_id=stream.stream_id, idempotency_key=f"e{i}")
        a, b = await asyncio.gather(gifting.end_stream(end), gifting.end_stream(end))
        stored = await gifting.get_stream(stream.stream_id)
        assert a == b == stored and stored.status == gifting_pb2.STREAM_STATUS_ENDED
    o = common.outbox.c
    async with gifting.db.unit_of_work(readonly=True) as uow:
        ended = (await uow.conn.execute(select(func.count()).where(o.subject == STREAM_ENDED_SUBJECT))).scalar_one()
    assert ended == 5  # one stream.ended event per stream


@pytest.mark.parametrize("title", ["a\x00b", "line\nbreak", "bell\a"])
async def test_a_title_that_is_not_printable_text_is_refused_as_invalid(gifting: Gifting, title: str) -> None:
    with pytest.raises(InvalidArgument) as stream:
        await gifting.start_stream(gifting_pb2.StartStreamRequest(creator_id="c", title=title, idempotency_key="s"))
    with pytest.raises(InvalidArgument) as content:
        await gifting.create_content(
            gifting_pb2.CreateContentRequest(creator_id="c", title=title, price_coins=10, idempotency_key="c")
        )
    assert stream.value.reason == content.value.reason == "INVALID_TITLE"
    # Text of any script is a title, emoji joined by zero-width joiners too.
    text = "Живой эфир 👨\u200d👩\u200d👧"
    live = await gifting.start_stream(gifting_pb2.StartStreamRequest(creator_id="c", title=text, idempotency_key="s2"))
    assert live.title == text and (await gifting.get_stream(live.stream_id)).title == text
