"""The wallet when its SQLite file cannot grow (a full disk) or cannot be written (read-only).

A real wallet (its wiring, gRPC server and error mapping) on a real SQLite file. A full disk is
SQLite's `max_page_count` set to the file's size on every connection of the pool (the pool is
emptied so each new connection takes it): writes that need a new page fail with SQLITE_FULL, as
on a disk with no space left, without root. A read-only file is `PRAGMA query_only` (the tests
run as root, which a chmod does not stop). The caller gets UNAVAILABLE with a stable reason,
never UNKNOWN or INTERNAL; the call wrote nothing, and its retry under the same key once space
is back takes effect once: no coin lost or counted twice.

On PostgreSQL, a failover: pooled connections to the old primary (now a standby) refuse writes
with 25006; the caller gets UNAVAILABLE STORAGE_READ_ONLY, those connections are dropped, and the
retry (on the new primary) takes effect once, without a restart.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from livegifts.wallet.v1 import wallet_pb2
from tests.integration import pg
from tests.integration.helpers import buy_coins, expect_error, signed_callback, uid
from tests.support.wallet_server import SECRET, WalletServer, wallet_server

SPENDS_MAX = 400  # a full file refuses a spend long before this many


@pytest.fixture
async def wallet(tmp_path: Path) -> AsyncIterator[WalletServer]:
    async with wallet_server(tmp_path) as w:
        yield w


async def test_a_full_disk_answers_unavailable_and_a_retry_once_space_is_back_takes_effect_once(
    wallet: WalletServer, caplog: pytest.LogCaptureFixture
) -> None:
    user = uid("user")
    await buy_coins(wallet.stub, SECRET, user)  # 700 coins
    await wallet.disk_full()
    spent: list[str] = []
    refused: str | None = None
    with caplog.at_level(logging.WARNING, logger="services.common.grpcserver"):
        for _ in range(SPENDS_MAX):  # a few fit in pages that have room left; then the file must grow
            key = uid("spend")
            try:
                await wallet.spend(user, key)
            except grpc.aio.AioRpcError:
                refused = key
                break
            spent.append(key)
        assert refused is not None, f"{SPENDS_MAX} spends fit in a file that cannot grow"
        await expect_error(wallet.spend(user, refused), grpc.StatusCode.UNAVAILABLE, "STORAGE_FULL")
    line = next(r for r in caplog.records if r.message == "dependency unavailable")
    assert "SQLITE_FULL" in line.error, "the log says what failed: the disk, not the database being down"
    assert await wallet.coins(user) == 700 - len(spent), "the refused spend took nothing"

    await wallet.space_back()
    await wallet.spend(user, refused)  # the same key: takes effect now, once
    await wallet.spend(user, refused)  # and its retry is the stored answer
    assert await wallet.coins(user) == 700 - len(spent) - 1
    audit = await wallet.audit()
    assert audit.coins_issued == 700
    assert audit.coins_spent == len(spent) + 1
    assert audit.spends == len(spent) + 1
    assert audit.ledger_sum == 0 and audit.unbalanced_entries == 0 and audit.postings_mismatch == 0


async def test_a_read_only_database_answers_unavailable_and_writes_resume_when_it_is_writable(
    wallet: WalletServer,
) -> None:
    user = uid("user")
    await buy_coins(wallet.stub, SECRET, user)
    purchase = await wallet.stub.CreatePurchase(
        wallet_pb2.CreatePurchaseRequest(
            user_id=user,
            package_id="us-usd-700",
            currency_code="USD",
            payment_method=wallet_pb2.PAYMENT_METHOD_CARD,
            idempotency_key=uid("buy"),
        )
    )
    callback = signed_callback(SECRET, "payment.succeeded", purchase)
    await wallet.read_only()
    key = uid("spend")
    await expect_error(wallet.spend(user, key), grpc.StatusCode.UNAVAILABLE, "STORAGE_READ_ONLY")
    await expect_error(wallet.stub.HandlePaymentEvent(callback), grpc.StatusCode.UNAVAILABLE, "STORAGE_READ_ONLY")
    assert await wallet.coins(user) == 700, "reads go on"
    await wallet.space_back()
    await wallet.stub.HandlePaymentEvent(callback)  # the provider's retry: credited once
    await wallet.stub.HandlePaymentEvent(callback)
    await wallet.spend(user, key)
    await wallet.spend(user, key)
    assert await wallet.coins(user) == 1400 - 1
    audit = await wallet.audit()
    assert (audit.coins_issued, audit.coins_spent, audit.spends) == (1400, 1, 1)
    assert audit.ledger_sum == 0 and audit.unbalanced_entries == 0 and audit.postings_mismatch == 0


@pytest.fixture
def postgres_database() -> Iterator[tuple[str, str]]:
    """A database of its own on the test PostgreSQL: (admin URL, its name); dropped after."""
    admin = pg.admin_url_or_skip()
    name = f"lg_readonly_{uuid.uuid4().hex[:12]}"
    pg.create_database(admin, name)
    try:
        yield admin, name
    finally:
        pg.drop_database(admin, name)


async def test_after_a_failover_a_write_on_the_old_primary_answers_unavailable_and_the_retry_succeeds_once(
    tmp_path: Path, postgres_database: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    # A failover, made with one server: `default_transaction_read_only` on the database makes
    # every connection opened meanwhile a "connection to a standby" (it refuses writes with
    # 25006 for as long as it lives, whatever the database says later), and turning it off
    # makes the database the "new primary" for connections opened after.
    admin, name = postgres_database

    def read_only(on: bool) -> None:
        pg.run_sql(admin, f'ALTER DATABASE "{name}" SET default_transaction_read_only = {"on" if on else "off"}')

    async with wallet_server(tmp_path, pg.database_url(admin, name)) as wallet:
        user = uid("user")
        await buy_coins(wallet.stub, SECRET, user)  # 700 coins
        read_only(True)
        await wallet.db.engine.dispose()  # the pool's connections from now on reach the "standby"
        key = uid("spend")
        with caplog.at_level(logging.WARNING, logger="services.common.grpcserver"):
            await expect_error(wallet.spend(user, key), grpc.StatusCode.UNAVAILABLE, "STORAGE_READ_ONLY")
        line = next(r for r in caplog.records if r.message == "dependency unavailable")
        assert "25006" in line.error and line.reason == "STORAGE_READ_ONLY", "the log names the SQLSTATE"
        assert await wallet.coins(user) == 700, "reads go on, and the refused spend took nothing"

        # The pool holds connections to the "old primary" (the read above opened one) when the
        # "new primary" takes writes: the first write on such a connection is refused, and that
        # connection is dropped with the others of its time, so the retry succeeds, no restart.
        read_only(False)
        await expect_error(wallet.spend(user, key), grpc.StatusCode.UNAVAILABLE, "STORAGE_READ_ONLY")
        await wallet.spend(user, key)  # the same key: takes effect now, once
        await wallet.spend(user, key)  # and its retry is the stored answer
        assert await wallet.coins(user) == 699
        audit = await wallet.audit()
        assert (audit.coins_issued, audit.coins_spent, audit.spends) == (700, 1, 1)
        assert audit.ledger_sum == 0 and audit.unbalanced_entries == 0 and audit.postings_mismatch == 0
