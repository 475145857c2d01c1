"""A libpq `sslmode` in a service's PostgreSQL URL is honoured by the service and its migration.

SREs copy libpq URLs from their secrets: `?sslmode=...` stopped start-up with a TypeError from
asyncpg.connect(). On a real server: `disable`, `allow` and `prefer` connect (to a server without
TLS, in plain text), and `require` refuses a server that offers no TLS rather than connecting in
plain text, so the mode is applied, not dropped.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from services.common.db import Database
from services.common.migrate import upgrade_head
from tests.integration import pg

WALLET_MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "wallet" / "migrations"


@pytest.fixture
def database() -> Iterator[str]:
    """A PostgreSQL database of its own (no SQLite leg: sslmode is PostgreSQL's)."""
    admin = pg.admin_url_or_skip()
    name = f"lg_tls_{uuid.uuid4().hex[:12]}"
    pg.create_database(admin, name)
    try:
        yield pg.database_url(admin, name)
    finally:
        pg.drop_database(admin, name)


async def _server_ssl(url: str) -> str:
    db = Database(url, pool_size=1, pool_timeout_s=5, application_name="lg-test-tls")
    try:
        async with db.unit_of_work(readonly=True) as uow:
            return str((await uow.conn.execute(text("SHOW ssl"))).scalar_one())
    finally:
        await db.dispose()


async def _in_tls(url: str) -> bool:
    db = Database(url, pool_size=1, pool_timeout_s=5, application_name="lg-test-tls")
    try:
        async with db.unit_of_work(readonly=True) as uow:
            row = await uow.conn.execute(text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))
            return bool(row.scalar_one())
    finally:
        await db.dispose()


@pytest.mark.parametrize("mode", ["disable", "allow", "prefer"])
async def test_a_service_connects_and_migrates_with_a_libpq_sslmode(database: str, mode: str) -> None:
    url = f"{database}{'&' if '?' in database else '?'}sslmode={mode}&connect_timeout=5"
    await upgrade_head(WALLET_MIGRATIONS, url)
    # `allow` tries plain text first, `prefer` TLS first: only a server with TLS on makes a difference.
    assert await _in_tls(url) == (mode == "prefer" and await _server_ssl(url) == "on")


async def test_sslmode_require_never_falls_back_to_plain_text(database: str) -> None:
    if await _server_ssl(database) == "on":
        assert await _in_tls(f"{database}?sslmode=require")
        return
    with pytest.raises(ConnectionError, match="rejected SSL upgrade"):
        await _in_tls(f"{database}?sslmode=require")
