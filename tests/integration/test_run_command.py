"""`livegifts run` (what `make run` starts): up on its ports, and gone after SIGTERM, however many arrive.

A supervisor (systemd, a container runtime, `timeout`) stops a program with SIGTERM, sometimes
more than once. The command's signal handler once called `threading.Event.set()`, which waits
for a lock the main thread holds now and then: a SIGTERM landing at such a moment left the
command, nats-server and the three services running for good.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli.suite import RUN_PROBE_PORTS, SuiteConfig

START_S = 90
STOP_S = 30


def _ports(offset: int) -> list[int]:
    d = SuiteConfig(var_dir=Path("var"))
    return [
        d.nats_port + offset,
        *(p + offset for p in d.grpc_ports.values()),
        *(p + offset for p in d.metrics_ports.values()),
        *(p + offset for p in RUN_PROBE_PORTS.values()),
    ]


def _free(port: int) -> bool:
    with socket.socket() as s:
        # SO_REUSEADDR: a closed server's connections in TIME_WAIT do not hold its port; a
        # listening socket still does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_offset() -> int:
    for _ in range(50):
        offset = random.randrange(1_000, 9_000)
        if all(_free(p) for p in _ports(offset)):
            return offset
    raise RuntimeError("no free set of ports for `livegifts run`")


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (the suite's processes run in sessions of their own)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's zombie waits for whoever reaps it here)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            answer = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def _run(tmp_path: Path, offset: int) -> subprocess.Popen[bytes]:
    cmd = [str(Path(sys.executable).parent / "livegifts"), "run", "--var", str(tmp_path), "--port-offset", str(offset)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _up(proc: subprocess.Popen[bytes], var: Path, offset: int) -> list[int]:
    """Wait until the three services answer health checks, on their gRPC ports and their probe
    ports; the suite's processes (`run`'s children)."""
    grpc_ports = [p + offset for p in [*SuiteConfig(var_dir=var).grpc_ports.values(), *RUN_PROBE_PORTS.values()]]
    deadline = time.monotonic() + START_S
    while not all(_serving(p) for p in grpc_ports):
        assert proc.poll() is None, proc.communicate()[0].decode()
        assert time.monotonic() < deadline, "the suite did not come up"
        time.sleep(0.5)
    return _children(proc.pid)


@contextlib.contextmanager
def _running(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, list[int]]]:
    """`livegifts run` on a free set of ports, up: the command, its port offset and the suite's
    processes. On exit they are killed (whatever a failure left behind; the suite's processes are
    in sessions of their own) and the command is reaped."""
    offset = _free_offset()
    proc = _run(tmp_path, offset)
    children: list[int] = []
    try:
        children = _up(proc, tmp_path, offset)
        yield proc, offset, children
    finally:
        for pid in [proc.pid, *children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def _assert_stopped_cleanly(proc: subprocess.Popen[bytes], out: bytes, offset: int, children: list[int]) -> None:
    """`run` exited 0 saying so, and nothing of the suite is left: no port held, no process."""
    assert proc.returncode == 0, out.decode()
    assert "nothing left running" in out.decode()
    assert all(_free(p) for p in _ports(offset)), "a process of the suite still holds its port"
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()], "a process of the suite is still there"


def test_run_serves_and_stops_everything_on_sigterm_even_when_signals_repeat(tmp_path: Path) -> None:
    with _running(tmp_path) as (proc, offset, children):
        assert len(children) == 4, children  # nats-server and three services
        for _ in range(500):  # a supervisor that insists: signals land while the last one is handled
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=STOP_S)
    _assert_stopped_cleanly(proc, out, offset, children)


def test_run_stops_everything_when_its_terminal_hangs_up(tmp_path: Path) -> None:
    """SIGHUP (a closed terminal, a dropped ssh session) reaches `run` alone: the suite's processes
    live in sessions of their own, so `run` must stop them, not die and leave them serving."""
    with _running(tmp_path) as (proc, offset, children):
        proc.send_signal(signal.SIGHUP)
        out, _ = proc.communicate(timeout=STOP_S)
    _assert_stopped_cleanly(proc, out, offset, children)


def test_run_whose_output_is_gone_still_stops_everything(tmp_path: Path) -> None:
    """A closed terminal (SIGHUP, then EIO on every write) or a reader of its pipe that went away:
    the first print of the stop fails, and the stop must not be skipped with it."""
    left: list[int] = []
    with _running(tmp_path) as (proc, offset, children):
        assert proc.stdout is not None
        proc.stdout.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=STOP_S)
        left = [pid for pid in children if _alive(pid)]
    assert not left, "a process of the suite outlived `run`"
    assert all(_free(p) for p in _ports(offset)), "a process of the suite still holds its port"


def test_a_second_run_on_the_same_var_refuses_and_leaves_the_first_serving(tmp_path: Path) -> None:
    """Two suites on one var/ would run two nats-servers on one JetStream store and two of each
    service on one SQLite file, and the second would rewrite the first's nats.conf."""
    with _running(tmp_path) as (first, offset, children):
        other = _free_offset()
        second = _run(tmp_path, other)
        try:
            out = second.communicate(timeout=30)[0].decode()  # a refusal comes at once
        finally:
            second.send_signal(signal.SIGTERM)  # if it started after all: it stops what it started
            second.wait(STOP_S)
        assert second.returncode == 1, out
        flat = " ".join(out.split())
        assert "could not start:" in flat and "a suite still running" in flat and "Traceback" not in out, out
        assert all(_free(p) for p in _ports(other)), "the second run started something"
        assert f"port: {SuiteConfig(var_dir=tmp_path).nats_port + offset}" in (tmp_path / "nats.conf").read_text()
        assert first.poll() is None and all(Path(f"/proc/{pid}").exists() for pid in children)
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=STOP_S)
    assert first.returncode == 0


def _run_beside(tmp_path: Path, offset: int, held_port: int) -> tuple[int, str]:
    """`run` while another program listens on `held_port`: its exit code and output."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", held_port))
        held.listen()
        proc = _run(tmp_path, offset)
        try:
            out = proc.communicate(timeout=START_S)[0].decode()
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    return proc.returncode, out


def test_run_that_cannot_start_a_service_says_why_in_a_line_and_exits_1(tmp_path: Path) -> None:
    offset = _free_offset()
    # Another program on the wallet's metrics port.
    code, out = _run_beside(tmp_path, offset, SuiteConfig(var_dir=tmp_path).metrics_ports["wallet"] + offset)
    assert code == 1, out
    assert "could not start: wallet exited with code" in out and "Traceback" not in out
    flat = " ".join(out.split())  # the console wraps long lines
    assert "last log line:" in flat and "cannot serve metrics on 127.0.0.1:" in flat, out  # the service's own words
    assert '"level": "ERROR"' not in flat, out  # its words, not the JSON record around them
    joined = "".join(out.split())  # paths too
    assert f"itslog:{tmp_path / 'logs' / 'wallet.log'}" in joined, out  # the log to read, not only its folder
    assert "nothing left running" in out
    assert all(_free(p) for p in _ports(offset)), "a process of the suite still holds its port"


def test_run_refuses_a_nats_port_another_program_holds(tmp_path: Path) -> None:
    """Not a suite on a server it did not start (another store, maybe no JetStream)."""
    offset = _free_offset()
    # Another program (say, an earlier run's nats-server) on the NATS port.
    code, out = _run_beside(tmp_path, offset, SuiteConfig(var_dir=tmp_path).nats_port + offset)
    flat = " ".join(out.split())
    assert code == 1, out
    assert "could not start: nats-server port 127.0.0.1:" in flat and "is taken by another program" in flat, out
    assert "LIVEGIFTS_RUN_PORT_OFFSET" in flat, out  # what `make run`, which takes no options, reads
    assert "Traceback" not in out and "nothing left running" in out
    assert all(_free(p) for p in _ports(offset)), "a process of the suite still holds its port"


def test_run_whose_service_crashes_stops_the_rest_and_exits_1(tmp_path: Path) -> None:
    with _running(tmp_path) as (proc, offset, children):
        payout = [pid for pid in children if b"services.payout" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(payout) == 1, children
        os.kill(payout[0], signal.SIGKILL)
        out, _ = proc.communicate(timeout=STOP_S)
    assert proc.returncode == 1, out.decode()  # a crash, not a Ctrl-C
    assert "payout exited with code -9" in out.decode() and "nothing left running" in out.decode()
    assert all(_free(p) for p in _ports(offset)), "a process of the suite still holds its port"


def test_run_killed_with_sigkill_takes_its_suite_with_it(tmp_path: Path) -> None:
    """`kill -9`, an OOM kill or a cancelled CI job: `run` gets no chance to stop the suite, whose
    processes live in sessions of their own. They once kept running on var/ (their ports held,
    the next `run` refused as "port taken"), and a `run` on the same var/ with another
    --port-offset, the run.lock gone with the killed one, started a second nats-server on the same
    JetStream store and a second service on each database."""
    left: list[int] = []
    with _running(tmp_path) as (proc, offset, children):
        assert len(children) == 4, children
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + STOP_S
        while [pid for pid in children if _alive(pid)] and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [pid for pid in children if _alive(pid)]
    assert not left, "a process of the suite outlived `run` killed with SIGKILL"
    assert all(_free(p) for p in _ports(offset)), "a process of the suite still holds its port"


def test_the_client_commands_call_the_suite_the_two_variables_that_started_it(tmp_path: Path) -> None:
    """README's second suite is `LIVEGIFTS_VAR_DIR=var2 LIVEGIFTS_RUN_PORT_OFFSET=100 make run`: the
    demo run with the same two variables (`make demo`) called the default ports, the FIRST suite,
    and bought coins and sent gifts there (or failed against nothing)."""
    livegifts = str(Path(sys.executable).parent / "livegifts")
    with _running(tmp_path) as (proc, offset, _):
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEGIFTS_")}  # no address, no secret
        env |= {"LIVEGIFTS_VAR_DIR": str(tmp_path), "LIVEGIFTS_RUN_PORT_OFFSET": str(offset)}
        demo = subprocess.run(  # from a folder with no var/ of its own: the secret is var2's
            [livegifts, "demo", "--json"], capture_output=True, text=True, timeout=90, env=env, cwd=tmp_path / "logs"
        )
        assert demo.returncode == 0, demo.stdout + demo.stderr
        answer = json.loads(demo.stdout)
        # This suite's payout, at the address `run` gave it, has the demo creator's diamonds.
        payout = f"127.0.0.1:{SuiteConfig(var_dir=tmp_path).grpc_ports['payout'] + offset}"
        earned = subprocess.run(
            [livegifts, "earnings", answer["creator_id"], "--json", "--payout-addr", payout],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )
        assert earned.returncode == 0, earned.stdout + earned.stderr
        assert json.loads(earned.stdout)["diamonds_lifetime"] == answer["diamonds_expected"] > 0, earned.stdout
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=STOP_S)
    assert proc.returncode == 0
