"""A PostgreSQL URL copied from a libpq secret (`?sslmode=require`, `sslrootcert=...`) is honoured.

SQLAlchemy's asyncpg dialect hands the URL's query string to asyncpg.connect() as keyword
arguments; asyncpg takes libpq's TLS parameters only in a DSN, so `sslmode` stopped start-up with
a TypeError traceback. They reach asyncpg in a DSN of their own now; a parameter asyncpg cannot
honour stops start-up with one configuration line naming it.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from typing import Any

import asyncpg
import pytest
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_dbapi, dialect
from sqlalchemy.engine import make_url

from services.common.db import SSL_MODES, postgres_connect_args

BASE = "postgresql://app:pw@db.internal:5432/wallet"


@pytest.mark.parametrize(
    ("query", "url", "args"),
    [
        ("", BASE, {}),
        ("?sslmode=require", BASE, {"dsn": "postgresql://?sslmode=require"}),
        (
            "?sslmode=verify-full&sslrootcert=/etc/ssl/rds-ca.pem&connect_timeout=5",
            BASE,
            {"dsn": "postgresql://?sslmode=verify-full&sslrootcert=%2Fetc%2Fssl%2Frds-ca.pem", "timeout": 5},
        ),
        ("?connect_timeout=0", BASE, {"timeout": None}),  # libpq: wait for ever
        ("?connect_timeout=1", BASE, {"timeout": 2}),  # libpq: at least 2 s
        ("?ssl=verify-ca", BASE + "?ssl=verify-ca", {}),  # asyncpg's own spelling, as it was
        ("?ssl=require&sslmode=require", BASE + "?ssl=require", {"dsn": "postgresql://?sslmode=require"}),
        (
            "?host=a:5432&host=b:5432&target_session_attrs=read-write&sslmode=prefer",
            BASE + "?host=a%3A5432&host=b%3A5432&target_session_attrs=read-write",
            {"dsn": "postgresql://?sslmode=prefer"},
        ),
        # libpq: the query's dbname names the database over the path's (psql connects to "other");
        # in a DSN, asyncpg's `database` argument (the path's, from the dialect) won over it.
        ("?dbname=other&sslmode=require", BASE.replace("/wallet", "/other"), {"dsn": "postgresql://?sslmode=require"}),
    ],
)
def test_libpq_parameters_reach_asyncpg_as_it_takes_them(query: str, url: str, args: dict[str, Any]) -> None:
    got_url, got_args = postgres_connect_args(BASE + query)
    assert (got_url, got_args) == (url.replace("postgresql://", "postgresql+asyncpg://"), args)


def _asyncpg_parse(kw: dict[str, Any], dsn: str | None, ssl: Any = None) -> tuple[Any, Any]:
    """asyncpg's own parse of what connect() gets: the addresses and the connection parameters,
    the dialect's host, port, user, password and database taken out of `kw`."""
    from asyncpg import connect_utils

    return connect_utils._parse_connect_dsn_and_args(
        dsn=dsn,
        host=kw.pop("host"),
        port=kw.pop("port", None),
        user=kw.pop("user"),
        password=kw.pop("password"),
        passfile=None,
        database=kw.pop("database"),
        ssl=ssl,
        service=None,
        servicefile=None,
        direct_tls=None,
        server_settings=None,
        target_session_attrs=None,
        krbsrvname=None,
        gsslib=None,
    )


def test_a_sqlite_url_is_left_alone() -> None:
    assert postgres_connect_args("sqlite:///var/w.db") == ("sqlite+aiosqlite:///var/w.db", {})


@pytest.mark.parametrize("mode", SSL_MODES)
def test_asyncpg_reads_every_sslmode_from_the_arguments_the_dialect_builds(mode: str) -> None:
    """What asyncpg.connect() is called with (the dialect's keyword arguments plus ours) parses
    in asyncpg as libpq would: the mode taken, the host and database the URL's."""
    from asyncpg import connect_utils

    ca = pytest.importorskip("certifi").where()  # some CA file for sslrootcert (verify-* needs one)
    url, args = postgres_connect_args(f"{BASE}?sslmode={mode}&sslrootcert={ca}&connect_timeout=7")
    _, kw = dialect(dbapi=AsyncAdapt_asyncpg_dbapi(asyncpg)).create_connect_args(make_url(url))
    kw |= args
    assert kw.pop("timeout") == 7
    addrs, params = _asyncpg_parse(kw, kw.pop("dsn"))
    assert kw == {}
    assert addrs == [("db.internal", 5432)]
    assert (params.user, params.database, params.password) == ("app", "wallet", "pw")
    assert params.sslmode == connect_utils.SSLMode.parse(mode)
    if mode == "disable":
        assert params.ssl is False
    else:  # sslrootcert taken: the server's certificate checked against it from require on
        verified = params.ssl.verify_mode == ssl.CERT_REQUIRED
        assert verified == (mode in ("require", "verify-ca", "verify-full"))
        assert params.ssl.check_hostname == (mode == "verify-full")
    assert params.server_settings is None  # nothing of ours sent to the server as a setting


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("?sslmode=required", "sslmode='required' is not one of disable, allow, prefer, require"),
        ("?ssl=true", "ssl='true' is not one of"),
        ("?ssl=disable&sslmode=require", "ssl='disable' and sslmode='require' disagree"),
        ("?application_name=x", "query parameter 'application_name' is not supported with asyncpg"),
        ("?keepalives=1", "query parameter 'keepalives' is not supported"),
        ("?sslmode=require&sslmode=disable", "query parameter 'sslmode' is given more than once"),
        ("?connect_timeout=5s", "connect_timeout='5s' is not a whole number of seconds"),
    ],
)
def test_a_parameter_asyncpg_cannot_honour_is_refused_by_name(query: str, says: str) -> None:
    with pytest.raises(ValueError, match="^" + says.replace("(", r"\(").replace("?", r"\?")):
        postgres_connect_args(BASE + query)


def test_an_unusable_database_url_stops_start_up_in_one_line_without_its_password() -> None:
    """Also `migrate`: exit 2, the variable named, no traceback, the password not shown."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEGIFTS_")}
    env |= {"LIVEGIFTS_WALLET_DATABASE_URL": "postgresql://app:hunter2@127.0.0.1:1/w?sslmode=required"}
    out = subprocess.run(
        [sys.executable, "-m", "services.wallet", "migrate"], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 2, out.stderr
    problem = [line for line in out.stderr.splitlines() if line.startswith("  ")]
    assert problem == [
        "  LIVEGIFTS_WALLET_DATABASE_URL: Value error, sslmode='required' is not one of disable, allow, prefer,"
        " require, verify-ca, verify-full"
    ]
    assert "Traceback" not in out.stderr and "hunter2" not in out.stderr


@pytest.mark.parametrize("url", ["postgresql://app:pw@a,b/wallet", "postgresql://app:pw@a:5432,b:5433/wallet"])
def test_libpq_s_list_of_hosts_is_refused_with_the_form_that_works(url: str) -> None:
    """libpq's hosts in the authority: asyncpg took "a,b" for one host name (not found at the first
    connect, after a start-up that passed), and with ports SQLAlchemy's int() quoted a piece of the
    URL; both refused by the settings check, saying to write them as ?host=a:5432&host=b:5432."""
    from pydantic import ValidationError

    from services.common.config import MigrationSettings

    with pytest.raises(ValidationError) as refused:
        MigrationSettings(database_url=url)
    assert "several hosts go in the query, ?host=h1:5432&host=h2:5432" in str(refused.value)
    assert "invalid literal" not in str(refused.value)
    if "5432," not in url:  # the same in the service's and the migration's engines
        with pytest.raises(ValueError, match="several hosts go in the query"):
            postgres_connect_args(url)
    # The form it names works (asyncpg takes both hosts).
    assert postgres_connect_args("postgresql://app:pw@/wallet?host=a:5432&host=b:5433")[0] == (
        "postgresql+asyncpg://app:pw@/wallet?host=a%3A5432&host=b%3A5433"
    )


@pytest.mark.parametrize(
    "query", ["?sslrootcert=system", "?sslmode=verify-full&sslrootcert=system", "?ssl=verify-full&sslrootcert=system"]
)
def test_sslrootcert_system_verifies_the_server_against_the_system_s_cas(query: str) -> None:
    """libpq 16's sslrootcert=system: the system's CAs, verify-full. asyncpg knows no such value:
    alone, it connected in `prefer`, unverified (plain text if the server had no TLS); with
    verify-full it opened a file named "system" at the first connect (FileNotFoundError)."""
    from asyncpg import connect_utils

    url, args = postgres_connect_args(BASE + query)
    _, kw = dialect(dbapi=AsyncAdapt_asyncpg_dbapi(asyncpg)).create_connect_args(make_url(url))
    kw |= args
    _addrs, params = _asyncpg_parse(kw, kw.pop("dsn"), ssl=kw.pop("ssl", None))
    assert params.sslmode == connect_utils.SSLMode.verify_full
    assert params.ssl.verify_mode == ssl.CERT_REQUIRED and params.ssl.check_hostname
    assert params.ssl.cert_store_stats()["x509_ca"] > 0  # the system's CAs loaded


@pytest.mark.parametrize("mode", [m for m in SSL_MODES if m != "verify-full"])
def test_sslrootcert_system_with_a_weaker_sslmode_is_refused_as_libpq_does(mode: str) -> None:
    with pytest.raises(
        ValueError, match=f"^sslrootcert=system needs sslmode=verify-full, as libpq does \\(given '{mode}'\\)"
    ):
        postgres_connect_args(f"{BASE}?sslmode={mode}&sslrootcert=system")


@pytest.mark.parametrize(
    ("url", "socket"),
    [
        ("postgresql://app:pw@%2Fvar%2Frun%2Fpostgresql/wallet", "/var/run/postgresql/.s.PGSQL.5432"),
        ("postgresql://app:pw@%2Fcloudsql%2Fp%3Ar%3Ai:5433/wallet?sslmode=disable", "/cloudsql/p:r:i/.s.PGSQL.5433"),
    ],
)
def test_libpq_s_percent_encoded_socket_directory_in_the_authority_is_a_unix_socket(url: str, socket: str) -> None:
    """libpq reads postgresql://%2Fvar%2Frun%2Fpostgresql/db as the Unix socket in that directory;
    SQLAlchemy kept the host encoded and asyncpg looked "%2Fvar%2Frun%2Fpostgresql" up as a host
    name, at the first connect after a start-up that passed."""

    got, args = postgres_connect_args(url)
    _, kw = dialect(dbapi=AsyncAdapt_asyncpg_dbapi(asyncpg)).create_connect_args(make_url(got))
    addrs, params = _asyncpg_parse(kw, args.get("dsn"))
    assert addrs == [socket]
    assert (params.user, params.database, params.password) == ("app", "wallet", "pw")
