"""Nothing lost, nothing doubled: a mixed load while processes die at named fault points.

Each scenario starts its own suite (nats-server + three services; SQLite, or PostgreSQL with
its own databases), runs a bounded seeded load with retrying clients, injects its faults
during the load, waits for in-flight work to drain, and then requires every invariant of the
cross-service audit to hold, id by id, and every viewer's balance to be what the clients saw.

LIVEGIFTS_FAULT_SEED makes a run repeatable (printed at the start of each scenario);
LIVEGIFTS_FAULT_GIFTS sets the gifts per scenario (default 120; `make faults` uses more).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy

from livegifts.payout.v1 import payout_pb2
from services.cli.audit import OK, Totals, collect, wait_until_settled
from services.cli.suite import Suite
from services.common.bus import STREAMS
from tests.faults.load import (
    LoadReport,
    balances,
    events_by_withdrawal,
    msg_ids_stored_twice,
    replay_events,
    run_load,
    withdrawal_statuses,
)
from tests.faults.suite_env import FAST_PAYOUT, FAST_SWEEP, OPERATOR_METADATA
from tests.integration import pg
from tests.integration.conftest import WEBHOOK_SECRET, suite_config
from tests.support.nats import NatsCluster, cluster_read

SEED = int(os.environ.get("LIVEGIFTS_FAULT_SEED", str(random.SystemRandom().randint(1, 10**6))))
GIFTS = int(os.environ.get("LIVEGIFTS_FAULT_GIFTS", "120"))
DRAIN_TIMEOUT_S = 90.0
LOAD_TIMEOUT_S = 240.0
REPLAY_SETTLE_S = 2.0
REPLAY_SENSITIVE = {
    "payout": ("coins_received", "earned_units", "diamonds_credited", "events_consumed", "diamonds_clawed_back"),
    "wallet": ("coins_issued", "coins_spent", "coins_reversed", "coins_in_user_balances", "spends"),
    "gifting": ("gifts_sent", "coins_sent", "leaderboard_coins"),
}
WITHDRAWALS_PAID_TIMEOUT_S = 30.0
# The withdrawals come last in the load, after every gift: a point on their path fires late.
WITHDRAWAL_FAULT_WITHIN_S = 180.0
# A SIGTERMed service drains within its SHUTDOWN_GRACE_S (10 s by default), then closes NATS and its pool.
STOP_WITHIN_S = 20.0

pytestmark = pytest.mark.timeout(600)
T = TypeVar("T")


@dataclass
class Flight:
    """The load under way, as a fault sees it: what the clients have done so far, and whether it ended."""

    report: LoadReport  # filled by the load as it goes
    task: asyncio.Task[LoadReport]
    started: float  # time.monotonic() when the load started
    gifts: int = GIFTS  # how many gifts, tips and unlocks the load makes
    counter: str = ""  # the LoadReport count that must grow after the fault (set by fault_starts)
    at_fault: int | None = None  # that count when the fault started

    def fault_starts(self, log: list[str], what: str, counter: str = "ops_done") -> None:
        """Note that the fault starts now; after the load, `counter` must have grown since (else it met no traffic)."""
        self.counter, self.at_fault = counter, getattr(self.report, counter)
        log.append(
            f"{what} {time.monotonic() - self.started:.1f} s into the load"
            f" ({self.report.ops_done} of {self.gifts} gifts/tips/unlocks done)"
        )


Action = Callable[[Suite, Flight, list[str]], Awaitable[None]]


@dataclass
class Scenario:
    """A named set of faults: fault points armed at start, and actions run during the load."""

    name: str
    armed: dict[str, str]  # service -> fault spec (LIVEGIFTS_<SVC>_FAULTS)
    action: Action | None = None
    postgres_only: bool = False
    settings: dict[str, dict[str, str]] = field(default_factory=dict)  # service -> LIVEGIFTS_<SVC>_* for this scenario


# A fault that is not an armed point starts once traffic flows through what it faults: N events
# stored, N gifts charged. After a fixed delay (1.5 s), a fast run's load had already ended (CI's
# gifts take about a second), and the scenario passed without its fault meeting any traffic.
FLOWING = 10  # events stored (or gifts charged) before such a fault starts
FLOWING_WITHIN_S = 30.0


async def _until(flight: Flight, what: str, reached: Callable[[], Awaitable[bool]]) -> None:
    """Return once `reached()`; fail if the load ended first or FLOWING_WITHIN_S passed: a fault
    started then would meet no traffic."""
    deadline = time.monotonic() + FLOWING_WITHIN_S
    while not await reached():
        if flight.task.done():
            flight.task.result()  # the load's own failure, if it failed
            pytest.fail(f"the load ended before {what}: a fault started now would meet no traffic")
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {FLOWING_WITHIN_S:g} s: the fault was not injected")
        await asyncio.sleep(0.02)


async def _until_stored(suite: Suite, flight: Flight, stream: str, n: int = FLOWING) -> None:
    """Return once `stream` holds `n` events (see `_until`)."""
    nc = await nats.connect(suite.config.nats_url.split(","))
    try:
        js = nc.jetstream()

        async def reached() -> bool:
            return bool((await js.stream_info(stream)).state.messages >= n)

        await _until(flight, f"{n} events stored in {stream}", reached)
    finally:
        await nc.close()


async def _until_charged(flight: Flight, n: int = FLOWING) -> None:
    """Return once the clients saw `n` gifts charged, each a spend the wallet answered (see `_until`)."""

    async def reached() -> bool:
        return flight.report.gifts_sent >= n

    await _until(flight, f"{n} gifts charged", reached)


# What each kind of service fault waits for: traffic through that service.
FLOWING_THROUGH: dict[str, Callable[[Suite, Flight], Awaitable[None]]] = {
    "wallet": lambda suite, flight: _until_charged(flight),
    "gifting": lambda suite, flight: _until_stored(suite, flight, "GIFTING"),  # gifts committed and relayed
    "payout": lambda suite, flight: _until_stored(suite, flight, "PAYOUT"),  # gift events credited
    "nats": lambda suite, flight: _until_stored(suite, flight, "GIFTING"),  # a relay publishing through it
}
# What must grow after a service's fault for it to have met traffic: the gifts, but payout's
# withdrawals, which come after every gift. By the time payout has stored its events (credits
# trail the gifts), a fast run's gifts may all be done, and payout still serves the withdrawals.
IN_FLIGHT_COUNTER = {"payout": "withdrawals"}


async def _restart_when_dead(suite: Suite, svc: str, log: list[str], timeout_s: float = 60.0) -> None:
    """Wait for an armed fault point to kill `svc`, then restart it disarmed; fail if it never fires.

    A scenario whose fault never fired ran a plain load: its audit passing would prove nothing.
    """
    proc = suite.procs[svc]
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        if time.monotonic() > deadline:
            pytest.fail(f"{svc}: its armed fault point never fired within {timeout_s:.0f} s, so no fault was injected")
        await asyncio.sleep(0.05)
    log.append(f"{svc} died at its fault point (exit {proc.returncode})")
    suite.config.extra_env[svc].pop(f"LIVEGIFTS_{svc.upper()}_FAULTS", None)
    await asyncio.to_thread(suite.restart, svc)
    log.append(f"{svc} restarted")


def _kill_and_restart(name: str, down_s: float) -> Action:
    """SIGKILL `name` once traffic flows through it, and start it again `down_s` later."""

    async def action(suite: Suite, flight: Flight, log: list[str]) -> None:
        await FLOWING_THROUGH[name](suite, flight)
        flight.fault_starts(log, f"{name} SIGKILLed", IN_FLIGHT_COUNTER.get(name, "ops_done"))
        await asyncio.to_thread(suite.kill, name, signal.SIGKILL)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(suite.restart, name)
        log.append(f"{name} restarted")

    return action


def _dies_at(svc: str, within_s: float = 60.0) -> Action:
    """An armed fault point kills `svc`: a point fires on a hit, so only with traffic through it."""

    async def action(suite: Suite, flight: Flight, log: list[str]) -> None:
        await _restart_when_dead(suite, svc, log, within_s)

    return action


def _terminate_and_restart(name: str) -> Action:
    """SIGTERM `name` mid-load, once traffic flows through it (a rolling update): it must drain and
    exit 0 within its grace, with no error logged, and the clients' retries and the audit must not notice."""

    async def action(suite: Suite, flight: Flight, log: list[str]) -> None:
        await FLOWING_THROUGH[name](suite, flight)
        proc = suite.procs[name]
        logfile = suite.log_dir / f"{name}.log"
        logged = logfile.stat().st_size
        started = time.monotonic()
        flight.fault_starts(log, f"{name} SIGTERMed", IN_FLIGHT_COUNTER.get(name, "ops_done"))
        proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(proc.wait, STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not exit within {STOP_WITHIN_S:g} s of its SIGTERM")
        log.append(f"{name} exited {code} {time.monotonic() - started:.1f} s after its SIGTERM")
        with logfile.open("rb") as f:
            f.seek(logged)
            stopping = f.read().decode(errors="replace").splitlines()
        errors = [line for line in stopping if '"level": "ERROR"' in line or "Traceback" in line]
        assert code == 0 and not errors, f"{name} exited {code} after SIGTERM, logging {errors}"
        await asyncio.to_thread(suite.restart, name)
        log.append(f"{name} restarted")

    return action


async def _drop_pg_connections(suite: Suite, flight: Flight, log: list[str]) -> None:
    """Terminate every connection to the suite's databases, three times a second apart, once gift events
    flow (each a spend in the wallet's database and a gift in gifting's); fail if none were terminated."""
    import asyncpg

    admin = pg.admin_url_or_skip()
    names = [u.rsplit("/", 1)[1] for u in suite.config.database_urls.values()]
    await _until_stored(suite, flight, "GIFTING")
    flight.fault_starts(log, "PostgreSQL connections dropped")
    terminated = 0
    for round_ in range(3):
        if round_:
            await asyncio.sleep(1.0)
        conn = await asyncpg.connect(pg.database_url(admin, "postgres").replace("+asyncpg", ""))
        try:
            n = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = ANY($1::text[])", names
            )
        finally:
            await conn.close()
        log.append(f"round {round_ + 1}: terminated {n} PostgreSQL connections")
        terminated += n
    # The services were connected (they served the load's first calls): none terminated means the
    # query missed their databases and the scenario ran without its fault.
    assert terminated > 0, f"no PostgreSQL connection of {names} was terminated: no fault was injected"


REFUSED_S = 2.0  # how long each database refuses new connections


async def _refuse_pg_connections(suite: Suite, flight: Flight, log: list[str]) -> None:
    """Each service's database in turn refuses new connections (`ALLOW_CONNECTIONS false`, an
    operator's maintenance switch: SQLSTATE 55000) for REFUSED_S, its sessions ended, once gift
    events flow. Its calls must answer UNAVAILABLE (the load retries them), not INTERNAL."""
    admin = pg.admin_url_or_skip()
    await _until_stored(suite, flight, "GIFTING")
    flight.fault_starts(log, "databases refuse new connections in turn")

    def refused_for_a_while(name: str) -> int:  # in a thread: the load goes on meanwhile
        with pg.refusing_connections(admin, name) as ended:
            time.sleep(REFUSED_S)
        return ended

    for svc in ("wallet", "gifting", "payout"):
        n = await asyncio.to_thread(refused_for_a_while, suite.config.database_urls[svc].rsplit("/", 1)[1])
        log.append(f"{svc}'s database refused connections for {REFUSED_S:g} s ({n} sessions ended)")


LOCKED_S = 6.0
LOCKED_STATEMENT_TIMEOUT_S = 2.0  # the wallet's DB_STATEMENT_TIMEOUT_S in that scenario: below the lock


async def _wallet_accounts_locked(suite: Suite, flight: Flight, log: list[str]) -> None:
    """Another session holds every wallet account row (`FOR UPDATE`, an operator's transaction left
    open) for LOCKED_S, past the wallet's DB_STATEMENT_TIMEOUT_S, once gifts are charged: the spends
    wait on the lock, time out, and are retried with their keys. Fails unless a statement met the
    timeout (else no fault was injected)."""
    import asyncpg

    pg.admin_url_or_skip()
    logfile = suite.log_dir / "wallet.log"
    await _until_charged(flight)
    logged = logfile.stat().st_size
    conn = await asyncpg.connect(suite.config.database_urls["wallet"].replace("+asyncpg", ""))
    try:
        async with conn.transaction():
            locked = len(await conn.fetch("SELECT 1 FROM accounts FOR UPDATE"))
            flight.fault_starts(log, f"{locked} wallet accounts locked for {LOCKED_S:g} s")
            await asyncio.sleep(LOCKED_S)
        log.append("wallet accounts unlocked")
    finally:
        await conn.close()
    with logfile.open("rb") as f:
        f.seek(logged)
        timed_out = f.read().decode(errors="replace").count("TimeoutError")
    assert timed_out, f"no wallet statement timed out on the locked accounts in {LOCKED_S:g} s: no fault was injected"
    log.append(f"wallet log lines with a statement timed out: {timed_out}")


STREAMS_FULL_S = 3.0


async def _streams_full(suite: Suite, flight: Flight, log: list[str]) -> None:
    """Every stream refuses new events for STREAMS_FULL_S mid-load (a limit with the `new` discard
    policy, as a full JetStream store refuses them), then takes them again: the outboxes keep what
    was refused. Fails unless a relay met the refusal (else no fault was injected).

    Mid-load means once gift events flow: after a fixed 1.5 s, a fast run's load had already
    ended (the gifts took about a second in CI), so no relay met the full streams."""
    await _until_stored(suite, flight, "GIFTING")
    nc = await nats.connect(suite.config.nats_url)
    try:
        js = nc.jetstream()
        kept = {}
        for name in STREAMS:
            info = await js.stream_info(name)
            kept[name] = copy.deepcopy(info.config)
            # A few above what it holds, so nothing stored is discarded by the new limit.
            info.config.max_msgs, info.config.discard = info.state.messages + 5, DiscardPolicy.NEW
            await js.update_stream(info.config)
        flight.fault_starts(log, f"streams full for {STREAMS_FULL_S:g} s")
        await asyncio.sleep(STREAMS_FULL_S)
        for config in kept.values():
            await js.update_stream(config)
        log.append("streams take events again")
    finally:
        await nc.close()
    refused = [svc for svc in ("wallet", "gifting") if "maximum messages exceeded" in _log_of(suite, svc)]
    assert refused, "no relay met a full stream: no fault was injected"
    log.append(f"relays refused: {refused}")


async def _payout_stream_deleted(suite: Suite, flight: Flight, log: list[str]) -> None:
    """The PAYOUT stream (no consumer in the suite reads it) is deleted mid-load, by mistake:
    payout's relay creates it again at its next publish, and no event it still had is lost.

    Mid-load means once payout's credit events flow (gifts are being credited), before the
    withdrawals: they come after every gift, and the checks after the load read their paid events
    from this stream. After a fixed 1.5 s, a fast run could be past them (the streams-full
    scenario's gifts took about a second in CI): its paid events were deleted with the stream, or
    nothing was published after and the stream never created again."""
    await _until_stored(suite, flight, "PAYOUT")
    nc = await nats.connect(suite.config.nats_url)
    try:
        js = nc.jetstream()
        # The withdrawals, on the path this faults, must come after it: the gifts may all be done.
        flight.fault_starts(log, "PAYOUT stream deleted", counter="withdrawals")
        await js.delete_stream("PAYOUT")
        deadline = time.monotonic() + WITHDRAWAL_FAULT_WITHIN_S
        while "created it again" not in _log_of(suite, "payout"):
            assert time.monotonic() < deadline, "payout never created its deleted stream again"
            await asyncio.sleep(0.2)
        info = await js.stream_info("PAYOUT")
        log.append(f"PAYOUT created again by payout ({info.state.messages} events since)")
    finally:
        await nc.close()


def _log_of(suite: Suite, svc: str) -> str:
    return (suite.log_dir / f"{svc}.log").read_text(errors="replace")


SCENARIOS = [
    Scenario(
        "gifting dies between the spend and its commit",
        {"gifting": "gifting.after_spend_before_commit@15"},
        _dies_at("gifting"),
    ),
    Scenario(
        "gifting's relay dies after the PubAck, before deleting its rows",
        {"gifting": "relay.after_puback_before_mark@8"},
        _dies_at("gifting"),
    ),
    Scenario(
        "payout dies after its commit, before the ack",
        {"payout": "consumer.after_commit_before_ack@4"},
        _dies_at("payout"),
    ),
    Scenario(
        "wallet dies after crediting a purchase, before answering the provider",
        {"wallet": "wallet.after_purchase_commit_before_answer@5"},
        _dies_at("wallet"),
    ),
    Scenario(
        "wallet dies after a chargeback commits, before answering the provider",
        {"wallet": "wallet.after_reversal_commit_before_answer"},
        _dies_at("wallet"),
    ),
    Scenario(
        "wallet dies after a spend batch commits, before answering",
        {"wallet": "wallet.after_spend_commit_before_answer@10"},
        _dies_at("wallet"),
    ),
    Scenario(
        "payout dies after claiming a withdrawal, before the provider is called",
        {"payout": "payout.after_claim_before_submit"},
        _dies_at("payout", WITHDRAWAL_FAULT_WITHIN_S),
    ),
    Scenario(
        "payout dies after the provider took a withdrawal, before storing its reference",
        {"payout": "payout.after_submit_before_commit"},
        _dies_at("payout", WITHDRAWAL_FAULT_WITHIN_S),
    ),
    Scenario(
        "payout dies after storing a withdrawal's reference, before its callback is applied",
        {"payout": "payout.after_commit_before_callback"},
        _dies_at("payout", WITHDRAWAL_FAULT_WITHIN_S),
    ),
    Scenario("wallet is SIGKILLed mid-load", {}, _kill_and_restart("wallet", down_s=1.0)),
    Scenario("nats-server is SIGKILLed mid-load", {}, _kill_and_restart("nats", down_s=2.0)),
    Scenario("wallet is SIGTERMed mid-load", {}, _terminate_and_restart("wallet")),
    Scenario("gifting is SIGTERMed mid-load", {}, _terminate_and_restart("gifting")),
    Scenario("payout is SIGTERMed mid-load", {}, _terminate_and_restart("payout")),
    Scenario("database connections are dropped mid-load", {}, _drop_pg_connections, postgres_only=True),
    Scenario("each database refuses new connections in turn mid-load", {}, _refuse_pg_connections, postgres_only=True),
    Scenario(
        "the wallet's accounts are locked past its statement timeout mid-load",
        {},
        _wallet_accounts_locked,
        postgres_only=True,
        settings={"wallet": {"LIVEGIFTS_WALLET_DB_STATEMENT_TIMEOUT_S": str(LOCKED_STATEMENT_TIMEOUT_S)}},
    ),
    Scenario("the streams refuse events mid-load (full)", {}, _streams_full),
    Scenario("the PAYOUT stream is deleted mid-load", {}, _payout_stream_deleted),
]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each scenario on SQLite and on PostgreSQL."""
    return str(request.param)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name.replace(" ", "-"))
async def test_every_coin_and_diamond_is_accounted_for_after_faults(
    scenario: Scenario, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    if scenario.postgres_only and backend != "postgres":
        pytest.skip("a PostgreSQL fault (connections dropped, rows locked); SQLite has neither")
    extra = {"gifting": dict(FAST_SWEEP), "payout": dict(FAST_PAYOUT)}
    for svc, settings in scenario.settings.items():
        extra.setdefault(svc, {}).update(settings)
    for svc, spec in scenario.armed.items():
        extra.setdefault(svc, {})[f"LIVEGIFTS_{svc.upper()}_FAULTS"] = spec
    print(f"\n== scenario: {scenario.name} [{backend}] seed={SEED} gifts={GIFTS}")
    # Nested, so each is undone even when the step after it fails: the databases (dropped last),
    # then the processes (stopped first), then the load (cancelled if the scenario failed mid-load).
    databases: contextlib.AbstractContextManager[dict[str, str]] = (
        pg.service_databases("lgfault") if backend == "postgres" else contextlib.nullcontext({})
    )
    with databases as urls:
        suite = Suite(suite_config(tmp_path_factory.mktemp("faults"), urls, extra))
        try:
            await asyncio.to_thread(suite.start)
            await _load_with_faults_then_audit(scenario, suite)
        finally:
            await asyncio.to_thread(suite.stop)


async def _every_withdrawal_paid(suite: Suite, ids: list[str]) -> None:
    """Each withdrawal the load made ends PAID: none is left PROCESSING by a crash on its way to the provider."""
    assert ids, "the load made no withdrawal: the withdrawal path ran without its faults"
    statuses = await withdrawal_statuses(
        suite.addr("payout"), ids, payout_pb2.WITHDRAWAL_STATUS_PAID, WITHDRAWALS_PAID_TIMEOUT_S
    )
    paid_status = payout_pb2.WITHDRAWAL_STATUS_PAID
    unpaid = {i: payout_pb2.WithdrawalStatus.Name(statuses.get(i, 0)) for i in ids if statuses.get(i) != paid_status}
    assert not unpaid, f"withdrawals not PAID within {WITHDRAWALS_PAID_TIMEOUT_S:.0f} s: {unpaid}"


async def _every_withdrawal_paid_once(suite: Suite, ids: list[str]) -> None:
    """One `payout.withdrawal.paid` event and no `failed` one per withdrawal; called once the audit
    found the outboxes drained, so every event the services committed is in the stream."""
    paid = await events_by_withdrawal(suite.config.nats_url, "payout.withdrawal.paid")
    failed = await events_by_withdrawal(suite.config.nats_url, "payout.withdrawal.failed")
    assert {i: paid[i] for i in ids} == dict.fromkeys(ids, 1), f"paid events per withdrawal: {dict(paid)}"
    assert not any(failed[i] for i in ids), f"failed events of paid withdrawals: {dict(failed)}"


def _leaderboards_caught_up(fetch: Callable[[], Totals]) -> Totals:
    """Totals once the creator leaderboards count every sent coin, exactly once.

    The leaderboards are gifting's own consumer of its gift.sent events, outside the audit's
    invariants: without this, one that lost or double-counted an event (a broken inbox) passed.
    """
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        totals = fetch()
        counted, sent = totals.gifting.leaderboard_coins, totals.gifting.coins_sent
        if counted > sent:
            pytest.fail(f"the leaderboards counted {counted} coins of {sent} sent: an event counted twice")
        if counted == sent:
            return totals
        if time.monotonic() > deadline:
            pytest.fail(f"the leaderboards counted {counted} of {sent} sent coins after {DRAIN_TIMEOUT_S:g} s")
        time.sleep(0.2)


async def _load_with_faults_then_audit(
    scenario: Scenario, suite: Suite, creators: int = 3, gifts: int = GIFTS, concurrency: int = 8, pause_s: float = 0.0
) -> None:
    """Run the load with the scenario's faults, then require the audit and the clients' view to agree
    (`concurrency` clients, each pausing `pause_s` after each op: `run_load`)."""
    log: list[str] = []
    progress = LoadReport(seed=SEED)
    started = time.monotonic()
    load = asyncio.create_task(
        run_load(
            suite.addr("wallet"),
            suite.addr("gifting"),
            suite.addr("payout"),
            WEBHOOK_SECRET,
            OPERATOR_METADATA,
            seed=SEED,
            viewers=8,
            creators=creators,
            gifts=gifts,
            concurrency=concurrency,
            report=progress,
            pause_s=pause_s,
        )
    )
    flight = Flight(progress, load, started, gifts)
    try:
        if scenario.action is not None:
            await scenario.action(suite, flight, log)
        report = await asyncio.wait_for(load, LOAD_TIMEOUT_S)
        print(f"   faults: {'; '.join(log) or 'none'}")
        if scenario.action is not None and not scenario.armed:
            # Else the fault met only a load that had ended: the scenario would pass without it.
            # (An armed point fires on a hit, so never without traffic.)
            at_fault, counter = flight.at_fault, flight.counter
            assert at_fault is not None, f"{scenario.name}: its action never said when its fault started"
            done = getattr(report, counter)
            assert done > at_fault, (
                f"the load's {counter} stood at {done} both when the fault started and at its end:"
                " the fault met no load in flight"
            )
        print(
            f"   load: {report.purchases} purchases ({report.callbacks_replayed} callbacks replayed),"
            f" {report.ops_done} gifts/tips/unlocks ({report.gifts_sent} charged, {report.coins_gifted} coins),"
            f" {report.reversals} chargeback, {report.withdrawals} withdrawals,"
            f" retries {dict(report.retries)}"
        )
        assert not report.wrong_answers, report.wrong_answers
        assert report.ops_done == gifts
        await _every_withdrawal_paid(suite, report.withdrawal_ids)

        def fetch(ids=None):  # type: ignore[no-untyped-def]
            return collect(suite.addr("wallet"), suite.addr("gifting"), suite.addr("payout"), 10.0, True, ids)

        audit = await asyncio.to_thread(wait_until_settled, fetch, DRAIN_TIMEOUT_S)
        for check in audit:
            print(f"   audit {check.status:>9}  {check.name}: {check.detail}")
        assert all(c.status == OK for c in audit), [c for c in audit if c.status != OK]
        await _every_withdrawal_paid_once(suite, report.withdrawal_ids)
        before = await asyncio.to_thread(_leaderboards_caught_up, fetch)

        # Only after the books balanced on their own: the broker redelivers. Replay stored events
        # past JetStream's de-duplication; the inboxes must make them no-ops (a replay first
        # would re-deliver events a broken consumer had lost and hide the loss).
        replayed = {stream: await replay_events(suite.config.nats_url, stream, 60) for stream in ("GIFTING", "WALLET")}
        # Nothing replayed would leave the checks below comparing the books with themselves.
        assert all(replayed.values()), f"no stored event was replayed: {replayed}"
        await asyncio.sleep(REPLAY_SETTLE_S)
        audit = await asyncio.to_thread(wait_until_settled, fetch, DRAIN_TIMEOUT_S)
        totals = await asyncio.to_thread(fetch)
        print(f"   replayed events: {replayed}; audit after replay: {sorted({c.status for c in audit})}")
        assert all(c.status == OK for c in audit), [c for c in audit if c.status != OK]
        # What a replayed gift, purchase or reversal event could change (withdrawals move on their own).
        for svc, fields in REPLAY_SENSITIVE.items():
            for f in fields:
                was, now = getattr(getattr(before, svc), f), getattr(getattr(totals, svc), f)
                assert was == now, f"a replayed event took effect: {svc}.{f} {was} -> {now}"

        clients_gifts = await asyncio.to_thread(fetch, report.gift_ids)  # those ids' records (a full read keeps none)
        assert clients_gifts.gifts is not None
        sent_ids = {k for k, r in clients_gifts.gifts.items() if r.status == "SENT"}
        assert report.gift_ids <= sent_ids, "a gift a client saw succeed is not SENT"
        assert totals.gifting.coins_sent == report.coins_gifted, "coins sent differ from what clients were charged"
        seen = await balances(suite.addr("wallet"), list(report.coins_by_viewer))
        assert seen == report.coins_by_viewer, "a balance differs from what the clients saw happen"
    finally:
        if not load.done():  # the action failed (a fault that never fired): stop the clients' retries
            load.cancel()
            await asyncio.gather(load, return_exceptions=True)


# Two replicas of the wallet and of payout (processes of their own over one database each and one
# NATS, as the Deployments run them), each taking the clients' calls in turn; one replica of each
# is SIGKILLed mid-load and stays dead. Payout's provider takes 0.3 s a call, so a withdrawal is
# with the provider for longer than a dispatcher round (0.2 s): the other replica's rounds read it
# claimed and unsubmitted meanwhile. Enough creators for several withdrawals, the kill among them,
# and enough gifts for each to earn the 100 diamonds it withdraws (about 10 coins a gift).
REPLICATED = ("wallet", "payout")
REPLICA_CREATORS = 8
REPLICA_GIFTS = 320
REPLICA_PROVIDER_LATENCY_S = "0.3"


def _submissions_logged(suite: Suite, svc: str) -> int:
    """The provider submissions the dispatchers of `svc`'s replicas logged as taken (their rounds'
    "submitted withdrawals" lines); a replica killed mid-round never logged that round's."""
    total = 0
    for name in (svc, *(n for n, of in suite.replica_of.items() if of == svc)):
        for line in _log_of(suite, name).splitlines():
            if '"submitted withdrawals"' in line:
                total += json.loads(line)["items"]
    return total


async def _kill_one_replica_of_each(suite: Suite, flight: Flight, log: list[str]) -> None:
    """SIGKILL the second wallet once gifts are charged (its calls in flight are retried on the
    first) and the first payout once withdrawals go (its dispatcher mid-way; the second's takes
    over); neither is restarted."""
    await _until_charged(flight)
    await asyncio.to_thread(suite.kill, "wallet-2", signal.SIGKILL)
    log.append("wallet-2 SIGKILLed")

    deadline = time.monotonic() + WITHDRAWAL_FAULT_WITHIN_S  # the withdrawals come after every gift
    while flight.report.withdrawals < 2:
        if flight.task.done():
            flight.task.result()
            pytest.fail("the load ended before 2 withdrawals were made: payout's kill would meet none")
        assert time.monotonic() < deadline, f"not 2 withdrawals made within {WITHDRAWAL_FAULT_WITHIN_S:g} s"
        await asyncio.sleep(0.02)
    flight.fault_starts(log, "payout SIGKILLed (payout-2 goes on)", "withdrawals")
    await asyncio.to_thread(suite.kill, "payout", signal.SIGKILL)


async def test_two_replicas_of_the_wallet_and_payout_one_of_each_killed_mid_load(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    pg.admin_url_or_skip()
    extra = {
        "gifting": dict(FAST_SWEEP),
        "payout": {**FAST_PAYOUT, "LIVEGIFTS_PAYOUT_DEV_PROVIDER_LATENCY_S": REPLICA_PROVIDER_LATENCY_S},
    }
    scenario = Scenario("one replica of the wallet and of payout SIGKILLed mid-load", {}, _kill_one_replica_of_each)
    print(f"\n== scenario: {scenario.name} [postgres] seed={SEED} gifts={REPLICA_GIFTS}")
    with pg.service_databases("lgreplicas") as urls:
        suite = Suite(suite_config(tmp_path_factory.mktemp("replicas"), urls, extra))
        try:
            await asyncio.to_thread(suite.start)
            for svc in REPLICATED:
                await asyncio.to_thread(suite.start_service, svc, f"{svc}-2")
            await _load_with_faults_then_audit(scenario, suite, REPLICA_CREATORS, REPLICA_GIFTS)
            withdrawals = len(await events_by_withdrawal(suite.config.nats_url, "payout.withdrawal.paid"))
            submitted = _submissions_logged(suite, "payout")
            print(f"   provider submissions logged by payout's replicas: {submitted} for {withdrawals} withdrawals")
            # One a withdrawal, or fewer (a round the kill cut short logged none): never a withdrawal
            # another replica was still submitting.
            assert 0 < submitted <= withdrawals, f"{submitted} submissions for {withdrawals} withdrawals"
        finally:
            await asyncio.to_thread(suite.stop)


# Prod's NATS: three servers, every stream of three replicas (deploy/k8s/overlays/prod/nats.conf),
# so a PubAck means two servers stored the event. The drill runs the suite on such a cluster of
# its own (tests/support/nats.py) and, mid-load, moves the GIFTING stream's leader (a step-down,
# then its server SIGKILLed and started again), kills the JetStream meta leader and starts it
# again, and takes two of the three servers away for a while (no quorum). After each, the relays
# must store events again and every durable of GIFTING be delivered them, with no service
# restarted (`_resumed` prints how long each took), and in the end every durable's acks settle
# past the faults; then the audit, the clients' view and the replay checks of every scenario
# above, and no event stored twice.
CLUSTER_REPLICAS = "3"
CLUSTER_GIFTS = 400
# A paced load (about 8 gifts a second at most), still in flight through every phase.
CLUSTER_CONCURRENCY = 2
CLUSTER_PAUSE_S = 0.25
CLUSTER_DOWN_S = 2.0  # how long a killed server (or two, without quorum) stays down
CLUSTER_PHASE_TIMEOUT_S = 60.0  # each phase's resume, and each read of the cluster's state
CLUSTER_DURABLES = ("payout-gift-sent", "gifting-leaderboards")  # GIFTING's durables
RESTORED_LINES = ("created it again", "set them back")  # what Bus.restore_stream logs when it acts


async def _cluster_read(what: str, read: Callable[[], Awaitable[T]]) -> T:
    """`cluster_read` for CLUSTER_PHASE_TIMEOUT_S."""
    return await cluster_read(what, read, CLUSTER_PHASE_TIMEOUT_S)


async def _resumed(js: JetStreamContext, flight: Flight, log: list[str], what: str, since: float) -> int:
    """Wait until the relays store events again after `what` (GIFTING's last sequence moves past
    `mark`, what it was once the stream answered again) and every durable of GIFTING is delivered
    events past `mark` (it pulls again, with no restart); returns `mark`. Logs how long each took
    from `since` (when the fault ended); fails after CLUSTER_PHASE_TIMEOUT_S."""
    mark = (await _cluster_read("GIFTING's info", lambda: js.stream_info("GIFTING"))).state.last_seq
    deadline = time.monotonic() + CLUSTER_PHASE_TIMEOUT_S
    took: dict[str, float] = {}
    while "delivered" not in took:
        if time.monotonic() > deadline:
            pytest.fail(f"after {what}, within {CLUSTER_PHASE_TIMEOUT_S:g} s only {took} past sequence {mark}")
        if "stored" not in took and flight.task.done():
            flight.task.result()
            pytest.fail(f"the load ended before the relays were seen to store again after {what}")
        if "stored" not in took:
            last = (await _cluster_read("GIFTING's info", lambda: js.stream_info("GIFTING"))).state.last_seq
            if last > mark:
                took["stored"] = time.monotonic() - since
        else:
            durables = [await _cluster_read(d, lambda d=d: js.consumer_info("GIFTING", d)) for d in CLUSTER_DURABLES]
            if all(c.delivered.stream_seq > mark for c in durables):  # type: ignore[union-attr]
                took["delivered"] = time.monotonic() - since
        await asyncio.sleep(0.1)
    log.append(
        f"after {what}: events stored again {took['stored']:.1f} s,"
        f" delivered to every durable {took['delivered']:.1f} s"
    )
    return mark


async def _acked_past(js: JetStreamContext, log: list[str], mark: int, since: float) -> None:
    """Wait until every durable of GIFTING has its acks settled past `mark` (its ack floor): an ack
    a fault lost, or one not sent (`Binding`), holds the floor until the event comes again, ack_wait
    (30 s) after its delivery, and the inbox makes that a no-op. Logs how long from `since`."""
    deadline = time.monotonic() + CLUSTER_PHASE_TIMEOUT_S
    while True:
        durables = [await _cluster_read(d, lambda d=d: js.consumer_info("GIFTING", d)) for d in CLUSTER_DURABLES]
        floors = [c.ack_floor.stream_seq for c in durables]  # type: ignore[union-attr]
        if min(floors) > mark:
            log.append(f"every durable's acks settled past the faults {time.monotonic() - since:.1f} s after")
            return
        if time.monotonic() > deadline:
            pytest.fail(f"GIFTING's durables acked up to {floors}, not past {mark}, {CLUSTER_PHASE_TIMEOUT_S:g} s on")
        await asyncio.sleep(0.2)


def _cluster_faults(cluster: NatsCluster) -> Action:
    async def action(suite: Suite, flight: Flight, log: list[str]) -> None:
        await _until_stored(suite, flight, "GIFTING")
        nc = await nats.connect(cluster.url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        try:
            js = nc.jetstream(timeout=2)

            async def down_a_while(*names: str) -> None:
                """SIGKILL `names`, and start them again CLUSTER_DOWN_S later."""
                for name in names:
                    await asyncio.to_thread(cluster.kill, name)
                await asyncio.sleep(CLUSTER_DOWN_S)
                for name in names:
                    await asyncio.to_thread(cluster.start, name)

            async def gifting_leader() -> str:
                leader = (await js.stream_info("GIFTING")).cluster.leader  # type: ignore[union-attr]
                assert leader, "no leader yet"
                return str(leader)

            leader = await _cluster_read("GIFTING's leader", gifting_leader)
            flight.fault_starts(log, f"GIFTING's leader {leader} steps down")
            await _cluster_read("the step-down", lambda: nc.request("$JS.API.STREAM.LEADER.STEPDOWN.GIFTING", b"", 2))
            await _resumed(js, flight, log, "the step-down", time.monotonic())

            leader = await _cluster_read("GIFTING's leader", gifting_leader)
            flight.fault_starts(log, f"GIFTING's leader {leader} SIGKILLed")
            await down_a_while(leader)
            await _resumed(js, flight, log, f"{leader} (GIFTING's leader) back", time.monotonic())

            async def meta_leader() -> str:  # "" while electing, or while /jsz is slow to answer
                meta = await asyncio.to_thread(cluster.meta_leader)
                assert meta, "no meta leader yet"
                return meta

            meta = await _cluster_read("the meta leader", meta_leader)
            flight.fault_starts(log, f"meta leader {meta} SIGKILLed")
            await down_a_while(meta)
            await _resumed(js, flight, log, f"{meta} (meta leader) back", time.monotonic())

            lost = cluster.running()[1:]
            flight.fault_starts(log, f"{' and '.join(lost)} SIGKILLed (no quorum)")
            await down_a_while(*lost)
            back = time.monotonic()
            mark = await _resumed(js, flight, log, "the quorum back", back)
            await _acked_past(js, log, mark, back)
        finally:
            await nc.close()

    return action


async def test_a_three_node_cluster_loses_leaders_and_quorum_mid_load(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = tmp_path_factory.mktemp("cluster")
    extra: dict[str, dict[str, str]] = {"wallet": {}, "gifting": dict(FAST_SWEEP), "payout": dict(FAST_PAYOUT)}
    for svc, env in extra.items():
        env[f"LIVEGIFTS_{svc.upper()}_NATS_STREAM_REPLICAS"] = CLUSTER_REPLICAS
    cluster = NatsCluster(base / "nats")
    scenario = Scenario("a three-node NATS cluster loses leaders and quorum mid-load", {}, _cluster_faults(cluster))
    print(f"\n== scenario: {scenario.name} [{backend}] seed={SEED} gifts={CLUSTER_GIFTS}")
    databases: contextlib.AbstractContextManager[dict[str, str]] = (
        pg.service_databases("lgcluster") if backend == "postgres" else contextlib.nullcontext({})
    )
    with databases as urls:
        await _on_a_cluster(cluster, Suite(suite_config(base / "suite", urls, extra)), scenario)


async def _on_a_cluster(cluster: NatsCluster, suite: Suite, scenario: Scenario) -> None:
    """The drill's load and checks on `suite`, its NATS `cluster` (both started here, stopped after)."""
    suite.config.external_nats_url = cluster.url
    nc = None
    try:
        await asyncio.to_thread(cluster.start)
        await asyncio.to_thread(suite.start)
        nc = await nats.connect(cluster.url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        js = nc.jetstream()
        for stream in STREAMS:  # made by the services once they reach NATS, maybe after their READY
            info = await _cluster_read(stream, lambda stream=stream: js.stream_info(stream))
            assert info.config.num_replicas == 3, f"{stream} has {info.config.num_replicas} replicas"
        await _load_with_faults_then_audit(
            scenario, suite, gifts=CLUSTER_GIFTS, concurrency=CLUSTER_CONCURRENCY, pause_s=CLUSTER_PAUSE_S
        )
        # The audit found no event parked. A relay's publish whose PubAck a leader change lost is
        # sent again: the stream's new leader must drop it as a duplicate (its Nats-Msg-Id).
        for stream in STREAMS:
            twice = await msg_ids_stored_twice(cluster.url, stream)
            assert not twice, f"{stream} stored events twice (their Nats-Msg-Id, copies): {twice}"
        for durable in CLUSTER_DURABLES:  # kept on three servers as their stream, not on one
            cluster_info = (await js.consumer_info("GIFTING", durable)).cluster
            assert cluster_info is not None and len(cluster_info.replicas or []) == 2, (durable, cluster_info)
        # An election is no stream deleted or edited (`Bus.restore_stream`'s ERROR lines).
        restored = {
            svc: [line for line in _log_of(suite, svc).splitlines() if any(w in line for w in RESTORED_LINES)]
            for svc in ("wallet", "gifting", "payout")
        }
        assert not any(restored.values()), (
            f"a service took a leader election for a stream deleted or edited: {restored}"
        )
    finally:
        if nc is not None:
            await nc.close()
        await asyncio.to_thread(suite.stop)
        await asyncio.to_thread(cluster.stop)
