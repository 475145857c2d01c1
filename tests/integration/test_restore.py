"""One service's database restored to an earlier point while the others and JetStream ran on.

Each service owns its database, so a restore (a backup, PITR after a bad migration or a mistaken
DELETE) leaves it behind the others and behind its JetStream consumers: the events its durables
acked after the restore point are not delivered again, and their effects are gone. These drills
take a snapshot of payout's (or gifting's) database, put gifts through, put the snapshot back and
start the service again: it must say that it is behind, and docs/sre.md's procedure ("Restoring
one service's database") must put the books right.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sqlite3
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from livegifts.payout.v1 import payout_pb2, payout_pb2_grpc
from livegifts.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from services.cli.suite import Suite, free_port
from services.common.consumers import GIFTING_LEADERBOARDS, PAYOUT_GIFT_SENT, PAYOUT_PURCHASE_REVERSED
from tests.integration import pg
from tests.integration.auditing import audit_cli
from tests.integration.conftest import BACKENDS, WEBHOOK_SECRET, running_suite
from tests.integration.helpers import BEHIND, counted, earned, eventually, gifts_to, log_since, signed_callback, uid


@contextlib.contextmanager
def snapshots(suite: Suite, svc: str) -> Iterator[tuple[object, object]]:
    """(take, put_back) for `svc`'s database, each with the service stopped; the copy is dropped on exit.

    SQLite: the file through sqlite3's online backup API (a copy of the file alone may miss what
    its -wal holds), put back over the file with its -wal and -shm removed. PostgreSQL: a copy
    made with CREATE DATABASE ... TEMPLATE, renamed over the service's database.
    """
    url = suite.config.database_url(svc)
    if url.startswith("sqlite"):
        path = Path(url.split("///", 1)[1])
        copy = path.with_name(f"{path.name}.snapshot")

        def take() -> None:
            with contextlib.closing(sqlite3.connect(path)) as src, contextlib.closing(sqlite3.connect(copy)) as dst:
                src.backup(dst)

        def put_back() -> None:
            for extra in ("-wal", "-shm"):
                path.with_name(path.name + extra).unlink(missing_ok=True)
            shutil.copyfile(copy, path)

        yield take, put_back
        return
    admin = pg.admin_url_or_skip()
    name = url.rsplit("/", 1)[1].split("?", 1)[0]
    copy_name = f"{name}_snap"

    def take_pg() -> None:
        pg.create_database(admin, copy_name, f'TEMPLATE "{name}"')

    def put_back_pg() -> None:
        pg.drop_database(admin, name)
        pg.run_sql(admin, f'ALTER DATABASE "{copy_name}" RENAME TO "{name}"')

    try:
        yield take_pg, put_back_pg
    finally:
        pg.drop_database(admin, copy_name)


async def _charge_back(suite: Suite, purchase: wallet_pb2.Purchase) -> None:
    async with grpc.aio.insecure_channel(suite.addr("wallet")) as ch:
        wallet = wallet_pb2_grpc.WalletServiceStub(ch)
        await wallet.HandlePaymentEvent(signed_callback(WEBHOOK_SECRET, "charge.dispute.lost", purchase))


async def _clawed_back(suite: Suite, creator: str, timeout_s: float = 20.0) -> int:
    """The diamonds clawed back from `creator`, once some are or the wait runs out."""
    async with grpc.aio.insecure_channel(suite.addr("payout")) as ch:
        payout = payout_pb2_grpc.PayoutServiceStub(ch)

        async def read() -> int:
            return (await payout.GetEarnings(payout_pb2.GetEarningsRequest(creator_id=creator))).diamonds_clawed_back

        return await eventually(read, lambda d: d > 0, timeout_s)


async def _pending(suite: Suite, stream: str, durable: str) -> int:
    """`nats consumer info <stream> <durable>`: its events not yet delivered or not yet acked,
    once none are or the wait runs out."""
    nc = await nats.connect(suite.config.nats_url)
    try:
        js = nc.jetstream()

        async def read() -> int:
            info = await js.consumer_info(stream, durable)
            return (info.num_pending or 0) + (info.num_ack_pending or 0)

        return await eventually(read, lambda n: n == 0)
    finally:
        await nc.drain()


async def _delete_durables(suite: Suite, stream: str, durables: list[str]) -> None:
    """`nats consumer rm <stream> <durable>` for each, as the runbook has the operator do."""
    nc = await nats.connect(suite.config.nats_url)
    try:
        js = nc.jetstream()
        for durable in durables:
            await js.delete_consumer(stream, durable)
    finally:
        await nc.drain()


def _position_checks(port: int) -> dict[tuple[str, str], float]:
    """(consumer, result) -> livegifts_consumer_position_check, from the /metrics on `port`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.labels["consumer"], s.labels["result"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "livegifts_consumer_position_check"
    }


def _restart_and_wait_for_check(suite: Suite, svc: str, offset: int, lines: int = 1) -> str:
    """Start `svc` and wait until its log says `lines` times that it is behind, or 5 s."""
    suite.restart(svc)
    # The check runs when a consumer first binds, just after READY; a short wait covers it.
    deadline = time.monotonic() + 5
    text = log_since(suite, svc, offset)
    while text.count(BEHIND) < lines and time.monotonic() < deadline:
        time.sleep(0.1)
        text = log_since(suite, svc, offset)
    return text


@pytest.mark.parametrize("backend", BACKENDS)
def test_payout_restored_to_an_earlier_point_says_so_and_the_runbooks_rewind_credits_what_it_lost(
    backend: str, tmp_path: Path
) -> None:
    metrics_port = free_port()  # payout's /metrics, where LivegiftsConsumerDatabaseBehind reads the check
    extra = {"payout": {"LIVEGIFTS_PAYOUT_METRICS_PORT": str(metrics_port)}}
    with (
        running_suite(backend, tmp_path, "lgtest", extra) as suite,
        snapshots(suite, "payout") as (take, put_back),
    ):
        viewer, before, after = uid("viewer"), [uid("creator")], [uid("creator"), uid("creator")]
        asyncio.run(gifts_to(suite, viewer, before))
        assert asyncio.run(earned(suite, before)) == [350]

        suite.kill("payout", signal.SIGTERM)
        take()  # type: ignore[operator]
        suite.restart("payout")
        bought = asyncio.run(gifts_to(suite, viewer, after))
        assert asyncio.run(earned(suite, after)) == [350, 350]
        asyncio.run(_charge_back(suite, bought[-1]))  # a reversal after T too: its clawback is lost
        assert asyncio.run(_clawed_back(suite, after[-1])) == 350
        # A restart on its own database (the snapshot was only taken) is not taken for a restore.
        assert BEHIND not in log_since(suite, "payout", 0)
        suite.kill("payout", signal.SIGTERM)
        put_back()  # type: ignore[operator]
        offset = len(log_since(suite, "payout", 0))
        text = _restart_and_wait_for_check(suite, "payout", offset, lines=2)

        # It says so, naming the durables that acked what the database lost: the gifts'
        # (GIFTING) and the reversal's (WALLET).
        assert BEHIND in text, text[-3000:]
        behind = [line for line in text.splitlines() if BEHIND in line]
        assert any(PAYOUT_GIFT_SENT in line and '"GIFTING"' in line for line in behind), behind
        assert any(PAYOUT_PURCHASE_REVERSED in line and '"WALLET"' in line for line in behind), behind
        # And so do its metrics, for the alert: an SRE who reads no logs is paged.
        checks = _position_checks(metrics_port)
        for durable in (PAYOUT_GIFT_SENT, PAYOUT_PURCHASE_REVERSED):
            assert checks[(durable, "behind")] == 1.0, checks
            assert checks[(durable, "ok")] == checks[(durable, "not_checked")] == 0.0, checks
        # What it lost: the credits of the gifts sent after the snapshot, and the clawback; JetStream
        # does not deliver their events again by itself.
        assert asyncio.run(earned(suite, after, timeout_s=2)) == [0, 0]
        assert asyncio.run(_clawed_back(suite, after[-1], timeout_s=1)) == 0
        failed = audit_cli(suite, "--detail", "--wait", "2")
        assert failed.returncode == 1 and "not yet credited 4" in failed.stdout, failed.stdout

        # The runbook: payout stopped, its gift durable removed, payout started: the durable is
        # made again from the start of its stream, and the inbox makes what the restored database
        # had a no-op. Its reversal durable only once the credits are all back: a reversal applied
        # before them claws back the sender's older gifts, another creator's diamonds.
        suite.kill("payout", signal.SIGTERM)
        asyncio.run(_delete_durables(suite, "GIFTING", [PAYOUT_GIFT_SENT]))
        suite.restart("payout")
        assert asyncio.run(earned(suite, before + after)) == [350, 350, 350]
        assert asyncio.run(_pending(suite, "GIFTING", PAYOUT_GIFT_SENT)) == 0
        suite.kill("payout", signal.SIGTERM)
        asyncio.run(_delete_durables(suite, "WALLET", [PAYOUT_PURCHASE_REVERSED]))
        offset = len(log_since(suite, "payout", 0))
        suite.restart("payout")
        assert asyncio.run(_clawed_back(suite, after[-1])) == 350
        assert asyncio.run(_clawed_back(suite, before[0], timeout_s=1)) == 0  # not the older gift's creator
        ok = audit_cli(suite, "--detail", "--wait", "30")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert BEHIND not in log_since(suite, "payout", offset)
        # The runbook done, the pod it started finds nothing behind: the alert resolves.
        checks = _position_checks(metrics_port)
        assert {checks[(d, "ok")] for d in (PAYOUT_GIFT_SENT, PAYOUT_PURCHASE_REVERSED)} == {1.0}, checks


@pytest.mark.parametrize("backend", BACKENDS)
def test_gifting_restored_to_an_earlier_point_says_its_leaderboards_are_behind(backend: str, tmp_path: Path) -> None:
    with running_suite(backend, tmp_path, "lgtest") as suite, snapshots(suite, "gifting") as (take, put_back):
        viewer = uid("viewer")
        asyncio.run(gifts_to(suite, viewer, [uid("creator")]))
        suite.kill("gifting", signal.SIGTERM)
        take()  # type: ignore[operator]
        suite.restart("gifting")
        after = [uid("creator")]
        asyncio.run(gifts_to(suite, viewer, after))
        assert asyncio.run(earned(suite, after)) == [350]
        assert asyncio.run(counted(suite, after[0])) == 700  # gifting's own durable applied them too
        suite.kill("gifting", signal.SIGTERM)
        put_back()  # type: ignore[operator]
        offset = len(log_since(suite, "gifting", 0))
        text = _restart_and_wait_for_check(suite, "gifting", offset)
        assert BEHIND in text, text[-3000:]
        assert GIFTING_LEADERBOARDS in next(line for line in text.splitlines() if BEHIND in line)
        # The audit names the gifts gifting lost: charged and credited, no longer sent.
        failed = audit_cli(suite, "--detail", "--wait", "2")
        assert failed.returncode == 1 and "credited without a sent gift 2" in failed.stdout, failed.stdout
        assert "charged without a gift 2" in failed.stdout, failed.stdout
