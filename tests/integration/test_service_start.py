"""A service that cannot start as configured says why in one log line and exits 1, no traceback.

A port another program holds, a database that is down, refuses the role or does not exist:
the operator (or `livegifts run`, which shows a service's last log line) reads the cause at once.
A failure nothing in the environment explains (a bug, a migration's own SQL error) keeps its traceback.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from services.common.app import StartupError, _starting
from tests.integration import pg

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another program listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _start(tmp_path: Path, *args: str, **env: str) -> tuple[int, str, list[dict[str, str]]]:
    """Run the gifting service (`args`) until it exits: its code, its output, its error log records."""
    base = {
        "PYTHONPATH": f"{ROOT / 'gen'}{os.pathsep}{ROOT}",
        "PATH": os.environ.get("PATH", ""),
        "LIVEGIFTS_GIFTING_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'gifting.db'}",
        "LIVEGIFTS_GIFTING_NATS_URL": "nats://127.0.0.1:1",
        "LIVEGIFTS_GIFTING_WALLET_ADDR": "127.0.0.1:1",
        "LIVEGIFTS_GIFTING_GRPC_PORT": "0",
        "LIVEGIFTS_GIFTING_METRICS_PORT": "0",
    }
    env = base | {f"LIVEGIFTS_GIFTING_{k.upper()}": v for k, v in env.items()}
    r = subprocess.run(
        [sys.executable, "-m", "services.gifting", *args], env=env, capture_output=True, text=True, timeout=60
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


@pytest.mark.parametrize("command", [[], ["migrate"]], ids=["serve", "migrate"])
def test_a_database_that_is_down_is_one_line_without_its_password(
    tmp_path: Path, held_port: int, command: list[str]
) -> None:
    # Nothing PostgreSQL-speaking listens on a port that is closed again: the connection is refused.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    url = f"postgresql://livegifts:hunter2@127.0.0.1:{closed}/gifting"
    result = _start(tmp_path, *command, database_url=url)
    _says(result, f"cannot migrate the database postgresql://livegifts:***@127.0.0.1:{closed}/gifting")
    assert "hunter2" not in result[1]


@pytest.mark.parametrize(
    ("change", "says"),
    [({"database": "livegifts_no_such_db"}, "does not exist"), ({"username": "livegifts_no_such_role"}, "role")],
    ids=["no-such-database", "no-such-role"],
)
def test_a_database_that_refuses_the_service_is_one_line(tmp_path: Path, change: dict[str, str], says: str) -> None:
    url = make_url(pg.admin_url_or_skip()).set(**change).render_as_string(hide_password=False)
    _says(_start(tmp_path, database_url=url), "cannot migrate the database", says)


def test_a_failure_the_environment_does_not_explain_keeps_its_traceback() -> None:
    # A migration's own SQL error is a bug to fix, not an outage: it is not turned into one line.
    bug = sa_exc.ProgrammingError("ALTER TABLE x", {}, Exception("syntax error at or near x"))
    with pytest.raises(sa_exc.ProgrammingError), _starting("cannot migrate", database=True):
        raise bug
    with pytest.raises(ValueError), _starting("cannot serve gRPC"):
        raise ValueError("a bug")
    with pytest.raises(StartupError, match="cannot serve gRPC: Failed to bind"), _starting("cannot serve gRPC"):
        raise RuntimeError("Failed to bind to address 127.0.0.1:1; set GRPC_VERBOSITY=debug")
