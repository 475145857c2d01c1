"""Integration fixtures: the whole suite as real processes (nats-server + three services).

Every test here runs once on SQLite files and once on PostgreSQL. The PostgreSQL leg needs
LIVEGIFTS_TEST_POSTGRES_URL (e.g. postgresql://postgres@127.0.0.1:5432/postgres); each test
run creates its own databases there and drops them afterwards. Without it, or when that server
cannot be reached, the leg is skipped with a message saying so.

LIVEGIFTS_TEST_TARGET_WALLET / _GIFTING / _PAYOUT (host:port) point the suite at an already
running deployment (docker-compose) instead of starting processes; tests that need to kill
processes or read their files skip there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from livegifts.gifting.v1 import gifting_pb2_grpc
from livegifts.payout.v1 import payout_pb2_grpc
from livegifts.wallet.v1 import wallet_pb2_grpc
from services.cli.suite import Suite, SuiteConfig, free_port
from services.common.db import Database
from services.common.migrate import upgrade_head
from services.common.outbox import Outbox
from services.gifting.config import GiftingSettings
from services.gifting.feed import FeedHub
from services.gifting.storage import common
from services.gifting.usecases import Gifting
from tests.integration import pg

WEBHOOK_SECRET = "test-webhook-secret-" + uuid.uuid4().hex
OPERATOR_TOKEN = "test-operator-token-" + uuid.uuid4().hex
BACKENDS = ["sqlite", "postgres"]


@dataclass
class Deployment:
    """How tests reach one running suite."""

    backend: str
    wallet_addr: str
    gifting_addr: str
    payout_addr: str
    nats_url: str | None
    suite: Suite | None  # None for an external deployment
    var_dir: Path | None
    webhook_secret: str  # the wallet's: signs payment-provider callbacks
    operator_token: str = OPERATOR_TOKEN
    payout_webhook_secret: str = ""  # payout's, for payout-provider callbacks; "" = the same as the wallet's

    @property
    def payout_secret(self) -> str:
        """The secret payout-provider callbacks are signed with."""
        return self.payout_webhook_secret or self.webhook_secret

    @property
    def operator_metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata of an operator (pass as `metadata=` to operator RPCs)."""
        return (("authorization", f"Bearer {self.operator_token}"), ("x-operator", "integration-test"))


def _external() -> Deployment | None:
    w, g, p = (os.environ.get(f"LIVEGIFTS_TEST_TARGET_{s}") for s in ("WALLET", "GIFTING", "PAYOUT"))
    if not (w and g and p):
        return None
    return Deployment(
        "external",
        w,
        g,
        p,
        os.environ.get("LIVEGIFTS_TEST_TARGET_NATS_URL"),
        None,
        None,
        os.environ.get("LIVEGIFTS_TEST_WEBHOOK_SECRET", ""),
        os.environ.get("LIVEGIFTS_TEST_OPERATOR_TOKEN", ""),
        os.environ.get("LIVEGIFTS_TEST_PAYOUT_WEBHOOK_SECRET", ""),
    )


def suite_config(
    var_dir: Path, database_urls: dict[str, str], extra: dict[str, dict[str, str]] | None = None
) -> SuiteConfig:
    """A suite on free ports with file-exported traces, for tests."""
    services = ("wallet", "gifting", "payout")
    extra_env = {
        s: {
            f"LIVEGIFTS_{s.upper()}_OTEL_EXPORTER": "file",
            f"LIVEGIFTS_{s.upper()}_OTEL_FILE": str(var_dir / f"{s}.spans.jsonl"),
            f"LIVEGIFTS_{s.upper()}_LOG_LEVEL": "INFO",
            **((extra or {}).get(s, {})),
        }
        for s in services
    }
    return SuiteConfig(
        var_dir=var_dir,
        nats_port=free_port(),
        grpc_ports={s: 0 for s in services},
        metrics_ports={s: 0 for s in services},
        database_urls=database_urls,
        webhook_secret=WEBHOOK_SECRET,
        operator_token=OPERATOR_TOKEN,
        extra_env=extra_env,
    )


@contextlib.contextmanager
def running_suite(
    backend: str, var_dir: Path, db_prefix: str, extra: dict[str, dict[str, str]] | None = None
) -> Iterator[Suite]:
    """A suite of test processes on `backend` ("sqlite": files in var_dir; "postgres": a new
    database per service named from db_prefix, or the leg skipped saying why), stopped on exit."""
    # Nested, so the databases are dropped even when starting or stopping the suite fails.
    databases: contextlib.AbstractContextManager[dict[str, str]] = (
        pg.service_databases(db_prefix) if backend == "postgres" else contextlib.nullcontext({})
    )
    with databases as urls:
        suite = Suite(suite_config(var_dir, urls, extra))
        try:
            suite.start()
            yield suite
        finally:
            suite.stop()


@pytest.fixture(scope="session", params=BACKENDS)
def deployment(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """The suite under test: started once per backend for the whole session."""
    external = _external()
    if external is not None:
        if request.param != "sqlite":
            pytest.skip("external deployment: its backend is whatever it was deployed with; run once")
        yield external
        return
    var_dir = tmp_path_factory.mktemp(f"suite-{request.param}")
    with running_suite(request.param, var_dir, "lgtest") as suite:
        yield Deployment(
            request.param,
            suite.addr("wallet"),
            suite.addr("gifting"),
            suite.addr("payout"),
            suite.config.nats_url,
            suite,
            var_dir,
            WEBHOOK_SECRET,
        )


@dataclass
class Clients:
    """Async stubs of the three services."""

    wallet: wallet_pb2_grpc.WalletServiceStub
    gifting: gifting_pb2_grpc.GiftingServiceStub
    payout: payout_pb2_grpc.PayoutServiceStub
    channels: list[grpc.aio.Channel]


@pytest.fixture(params=BACKENDS)
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of its own, on each backend, for tests that bring their own schema."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
        return
    admin = pg.admin_url_or_skip()
    name = f"lg_empty_{uuid.uuid4().hex[:12]}"
    pg.create_database(admin, name)
    try:
        yield pg.database_url(admin, name)
    finally:
        pg.drop_database(admin, name)


GIFTING_MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "gifting" / "migrations"


@contextlib.asynccontextmanager
async def gifting_database(url: str, pool_size: int, application_name: str = "test") -> AsyncIterator[Database]:
    """Gifting's database at `url`, migrated to head, open until the block ends."""
    await upgrade_head(GIFTING_MIGRATIONS, url)
    database = Database(url, pool_size=pool_size, pool_timeout_s=5, application_name=application_name)
    try:
        yield database
    finally:
        await database.dispose()


@contextlib.asynccontextmanager
async def gifting_on(
    url: str,
    pool_size: int,
    application_name: str = "gifting-test",
    wallet: Any = None,
    hub: FeedHub | None = None,
    **settings: Any,
) -> AsyncIterator[Gifting]:
    """Gifting's use cases over its migrated database at `url`, with `settings` and no bus; `wallet`
    is the wallet client, if the test reaches it."""
    async with gifting_database(url, pool_size, application_name) as db:
        config = GiftingSettings(database_url=url, nats_url="nats://127.0.0.1:1", wallet_addr="127.0.0.1:1", **settings)
        yield Gifting(db, Outbox(common.outbox), wallet, config, hub)


@pytest.fixture
async def gifting_db(empty_database: str) -> AsyncIterator[Database]:
    """An empty database on each backend with a service's real common tables and indexes (gifting's
    migrations), for tests of what every service keeps (inbox, idempotency records)."""
    async with gifting_database(empty_database, pool_size=2) as database:
        yield database


@pytest.fixture
async def clients(deployment: Deployment) -> AsyncIterator[Clients]:
    """Fresh channels per test (channels belong to the test's event loop)."""
    chans = [
        grpc.aio.insecure_channel(a) for a in (deployment.wallet_addr, deployment.gifting_addr, deployment.payout_addr)
    ]
    yield Clients(
        wallet_pb2_grpc.WalletServiceStub(chans[0]),
        gifting_pb2_grpc.GiftingServiceStub(chans[1]),
        payout_pb2_grpc.PayoutServiceStub(chans[2]),
        chans,
    )
    await asyncio.gather(*(c.close() for c in chans))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark everything here as integration."""
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
