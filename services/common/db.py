"""The database of one service: an async engine with durable settings, and a unit of work.

SQLite (embedded default) runs in WAL mode with synchronous=FULL; write transactions begin
IMMEDIATE and are serialized in-process by an asyncio lock, so writers queue fairly instead of
spinning in SQLite's busy handler; a connection closed inside a transaction (a call cancelled
mid-statement) rolls it back first. PostgreSQL runs with synchronous_commit=on.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus, unquote, urlencode

from sqlalchemy import event, exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from services.common.sql import dialect_insert


def normalize_url(url: str) -> str:
    """Pick the async driver for a plain URL (postgresql:// -> asyncpg, sqlite:// -> aiosqlite)."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres", "postgresql+psycopg2", "postgresql+psycopg"):
        u = u.set(drivername="postgresql+asyncpg")
    elif u.drivername == "sqlite":
        u = u.set(drivername="sqlite+aiosqlite")
    return u.render_as_string(hide_password=False)


# Query-string keys whose value is a secret: asyncpg and libpq take `password` there as well as
# in the URL's user part, libpq `sslpassword` (a client key's passphrase).
_SECRET_QUERY_WORDS = ("password", "secret", "token")


# libpq's sslmode values, which asyncpg honours too (its `ssl=` takes the same names).
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# PostgreSQL URL query parameters, by how they reach asyncpg (SQLAlchemy's asyncpg dialect hands
# the query string to asyncpg.connect() as keyword arguments, and asyncpg takes libpq's TLS
# parameters only from a DSN: `?sslmode=require`, copied from a libpq URL, stopped start-up with
# a TypeError traceback). Keyword arguments asyncpg takes as the strings a URL carries:
_PG_KWARGS = frozenset(
    {
        "host",  # several `host=h:p`: SQLAlchemy's multi-host URL
        "port",
        "user",
        "password",
        "database",
        "ssl",  # asyncpg's spelling of sslmode
        "passfile",
        "target_session_attrs",
        "krbsrvname",
        "gsslib",
        "service",
        "servicefile",
        "prepared_statement_cache_size",  # SQLAlchemy's; it makes it an int
    }
)
# libpq parameters asyncpg reads only from a DSN: handed over in one (connect_args["dsn"]) that
# carries nothing else, host, user and database still coming from the URL.
_PG_DSN_ONLY = frozenset(
    {
        "sslmode",
        "sslrootcert",
        "sslcert",
        "sslkey",
        "sslcrl",
        "sslpassword",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "sslnegotiation",
    }
)
# libpq's list of hosts in the URL's authority (`h1:5432,h2:5432`) is not SQLAlchemy's form, and
# asyncpg took the whole "h1,h2" for one host name: refused at start-up, with the form that works.
MULTI_HOST_FORM = "several hosts go in the query, ?host=h1:5432&host=h2:5432, not as libpq's h1:5432,h2:5432"


def postgres_connect_args(url: str) -> tuple[str, dict[str, Any]]:
    """A PostgreSQL URL as the asyncpg dialect takes it: the URL without the libpq parameters
    asyncpg cannot take as keyword arguments, and the connect_args that honour them.

    libpq's TLS parameters (sslmode, sslrootcert, sslcert, sslkey, ...) go to asyncpg in a DSN of
    their own, where it applies them as libpq does; `dbname` names the database, over the URL's
    path, as in libpq; `connect_timeout` (seconds) becomes asyncpg's connect timeout. Any other
    parameter (application_name, options, keepalives, ...), or libpq's comma-separated hosts,
    raises ValueError naming it, a start-up configuration error rather than a TypeError (or a
    host "h1,h2" not found) at the first connect. A SQLite URL comes back as it is, with no arguments.
    """
    u = make_url(normalize_url(url))
    if u.get_backend_name() != "postgresql":
        return u.render_as_string(hide_password=False), {}
    if u.host and "," in u.host:
        raise ValueError(MULTI_HOST_FORM)
    if u.host and unquote(u.host).startswith("/") and "host" not in u.query:
        # libpq's Unix-socket directory, percent-encoded in the authority
        # (postgresql://%2Fvar%2Frun%2Fpostgresql/db): SQLAlchemy keeps the host encoded, and
        # asyncpg looked "%2Fvar%2F..." up as a host name at the first connect. Its form: ?host=/dir.
        socket = {"host": unquote(u.host)} | ({"port": str(u.port)} if u.port is not None else {})
        u = u._replace(host=None, port=None).update_query_dict(socket | dict(u.query))  # (set() keeps a None)
    keep: dict[str, str | tuple[str, ...]] = {}
    dsn: dict[str, str] = {}
    args: dict[str, Any] = {}
    for key, value in u.query.items():
        if key == "host":  # more than once: SQLAlchemy's multi-host URL
            keep[key] = value
            continue
        if not isinstance(value, str):
            raise ValueError(f"query parameter {key!r} is given more than once")
        if key in ("ssl", "sslmode") and value not in SSL_MODES:
            raise ValueError(f"{key}={value!r} is not one of {', '.join(SSL_MODES)}")
        if key == "connect_timeout":
            try:
                seconds = int(value)
            except ValueError:
                raise ValueError(f"connect_timeout={value!r} is not a whole number of seconds") from None
            # libpq: 0 or less waits for ever, and less than 2 s is 2 s.
            args["timeout"] = None if seconds <= 0 else max(2, seconds)
        elif key == "dbname":
            # libpq: the query's dbname overrides the path's (asyncpg's `database` argument,
            # which the dialect fills from the path, would win over one in the DSN).
            u = u.set(database=value)
        elif key in _PG_DSN_ONLY:
            dsn[key] = value
        elif key in _PG_KWARGS:
            keep[key] = value
        else:
            raise ValueError(
                f"query parameter {key!r} is not supported with asyncpg (supported: connect_timeout, "
                f"{', '.join(sorted(_PG_DSN_ONLY | _PG_KWARGS | {'dbname'}))})"
            )
    if "ssl" in keep and "sslmode" in dsn and keep["ssl"] != dsn["sslmode"]:
        raise ValueError(f"ssl={keep['ssl']!r} and sslmode={dsn['sslmode']!r} disagree: give one of them")
    if dsn.get("sslrootcert") == "system":
        _system_root_cert(dsn, keep)
    if dsn:
        args["dsn"] = "postgresql://?" + urlencode(dsn)
    return u.set(query=keep).render_as_string(hide_password=False), args


def _system_root_cert(dsn: dict[str, str], keep: dict[str, str | tuple[str, ...]]) -> None:
    """libpq's `sslrootcert=system` (PostgreSQL 16): the system's trusted CAs, and `verify-full`
    unless a mode is given, a weaker one being an error. asyncpg knows no such value: it left the
    default mode `prefer` unverified (and falling back to plain text), and with `verify-full` it
    opened a file named "system" at the first connect. Here the system's CA file (OpenSSL's, or
    SSL_CERT_FILE) takes its place, in `verify-full`."""
    mode = dsn.get("sslmode", keep.get("ssl", "verify-full"))
    if mode != "verify-full":
        raise ValueError(f"sslrootcert=system needs sslmode=verify-full, as libpq does (given {mode!r})")
    cafile = ssl.get_default_verify_paths().cafile
    if cafile is None:
        raise ValueError(
            "sslrootcert=system: this system has no CA file (SSL_CERT_FILE, or OpenSSL's cert.pem):"
            " give the CA file's path in sslrootcert"
        )
    dsn["sslrootcert"] = cafile
    if "ssl" not in keep:
        dsn["sslmode"] = "verify-full"


def url_for_messages(url: str) -> str:
    """The database URL as logs and start-up errors show it: its password hidden, also one in
    the query string (SQLAlchemy's hide_password hides only the user part's)."""
    u = make_url(url)
    if u.host and "@" in u.host:
        # A password holding an "@" not percent-encoded (%40): the URL is split at its first "@"
        # (SQLAlchemy, as libpq), so the password's rest is in the host, up to its last "@".
        u = u.set(host=u.host.rsplit("@", 1)[1], password="hidden")
    pairs = []
    for key, value in u.query.items():
        secret = any(word in key.lower() for word in _SECRET_QUERY_WORDS)
        for one in (value,) if isinstance(value, str) else value:  # a key given twice: a tuple
            pairs.append(f"{quote_plus(key)}={'***' if secret else quote_plus(one)}")
    shown = u.set(query={}).render_as_string(hide_password=True)
    return f"{shown}?{'&'.join(pairs)}" if pairs else shown


def is_sqlite(url: str) -> bool:
    """True for a SQLite URL."""
    return make_url(url).get_backend_name() == "sqlite"


def ensure_sqlite_dir(url: str) -> None:
    """Create the folder of a SQLite file so a fresh checkout starts without a manual step."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        Path(u.database).parent.mkdir(parents=True, exist_ok=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # durable: fsync on every commit
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


class _SQLiteConnection(sqlite3.Connection):
    """A sqlite3 connection that rolls back its open transaction before it closes.

    grpc.aio cancels a handler at its deadline, and the cancel can land inside a statement of a
    write transaction. SQLAlchemy takes the CancelledError for an exit: it invalidates the
    connection without a ROLLBACK and without closing the statement's cursor, and closes the
    connection. sqlite3 closes with sqlite3_close_v2, which, while a statement is unfinished
    (an executemany, or a RETURNING statement whose rows were not fetched), does not close but
    leaves a zombie: its transaction not rolled back, the write lock of BEGIN IMMEDIATE held
    until that cursor is freed, which the cancelled call's traceback (a reference cycle) delays
    to the garbage collector's next full pass (minutes). Every later writer of the service
    waited busy_timeout and failed SQLITE_BUSY. Rolled back here, in aiosqlite's thread after
    the cancelled statement, on every path that closes a connection (invalidation, a failed
    reset, dispose, garbage collection), the lock ends with the transaction. A committed
    transaction is not in one any more: nothing it wrote is undone.
    """

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):  # closed already, or the rollback failed: close anyway
            if self.in_transaction:
                self.rollback()
        super().close()


def _sqlite_no_driver_transactions(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # sqlite3's own BEGIN, before DML only, is off


def _sqlite_begin(conn: Any) -> None:
    options = conn.get_execution_options()
    if options.get("isolation_level") == "AUTOCOMMIT":
        return  # an Alembic autocommit_block (VACUUM, or a PRAGMA a transaction would make a no-op)
    conn.exec_driver_sql("BEGIN" if options.get("livegifts_readonly", False) else "BEGIN IMMEDIATE")


def sqlite_transactions_by_sqlalchemy(engine: AsyncEngine) -> None:
    """SQLite: each SQLAlchemy transaction is one of SQLite's, begun by SQLAlchemy's begin event
    (BEGIN IMMEDIATE for writers, BEGIN for `livegifts_readonly`), DDL included.

    sqlite3 (and aiosqlite over it) begins a transaction of its own only before an INSERT,
    UPDATE, DELETE or REPLACE: a CREATE, DROP or ALTER ran each in its own autocommit, and a
    rollback undid none of them. A migration stopped part way through an Alembic batch rebuild
    left `_alembic_tmp_<table>` behind, and every retry failed "table ... already exists".
    """
    event.listen(engine.sync_engine, "connect", _sqlite_no_driver_transactions)
    event.listen(engine.sync_engine, "begin", _sqlite_begin)


def _drop_closed_on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Hand out no connection the server already closed, without a round trip.

    Choices for a pooled connection PostgreSQL dropped (restart, failover, pg_terminate_backend):
    A) `pool_pre_ping`: BEGIN; ";"; ROLLBACK on every checkout, three round trips that were
    7-10% of a busy service's samples; B) nothing: the first statement fails and the request
    answers UNAVAILABLE, a retry for every pooled connection; C) ask asyncpg, which reads the
    server's FATAL and EOF as soon as they arrive, whether the connection is closed - the same
    test the dialect's is_disconnect() uses - and let the pool replace it (raising
    DisconnectionError here makes the pool invalidate the connection and check out another, up
    to three times). We take C. A connection that dies after checkout, or whose EOF has not been
    read yet, fails its statement; SQLAlchemy invalidates it (is_disconnect) and ErrorInterceptor
    answers UNAVAILABLE, which callers retry with the same idempotency key.
    """
    driver = getattr(dbapi_connection, "driver_connection", None)
    if driver is not None and driver.is_closed():
        raise exc.DisconnectionError("connection was closed by the server while pooled")


def driver_sqlstate(orig: Any) -> str:
    """The SQLSTATE a driver's error carries (asyncpg's `sqlstate`, psycopg's `pgcode`), or ""."""
    return str(getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None) or "")


READ_ONLY_SQLSTATE = "25006"  # read_only_sql_transaction: a write on a standby or a read-only database


def _drop_read_only(ctx: Any) -> None:
    """Treat a write PostgreSQL refused as read-only (25006) as a disconnect.

    After a failover the pool still holds connections to the old primary, now a standby: each
    of them refuses every write for as long as it lives, and nothing else ever closes it (it
    answers reads, and asyncpg sees no EOF). Marked a disconnect, the connection that said it is
    invalidated, and with it the pool's other connections of that time (recycled at their next
    checkout): the caller's retry connects again, to the new primary (or the same database,
    once it is writable), with no restart. A database still read-only refuses the new
    connection's write too, and its connections are replaced again: one connect per refused
    call, not a spin (every refusal is an answer, UNAVAILABLE STORAGE_READ_ONLY).
    """
    if driver_sqlstate(ctx.original_exception) == READ_ONLY_SQLSTATE:
        ctx.is_disconnect = True


# What PostgreSQL answers a new connection to a database it does not open now: 55000 (object not
# in prerequisite state: `ALLOW_CONNECTIONS false`, set for maintenance or by a tool that needs
# the database to itself) and 3D000 (no such database: dropped, or renamed for a restore).
REFUSED_CONNECT_SQLSTATES = ("55000", "3D000")


def _refused_connect(ctx: Any) -> None:
    """Treat PostgreSQL refusing a new connection to the database (REFUSED_CONNECT_SQLSTATES) as
    a disconnect, which dependency_errors.is_unavailable reads as it reads PostgreSQL's other refusals
    (08, 28, 53, 57P03): the database is unavailable to the service, the call answers
    UNAVAILABLE / DEPENDENCY_UNAVAILABLE, a consumer does not count the delivery towards parking.
    It used to be a bare DBAPIError: every call answered INTERNAL with a traceback in the log,
    and consumers counted an outage as the event's failure. Only at connect (no connection yet):
    55000 from a statement is another matter, a bug of ours (e.g. currval before nextval).
    """
    if ctx.connection is None and driver_sqlstate(ctx.original_exception) in REFUSED_CONNECT_SQLSTATES:
        ctx.is_disconnect = True


def create_engine(
    url: str,
    *,
    pool_size: int,
    pool_timeout_s: float,
    application_name: str,
    statement_timeout_s: float | None = None,
    idle_in_transaction_timeout_s: float | None = None,
) -> AsyncEngine:
    """An async engine for the service's own database, with durability settings applied.

    `statement_timeout_s` (PostgreSQL): how long a statement or commit may go unanswered before
    it fails with TimeoutError (UNAVAILABLE) and its connection is dropped. A primary lost with
    its node or behind a partition sends no FIN and no RST: without a limit a statement waits
    for ever, and a call's deadline rescues only that call, not a batch (MicroBatcher) every
    later call queues behind, nor the relay or a consumer. Not PostgreSQL's statement_timeout,
    which a server that is gone cannot apply.

    `idle_in_transaction_timeout_s` (PostgreSQL's idle_in_transaction_session_timeout): the
    server ends a session that stays this long inside a transaction without a statement. Ours
    never do (a unit of work runs its statements back to back; the outbox relay's claim waits
    for JetStream acks, bounded), but a client that vanished mid-transaction (its node lost, a
    partition, a frozen process) leaves its session holding its locks and the vacuum horizon
    until TCP keepalive notices, hours by default; a migration's ALTER then waits for it. The
    session ended, its next statement finds the connection closed and the pool replaces it.
    """
    url = normalize_url(url)
    if is_sqlite(url):
        ensure_sqlite_dir(url)
        engine = create_async_engine(
            url,
            pool_size=pool_size,
            max_overflow=0,
            pool_timeout=pool_timeout_s,
            connect_args={"factory": _SQLiteConnection},
        )
        sqlite_transactions_by_sqlalchemy(engine)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    url, libpq_args = postgres_connect_args(url)
    engine = create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=pool_timeout_s,
        connect_args={
            "server_settings": {
                "synchronous_commit": "on",
                "application_name": application_name,
                # asyncpg prepares every statement; after five runs PostgreSQL may keep one generic
                # plan for it. A plan made while a table was empty (a fresh database) is a
                # sequential scan it would then keep as the table grows, until autovacuum's next
                # ANALYZE. Our statements are short key look-ups: planning each run costs less.
                "plan_cache_mode": "force_custom_plan",
                **(
                    {"idle_in_transaction_session_timeout": f"{max(1, round(idle_in_transaction_timeout_s * 1000))}ms"}
                    if idle_in_transaction_timeout_s
                    else {}
                ),
            },
            "timeout": 10,
            "command_timeout": statement_timeout_s,
            **libpq_args,  # the URL's TLS parameters, and its connect_timeout over our 10 s
        },
    )
    event.listen(engine.sync_engine.pool, "checkout", _drop_closed_on_checkout)
    event.listen(engine.sync_engine, "handle_error", _drop_read_only)
    event.listen(engine.sync_engine, "handle_error", _refused_connect)
    return engine


class UnitOfWork:
    """One transaction. It rolls back unless the use case calls `commit()`."""

    def __init__(self, conn: AsyncConnection, *, readonly: bool = False) -> None:
        self.conn = conn
        self.readonly = readonly  # opened to read only (SQLite: no write lock; PostgreSQL: no row locks wanted)
        self.committed = False
        self._after_commit: list[Callable[[], None]] = []

    async def commit(self) -> None:
        """Commit the transaction and run the after-commit hooks (e.g. wake the outbox relay)."""
        await self.conn.commit()
        self.committed = True
        for hook in self._after_commit:
            hook()

    def after_commit(self, hook: Callable[[], None]) -> None:
        """Run `hook` once this transaction has committed (never if it rolls back)."""
        self._after_commit.append(hook)


class Database:
    """A service's database: engine plus units of work."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int,
        pool_timeout_s: float,
        application_name: str,
        statement_timeout_s: float | None = None,
        idle_in_transaction_timeout_s: float | None = None,
    ) -> None:
        self.url = normalize_url(url)
        self.sqlite = is_sqlite(self.url)
        self.engine = create_engine(
            self.url,
            pool_size=pool_size,
            pool_timeout_s=pool_timeout_s,
            application_name=application_name,
            statement_timeout_s=statement_timeout_s,
            idle_in_transaction_timeout_s=idle_in_transaction_timeout_s,
        )
        self._write_lock = asyncio.Lock() if self.sqlite else None

    @property
    def dialect(self) -> str:
        """'sqlite' or 'postgresql'."""
        return self.engine.dialect.name

    @contextlib.asynccontextmanager
    async def unit_of_work(self, *, readonly: bool = False, snapshot: bool = False) -> AsyncIterator[UnitOfWork]:
        """Open a transaction; roll it back on exit unless committed.

        `snapshot`: every statement sees the same moment (audits that sum several tables while
        traffic runs). SQLite's read transaction already does; PostgreSQL needs REPEATABLE READ.
        """
        lock = self._write_lock if (self._write_lock is not None and not readonly) else contextlib.nullcontext()
        async with lock:
            async with self.engine.connect() as conn:
                if readonly:
                    await conn.execution_options(livegifts_readonly=True)
                if snapshot and not self.sqlite:
                    await conn.execution_options(isolation_level="REPEATABLE READ")
                await conn.begin()
                uow = UnitOfWork(conn, readonly=readonly)
                try:
                    yield uow
                finally:
                    if not uow.committed and conn.in_transaction():
                        await conn.rollback()

    async def dispose(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()


def insert_ignore(dialect: str, table: Any) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING for the service's dialect (SQLite or PostgreSQL)."""
    return dialect_insert(dialect, table).on_conflict_do_nothing()
