"""The routine audit's recent window (`livegifts audit --detail-since`), on the real suite.

Its totals cover all time; its per-id comparison covers the ids any service wrote a record for
in the window. A suite of its own per backend: a few gifts sent now, most of them then moved
back in time by hand (their spend's and gift's creation, their earning's credit three hours ago),
so the books hold an old part and a recent part. Books are broken by hand, as the other audit
tests break them, and mended after.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import Table, event, select, update

from livegifts.common.v1 import audit_pb2, audit_pb2_grpc
from livegifts.gifting.v1 import gifting_pb2, gifting_pb2_grpc
from livegifts.wallet.v1 import wallet_pb2_grpc
from services.cli import audit
from services.cli.audit import FAILED, OK, check_invariants, collect, wait_until_settled
from services.cli.suite import Suite
from services.common.audit import Query, table_query
from services.common.db import Database
from services.common.migrate import upgrade_head
from services.gifting.storage import gift_events
from services.payout.storage import earnings
from services.wallet.storage import spends
from tests.integration import pg
from tests.integration.auditing import addrs, audit_cli, audit_pages
from tests.integration.conftest import BACKENDS, WEBHOOK_SECRET, running_suite
from tests.integration.helpers import buy_coins, live_stream, uid

HOUR_US = 3600 * 1_000_000
GIFTS_PER_CREATOR = 8
RECENT_PER_CREATOR = 2  # the last gifts of each creator stay in the window; the others are moved out
# Each service's table and the column the window reads.
TIMES: dict[str, tuple[Table, str, str]] = {
    "wallet": (spends, "idempotency_key", "created_at_us"),
    "gifting": (gift_events, "event_id", "created_at_us"),
    "payout": (earnings, "event_id", "credited_at_us"),
}
KINDS = {"wallet": "spends", "gifting": "gifts", "payout": "earnings"}
WALLET_MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "wallet" / "migrations"
KEYS = ["B1", "a1"]  # in code point order; a database collation may sort them the other way


@pytest.fixture(scope="module", params=BACKENDS)
def suite(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    if os.environ.get("LIVEGIFTS_TEST_TARGET_WALLET"):
        pytest.skip("edits its books by hand: not run against an external deployment")
    var_dir = tmp_path_factory.mktemp(f"audit-window-{request.param}")
    with running_suite(request.param, var_dir, "lgwindow") as s:
        yield s


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[Database]:
    db = Database(url, pool_size=1, pool_timeout_s=10, application_name="window-test")
    try:
        yield db
    finally:
        await db.dispose()


def database(suite: Suite, svc: str) -> contextlib.AbstractAsyncContextManager[Database]:
    return opened(suite.config.database_url(svc))


@contextlib.asynccontextmanager
async def migrated_wallet(url: str) -> AsyncIterator[Database]:
    """The wallet's database at `url`, migrated to head."""
    await upgrade_head(WALLET_MIGRATIONS, url)
    async with opened(url) as db:
        yield db


async def spends_read(db: Database, keys: list[str]) -> Query:
    """The audit's read of the wallet's spends, over one stored spend (a coin, at time 10) per key."""
    rows = [{"idempotency_key": k, "status": "SPENT", "amount": 1, "user_id": "u", "created_at_us": 10} for k in keys]
    async with db.unit_of_work() as uow:
        await uow.conn.execute(spends.insert(), rows)
        await uow.commit()
    return table_query(
        db, spends, id_col="idempotency_key", amount_col="amount", party_col="user_id", time_col="created_at_us"
    )


async def execute(suite: Suite, svc: str, *statements) -> None:  # type: ignore[no-untyped-def]
    async with database(suite, svc) as db, db.unit_of_work() as uow:
        for s in statements:
            await uow.conn.execute(s)
        await uow.commit()


@pytest.fixture(scope="module")
def books(suite: Suite) -> dict[str, list[str]]:
    """Roses from one viewer to two creators, settled; all but the last RECENT_PER_CREATOR of each
    creator's gifts moved three hours back. Returns each creator's gift ids, oldest first."""

    async def make() -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        async with (
            grpc.aio.insecure_channel(suite.addr("wallet")) as wc,
            grpc.aio.insecure_channel(suite.addr("gifting")) as gc,
        ):
            wallet, gifting = wallet_pb2_grpc.WalletServiceStub(wc), gifting_pb2_grpc.GiftingServiceStub(gc)
            viewer = uid("viewer")
            await buy_coins(wallet, WEBHOOK_SECRET, viewer)
            for creator in (uid("alice"), uid("bob")):
                stream = await live_stream(gifting, creator)
                answer = await gifting.SendGifts(
                    gifting_pb2.SendGiftsRequest(
                        gifts=[
                            gifting_pb2.SendGiftRequest(
                                stream_id=stream.stream_id,
                                sender_id=viewer,
                                gift_id="rose",
                                quantity=1,
                                idempotency_key=uid("rose"),
                            )
                            for _ in range(GIFTS_PER_CREATOR)
                        ]
                    )
                )
                out[creator] = [r.receipt.gift_event_id for r in answer.results]
                assert all(r.WhichOneof("outcome") == "receipt" for r in answer.results), answer
        return out

    out = asyncio.run(make())
    report = wait_until_settled(lambda ids=None: collect(*addrs(suite), 30.0, True, ids), 60.0)
    assert all(c.status == OK for c in report), report
    old = [k for ids in out.values() for k in ids[:-RECENT_PER_CREATOR]]
    moved = int(time.time() * 1_000_000) - 3 * HOUR_US

    async def age() -> None:
        for svc, (table, id_col, time_col) in TIMES.items():
            await execute(suite, svc, update(table).where(table.c[id_col].in_(old)).values({time_col: moved}))

    asyncio.run(age())
    return out


@contextlib.contextmanager
def swapped_creators(suite: Suite, a: str, b: str) -> Iterator[None]:
    """Gifts a and b (a rose each, to different creators) swap creators in gifting's books: every
    total holds (same coins, same counts), but each is now credited to another creator."""

    async def swap() -> None:
        async with database(suite, "gifting") as db, db.unit_of_work(readonly=True) as uow:
            rows = dict(
                (
                    await uow.conn.execute(
                        select(gift_events.c.event_id, gift_events.c.creator_id).where(
                            gift_events.c.event_id.in_([a, b])
                        )
                    )
                ).all()
            )
        g = gift_events.c
        await execute(
            suite,
            "gifting",
            update(gift_events).where(g.event_id == a).values(creator_id=rows[b]),
            update(gift_events).where(g.event_id == b).values(creator_id=rows[a]),
        )

    asyncio.run(swap())
    try:
        yield
    finally:
        asyncio.run(swap())


def test_the_window_lists_only_its_records_a_page_at_a_time(suite: Suite, books: dict[str, list[str]]) -> None:
    """ListAuditRecords with since_us pages through the records written since then, in (time, id)
    order, and through nothing older: the read is the window's, whatever the books hold."""
    recent = {k for ids in books.values() for k in ids[-RECENT_PER_CREATOR:]}
    since = int(time.time() * 1_000_000) - 2 * HOUR_US
    for svc, kind in KINDS.items():
        with grpc.insecure_channel(suite.addr(svc)) as ch:
            stub = audit_pb2_grpc.AuditServiceStub(ch)
            pages = audit_pages(stub, audit_pb2.ListAuditRecordsRequest(kind=kind, since_us=since, page_size=1))
            assert all(page.since_applied for page in pages)
            got = [r.id for page in pages for r in page.records]
            every = stub.ListAuditRecords(audit_pb2.ListAuditRecordsRequest(kind=kind, page_size=5000)).records
        assert sorted(got) == sorted(recent), svc  # each once, none of the older ones
        assert len(pages) <= len(recent) + 1, svc
        assert len(every) == GIFTS_PER_CREATOR * len(books), svc  # the older ones are in the books


def test_the_windowed_audit_passes_and_judges_only_the_windows_ids(suite: Suite, books: dict[str, list[str]]) -> None:
    out = audit_cli(suite, "--detail-since", "2h", "--wait", "30")
    assert out.returncode == 0, out.stdout + out.stderr
    recent = RECENT_PER_CREATOR * len(books)
    assert f"window: the {recent} ids with a record since" in out.stdout, out.stdout
    full = audit_cli(suite, "--detail", "--wait", "30")
    assert full.returncode == 0 and "window:" not in full.stdout, full.stdout + full.stderr


def test_a_broken_book_in_the_window_fails_the_windowed_audit(suite: Suite, books: dict[str, list[str]]) -> None:
    """Two recent gifts credited to each other's creator: the totals hold, the window's per-id
    comparison does not."""
    a, b = (ids[-1] for ids in books.values())
    with swapped_creators(suite, a, b):
        totals = audit_cli(suite, "--wait", "10")
        assert totals.returncode == 0, totals.stdout  # no total tells
        out = audit_cli(suite, "--detail-since", "2h", "--wait", "10")
        assert out.returncode == 1, out.stdout + out.stderr
        assert "credited to another creator than the gift's" in out.stdout, out.stdout


def test_the_same_break_before_the_window_is_left_to_the_full_detail(suite: Suite, books: dict[str, list[str]]) -> None:
    """The stated limit: a break that keeps every total, in ids none of whose records is in the
    window, is not seen by the windowed run (the run whose window covered it saw it), and the full
    `--detail` still finds it."""
    a, b = (ids[0] for ids in books.values())
    with swapped_creators(suite, a, b):
        out = audit_cli(suite, "--detail-since", "2h", "--wait", "10")
        assert out.returncode == 0, out.stdout + out.stderr
        full = audit_cli(suite, "--detail", "--wait", "10")
        assert full.returncode == 1 and "credited to another creator than the gift's" in full.stdout, full.stdout


def test_an_old_record_altered_by_hand_fails_the_windowed_audit_by_its_totals(
    suite: Suite, books: dict[str, list[str]]
) -> None:
    """An earning from before the window credited one coin more: the all-time totals catch it."""
    old = next(iter(books.values()))[0]
    e = earnings.c
    asyncio.run(execute(suite, "payout", update(earnings).where(e.event_id == old).values(coins=e.coins + 1)))
    try:
        out = audit_cli(suite, "--detail-since", "2h", "--wait", "10")
        assert out.returncode == 1, out.stdout + out.stderr
        failed = [line for line in out.stdout.splitlines() if "FAILED" in line]
        assert any("4. diamonds = exact creator share" in line for line in failed), out.stdout
        assert "credited coins differ" not in out.stdout  # not seen id by id: outside the window
    finally:
        asyncio.run(execute(suite, "payout", update(earnings).where(e.event_id == old).values(coins=e.coins - 1)))


def test_a_window_larger_than_the_ids_held_is_judged_chunk_by_chunk(
    suite: Suite, books: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 3 of the window's ids held at a time, its 4 ids take more than one read of the window:
    each is judged once, and a break that keeps every total, in the highest ids, is still found."""
    chunks: list[audit._Lowest] = []

    class Spy(audit._Lowest):
        def __init__(self, after: str, limit: int) -> None:
            super().__init__(after, limit)
            chunks.append(self)

    monkeypatch.setattr(audit, "WINDOW_IDS_MAX", 3)
    monkeypatch.setattr(audit, "_Lowest", Spy)
    since = int(time.time() * 1_000_000) - 2 * HOUR_US
    recent = sorted(k for ids in books.values() for k in ids[-RECENT_PER_CREATOR:])
    report = check_invariants(collect(*addrs(suite), 30.0, True, since_us=since))
    assert all(c.status == OK for c in report), report
    credit = next(c for c in report if c.name == audit.CREDIT_LINE)
    assert f"window: the {len(recent)} ids with a record since" in credit.detail, credit
    assert len(chunks) > 1 and max(c.peak for c in chunks) <= 3
    # The highest id of the window (the last chunk's) and the other creator's highest, swapped.
    creator = {k: c for c, ids in books.items() for k in ids}
    a = recent[-1]
    b = max(k for k in recent if creator[k] != creator[a])
    with swapped_creators(suite, a, b):
        report = check_invariants(collect(*addrs(suite), 30.0, True, since_us=since))
    credit = next(c for c in report if c.name == audit.CREDIT_LINE)
    assert credit.status == FAILED and "credited to another creator than the gift's 2:" in credit.detail, credit
    assert a in credit.detail and b in credit.detail, credit


def test_a_window_of_several_chunks_is_read_about_once_with_the_verdicts_of_one_read(
    suite: Suite, books: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """All 16 gifts in the window (4 h), 4 of its ids held at a time: the report is the one of a
    read of the whole window, broken books too, and the servers hand each window page only the
    ids within the bounds it asked for (`after_id`, `up_to`), so the window's records are read
    about once, not once per chunk."""
    since = int(time.time() * 1_000_000) - 4 * HOUR_US
    every = {k for ids in books.values() for k in ids}
    pages: list[tuple[bool, str, str, list[str]]] = []  # (a pass's first page, after_id, up_to, ids)
    stub = audit_pb2_grpc.AuditServiceStub

    class Counting:
        """The real stub, noting each window page's bounds and the ids it answered."""

        def __init__(self, channel: grpc.Channel) -> None:
            self.stub = stub(channel)

        def ListAuditRecords(self, req, timeout):  # type: ignore[no-untyped-def]  # noqa: N802 - the gRPC name
            out = self.stub.ListAuditRecords(req, timeout=timeout)
            if req.since_us and not req.ids:
                first = req.kind == "earnings" and not req.page_token
                pages.append((first, req.after_id, req.up_to, [r.id for r in out.records]))
            return out

    def reports() -> tuple[list[audit.Check], list[audit.Check]]:
        """The report with the whole window held, then with 4 of its ids held at a time (in pages
        of 2, smaller than a chunk as the CLI's 5000 are than its 500,000)."""
        whole = check_invariants(collect(*addrs(suite), 30.0, True, since_us=since))
        with monkeypatch.context() as mp:
            mp.setattr(audit, "WINDOW_IDS_MAX", 4)
            mp.setattr(audit, "PAGE_SIZE", 2)
            mp.setattr(audit.audit_pb2_grpc, "AuditServiceStub", Counting)
            pages.clear()
            return whole, check_invariants(collect(*addrs(suite), 30.0, True, since_us=since))

    whole, chunked = reports()
    assert all(c.status == OK for c in whole), whole
    credit = next(c for c in chunked if c.name == audit.CREDIT_LINE)
    assert f"window: the {len(every)} ids with a record since" in credit.detail, credit
    assert chunked == whole
    passes = sum(first for first, _, _, _ in pages)
    assert passes > 3  # several chunks
    for _, after, up_to, got in pages:
        assert all(after < k and (not up_to or k <= up_to) for k in got), (after, up_to, got)
    records = 3 * len(every)  # a spend, a gift and an earning each
    read = sum(len(got) for _, _, _, got in pages)
    assert read <= 1.6 * records, (read, records)  # read once per chunk: about 6 times
    # A break that keeps every total, one in the first chunk and one in the last: the same report.
    a, b = min(every), max(every)
    if len({c for c, ids in books.items() if a in ids or b in ids}) == 1:
        b = max(k for ids in books.values() if a not in ids for k in ids)
    with swapped_creators(suite, a, b):
        whole, chunked = reports()
    assert chunked == whole
    credit = next(c for c in chunked if c.name == audit.CREDIT_LINE)
    assert credit.status == FAILED and "credited to another creator than the gift's 2:" in credit.detail, credit


@pytest.fixture(params=["sqlite", "en-US"])
async def spends_db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """The wallet's migrated database: SQLite, or PostgreSQL sorting text as people read it
    ('a1' before 'B1', as the postgres image under docker-compose does; ICU's en-US here)."""
    if request.param == "sqlite":
        async with migrated_wallet(f"sqlite+aiosqlite:///{tmp_path / 'wallet.db'}") as db:
            yield db
        return
    with pg.en_us_database() as url:
        async with migrated_wallet(url) as db:
            yield db


async def test_a_windows_id_bounds_compare_by_code_point_whatever_the_collation(spends_db: Database) -> None:
    """The CLI's chunks are ranges of ids in Python's order (by code point: "B" < "B1" < "a" <
    "a1"); a database that sorts "a1" before "B1" must still answer the range the CLI asked for,
    or an id of the window falls between two chunks and is never judged."""
    query = await spends_read(spends_db, KEYS)
    for after_id, up_to, want in (("B", "a", ["B1"]), ("", "a", ["B1"]), ("B1", "", ["a1"]), ("", "", KEYS)):
        records, _ = await query("", 10, [], up_to, 5, after_id)
        assert sorted(r.id for r in records) == want, (after_id, up_to)


@pytest.fixture
async def wallet_db(empty_database: str) -> AsyncIterator[Database]:
    """The wallet's migrated database, on each backend."""
    async with migrated_wallet(empty_database) as db:
        yield db


async def test_the_read_by_ids_answers_the_ids_asked_for_in_one_statement_whatever_their_number(
    wallet_db: Database,
) -> None:
    """The audit reads up to 5,000 records by id per call: on PostgreSQL as `= ANY` of one array
    parameter, one statement text for any number of ids. An expanding IN bound a parameter per id
    and made each size a statement of its own to render, parse and plan: most of a large
    window's cost (bench/README.md). On either backend the answer is the records of the ids asked
    for that exist, in id order; an id longer than the column holds is none of them (an array of
    the column's VARCHAR(128) would cut it to a stored one)."""
    stored_long = "L" * 128
    keys = [f"k{i:04d}" for i in range(0, 1400, 2)] + [stored_long]  # odd ones: asked for, not stored
    query = await spends_read(wallet_db, keys)
    statements: list[tuple[str, object]] = []

    def seen(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        if "FROM spends" in statement:
            statements.append((statement, parameters))

    event.listen(wallet_db.engine.sync_engine, "before_cursor_execute", seen)
    many = [f"k{i:04d}" for i in range(1400)]
    for asked in (["k0003", "k0002"], many, ["k1398", "k1398"], [stored_long + "x", "k0004"], [stored_long]):
        records, _ = await query("", 10, asked, "", 0, "")
        assert [r.id for r in records] == sorted(set(asked) & set(keys))
    assert len(statements) == 5
    if wallet_db.dialect == "postgresql":
        texts = {s for s, _ in statements}
        assert len(texts) == 1, texts
        assert "= ANY (" in texts.pop()
        assert [len(p) for _, p in statements] == [1] * 5  # type: ignore[arg-type]
