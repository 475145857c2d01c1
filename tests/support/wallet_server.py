"""The wallet service in the test's process: its wiring, gRPC server and error mapping over a real
database, whose storage a test can fill (SQLite's max_page_count), make read-only (query_only) and
free again, for the tests of storage outages."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from pydantic import SecretStr
from sqlalchemy import event

from livegifts.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from services.common.app import Runtime
from services.common.bus import Bus
from services.common.db import Database
from services.common.grpcserver import create_server
from services.common.migrate import upgrade_head
from services.common.outbox import Outbox
from services.wallet.__main__ import SPEC
from services.wallet.config import WalletSettings

SECRET = "storage-full-test-webhook-secret"  # the wallet's payment webhook secret


class WalletServer:
    """A running wallet's stub and database, whose storage a test fills or makes read-only, then frees."""

    def __init__(self, db: Database, stub: Any) -> None:
        self.db, self.stub = db, stub
        self._limit: Callable[..., None] | None = None

    async def _reconnect_with(self, limit: Callable[..., None] | None) -> None:
        """Every connection from now on runs `limit` (None: none); the pooled ones are closed."""
        if self._limit is not None:
            event.remove(self.db.engine.sync_engine, "connect", self._limit)
        self._limit = limit
        if limit is not None:
            event.listen(self.db.engine.sync_engine, "connect", limit)
        await self.db.engine.dispose()

    async def disk_full(self) -> None:
        def cap(dbapi: Any, _record: Any) -> None:
            cursor = dbapi.cursor()
            cursor.execute("PRAGMA page_count")
            pages = cursor.fetchone()[0]
            cursor.execute(f"PRAGMA max_page_count={pages}")
            cursor.close()

        await self._reconnect_with(cap)

    async def read_only(self) -> None:
        def query_only(dbapi: Any, _record: Any) -> None:
            cursor = dbapi.cursor()
            cursor.execute("PRAGMA query_only=ON")
            cursor.close()

        await self._reconnect_with(query_only)

    async def space_back(self) -> None:
        await self._reconnect_with(None)

    def spend(self, user: str, key: str) -> Any:
        return self.stub.Spend(
            wallet_pb2.SpendRequest(
                user_id=user, amount=1, reason=wallet_pb2.SPEND_REASON_GIFT, reference_id=key, idempotency_key=key
            )
        )

    async def coins(self, user: str) -> int:
        return int((await self.stub.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))).coins)

    async def audit(self) -> Any:
        return await self.stub.GetAudit(wallet_pb2.GetAuditRequest())


@contextlib.asynccontextmanager
async def wallet_server(tmp_path: Path, url: str | None = None) -> AsyncIterator[WalletServer]:
    """The wallet (its wiring, gRPC server and error mapping) on `url`, a SQLite file in tmp_path if
    None, migrated, its events left in the outbox (no NATS), served until the block ends."""
    url = url or f"sqlite+aiosqlite:///{tmp_path / 'wallet.db'}"
    await upgrade_head(SPEC.migrations_dir, url)
    settings = WalletSettings(
        database_url=url,
        nats_url="nats://127.0.0.1:1",  # never connected: the events stay in the outbox, as tested
        payment_webhook_secret=SecretStr(SECRET),
    )  # type: ignore[call-arg]
    db = Database(url, pool_size=4, pool_timeout_s=5, application_name="storage-full-test")
    runtime = Runtime(
        "wallet", settings, db, Bus(settings, "storage-full-test"), SPEC.tables, Outbox(SPEC.tables.outbox), None
    )  # type: ignore[arg-type]
    wiring = await SPEC.wire(runtime)
    running = await create_server(wiring.registrations, "127.0.0.1", 0, "livegifts.wallet")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield WalletServer(db, wallet_pb2_grpc.WalletServiceStub(channel))
    finally:
        await channel.close()
        await running.server.stop(None)
        if wiring.close is not None:
            await wiring.close()
        await db.dispose()
