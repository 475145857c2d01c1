"""The audit while gifts keep coming: it never reports a failure that is not there, and the
CronJob's command (`livegifts audit --detail --wait`) passes without the traffic stopping.

A suite of its own per backend (real processes, real nats-server, SQLite files or PostgreSQL),
so nothing another test left behind is in its books. Traffic is bounded in count and time:
viewers buying coins and sending gifts and tips at a fixed concurrency, stopped before the test
ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc
import pytest

from livegifts.gifting.v1 import gifting_pb2, gifting_pb2_grpc
from livegifts.wallet.v1 import wallet_pb2_grpc
from services.cli.audit import FAILED, OK, check_invariants, collect, wait_until_settled
from services.cli.suite import Suite
from tests.integration.auditing import addrs, audit_cli, audit_pages
from tests.integration.conftest import BACKENDS, WEBHOOK_SECRET, running_suite
from tests.integration.helpers import buy_coins, eventually, live_stream, uid

CONCURRENCY = 8
GIFTS_MAX = 6000  # the traffic stops here, or at TRAFFIC_S, whichever comes first
TRAFFIC_S = 120.0
TRAFFIC_MIN = 200  # gifts and tips the traffic sends at least (waited for), so the audits see real load
LOOKS = 6  # single audits (no wait) taken while the traffic runs
VIEWERS = 16  # each buys 700 coins up front; more buy while the audits run


@pytest.fixture(scope="module", params=BACKENDS)
def suite(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    if os.environ.get("LIVEGIFTS_TEST_TARGET_WALLET"):
        pytest.skip("needs books of its own: not run against an external deployment")
    var_dir = tmp_path_factory.mktemp(f"audit-traffic-{request.param}")
    with running_suite(request.param, var_dir, "lgaudit") as s:
        yield s


@dataclass
class Traffic:
    sent: int = 0
    bought: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def _viewer_with_coins(wallet, traffic: Traffic) -> str:  # type: ignore[no-untyped-def]
    viewer = uid("viewer")
    await buy_coins(wallet, WEBHOOK_SECRET, viewer, "us-usd-700")
    traffic.bought += 1
    return viewer


@contextlib.asynccontextmanager
async def traffic_on(suite: Suite) -> AsyncIterator[Traffic]:
    """Gifts and tips from many viewers to a few streams until the block ends (bounded)."""
    traffic = Traffic()
    async with (
        grpc.aio.insecure_channel(suite.addr("wallet")) as wc,
        grpc.aio.insecure_channel(suite.addr("gifting")) as gc,
    ):
        wallet, gifting = wallet_pb2_grpc.WalletServiceStub(wc), gifting_pb2_grpc.GiftingServiceStub(gc)
        streams = [(await live_stream(gifting, uid("creator"))).stream_id for _ in range(3)]
        viewers = [await _viewer_with_coins(wallet, traffic) for _ in range(VIEWERS)]
        counter = itertools.count()
        deadline = time.monotonic() + TRAFFIC_S

        async def worker(w: int) -> None:
            while not traffic.stop.is_set() and traffic.sent < GIFTS_MAX and time.monotonic() < deadline:
                n = next(counter)
                if n % 200 == w:  # now and then a new viewer buys coins mid-audit
                    viewers.append(await _viewer_with_coins(wallet, traffic))
                viewer, stream = viewers[n % len(viewers)], streams[n % len(streams)]
                if n % 10 == 0:
                    call = gifting.SendTip(
                        gifting_pb2.SendTipRequest(
                            stream_id=stream, sender_id=viewer, coins=1, idempotency_key=uid("t")
                        )
                    )
                else:
                    call = gifting.SendGift(
                        gifting_pb2.SendGiftRequest(
                            stream_id=stream, sender_id=viewer, gift_id="rose", quantity=1, idempotency_key=uid("g")
                        )
                    )
                try:
                    await call
                    traffic.sent += 1
                except grpc.aio.AioRpcError as exc:  # out of coins: that viewer is done
                    reason = exc.details() or exc.code().name
                    traffic.refused[reason] = traffic.refused.get(reason, 0) + 1

        workers = [asyncio.create_task(worker(w)) for w in range(CONCURRENCY)]
        try:
            await asyncio.sleep(1.0)  # traffic under way before the first look
            yield traffic
        finally:
            traffic.stop.set()
            await asyncio.gather(*workers)


def _fetcher(suite: Suite, detail: bool):  # type: ignore[no-untyped-def]
    def fetch(ids=None):  # type: ignore[no-untyped-def]
        return collect(*addrs(suite), 30.0, detail, ids)

    return fetch


async def test_audits_under_traffic_never_fail_and_the_cronjob_command_passes(suite: Suite) -> None:
    async with traffic_on(suite) as traffic:
        looks = []
        for i in range(LOOKS):
            totals = await asyncio.to_thread(_fetcher(suite, detail=i % 2 == 0))
            report = check_invariants(totals)
            looks.append(report)
            assert not [c for c in report if c.status == FAILED], (i, traffic.sent, report)
        before = traffic.sent
        # The CronJob's command, while the gifts keep coming.
        cli = await asyncio.to_thread(audit_cli, suite, "--detail", "--wait", "60")
        during = traffic.sent - before
        # How many gifts the traffic sends while the audits run is the machine's speed, not theirs
        # (a loaded one: 198 by the end of the CLI's audit): the traffic goes on until it has sent
        # enough, within its own TRAFFIC_S.
        await eventually(lambda: asyncio.sleep(0, traffic.sent), lambda sent: sent > TRAFFIC_MIN, TRAFFIC_S)
    print(f"   traffic: {traffic.sent} gifts/tips, {traffic.bought} purchases, refused {traffic.refused}")
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert during > 0, "the traffic had stopped before the CronJob's audit ran"
    assert traffic.sent > TRAFFIC_MIN and traffic.bought > VIEWERS, traffic
    # Traffic was in flight at some look: totals alone could not have settled it.
    assert any(c.status != OK for report in looks for c in report), looks

    # Once the traffic stops, totals alone settle too.
    report = await asyncio.to_thread(wait_until_settled, _fetcher(suite, False), 60.0)
    assert all(c.status == OK for c in report), report


def test_records_are_listed_within_a_range_of_ids(suite: Suite) -> None:
    """`up_to` bounds a page: the audit reads the three services range by range of ids."""
    from livegifts.common.v1 import audit_pb2, audit_pb2_grpc

    with grpc.insecure_channel(suite.addr("gifting")) as ch:
        stub = audit_pb2_grpc.AuditServiceStub(ch)
        every = [
            r.id for r in stub.ListAuditRecords(audit_pb2.ListAuditRecordsRequest(kind="gifts", page_size=5000)).records
        ]
        assert len(every) > 10, "no gifts to list (the traffic test runs first)"
        after, up_to = every[2], every[9]
        pages = audit_pages(
            stub, audit_pb2.ListAuditRecordsRequest(kind="gifts", page_token=after, page_size=2, up_to=up_to)
        )
        got = [r.id for page in pages for r in page.records]
    assert got == every[3:10]
