"""A database that refuses us answers UNAVAILABLE (retry), never INTERNAL (our bug).

After a rotated password or a role removed by mistake, every call fails until it is fixed;
callers and alerts must see a dependency outage, as for a server that is down. A primary that
goes silent (lost with its node: no FIN, no RST) fails what waits on it within
DB_STATEMENT_TIMEOUT_S, and what comes next runs on a new connection. A database that refuses
new connections (not allowed, or renamed away) is an outage too, over once it takes them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from pathlib import Path

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from services.common.batching import MicroBatcher
from services.common.db import Database, driver_sqlstate
from services.common.dependency_errors import error_kind, is_retryable, is_unavailable
from services.common.grpcserver import ErrorInterceptor
from services.common.loops import run_every
from tests.integration import pg
from tests.integration.helpers import buy_coins, eventually, expect_error, uid
from tests.support.wallet_server import SECRET, wallet_server


async def test_a_role_postgresql_refuses_is_a_dependency_outage_not_an_internal_error() -> None:
    admin = pg.admin_url_or_skip()
    url = make_url(admin).set(username="livegifts_no_such_role", password=None).render_as_string(hide_password=False)
    db = Database(url, pool_size=1, pool_timeout_s=5, application_name="refused")
    try:
        async with db.unit_of_work(readonly=True) as uow:
            await uow.conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - the error is what is tested
        refused = exc
    else:
        raise AssertionError("PostgreSQL accepted a role that does not exist")
    finally:
        await db.dispose()
    status = ErrorInterceptor("livegifts.test")._status_of(refused)
    assert status.code == grpc.StatusCode.UNAVAILABLE
    assert "DEPENDENCY_UNAVAILABLE" in str(status.trailing_metadata)


class _Blackhole:
    """A TCP proxy to PostgreSQL. `cut()` makes every connection open now pass nothing and close
    nothing, for good: a primary lost with its node (no FIN, no RST reaches us). Connections made
    after it pass (the new primary behind the same address)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.cut_ones: list[asyncio.Event] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def cut(self) -> None:
        for cut in self.cut_ones:
            cut.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]
        cut = asyncio.Event()
        self.cut_ones.append(cut)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if cut.is_set():
                    return  # dropped: nothing passes, and nothing is closed
                dst.write(data)
                await dst.drain()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    async def close(self) -> None:
        for w in self.writers:
            w.close()
        if self.server is not None:
            self.server.close()


async def test_a_primary_lost_without_a_word_fails_the_batch_on_it_and_the_next_batch_runs() -> None:
    # A batch whose connection went silent used to wait for ever, and every call queued behind it
    # (the wallet's Spend, gifting's steps) with it: the service answered nothing until restarted.
    admin = make_url(pg.admin_url_or_skip())
    proxy = _Blackhole((admin.host or "127.0.0.1", admin.port or 5432))
    url = admin.set(host="127.0.0.1", port=await proxy.start()).render_as_string(hide_password=False)
    db = Database(url, pool_size=1, pool_timeout_s=5, application_name="blackholed", statement_timeout_s=2)

    async def write(items: list[int]) -> list[int | BaseException]:
        async with db.unit_of_work() as uow:
            await uow.conn.execute(text("SELECT 1"))
            await uow.commit()
        return list(items)

    batcher: MicroBatcher[int, int] = MicroBatcher(write, 10, "test-blackhole")
    try:
        assert await batcher.submit(1) == 1  # the pool holds a connection now
        proxy.cut()
        lost = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0.2)  # its batch is waiting on the lost connection
        behind = asyncio.ensure_future(batcher.submit(3))
        try:
            outcomes = await asyncio.wait_for(asyncio.gather(lost, behind, return_exceptions=True), 60)
        except TimeoutError:
            pytest.fail("the batch on the lost connection never ended, nor did the one queued behind it")
        assert isinstance(outcomes[0], Exception) and is_unavailable(outcomes[0]), outcomes[0]
        assert outcomes[1] == 3
    finally:
        await proxy.close()
        await asyncio.wait_for(db.dispose(), 30)


@pytest.mark.parametrize(
    ("refuse", "allow"),
    [
        ('ALTER DATABASE "{name}" ALLOW_CONNECTIONS false', 'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'),
        ('ALTER DATABASE "{name}" RENAME TO "{name}_away"', 'ALTER DATABASE "{name}_away" RENAME TO "{name}"'),
    ],
    ids=["connections-not-allowed", "renamed-away"],
)
async def test_a_database_that_refuses_new_connections_is_an_outage_and_the_pool_connects_once_it_allows_them(
    refuse: str, allow: str
) -> None:
    # PostgreSQL refuses a new connection to a database that does not allow them (55000: an
    # operator's `ALLOW_CONNECTIONS false` for maintenance) or is not there (3D000: renamed or
    # dropped for a restore). Every call answered INTERNAL, logged "unexpected error" with a
    # traceback, and consumers counted each delivery as the event's own failure, towards parking.
    admin = pg.admin_url_or_skip()
    name = f"lg_refusing_{uuid.uuid4().hex[:12]}"
    pg.create_database(admin, name)
    db = Database(pg.database_url(admin, name), pool_size=2, pool_timeout_s=5, application_name="refusing")

    async def select_one() -> int:
        async with db.unit_of_work(readonly=True) as uow:
            return int((await uow.conn.execute(text("SELECT 1"))).scalar_one())

    try:
        assert await select_one() == 1  # the pool holds a connection now
        # Its sessions ended first: a database is renamed only once nobody is connected to it.
        pg.run_sql(admin, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
        pg.run_sql(admin, refuse.format(name=name))
        refused: list[BaseException] = []
        for _ in range(2):  # the pooled connection the server closed, then a new connect refused
            try:
                await select_one()
            except Exception as exc:  # noqa: BLE001 - the error is what is tested
                refused.append(exc)
        assert len(refused) == 2, "a call went through while the database refused connections"
        for exc in refused:
            assert is_retryable(exc), f"not retryable: {exc!r}"
            status = ErrorInterceptor("livegifts.test")._status_of(exc)
            assert status.code == grpc.StatusCode.UNAVAILABLE, f"{status.code}: {exc!r}"
            assert "DEPENDENCY_UNAVAILABLE" in str(status.trailing_metadata)
        pg.run_sql(admin, allow.format(name=name))
        assert await select_one() == 1, "the pool did not connect again once the database allowed it"
    finally:
        await db.dispose()
        with contextlib.suppress(Exception):
            pg.run_sql(admin, allow.format(name=name))
        pg.drop_database(admin, name)


async def test_the_same_sqlstate_from_a_statement_is_our_bug_not_an_outage() -> None:
    # 55000 at connect is the database refusing connections (above); from a statement it is a
    # statement of ours PostgreSQL cannot run in this state (currval before nextval): INTERNAL,
    # not UNAVAILABLE, or a caller would retry it for ever and a consumer would never park it.
    admin = pg.admin_url_or_skip()
    name = f"lg_statement_{uuid.uuid4().hex[:12]}"
    pg.create_database(admin, name)
    db = Database(pg.database_url(admin, name), pool_size=1, pool_timeout_s=5, application_name="statement")
    try:
        async with db.unit_of_work() as uow:
            await uow.conn.execute(text("CREATE SEQUENCE s"))
            await uow.commit()
        with pytest.raises(Exception) as caught:  # noqa: PT011 - the error is what is tested
            async with db.unit_of_work(readonly=True) as uow:
                await uow.conn.execute(text("SELECT currval('s')"))
        assert driver_sqlstate(getattr(caught.value, "orig", None)) == "55000", repr(caught.value)
        assert not is_unavailable(caught.value) and not is_retryable(caught.value)
        assert ErrorInterceptor("livegifts.test")._status_of(caught.value).code == grpc.StatusCode.INTERNAL
        async with db.unit_of_work(readonly=True) as uow:  # its connection was kept: no outage
            assert (await uow.conn.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await db.dispose()
        pg.drop_database(admin, name)


async def test_a_loop_the_database_fails_round_after_round_logs_once_and_goes_on_when_it_is_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A background loop (payout's dispatcher runs every 0.2 s) whose database refuses it logged
    # "<what> failed, retrying next round" every round: 300 lines a minute per pod for as long
    # as the outage lasted. One line per FAILURE_LOG_INTERVAL_S and kind of error now, saying how
    # many rounds it stands for; the loop handles items again once the database is back, without a restart, and
    # the next outage is logged at once.
    admin = pg.admin_url_or_skip()
    name = f"lg_refusing_{uuid.uuid4().hex[:12]}"
    pg.create_database(admin, name)
    db = Database(pg.database_url(admin, name), pool_size=1, pool_timeout_s=5, application_name="loop")
    rounds = {"ok": 0, "failed": 0}
    first_of_kind: dict[str, str] = {}  # each kind of error the rounds met: its first one's repr

    async def once() -> int:
        try:
            async with db.unit_of_work(readonly=True) as uow:
                await uow.conn.execute(text("SELECT 1"))
        except Exception as exc:
            rounds["failed"] += 1
            first_of_kind.setdefault(error_kind(exc), repr(exc))
            raise
        rounds["ok"] += 1
        return 1

    async def until(what: str, count: int) -> None:
        target = rounds[what] + count
        await eventually(lambda: asyncio.sleep(0, rounds[what] >= target), bool, 20)
        assert rounds[what] >= target, f"the loop stopped: {rounds}"

    def failure_lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.message == "rounds failed, retrying next round"]

    stop = asyncio.Event()
    try:
        with caplog.at_level(logging.WARNING, logger="services.common.loops"):
            loop = asyncio.create_task(run_every(stop, 0.02, once, "rounds"))
            await until("ok", 3)
            with pg.refusing_connections(admin, name):
                await until("failed", 20)
                # One line for each kind of error, class and SQLSTATE (the terminated connection's,
                # then the refusal's, 55000), the first of its kind, not one per round.
                first = [r.error for r in failure_lines()]  # type: ignore[attr-defined]
                assert first == list(first_of_kind.values()), (first, first_of_kind)
                assert "DBAPIError (55000)" in first_of_kind, first_of_kind
            await until("ok", 3)
            with pg.refusing_connections(admin, name):  # a new outage: said at once, not held back
                await until("failed", 2)
                assert len(failure_lines()) > len(first), "the second outage not said at once"
            await until("ok", 1)
            stop.set()
            await asyncio.wait_for(loop, 10)
        assert {r.retries for r in failure_lines()} == {1}  # type: ignore[attr-defined]
    finally:
        stop.set()
        await db.dispose()
        pg.drop_database(admin, name)


async def test_an_outage_logs_a_line_per_error_not_one_per_call_and_the_retry_takes_effect_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Every call a database outage failed logged "dependency unavailable": hundreds of lines a
    # second on a busy pod, for as long as the outage lasted. One line per error and reason at
    # once, then one per 30 s saying how many calls it stands for.
    admin = pg.admin_url_or_skip()
    name = f"lg_refusing_{uuid.uuid4().hex[:12]}"
    pg.create_database(admin, name)
    try:
        async with wallet_server(tmp_path, pg.database_url(admin, name)) as wallet:
            user = uid("user")
            await buy_coins(wallet.stub, SECRET, user)  # 700 coins
            key = uid("spend")
            with (
                pg.refusing_connections(admin, name),
                caplog.at_level(logging.WARNING, logger="services.common.grpcserver"),
            ):
                for _ in range(12):
                    await expect_error(wallet.spend(user, key), grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE")
            lines = [r for r in caplog.records if r.message == "dependency unavailable"]
            errors = [r.error for r in lines]  # type: ignore[attr-defined]
            assert "DBAPIError (55000)" in errors, errors
            assert len(errors) == len(set(errors)), f"{len(lines)} lines for 12 calls: {errors}"
            assert all(r.calls == 1 for r in lines)  # type: ignore[attr-defined]
            await wallet.spend(user, key)  # the retry, same key, once the database takes connections
            await wallet.spend(user, key)
            assert await wallet.coins(user) == 699, "the retried spend took effect once"
    finally:
        pg.drop_database(admin, name)
