"""Service runtime: settings -> telemetry -> migrations -> database -> NATS -> gRPC -> graceful stop.

Every service's `__main__` builds a `ServiceSpec` and hands it to `main()`; nothing here knows
which service it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common import faults
from services.common.auth import OperatorAuth
from services.common.bus import JETSTREAM_TIMEOUT_S, Bus
from services.common.config import MigrationSettings, ServiceSettings, load_settings
from services.common.consumers import unlisted
from services.common.db import Database, url_for_messages
from services.common.deadletters import ParkedGauge, dead_letter_registration
from services.common.dependency_errors import is_unavailable, sqlstate
from services.common.errors import StartupError, check
from services.common.gc_tuning import observe_pauses, tune_gc
from services.common.grpcserver import (
    CONCURRENT_RPCS_MAX,
    ServiceRegistration,
    create_server,
)
from services.common.idempotency import IdempotencyPruner
from services.common.inbox import Consumer, InboxPruner, Subscription
from services.common.looplag import watch_loop_lag
from services.common.migrate import MigrationBlockedError, upgrade_head
from services.common.outbox import ATOMIC_BATCH_MAX, Outbox, OutboxRelay
from services.common.tables import CommonTables
from services.common.telemetry import setup_logging, setup_tracing, start_metrics

log = logging.getLogger(__name__)


# SQLSTATE of a database that does not exist (a wrong name in DATABASE_URL).
_NO_SUCH_DATABASE = "3D000"


@contextlib.contextmanager
def _starting(what: str, *, database: bool = False) -> Iterator[None]:
    """Raise StartupError for a start step's failure that the environment explains: a port that
    cannot be bound (OSError, gRPC's RuntimeError), and with `database` the database down,
    refusing the service or missing. Anything else (a bug, a migration's own error) keeps its
    traceback."""
    try:
        yield
    except Exception as exc:
        explained = isinstance(exc, OSError | RuntimeError)
        if database:
            explained = is_unavailable(exc) or sqlstate(exc) == _NO_SUCH_DATABASE
        if not explained:
            raise
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__]
        raise StartupError(f"{what}: {detail[0]}") from exc


def idle_in_transaction_timeout_s(settings: ServiceSettings) -> float:
    """How long PostgreSQL lets a session of ours sit inside a transaction without a statement
    before it ends the session (see db.create_engine): twice the longest gap we make ourselves.

    That gap is either a statement (at most DB_STATEMENT_TIMEOUT_S; between statements there
    is only Python work), the outbox relay's claimed batch waiting for JetStream: per 1,000
    events an atomic batch (OUTGOING_DEADLINE_S), then one by one (JetStream's timeout), or
    a transaction a service holds over a call (`ServiceSettings.held_over_a_call_s`: payout's
    dispatcher, a withdrawal's submission lock over the provider's answer). Twice that, for an
    event loop that is slow for a moment. 120 s with the defaults. A leaked or orphaned
    transaction then holds its locks for minutes, not until TCP keepalive notices.
    """
    relay_s = math.ceil(settings.relay_batch_size_max / ATOMIC_BATCH_MAX) * (
        settings.outgoing_deadline_s + JETSTREAM_TIMEOUT_S
    )
    return 2 * max(settings.db_statement_timeout_s, relay_s, settings.held_over_a_call_s())


@dataclass
class Runtime:
    """What a service's wiring gets to build its use cases and servicers from."""

    name: str
    settings: Any
    db: Database
    bus: Bus
    tables: CommonTables
    outbox: Outbox
    stop: asyncio.Event


@dataclass
class Wiring:
    """What a service contributes: servicers, subscriptions, extra background loops, a close hook."""

    registrations: list[ServiceRegistration]
    subscriptions: list[Subscription[Any]] = field(default_factory=list)
    background: list[Callable[[asyncio.Event], Awaitable[None]]] = field(default_factory=list)
    close: Callable[[], Awaitable[None]] | None = None
    # Long-lived streaming calls the service bounds itself (gifting's live feeds, WATCHERS_MAX):
    # each holds a slot of the server's concurrent-call limit for as long as it streams.
    streaming_rpcs_max: int = 0


def rpc_limit(wiring: Wiring) -> int:
    """How many calls the service's gRPC server takes at once; past it every call, health checks
    on that port included, is refused with RESOURCE_EXHAUSTED (the kubelet's probes go to the
    probe port, PROBE_PORT, which this limit does not reach). The long-lived streams get slots of
    their own on top of CONCURRENT_RPCS_MAX, so a replica full of them still takes other calls
    and answers health checks on its main port; their own limit answers the stream past it."""
    return CONCURRENT_RPCS_MAX + wiring.streaming_rpcs_max


@dataclass(frozen=True)
class ServiceSpec:
    """A service: its name, settings class, migrations, common tables, streams it touches, wiring."""

    name: str
    settings_cls: type[ServiceSettings]
    migrations_dir: Path
    tables: CommonTables
    streams: list[str]
    wire: Callable[[Runtime], Awaitable[Wiring]]


async def serve(spec: ServiceSpec, settings: ServiceSettings) -> int:
    """Run the service until SIGTERM/SIGINT, then drain and stop gracefully; returns the exit code.

    A background loop (relay, consumer, sweeper) that dies stops the process with exit code 1,
    so the supervisor (Kubernetes, `livegifts run`) restarts it instead of it serving half-alive.
    """
    faults.arm(settings.faults)
    observe_pauses()
    tracing = setup_tracing(spec.name, settings)
    with _starting(f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}"):
        metrics_port = start_metrics(settings)
    if settings.migrate_on_start:
        await _migrate(spec, settings)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    db = Database(
        settings.database_url,
        pool_size=settings.db_pool_size,
        pool_timeout_s=settings.db_pool_timeout_s,
        application_name=f"livegifts-{spec.name}",
        statement_timeout_s=settings.db_statement_timeout_s,
        idle_in_transaction_timeout_s=idle_in_transaction_timeout_s(settings),
    )
    bus = Bus(settings, f"livegifts-{spec.name}")
    outbox = Outbox(spec.tables.outbox)
    runtime = Runtime(spec.name, settings, db, bus, spec.tables, outbox, stop)
    wiring = await spec.wire(runtime)
    # The CLI checks `--consumer` against services/common/consumers.py: a consumer not listed
    # there could not be listed by name, and `nats-drained` would not look for it on its stream.
    differs = unlisted(spec.name, {sub.durable: sub.stream for sub in wiring.subscriptions})
    check(not differs, differs)
    consumers = [Consumer(db, bus, spec.tables, sub, settings) for sub in wiring.subscriptions]
    parked = dead_letter_registration(
        db, spec.tables, consumers, OperatorAuth(settings.operator_token, settings.operator_token_previous)
    )
    with _starting(f"cannot serve gRPC on {settings.grpc_host}:{settings.grpc_port} (in use, or not this host's)"):
        running = await create_server(
            [*wiring.registrations, parked],
            settings.grpc_host,
            settings.grpc_port,
            f"livegifts.{spec.name}",
            trace_spans=tracing.recording,
            concurrent_rpcs_max=rpc_limit(wiring),
            keepalive_time_s=settings.grpc_keepalive_time_s,
            keepalive_timeout_s=settings.grpc_keepalive_timeout_s,
        )
    probe_port = None
    if settings.probe_port:
        where = f"{settings.probe_host}:{settings.probe_port}"
        with _starting(f"cannot serve the gRPC probe port on {where} (in use, or not this host's)"):
            try:
                probe_port = await running.serve_probes(
                    settings.probe_host,
                    settings.probe_port,
                    keepalive_time_s=settings.grpc_keepalive_time_s,
                    keepalive_timeout_s=settings.grpc_keepalive_timeout_s,
                )
            except BaseException:
                await running.stop(0)  # a started server left to the collector logs a traceback
                raise

    connecting = asyncio.create_task(bus.connect(stop, spec.streams), name="nats-connect")
    tasks = [connecting]
    tasks.append(asyncio.create_task(OutboxRelay(db, bus, outbox, settings).run(stop), name="outbox-relay"))
    for consumer in consumers:
        tasks.append(asyncio.create_task(consumer.run(stop), name=consumer.sub.durable))
    if consumers:
        tasks.append(asyncio.create_task(InboxPruner(db, spec.tables, settings).run(stop), name="inbox-pruner"))
        gauge = ParkedGauge(db, spec.tables, [c.sub.durable for c in consumers])
        tasks.append(asyncio.create_task(gauge.run(stop), name="dead-letters-gauge"))
    # Every service records idempotent answers (its commands, dead-letter replays), consumers or not.
    pruner = IdempotencyPruner(db, spec.tables, settings)
    tasks.append(asyncio.create_task(pruner.run(stop), name="idempotency-pruner"))
    lag_probe = asyncio.create_task(watch_loop_lag(stop, settings.loop_lag_probe_s), name="loop-lag")
    tasks.append(lag_probe)
    for loop_fn in wiring.background:
        tasks.append(asyncio.create_task(loop_fn(stop), name=getattr(loop_fn, "__qualname__", "background")))

    # Everything the process keeps is built: leave it out of every later full collection.
    tune_gc(freeze=settings.gc_freeze, gen0_threshold=settings.gc_gen0_threshold)

    ready = {
        "service": spec.name,
        "grpc": f"{settings.grpc_host}:{running.port}",
        "metrics_port": metrics_port,
        "probe": f"{settings.probe_host}:{probe_port}" if probe_port else None,
    }
    log.info("serving", extra=ready)
    # One machine-readable line on stdout: launchers and tests learn the bound ports from it.
    print("LIVEGIFTS_READY " + json.dumps(ready), flush=True)

    stop_wait = asyncio.create_task(stop.wait())
    crashed = asyncio.create_task(_first_crash(tasks))
    await asyncio.wait([stop_wait, crashed], return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if crashed.done() and not crashed.cancelled() and crashed.exception() is not None:
        exc = crashed.exception()
        if isinstance(exc, StartupError):  # found once running (NATS reached late): one line, as in `main`
            log.error("%s", exc)
        else:
            log.error("background task crashed; stopping", exc_info=exc)
        exit_code = 1
    stop.set()

    log.info("draining", extra={"drain_delay_s": settings.drain_delay_s, "grace_s": settings.shutdown_grace_s})
    await running.set_serving(False)
    await asyncio.sleep(settings.drain_delay_s)
    grace_ends = loop.time() + settings.shutdown_grace_s
    await running.stop(settings.shutdown_grace_s)
    # Every loop saw `stop` and ends after the round it is in: a consumer's batch committed and
    # acked, a relay's batch deleted, a dispatcher's submission stored. Cancelled at once (no call
    # in flight, no drain delay), a consumer's batch was rolled back and its events, fetched and
    # never acked, reached the next process only after the ack_wait (30 s). They get what is left
    # of the grace, then are cancelled. A connection to NATS not made by now has no round to
    # finish (the client's own attempt would hold the wait for the whole grace): cancelled first,
    # as is the loop-lag probe, whose sleep (LOOP_LAG_PROBE_S, up to 60 s) has no round to end.
    connecting.cancel()
    lag_probe.cancel()
    await asyncio.wait(tasks, timeout=max(0.0, grace_ends - loop.time()))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    crashed.cancel()
    if wiring.close is not None:
        await wiring.close()
    await bus.close()
    await db.dispose()
    tracing.shutdown()
    log.info("stopped", extra={"exit_code": exit_code})
    return exit_code


async def _migrate(spec: ServiceSpec, settings: MigrationSettings) -> None:
    what = f"cannot migrate the database {url_for_messages(settings.database_url)}"
    with _starting(what, database=True):
        try:
            await upgrade_head(
                spec.migrations_dir,
                settings.database_url,
                lock_timeout_s=settings.migration_lock_timeout_s,
                give_up_s=settings.migration_lock_give_up_s,
            )
        except MigrationBlockedError as exc:  # explained: one line, exit 1, the init container restarts
            raise StartupError(f"{what}: {exc}") from exc


async def _first_crash(tasks: list[asyncio.Task[Any]]) -> None:
    for fut in asyncio.as_completed(tasks):
        try:
            await fut
        except asyncio.CancelledError:
            continue
        except Exception:
            raise
    await asyncio.Event().wait()  # all finished cleanly: wait forever for the stop signal


def main(spec: ServiceSpec, argv: list[str] | None = None) -> None:
    """Command line of a service: `serve` (default) or `migrate`."""
    prefix = spec.settings_cls.model_config.get("env_prefix", "")
    parser = argparse.ArgumentParser(
        prog=f"python -m services.{spec.name}",
        description=f"livegifts {spec.name} service. Configuration comes from {prefix}* environment variables "
        "(see README.md).",
        epilog=f"serve: migrate the database to the latest schema (unless {prefix}MIGRATE_ON_START=false), then "
        "serve gRPC, /metrics, the outbox relay and the event consumers until SIGTERM. migrate: bring the "
        f"database to the latest schema and exit, as a migration Job or init container does; it reads only "
        f"{prefix}DATABASE_URL, {prefix}MIGRATION_LOCK_TIMEOUT_S, {prefix}MIGRATION_LOCK_GIVE_UP_S and "
        f"{prefix}LOG_LEVEL / {prefix}LOG_FORMAT.",
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="serve",
        choices=["serve", "migrate"],
        help="serve the service (default), or migrate its database and exit",
    )
    args = parser.parse_args(argv)
    if args.command == "migrate":
        # It reads only what it uses: a migration Job needs no NATS URL, secret or peer address.
        migration = load_settings(MigrationSettings, prefix)
        setup_logging(spec.name, migration.log_level, migration.log_format)
        sys.exit(_exit_code(lambda: asyncio.run(_migrate(spec, migration))))
    settings = load_settings(spec.settings_cls)
    setup_logging(spec.name, settings.log_level, settings.log_format)
    try:
        import uvloop

        runner: Callable[..., Any] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        runner = asyncio.run

    def run() -> int:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C before the signal handlers are in
            return int(runner(serve(spec, settings)))
        return 0

    sys.exit(_exit_code(run))


def _exit_code(run: Callable[[], int | None]) -> int:
    """Run a command: its exit code (0 for none), or 1 for a start it cannot make (one log line)."""
    try:
        return run() or 0
    except StartupError as exc:
        log.error("%s", exc)
        return 1
