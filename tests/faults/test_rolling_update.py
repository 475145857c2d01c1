"""A rolling update under live traffic: every service SIGTERMed in turn, each restarted before the next.

test_faults.py SIGTERMs one service per scenario, with no drain delay, under a load that retries
every retryable code its own way and asks each key until it gets one answer. This drill is the
rollout itself: the wallet, then gifting, then payout are drained and restarted one after the
other within one load, each with a drain delay (NOT_SERVING while it still serves: the calls of
connections already open keep coming, as in Kubernetes and compose), while callers keep sending
gifts one by one (SendGift), in batches (SendGifts) and withdrawals (RequestWithdrawal), each on
the suite's own client channel (services/common/clients.py: the retry policy real callers get)
retrying under the same key only what README says to retry. Gifting's calls to the wallet
(Spend, SpendMany) are the suite's own callers with that policy.

It requires: no caller ever sees an answer it must not retry; each drained process says
NOT_SERVING on its probe port, exits 0 within its drain and grace, and logs no error; after the
rollout every key asked again answers what its caller was first told; every withdrawal is paid
once; every viewer's balance is what the clients saw; the audit passes, its outboxes drained: the
events a drain committed after its relay stopped (printed: the rows each process left) are
published by its successor.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sqlite3
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from livegifts.gifting.v1 import gifting_pb2, gifting_pb2_grpc
from livegifts.payout.v1 import payout_pb2, payout_pb2_grpc
from services.cli.audit import OK, collect, wait_until_settled
from services.cli.suite import Suite
from services.common.clients import error_reason, make_channel
from tests.faults.load import (
    CHEAP_GIFTS,
    LoadReport,
    _buy,
    _low_minimum_policy,
    balances,
    events_by_withdrawal,
    withdrawal_statuses,
)
from tests.faults.suite_env import FAST_PAYOUT, FAST_SWEEP, OPERATOR_METADATA
from tests.integration import pg
from tests.integration.conftest import WEBHOOK_SECRET, suite_config
from tests.integration.helpers import uid
from tests.support.ports import free_ports

T = TypeVar("T")

ORDER = ("wallet", "gifting", "payout")
DRAIN_DELAY_S = 1.0  # compose's; Kubernetes' is 5
GRACE_S = 10.0
EXIT_SLACK_S = 5.0
VIEWERS, CREATORS = 6, 2
GIFT_LOOPS = 3  # SendGift callers; one more sends batches
BATCH = 4
PACE_S = 0.25  # between one caller's calls: about 30 gifts a second in all
GIFTS_MAX = 900  # a bound on the gifts, whatever the pace
WITHDRAWAL_DIAMONDS = 100
CALL_BUDGET_S = 60.0
FLOWING_WITHIN_S = 30.0
SETTLE_S = 60.0
# What README's error table says a caller retries under the same key; anything else is final.
RETRY_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}
RETRY_ABORTED = {"CONFLICT", "GIFT_CANCELLED"}

pytestmark = pytest.mark.timeout(300)


@dataclass
class Traffic:
    """What the callers were told, key by key."""

    gifts: dict[str, tuple[gifting_pb2.SendGiftRequest, str, int]] = field(
        default_factory=dict
    )  # key -> (req, id, coins)
    batched: list[list[str]] = field(default_factory=list)  # the keys of each SendGifts call
    withdrawals: dict[str, tuple[payout_pb2.RequestWithdrawalRequest, str]] = field(default_factory=dict)
    retried: set[str] = field(default_factory=set)  # keys asked more than once
    retries: dict[str, int] = field(default_factory=dict)  # by code
    wrong: list[str] = field(default_factory=list)

    def note_retry(self, key: str, what: str) -> None:
        self.retried.add(key)
        self.retries[what] = self.retries.get(what, 0) + 1


def _retryable(code: grpc.StatusCode, reason: str) -> bool:
    return code in RETRY_CODES or (code == grpc.StatusCode.ABORTED and reason in RETRY_ABORTED)


async def _ask(traffic: Traffic, key: str, call: Callable[[], Awaitable[T]]) -> T | None:
    """`call()` until it answers, retrying under the same key what a caller retries; None when final."""
    deadline = time.monotonic() + CALL_BUDGET_S
    attempt = 0
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            reason = error_reason(exc)
            if _retryable(exc.code(), reason) and time.monotonic() < deadline:
                traffic.note_retry(key, f"{exc.code().name} {reason}")
                attempt += 1
                await asyncio.sleep(min(0.05 * 2 ** min(attempt, 5), 1.0))
                continue
            traffic.wrong.append(f"{key}: {exc.code().name} {reason} {exc.details()}")
            return None


@dataclass
class Callers:
    traffic: Traffic
    viewers: list[str]
    streams: list[str]
    creators: list[str]
    methods: list[str]
    gifting: gifting_pb2_grpc.GiftingServiceStub
    payout: payout_pb2_grpc.PayoutServiceStub
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    rnd: random.Random = field(default_factory=lambda: random.Random(7))

    def gift(self) -> gifting_pb2.SendGiftRequest:
        gift_id, _ = self.rnd.choice(CHEAP_GIFTS)
        return gifting_pb2.SendGiftRequest(
            stream_id=self.rnd.choice(self.streams),
            sender_id=self.rnd.choice(self.viewers),
            gift_id=gift_id,
            quantity=1,
            idempotency_key=uid("roll"),
        )

    def room(self) -> bool:
        return not self.stop.is_set() and len(self.traffic.gifts) < GIFTS_MAX

    async def send_gifts_one_by_one(self) -> None:
        while self.room():
            req = self.gift()
            r = await _ask(self.traffic, req.idempotency_key, lambda req=req: self.gifting.SendGift(req))
            if r is not None:
                self.traffic.gifts[req.idempotency_key] = (req, r.gift_event_id, r.coins)
            await asyncio.sleep(PACE_S)

    async def send_gifts_in_batches(self) -> None:
        while self.room():
            batch = [self.gift() for _ in range(BATCH)]
            self.traffic.batched.append([g.idempotency_key for g in batch])
            todo, deadline, attempt = batch, time.monotonic() + CALL_BUDGET_S, 0
            while todo:
                key = todo[0].idempotency_key
                resp = await _ask(
                    self.traffic,
                    key,
                    lambda todo=todo: self.gifting.SendGifts(gifting_pb2.SendGiftsRequest(gifts=todo)),
                )
                if resp is None:
                    break
                again = []
                for req, result in zip(todo, resp.results, strict=True):
                    k = req.idempotency_key
                    if result.HasField("receipt"):
                        self.traffic.gifts[k] = (req, result.receipt.gift_event_id, result.receipt.coins)
                        continue
                    code = grpc.StatusCode[_CODE_NAMES[result.error.code]]
                    if _retryable(code, result.error.reason) and time.monotonic() < deadline:
                        self.traffic.note_retry(k, f"item {code.name} {result.error.reason}")
                        again.append(req)
                    else:
                        self.traffic.wrong.append(f"{k}: item {code.name} {result.error.reason} {result.error.message}")
                todo = again
                if todo:
                    attempt += 1
                    await asyncio.sleep(min(0.05 * 2 ** min(attempt, 5), 1.0))
            await asyncio.sleep(PACE_S)

    async def withdraw(self) -> None:
        """Each creator withdraws 100 diamonds whenever it has them."""
        while not self.stop.is_set():
            for creator, method in zip(self.creators, self.methods, strict=True):
                try:
                    e = await self.payout.GetEarnings(payout_pb2.GetEarningsRequest(creator_id=creator))
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in RETRY_CODES:
                        self.traffic.wrong.append(f"GetEarnings: {exc.code().name} {exc.details()}")
                    continue
                if e.diamonds_available < WITHDRAWAL_DIAMONDS:
                    continue
                req = payout_pb2.RequestWithdrawalRequest(
                    creator_id=creator, diamonds=WITHDRAWAL_DIAMONDS, method_id=method, idempotency_key=uid("wd")
                )
                w = await _ask(self.traffic, req.idempotency_key, lambda req=req: self.payout.RequestWithdrawal(req))
                if w is not None:
                    self.traffic.withdrawals[req.idempotency_key] = (req, w.withdrawal_id)
            await asyncio.sleep(PACE_S)


_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


async def _probe(port: int) -> int | None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            return int(
                (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=0.5)).status
            )
        except grpc.aio.AioRpcError:
            return None


async def _until(what: str, reached: Callable[[], bool], callers: list[asyncio.Task[None]]) -> None:
    deadline = time.monotonic() + FLOWING_WITHIN_S
    while not reached():
        for task in callers:
            if task.done():
                task.result()
                pytest.fail(f"the callers stopped before {what}")
        assert time.monotonic() < deadline, f"not {what} within {FLOWING_WITHIN_S:g} s"
        await asyncio.sleep(0.02)


def _unpublished(suite: Suite, svc: str) -> int:
    """Outbox rows of `svc` not yet published, read from its database while it is down."""
    url = suite.config.database_url(svc)
    if url.startswith("sqlite"):
        with sqlite3.connect(url.split("///", 1)[1]) as conn:
            return int(conn.execute("SELECT count(*) FROM outbox WHERE published_at_us IS NULL").fetchone()[0])
    import asyncpg

    async def count() -> int:
        conn = await asyncpg.connect(url.replace("+asyncpg", ""))
        try:
            return int(await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at_us IS NULL"))
        finally:
            await conn.close()

    return asyncio.run(count())


async def _roll(
    suite: Suite, svc: str, flowing: Callable[[], int], step: int, callers: list[asyncio.Task[None]], log: list[str]
) -> None:
    """SIGTERM `svc` once `step` more answers came through it, check its drain, restart it, and wait
    for `step` more through the new one."""
    at = flowing()
    await _until(f"traffic through {svc}", lambda: flowing() >= at + step, callers)
    proc, probe = suite.procs[svc], suite.config.probe_ports[svc]
    logfile = suite.log_dir / f"{svc}.log"
    logged = logfile.stat().st_size
    assert await _probe(probe) == health_pb2.HealthCheckResponse.SERVING
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    statuses = set()
    while proc.poll() is None and time.monotonic() - started < DRAIN_DELAY_S:
        statuses.add(await _probe(probe))
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses, f"{svc}'s probe port said {statuses} while draining"
    try:
        code = await asyncio.to_thread(proc.wait, DRAIN_DELAY_S + GRACE_S + EXIT_SLACK_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{svc} did not exit within its drain and grace ({DRAIN_DELAY_S + GRACE_S:g} s)")
    took = time.monotonic() - started
    with logfile.open("rb") as f:
        f.seek(logged)
        stopping = f.read().decode(errors="replace").splitlines()
    errors = [line for line in stopping if '"level": "ERROR"' in line or "Traceback" in line]
    assert code == 0 and not errors, f"{svc} exited {code} after SIGTERM, logging {errors}"
    assert any('"stopped"' in line for line in stopping), f"{svc} never logged its stop"
    left = await asyncio.to_thread(_unpublished, suite, svc)
    at = flowing()
    await asyncio.to_thread(suite.restart, svc)
    log.append(f"{svc}: exited 0 {took:.1f} s after SIGTERM, {left} outbox rows left for its successor")
    await _until(f"traffic through the restarted {svc}", lambda: flowing() >= at + step, callers)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_a_rolling_update_of_every_service_under_traffic_loses_and_changes_nothing(
    backend: str, tmp_path: Path
) -> None:
    settings = {"LIVEGIFTS_{}_DRAIN_DELAY_S": str(DRAIN_DELAY_S), "LIVEGIFTS_{}_SHUTDOWN_GRACE_S": str(GRACE_S)}
    extra = {svc: {k.format(svc.upper()): v for k, v in settings.items()} for svc in ORDER}
    extra["gifting"].update(FAST_SWEEP)
    extra["payout"].update(FAST_PAYOUT)
    databases: contextlib.AbstractContextManager[dict[str, str]] = (
        pg.service_databases("lgroll") if backend == "postgres" else contextlib.nullcontext({})
    )
    with databases as urls:
        config = suite_config(tmp_path, urls, extra)
        config.probe_ports = dict(zip(ORDER, free_ports(len(ORDER)), strict=True))  # three different ones
        suite = Suite(config)
        try:
            await asyncio.to_thread(suite.start)
            await _rollout(suite)
        finally:
            await asyncio.to_thread(suite.stop)


async def _rollout(suite: Suite) -> None:
    from livegifts.wallet.v1 import wallet_pb2_grpc

    chans = {svc: make_channel(suite.addr(svc), 10.0) for svc in ORDER}
    try:
        wallet = wallet_pb2_grpc.WalletServiceStub(chans["wallet"])
        gifting = gifting_pb2_grpc.GiftingServiceStub(chans["gifting"])
        payout = payout_pb2_grpc.PayoutServiceStub(chans["payout"])
        setup = LoadReport(seed=0)
        await _low_minimum_policy(setup, payout, OPERATOR_METADATA)
        viewers = [uid("rv") for _ in range(VIEWERS)]
        for v in viewers:
            setup.coins_by_viewer[v] = 0
            for package in ("us-usd-700", "us-usd-700"):
                await _buy(setup, wallet, WEBHOOK_SECRET, v, package, replay=False)
        creators = [uid("rc") for _ in range(CREATORS)]
        streams, methods = [], []
        for c in creators:
            s = await gifting.StartStream(
                gifting_pb2.StartStreamRequest(creator_id=c, title="roll", idempotency_key=uid("s"))
            )
            m = await payout.AddPayoutMethod(
                payout_pb2.AddPayoutMethodRequest(
                    creator_id=c,
                    kind=payout_pb2.PAYOUT_METHOD_KIND_PAYPAL,
                    paypal_email=f"{c}@example.com",
                    currency_code="USD",
                    idempotency_key=uid("m"),
                )
            )
            await payout.VerifyPayoutMethod(
                payout_pb2.VerifyPayoutMethodRequest(method_id=m.method_id, verified=True, idempotency_key=uid("v")),
                metadata=OPERATOR_METADATA,
            )
            streams.append(s.stream_id)
            methods.append(m.method_id)
        assert not setup.wrong_answers, setup.wrong_answers

        traffic = Traffic()
        callers = Callers(traffic, viewers, streams, creators, methods, gifting, payout)
        tasks = [asyncio.create_task(callers.send_gifts_one_by_one()) for _ in range(GIFT_LOOPS)]
        tasks.append(asyncio.create_task(callers.send_gifts_in_batches()))
        tasks.append(asyncio.create_task(callers.withdraw()))
        log: list[str] = []
        started = time.monotonic()
        try:
            flowing = {  # what goes through each service, and how many of them before and after its turn
                "wallet": (lambda: len(traffic.gifts), 5),  # each a spend gifting asked the wallet for
                "gifting": (lambda: len(traffic.gifts), 5),
                "payout": (lambda: len(traffic.withdrawals), 1),
            }
            for svc in ORDER:
                await _roll(suite, svc, *flowing[svc], tasks, log)
        finally:
            callers.stop.set()
            await asyncio.gather(*tasks)
        print(
            f"\n   rollout {time.monotonic() - started:.1f} s: {'; '.join(log)}\n"
            f"   {len(traffic.gifts)} gifts ({len(traffic.batched)} batches), {len(traffic.withdrawals)} withdrawals,"
            f" {len(traffic.retried)} keys retried, retries {traffic.retries}"
        )
        assert not traffic.wrong, traffic.wrong[:10]
        assert traffic.retried, "no caller retried: no call met a drain"

        # Every key asked again answers what its caller was told first.
        batched = {k for keys in traffic.batched for k in keys}
        for key, (req, event_id, coins) in traffic.gifts.items():
            if key in batched:
                continue
            r = await gifting.SendGift(req)
            assert (r.gift_event_id, r.coins) == (event_id, coins), (
                f"{key} answered {r} after first {event_id}, {coins}"
            )
        for keys in traffic.batched:
            reqs = [traffic.gifts[k][0] for k in keys if k in traffic.gifts]
            resp = await gifting.SendGifts(gifting_pb2.SendGiftsRequest(gifts=reqs))
            for req, result in zip(reqs, resp.results, strict=True):
                first = traffic.gifts[req.idempotency_key][1:]
                got = (result.receipt.gift_event_id, result.receipt.coins)
                assert got == first, f"{req.idempotency_key} answered {result} after first {first}"
        for key, (req, withdrawal_id) in traffic.withdrawals.items():
            w = await payout.RequestWithdrawal(req)
            assert w.withdrawal_id == withdrawal_id, f"{key} answered {w.withdrawal_id} after first {withdrawal_id}"

        ids = [w for _, w in traffic.withdrawals.values()]
        statuses = await withdrawal_statuses(suite.addr("payout"), ids, payout_pb2.WITHDRAWAL_STATUS_PAID, SETTLE_S)
        assert all(s == payout_pb2.WITHDRAWAL_STATUS_PAID for s in statuses.values()), statuses

        def fetch():  # type: ignore[no-untyped-def]
            return collect(suite.addr("wallet"), suite.addr("gifting"), suite.addr("payout"), 10.0, True, None)

        audit = await asyncio.to_thread(wait_until_settled, fetch, SETTLE_S)
        assert all(c.status == OK for c in audit), [c for c in audit if c.status != OK]
        paid = await events_by_withdrawal(suite.config.nats_url, "payout.withdrawal.paid")
        assert {i: paid[i] for i in ids} == dict.fromkeys(ids, 1), f"paid events per withdrawal: {dict(paid)}"

        expected = dict(setup.coins_by_viewer)
        for req, _, coins in traffic.gifts.values():
            expected[req.sender_id] -= coins
        assert await balances(suite.addr("wallet"), viewers) == expected, "a balance differs from what the callers saw"
        totals = fetch()
        assert totals.gifting.coins_sent == sum(c for _, _, c in traffic.gifts.values())
    finally:
        for ch in chans.values():
            await ch.close()
