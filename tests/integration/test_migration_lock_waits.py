"""A migration queued for a table lock behind a long transaction must not stop the live traffic.

PostgreSQL grants locks in order: a migration's ALTER TABLE (ACCESS EXCLUSIVE) waiting behind a
long transaction that read the table (a report, pg_dump, an open psql session) makes every later
statement on the table wait behind it. The migration connection's lock_timeout bounds that stall,
the step is rolled back and tried again, and a migration blocked past its give-up time exits
non-zero naming the blocker. A CREATE INDEX CONCURRENTLY build, which waits for older
transactions by design and blocks nobody, must not be cut short by that timeout.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from services.common import migrate
from services.common.app import idle_in_transaction_timeout_s
from services.common.config import ServiceSettings
from services.common.db import Database, normalize_url
from services.common.migrate import alembic_config, upgrade_head
from services.payout.config import PayoutSettings

ROOT = Path(__file__).resolve().parents[2]
WALLET = ROOT / "services" / "wallet" / "migrations"
GIFTING = ROOT / "services" / "gifting" / "migrations"
PAYOUT = ROOT / "services" / "payout" / "migrations"
LOCK_TIMEOUT_S = 1.0
WAIT_S_MAX = 10.0  # for the migration to start waiting, or to end once the blocker has
# A live write beside the blocked migration waits at most about the lock timeout; this leaves
# room for a slow machine. Without the timeout it waits as long as the blocker is held.
LIVE_WRITE_S_MAX = LOCK_TIMEOUT_S + 2.0
BLOCKER = "slow-report"  # the blocker's application_name, which the migration must name

INSERT_PURCHASE = (
    "INSERT INTO purchases (purchase_id, user_id, package_id, coins, currency_code, amount_minor,"
    " payment_method, provider, checkout_session_id, status, created_at_us, updated_at_us)"
    " VALUES ($1, 'u1', 'p1', 1, 'USD', 1, 'card', 'fake', 'cs', 'PENDING', 0, 0)"
)


def _plain(url: str) -> str:
    return normalize_url(url).replace("+asyncpg", "")


@pytest.fixture
async def postgres(empty_database: str) -> AsyncIterator[str]:
    if not empty_database.startswith("postgresql"):
        pytest.skip("SQLite: no lock timeout; the service is one process, stopped while it migrates")
    yield empty_database


async def _upgrade_to(migrations: Path, url: str, revision: str) -> None:
    await asyncio.to_thread(command.upgrade, alembic_config(migrations, url), revision)


async def _wait_for_lock_waiter(conn: asyncpg.Connection) -> None:
    """Until a session of this database waits for a lock (the migration), at most WAIT_S_MAX."""
    deadline = time.monotonic() + WAIT_S_MAX
    sql = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    while not await conn.fetchval(sql):
        assert time.monotonic() < deadline, f"no session waits for a lock after {WAIT_S_MAX} s"
        await asyncio.sleep(0.05)


def _head(migrations: Path) -> str:
    """The newest revision of a service's migrations (a new revision must not break the test)."""
    return ScriptDirectory.from_config(alembic_config(migrations, "sqlite://")).get_current_head() or ""


async def _columns(conn: asyncpg.Connection, table: str) -> set[str]:
    rows = await conn.fetch("SELECT column_name FROM information_schema.columns WHERE table_name = $1", table)
    return {r["column_name"] for r in rows}


async def test_live_writes_wait_at_most_about_the_lock_timeout_and_the_retry_migrates_once_the_blocker_ends(
    postgres: str, caplog: pytest.LogCaptureFixture
) -> None:
    await _upgrade_to(WALLET, postgres, "0006")  # 0007 adds a column to purchases: ACCESS EXCLUSIVE
    blocker = await asyncpg.connect(_plain(postgres), server_settings={"application_name": BLOCKER})
    live = await asyncpg.connect(_plain(postgres), server_settings={"application_name": "wallet"})
    migrating: asyncio.Task[None] | None = None
    try:
        await blocker.execute("BEGIN; SELECT count(*) FROM purchases")  # ACCESS SHARE, held
        with caplog.at_level(logging.INFO, logger="services.common.migrate"):
            migrating = asyncio.create_task(upgrade_head(WALLET, postgres, lock_timeout_s=LOCK_TIMEOUT_S, give_up_s=60))
            await _wait_for_lock_waiter(live)
            started = time.monotonic()
            await asyncio.wait_for(live.execute(INSERT_PURCHASE, "live-1"), LIVE_WRITE_S_MAX)
            assert time.monotonic() - started < LIVE_WRITE_S_MAX
            assert not migrating.done(), "it migrated while the blocker held its lock"
            for _ in range(int(WAIT_S_MAX / 0.05)):
                if "waited too long for a table lock" in caplog.text:
                    break
                await asyncio.sleep(0.05)
            retried = [r for r in caplog.records if "waited too long for a table lock" in r.getMessage()]
            assert retried, caplog.text
            assert BLOCKER in retried[0].blockers and "purchases" in retried[0].blockers
            assert str(await blocker.fetchval("SELECT pg_backend_pid()")) in retried[0].blockers
            assert "ALTER TABLE purchases" in retried[0].statement
            # A second live write, during a later attempt's wait, is bounded as well.
            await asyncio.wait_for(live.execute(INSERT_PURCHASE, "live-2"), LIVE_WRITE_S_MAX)
            await blocker.execute("ROLLBACK")
            await asyncio.wait_for(migrating, WAIT_S_MAX + 15)  # the next attempt, after its backoff
        assert "coins_claimed" in await _columns(live, "purchases")
        assert await live.fetchval("SELECT version_num FROM alembic_version") == _head(WALLET)
        assert await live.fetchval("SELECT count(*) FROM purchases") == 2
    finally:
        if not blocker.is_closed():
            await blocker.close()
        if migrating is not None and not migrating.done():
            migrating.cancel()
            await asyncio.gather(migrating, return_exceptions=True)
        await live.close()


async def test_a_migration_blocked_past_its_give_up_time_exits_naming_the_blocker_and_changes_nothing(
    postgres: str,
) -> None:
    await _upgrade_to(WALLET, postgres, "0006")
    blocker = await asyncpg.connect(_plain(postgres), server_settings={"application_name": BLOCKER})
    proc: asyncio.subprocess.Process | None = None
    try:
        await blocker.execute("BEGIN; SELECT count(*) FROM purchases")
        env = {
            **os.environ,
            "LIVEGIFTS_WALLET_DATABASE_URL": postgres,
            "LIVEGIFTS_WALLET_NATS_URL": "nats://127.0.0.1:1",  # required; migrate does not connect
            "LIVEGIFTS_WALLET_PAYMENT_WEBHOOK_SECRET": "test-webhook-secret-0123456789",
            "LIVEGIFTS_WALLET_LOG_FORMAT": "text",
            "LIVEGIFTS_WALLET_MIGRATION_LOCK_TIMEOUT_S": "0.5",
            "LIVEGIFTS_WALLET_MIGRATION_LOCK_GIVE_UP_S": "3",
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.wallet", "migrate", cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(proc.communicate(), 30)  # give-up 3 s + an attempt and a start
        log = err.decode()
        assert proc.returncode == 1, log
        assert "cannot migrate the database" in log and "gave up after" in log, log
        assert BLOCKER in log and "holding purchases" in log, log
        assert "Traceback" not in log, log
        assert await blocker.fetchval("SELECT version_num FROM alembic_version") == "0006"
        assert "coins_claimed" not in await _columns(blocker, "purchases")
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await blocker.close()


@pytest.mark.parametrize(
    ("migrations", "start", "index"),
    [(WALLET, "0008", "ix_idempotency_keys_created_at"), (GIFTING, "0007", "ix_gift_events_key_lost")],
    ids=["wallet-0009", "gifting-0008"],
)
async def test_a_concurrent_index_build_waits_for_older_transactions_past_the_lock_timeout(
    postgres: str, migrations: Path, start: str, index: str, caplog: pytest.LogCaptureFixture
) -> None:
    """CREATE INDEX CONCURRENTLY waits for every transaction with an older snapshot, and
    PostgreSQL counts that wait against lock_timeout: the build must run without it."""
    await _upgrade_to(migrations, postgres, start)
    blocker = await asyncpg.connect(_plain(postgres), server_settings={"application_name": BLOCKER})
    watcher = await asyncpg.connect(_plain(postgres))  # the blocker's own snapshot would show nothing new
    migrating: asyncio.Task[None] | None = None
    try:
        # A report's snapshot, on a table the migration does not alter.
        await blocker.execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT * FROM alembic_version")
        with caplog.at_level(logging.INFO, logger="services.common.migrate"):
            migrating = asyncio.create_task(upgrade_head(migrations, postgres, lock_timeout_s=0.5, give_up_s=60))
            await _wait_for_lock_waiter(watcher)
            await asyncio.sleep(4 * 0.5)  # well past the lock timeout
            assert not migrating.done()
            await blocker.execute("ROLLBACK")
            await asyncio.wait_for(migrating, WAIT_S_MAX)
        assert "waited too long for a table lock" not in caplog.text
        valid = "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)"
        assert await watcher.fetchval(valid, index) is True
    finally:
        if migrating is not None and not migrating.done():
            migrating.cancel()
            await asyncio.gather(migrating, return_exceptions=True)
        await blocker.close()
        await watcher.close()


async def test_the_downgrade_back_to_brin_keeps_live_writes_going_while_an_older_transaction_holds_the_table(
    postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Undoing the BRIN -> B-tree revision (a rollback's `alembic downgrade`) rebuilds each index
    beside the writers, as the upgrade does: a plain DROP INDEX queued behind a report's open
    transaction (ACCESS EXCLUSIVE, then the BRIN build's SHARE lock) stopped every write on the
    table for as long as it waited, up to the lock timeout each attempt."""
    monkeypatch.setattr(migrate, "MIGRATION_LOCK_TIMEOUT_S", 60.0)  # a stall as long as the blocker
    await _upgrade_to(PAYOUT, postgres, "0017")
    blocker = await asyncpg.connect(_plain(postgres), server_settings={"application_name": BLOCKER})
    live = await asyncpg.connect(_plain(postgres), server_settings={"application_name": "payout"})
    downgrade = asyncio.to_thread(command.downgrade, alembic_config(PAYOUT, postgres), "0016")
    migrating = asyncio.ensure_future(downgrade)
    try:
        await blocker.execute("BEGIN; SELECT count(*) FROM inbox")  # ACCESS SHARE, held
        await _wait_for_lock_waiter(live)
        await asyncio.wait_for(live.execute("INSERT INTO inbox VALUES ('c', 'live', 0)"), WAIT_S_MAX)
        assert not migrating.done(), "it migrated while the blocker held its transaction open"
        await blocker.execute("ROLLBACK")
        await asyncio.wait_for(migrating, WAIT_S_MAX)
        method = (
            "SELECT am.amname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " JOIN pg_am am ON am.oid = c.relam WHERE i.indexrelid = to_regclass($1)"
        )
        for index in ("ix_inbox_received_at", "ix_idempotency_keys_created_at"):
            assert tuple(await live.fetchrow(method, index)) == ("brin", True), index
    finally:
        if not blocker.is_closed():
            await blocker.close()  # ends its transaction: the downgrade goes on, and is waited for
        await asyncio.gather(migrating, return_exceptions=True)
        await live.close()


async def test_a_services_transaction_left_open_is_ended_by_the_server_and_frees_its_locks(postgres: str) -> None:
    """A unit of work whose client went quiet (a vanished node, a frozen process; here: a leak)
    must not hold its table locks until TCP keepalive notices, hours later."""
    await _upgrade_to(WALLET, postgres, "0006")
    idle_s = 1.0
    db = Database(
        postgres, pool_size=1, pool_timeout_s=5, application_name="wallet", idle_in_transaction_timeout_s=idle_s
    )
    migration = await asyncpg.connect(_plain(postgres), server_settings={"lock_timeout": "1000ms"})
    try:
        with pytest.raises(DBAPIError):  # its next statement finds the session ended
            async with db.unit_of_work(readonly=True) as leaked:
                await leaked.conn.execute(text("SELECT count(*) FROM purchases"))  # ACCESS SHARE, held
                await asyncio.sleep(idle_s + 1.5)
                await migration.execute("ALTER TABLE purchases ADD COLUMN coins_claimed BIGINT")  # not blocked
                await leaked.conn.execute(text("SELECT 1"))
        assert "coins_claimed" in await _columns(migration, "purchases")
        async with db.unit_of_work(readonly=True) as uow:  # the pool replaced the ended connection
            assert (await uow.conn.execute(text("SELECT count(*) FROM purchases"))).scalar_one() == 0
    finally:
        await migration.close()
        await db.dispose()


def test_the_idle_in_transaction_timeout_outlasts_every_gap_a_service_makes_itself() -> None:
    defaults = ServiceSettings(database_url="sqlite:///x.db", nats_url="nats://127.0.0.1:1")
    assert idle_in_transaction_timeout_s(defaults) == 2 * defaults.db_statement_timeout_s == 120
    # The relay's claimed batch waits for JetStream up to OUTGOING_DEADLINE_S + 5 s per 1,000 events.
    slow = defaults.model_copy(update={"outgoing_deadline_s": 120.0, "relay_batch_size_max": 10_000})
    assert idle_in_transaction_timeout_s(slow) == 2 * 10 * (120 + 5)
    # Payout's dispatcher holds a withdrawal's submission lock over the provider's answer.
    payout = PayoutSettings(
        database_url="sqlite:///x.db",
        nats_url="nats://127.0.0.1:1",
        wallet_addr="127.0.0.1:1",
        payout_webhook_secret="a-webhook-secret-of-32-characters",
        provider_timeout_s=100,
    )
    assert idle_in_transaction_timeout_s(payout) == 2 * 100
