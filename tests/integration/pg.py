"""Create and drop PostgreSQL test databases on the server named by LIVEGIFTS_TEST_POSTGRES_URL."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy.engine import make_url

ENV = "LIVEGIFTS_TEST_POSTGRES_URL"
SERVICES = ("wallet", "gifting", "payout")
_reachable: bool | None = None


async def _execute(admin_url: str, sql: str, *, fetch: bool = False) -> object:
    """Run `sql` as the admin; with `fetch`, one query whose first value it returns."""
    import asyncpg

    from services.common.db import postgres_connect_args

    url, libpq_args = postgres_connect_args(admin_url)
    u = make_url(url)  # a ?dbname= names the database, as for the services
    conn = await asyncpg.connect(
        host=u.host or "127.0.0.1",
        port=u.port or 5432,
        user=u.username or "postgres",
        password=u.password,
        database=u.database or "postgres",
        **{"timeout": 5, **libpq_args},  # its sslmode etc., as the services take them
    )
    try:
        return await (conn.fetchval(sql) if fetch else conn.execute(sql))
    finally:
        await conn.close()


def _run(coro: object) -> object:
    # A thread of its own: callers may be sync fixtures or async tests with a loop running.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()  # type: ignore[arg-type]


def admin_url_or_skip() -> str:
    """The admin URL, or skip the PostgreSQL leg saying why."""
    global _reachable
    url = os.environ.get(ENV)
    if not url:
        pytest.skip(f"PostgreSQL leg skipped: {ENV} is not set (.ci/run sets it)")
    if _reachable is None:
        try:
            _run(_execute(url, "SELECT 1"))
            _reachable = True
        except Exception as exc:  # noqa: BLE001 - any failure means: cannot run this leg here
            _reachable = False
            pytest.skip(f"PostgreSQL leg skipped: {ENV}={url} is not reachable ({exc!r})")
    if not _reachable:
        pytest.skip(f"PostgreSQL leg skipped: {ENV}={url} is not reachable")
    return url


def run_sql(admin_url: str, sql: str) -> None:
    """Run one statement as the admin (e.g. ALTER DATABASE)."""
    _run(_execute(admin_url, sql))


def create_database(admin_url: str, name: str, options: str = "") -> None:
    """CREATE DATABASE name, with `options` (e.g. its locale) if any."""
    _run(_execute(admin_url, f'CREATE DATABASE "{name}" {options}'.rstrip()))


def drop_database(admin_url: str, name: str) -> None:
    """DROP DATABASE name, disconnecting whoever is still connected."""
    _run(_execute(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def refusing_connections(admin_url: str, name: str) -> Iterator[int]:
    """Database `name` refuses new connections (`ALLOW_CONNECTIONS false`, an operator's
    maintenance switch: SQLSTATE 55000) and its sessions are ended (yields how many), until the
    block ends; then it allows them again, also when the block raised."""
    run_sql(admin_url, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    try:
        ended = _run(
            _execute(
                admin_url,
                f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '{name}'",
                fetch=True,
            )
        )
        yield int(ended)  # type: ignore[call-overload]
    finally:
        run_sql(admin_url, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


@contextlib.contextmanager
def service_databases(prefix: str) -> Iterator[dict[str, str]]:
    """A new database per service (service -> URL), each dropped on exit, even when a later step failed."""
    admin = admin_url_or_skip()
    with contextlib.ExitStack() as created:
        urls: dict[str, str] = {}
        for svc in SERVICES:
            name = f"{prefix}_{uuid.uuid4().hex[:10]}_{svc}"
            create_database(admin, name)
            created.callback(drop_database, admin, name)
            urls[svc] = database_url(admin, name)
        yield urls


@contextlib.contextmanager
def en_us_database() -> Iterator[str]:
    """A new database (its URL) whose text sorts as people read it ('a1' before 'B1', 'alice'
    before 'Bob'), as the postgres image under docker-compose sorts (en_US.utf8); ICU's en-US
    here. Skips on a server without ICU; dropped on exit."""
    admin = admin_url_or_skip()
    name = f"lg_en_us_{uuid.uuid4().hex[:12]}"
    try:
        create_database(admin, name, "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'")
    except Exception as exc:  # noqa: BLE001 - a server without ICU (or before PostgreSQL 15) cannot run this test
        pytest.skip(f"no ICU collation on this server: {exc!r}")
    try:
        yield database_url(admin, name)
    finally:
        drop_database(admin, name)


def database_url(admin_url: str, name: str) -> str:
    """The asyncpg URL of database `name` on the admin URL's server."""
    # Without a ?dbname=, which would name the admin's database over `name` (as in libpq).
    u = make_url(admin_url).set(drivername="postgresql+asyncpg", database=name).difference_update_query(["dbname"])
    return u.render_as_string(hide_password=False)
