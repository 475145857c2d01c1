"""A service that cannot start as configured says why in one log line and exits 1, no traceback.

A port another program holds, a database that is down, refuses the role or does not exist:
the operator (or `livegifts run`, which shows a service's last log line) reads the cause at once.
A failure nothing in the environment explains (a bug, a migration's own SQL error) keeps its traceback.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from services.common.app import StartupError, _starting
from services.common.bus import EVENT_BYTES_MAX
from services.common.early_signals import SIGTERM_EXIT_CODE
from services.common.migrate import MIGRATION_LOCK_KEY
from tests.integration import pg
from tests.support.nats import nats_server

ROOT = Path(__file__).resolve().parents[2]
START_WAIT_S = 30.0
STOP_WAIT_S = 10.0


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another program listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _env(tmp_path: Path, **env: str) -> dict[str, str]:
    """The gifting service's environment on SQLite under `tmp_path`, with `env` (settings) over it."""
    base = {
        "PYTHONPATH": f"{ROOT / 'gen'}{os.pathsep}{ROOT}",
        "PATH": os.environ.get("PATH", ""),
        "LIVEGIFTS_GIFTING_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'gifting.db'}",
        "LIVEGIFTS_GIFTING_NATS_URL": "nats://127.0.0.1:1",
        "LIVEGIFTS_GIFTING_WALLET_ADDR": "127.0.0.1:1",
        "LIVEGIFTS_GIFTING_GRPC_PORT": "0",
        "LIVEGIFTS_GIFTING_METRICS_PORT": "0",
    }
    return base | {f"LIVEGIFTS_GIFTING_{k.upper()}": v for k, v in env.items()}


def _start(tmp_path: Path, *args: str, **env: str) -> tuple[int, str, list[dict[str, str]]]:
    """Run the gifting service (`args`) until it exits: its code, its output, its error log records."""
    r = subprocess.run(
        [sys.executable, "-m", "services.gifting", *args],
        env=_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = r.stdout + r.stderr
    errors = []
    for line in out.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("level") == "ERROR":
                errors.append(record)
    return r.returncode, out, errors


def _says(result: tuple[int, str, list[dict[str, str]]], *words: str) -> None:
    code, out, errors = result
    assert code == 1, out
    assert "Traceback" not in out, out
    assert len(errors) == 1 and all(w in errors[0]["msg"] for w in words), out


def test_a_grpc_port_in_use_is_one_line(tmp_path: Path, held_port: int) -> None:
    _says(_start(tmp_path, grpc_port=str(held_port)), f"cannot serve gRPC on 127.0.0.1:{held_port}")


def test_a_metrics_port_in_use_is_one_line(tmp_path: Path, held_port: int) -> None:
    _says(_start(tmp_path, metrics_port=str(held_port)), f"cannot serve metrics on 127.0.0.1:{held_port}")


def test_a_probe_port_in_use_is_one_line(tmp_path: Path, held_port: int) -> None:
    _says(_start(tmp_path, probe_port=str(held_port)), f"cannot serve the gRPC probe port on 127.0.0.1:{held_port}")


def _health(port: int) -> int | None:
    """The status a grpc.health.v1 Check on 127.0.0.1:port answers, None for no answer."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            return int(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status)
        except grpc.RpcError:
            return None


def test_the_probe_port_serves_with_the_service_and_says_not_serving_from_sigterm_on(tmp_path: Path) -> None:
    """PROBE_PORT: where the kubelet's probes go. SERVING once the service serves (its READY line
    names it), NOT_SERVING through the drain as the main port, then closed."""
    from grpc_health.v1 import health_pb2

    from services.cli.suite import READY_PREFIX, free_port

    probe_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.gifting"],
        env=_env(tmp_path, probe_port=str(probe_port), drain_delay_s="3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(next(line for line in proc.stdout if line.startswith(READY_PREFIX))[len(READY_PREFIX) :])
        assert ready["probe"] == f"127.0.0.1:{probe_port}", ready
        main_port = int(ready["grpc"].rsplit(":", 1)[1])
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        assert _health(probe_port) == serving == _health(main_port)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 2
        while _health(probe_port) != not_serving:  # the drain (DRAIN_DELAY_S) has begun
            assert time.monotonic() < deadline, "the probe port did not turn NOT_SERVING"
            time.sleep(0.05)
        assert _health(main_port) == not_serving
        assert proc.wait(timeout=STOP_WAIT_S) == 0
        assert _health(probe_port) is None, "the probe port outlived the service"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_sigterm_does_not_wait_out_the_loop_lag_probes_interval(tmp_path: Path) -> None:
    """Since a stop waits for the background loops to end their round (within the grace), the
    loop-lag probe, asleep for LOOP_LAG_PROBE_S (up to 60 s), held every stop for the grace."""
    from services.cli.suite import READY_PREFIX

    proc = subprocess.Popen(
        [sys.executable, "-m", "services.gifting"],
        env=_env(tmp_path, loop_lag_probe_s="60", drain_delay_s="0", shutdown_grace_s="30"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        next(line for line in proc.stdout if line.startswith(READY_PREFIX))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOP_WAIT_S) == 0  # NATS never reached: closing it takes a moment
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("command", [[], ["migrate"]], ids=["serve", "migrate"])
@pytest.mark.parametrize(
    ("user", "query", "shown"),
    [
        ("livegifts:hunter2", "", ""),
        # asyncpg and libpq take the password in the query string too
        ("livegifts", "?password=hunter2&ssl=disable", "?password=***&ssl=disable"),
    ],
    ids=["in-the-user-part", "in-the-query-string"],
)
def test_a_database_that_is_down_is_one_line_without_its_password(
    tmp_path: Path, held_port: int, command: list[str], user: str, query: str, shown: str
) -> None:
    # Nothing PostgreSQL-speaking listens on a port that is closed again: the connection is refused.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    url = f"postgresql://{user}@127.0.0.1:{closed}/gifting{query}"
    result = _start(tmp_path, *command, database_url=url)
    who = "livegifts:***" if ":" in user else user
    _says(result, f"cannot migrate the database postgresql://{who}@127.0.0.1:{closed}/gifting{shown}")
    assert "hunter2" not in result[1]


@pytest.mark.parametrize(
    ("change", "says"),
    [({"database": "livegifts_no_such_db"}, "does not exist"), ({"username": "livegifts_no_such_role"}, "role")],
    ids=["no-such-database", "no-such-role"],
)
def test_a_database_that_refuses_the_service_is_one_line(tmp_path: Path, change: dict[str, str], says: str) -> None:
    url = make_url(pg.admin_url_or_skip()).set(**change).render_as_string(hide_password=False)
    _says(_start(tmp_path, database_url=url), "cannot migrate the database", says)


def test_a_nats_server_that_takes_smaller_messages_than_our_events_is_one_line(tmp_path: Path) -> None:
    small = EVENT_BYTES_MAX - 1
    with nats_server(tmp_path, max_payload=small) as url:
        result = _start(tmp_path, nats_url=url)
    _says(
        result,
        f"at most {small} bytes",
        f"the {EVENT_BYTES_MAX} bytes",
        "raise max_payload",
        url.removeprefix("nats://"),
    )


@pytest.mark.parametrize("svc", ["wallet", "gifting", "payout"])
def test_migrate_needs_only_the_database_url(tmp_path: Path, svc: str) -> None:
    """A migration Job is given the database and nothing else: no NATS URL, no webhook secret, no
    wallet address (none of which a migration uses)."""
    db = tmp_path / f"{svc}.db"
    env = {
        "PYTHONPATH": f"{ROOT / 'gen'}{os.pathsep}{ROOT}",
        "PATH": os.environ.get("PATH", ""),
        f"LIVEGIFTS_{svc.upper()}_DATABASE_URL": f"sqlite+aiosqlite:///{db}",
    }
    r = subprocess.run(
        [sys.executable, "-m", f"services.{svc}", "migrate"], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone(), "no migration ran"


def test_a_failure_the_environment_does_not_explain_keeps_its_traceback() -> None:
    # A migration's own SQL error is a bug to fix, not an outage: it is not turned into one line.
    bug = sa_exc.ProgrammingError("ALTER TABLE x", {}, Exception("syntax error at or near x"))
    with pytest.raises(sa_exc.ProgrammingError), _starting("cannot migrate", database=True):
        raise bug
    with pytest.raises(ValueError), _starting("cannot serve gRPC"):
        raise ValueError("a bug")
    with pytest.raises(StartupError, match="cannot serve gRPC: Failed to bind"), _starting("cannot serve gRPC"):
        raise RuntimeError("Failed to bind to address 127.0.0.1:1; set GRPC_VERBOSITY=debug")


async def _backends(conn: Any) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"))


@pytest.mark.parametrize("command", [[], ["migrate"]], ids=["serve", "migrate"])
async def test_a_sigterm_before_serving_ends_the_service_even_as_pid_1(command: list[str]) -> None:
    """In its container the service is PID 1, which ignores a signal it has no handler for; a
    parent that ignores SIGTERM hands its child the same disposition, so this runs anywhere. The
    service waits for the migration lock another replica holds, as an init container does."""
    import asyncpg

    with pg.service_databases("lgterm") as urls:
        url = urls["gifting"]
        holder = await asyncpg.connect(url.replace("+asyncpg", ""))
        proc = None
        try:
            await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
            env = _env(Path(os.devnull), database_url=url)
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "services.gifting",
                *command,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN),
            )
            deadline = time.monotonic() + START_WAIT_S
            while await _backends(holder) < 2:  # it is connected, trying for the lock
                assert proc.returncode is None, "the service exited while starting"
                assert time.monotonic() < deadline, "the service never asked for the migration lock"
                await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            try:
                code = await asyncio.wait_for(proc.wait(), STOP_WAIT_S)
            except TimeoutError:
                pytest.fail(f"SIGTERM was ignored: still running {STOP_WAIT_S} s later")
            assert proc.stdout is not None
            out = (await proc.stdout.read()).decode(errors="replace")
            assert code == SIGTERM_EXIT_CODE, out
            assert "LIVEGIFTS_READY" not in out and "Traceback" not in out, out
        finally:
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
            await holder.close()
