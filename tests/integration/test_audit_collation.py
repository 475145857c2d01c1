"""The audit's full read (`livegifts audit --detail`) judges every id once whatever the collation.

The CLI cuts the books into ranges of ids by code point (Python's str order) and asks each
service's ListAuditRecords for a range (`page_token` < id <= `up_to`). A PostgreSQL database
created with a language's collation (en_US as the postgres image has it, ICU's 'en-US' here)
sorts "a1" before "B1": if the server ordered and bounded ids that way, an id the client placed
past a range's end fell before the next range's start, and was never judged. Spends' ids are
their callers' own keys (the wallet's Spend takes any printable text), so such ids are real.

The three services' audit servers, over their own migrated databases, on a gRPC server of the
test's; the records written by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from livegifts.common.v1 import audit_pb2, audit_pb2_grpc
from services.cli import audit
from services.cli.audit import SENT, SPENT, Findings
from services.common.audit import Query, audit_registration, table_query
from services.common.db import Database
from services.common.migrate import upgrade_head
from services.gifting.storage import gift_events
from services.payout.storage import earnings
from services.wallet.storage import spends
from tests.integration import pg

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("wallet", "gifting", "payout")
# Ids whose code point order ("B1" < "a1", "Zz" < "a_3" < "aa") is not a language's ("a1" < "B1",
# "aa" < "a_3" < "Zz"). Every one a gift, its spend and its earning; every third one's earning of
# another amount, so a skipped id also shows as a missing finding.
GIFTS = ["A1", "B1", "C1", "a2", "b2", "c2", "A-3", "a_3", "aa", "Zz", "zz", "0x", "X.9", "x-9", "Éa", "eb"]
# Caller's own spend keys, charged without a gift of that id (each a finding of its own).
SPENDS_ALONE = ["AB", "ab", "a-b", "Ab_1", "m", "M1"]


def _gift(k: str, i: int) -> dict[str, object]:
    return {
        "event_id": k,
        "client_key": k,
        "request_hash": "h",
        "kind": "GIFT",
        "stream_id": "s",
        "creator_id": "creator",
        "sender_id": "viewer",
        "gift_id": "rose",
        "quantity": 1,
        "unit_price_coins": 10 + i,
        "coins": 10 + i,
        "status": SENT,
        "created_at_us": 1,
        "updated_at_us": 1,
    }


def _earning(k: str, i: int) -> dict[str, object]:
    coins = 10 + i + (1 if i % 3 == 0 else 0)
    return {
        "event_id": k,
        "creator_id": "creator",
        "kind": "GIFT",
        "sender_id": "viewer",
        "stream_id": "s",
        "coins": coins,
        "share_bp": 5000,
        "units": coins * 5000,
        "occurred_at_us": 1,
        "credited_at_us": 1,
    }


def _spend(k: str, amount: int) -> dict[str, object]:
    return {"idempotency_key": k, "status": SPENT, "user_id": "viewer", "amount": amount, "created_at_us": 1}


ROWS = {
    "wallet": (spends, [_spend(k, 10 + i) for i, k in enumerate(GIFTS)] + [_spend(k, 5) for k in SPENDS_ALONE]),
    "gifting": (gift_events, [_gift(k, i) for i, k in enumerate(GIFTS)]),
    "payout": (earnings, [_earning(k, i) for i, k in enumerate(GIFTS)]),
}


def _kinds(db: Database, svc: str) -> dict[str, Query]:
    """The kind each service's audit server reads, as its __main__ wires it."""
    if svc == "wallet":
        q = table_query(
            db,
            spends,
            id_col="idempotency_key",
            amount_col="amount",
            time_col="created_at_us",
            party_col="user_id",
            status_col="status",
        )
        return {"spends": q}
    if svc == "gifting":
        q = table_query(
            db,
            gift_events,
            id_col="event_id",
            amount_col="coins",
            time_col="created_at_us",
            party_col="creator_id",
            status_col="status",
        )
        return {"gifts": q}
    q = table_query(
        db,
        earnings,
        id_col="event_id",
        amount_col="coins",
        time_col="credited_at_us",
        party_col="creator_id",
        status="CREDITED",
    )
    return {"earnings": q}


@contextlib.contextmanager
def databases(backend: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Each service's empty database: SQLite, or PostgreSQL sorting text as people read it."""
    if backend == "sqlite":
        yield {svc: f"sqlite+aiosqlite:///{tmp_path / f'{svc}.db'}" for svc in SERVICES}
        return
    admin = pg.admin_url_or_skip()
    names = {svc: f"lg_icu_{svc}_{uuid.uuid4().hex[:12]}" for svc in SERVICES}
    created: list[str] = []
    try:
        for name in names.values():
            try:
                pg.create_database(admin, name, "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'")
            except Exception as exc:  # noqa: BLE001 - a server without ICU (or before PostgreSQL 15) cannot run this test
                pytest.skip(f"no ICU collation on this server (CREATE DATABASE ... LOCALE_PROVIDER icu): {exc!r}")
            created.append(name)
        yield {svc: pg.database_url(admin, name) for svc, name in names.items()}
    finally:
        for name in created:
            pg.drop_database(admin, name)


@contextlib.contextmanager
def audit_servers(urls: dict[str, str]) -> Iterator[dict[str, str]]:
    """The three services' audit servers over their migrated databases, holding ROWS; their
    addresses. On a loop of their own, in a thread: the CLI's calls are synchronous."""
    loop = asyncio.new_event_loop()
    ready: asyncio.Future[dict[str, str]] = loop.create_future()
    stop = asyncio.Event()

    async def serve() -> None:
        dbs: list[Database] = []
        servers: list[grpc.aio.Server] = []
        try:
            addrs = {}
            for svc, url in urls.items():
                await upgrade_head(ROOT / "services" / svc / "migrations", url)
                db = Database(url, pool_size=1, pool_timeout_s=10, application_name="collation-test")
                dbs.append(db)
                table, rows = ROWS[svc]
                async with db.unit_of_work() as uow:
                    await uow.conn.execute(table.insert(), rows)
                    await uow.commit()
                server = grpc.aio.server()
                servers.append(server)
                reg = audit_registration(_kinds(db, svc))
                reg.add_to_server(reg.servicer, server)
                addrs[svc] = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
                await server.start()
            ready.set_result(addrs)
            await stop.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise
        finally:
            for server in servers:
                await server.stop(None)
            for db in dbs:
                await db.dispose()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        yield asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(ready), 60), loop).result(90)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()


@pytest.fixture(params=["sqlite", "en-US"])
def servers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    with databases(request.param, tmp_path) as urls, audit_servers(urls) as addrs:
        yield addrs


def _records(svc: str) -> dict[str, audit_pb2.AuditRecord]:
    """ROWS of a service as its audit server answers them."""
    table, rows = ROWS[svc]
    if svc == "wallet":
        key, amount, party, status = "idempotency_key", "amount", "user_id", SPENT
    else:
        key, amount, party, status = "event_id", "coins", "creator_id", SENT if svc == "gifting" else "CREDITED"
    return {
        str(r[key]): audit_pb2.AuditRecord(id=str(r[key]), amount=int(r[amount]), party=str(r[party]), status=status)  # type: ignore[call-overload]
        for r in rows
    }


@pytest.mark.parametrize("page", [2, 3, 5])
def test_the_full_read_judges_every_id_once_whatever_the_collation(
    servers: dict[str, str], page: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Range by range, in pages smaller than the books (the CLI's are 5,000), the audit judges
    each id exactly once and finds what reading everything at once finds."""
    monkeypatch.setattr(audit, "PAGE_SIZE", page)
    progress: list[tuple[int, int]] = []
    with contextlib.ExitStack() as stack:
        w, g, p = (stack.enter_context(grpc.insecure_channel(servers[svc])) for svc in SERVICES)
        got = audit._judge_every_id(w, g, p, 30.0, lambda ranges, ids: progress.append((ranges, ids)))
    spent, gifted, earned = (_records(svc) for svc in SERVICES)
    every = spent.keys() | gifted.keys() | earned.keys()
    want = Findings()
    want.judge_all(every, earned, gifted, spent, gifted)
    assert progress[-1][1] == len(every), progress  # each id judged once: none skipped, none twice
    shown = lambda f: {k: sorted(v) for k, v in f.shown.items()}  # noqa: E731 - in the order judged
    assert (dict(got.counts), shown(got)) == (dict(want.counts), shown(want))
    assert sum(want.counts.values()) == len(GIFTS) // 3 + 1 + len(SPENDS_ALONE), want.counts  # it finds things


def test_a_kinds_pages_come_in_code_point_order_whatever_the_collation(servers: dict[str, str]) -> None:
    """Following next_page_token, every spend once, in Python's order of their ids."""
    got: list[str] = []
    token = ""
    with grpc.insecure_channel(servers["wallet"]) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        while True:
            req = audit_pb2.ListAuditRecordsRequest(kind="spends", page_token=token, page_size=4)
            page = stub.ListAuditRecords(req, timeout=30)
            got += [r.id for r in page.records]
            if not page.next_page_token:
                break
            token = page.next_page_token
    assert got == sorted(GIFTS + SPENDS_ALONE)
