"""nats-server processes of a test's own: one server, or a JetStream cluster of three as prod runs
(deploy/k8s/overlays/prod/nats.conf), each on free ports of 127.0.0.1 with a store under the
test's directory, syncing every write (`sync_interval: always`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from services.cli.suite import free_port, nats_server_binary
from tests.support.ports import free_ports

STOP_WAIT_S = 10.0


def nats_conf(
    store_dir: Path,
    *,
    max_payload: int | None = None,
    store_bytes: int | None = None,
    server_name: str = "",
    http_port: int = 0,
    cluster: tuple[int, list[int]] | None = None,
) -> str:
    """A nats-server configuration: JetStream on a file store in `store_dir`, fsync on every write;
    `max_payload` and a store of `store_bytes` if given; with `cluster` (this server's route port,
    every server's route port) one server of a cluster named "livegifts"."""
    lines = ["host: 127.0.0.1"]
    if server_name:
        lines.append(f"server_name: {server_name}")
    if http_port:
        lines.append(f"http: 127.0.0.1:{http_port}")
    if max_payload is not None:
        lines.append(f"max_payload: {max_payload}")
    lines += ["jetstream {", f'  store_dir: "{store_dir}"', "  sync_interval: always"]
    if store_bytes is not None:
        lines.append(f"  max_file_store: {store_bytes}")
    lines.append("}")
    if cluster is not None:
        listen, routes = cluster
        lines += [
            "cluster {",
            "  name: livegifts",
            f"  listen: 127.0.0.1:{listen}",
            "  routes: [" + ", ".join(f"nats-route://127.0.0.1:{p}" for p in routes) + "]",
            "  connect_retries: 120",
            "}",
        ]
    return "\n".join(lines) + "\n"


def start_nats(conf: Path, port: int, log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start nats-server with `conf` on `port`, its output appended to `log_path`, with `env` added
    to its environment (what `$VAR`s of the configuration read). Clients reach it once it listens
    (Bus.connect retries until then)."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [nats_server_binary(), "-c", str(conf), "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env} if env else None,
        )


def stop_nats(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it outlives STOP_WAIT_S; reaped either way."""
    if server.poll() is None:
        server.terminate()
    try:
        server.wait(STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@contextlib.contextmanager
def nats_server(tmp_path: Path, *, max_payload: int | None = None, store_bytes: int | None = None) -> Iterator[str]:
    """A nats-server of the test's own on a free port of 127.0.0.1 (`nats_conf`); yields its URL
    and stops it."""
    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(nats_conf(tmp_path / "js", max_payload=max_payload, store_bytes=store_bytes))
    server = start_nats(conf, port, tmp_path / "nats.log")
    try:
        yield f"nats://127.0.0.1:{port}"
    finally:
        stop_nats(server)


@dataclass
class Node:
    """One server of a `NatsCluster`."""

    name: str
    port: int
    http_port: int
    conf: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class NatsCluster:
    """`size` nats-servers (three, as prod: a quorum of two) routed to each other as one JetStream
    cluster, each with a store of its own under `base`; `kill` and `start` one by name, keeping its
    store."""

    base: Path
    size: int = 3
    nodes: dict[str, Node] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Each server's route, monitor and client port, all different (`free_ports`).
        ports = free_ports(3 * self.size)
        routes, https, clients = ports[: self.size], ports[self.size : 2 * self.size], ports[2 * self.size :]
        for i, route in enumerate(routes):
            name = f"n{i + 1}"
            node_dir = self.base / name
            node_dir.mkdir(parents=True, exist_ok=True)
            conf = node_dir / "nats.conf"
            conf.write_text(nats_conf(node_dir / "js", server_name=name, http_port=https[i], cluster=(route, routes)))
            self.nodes[name] = Node(name, clients[i], https[i], conf, node_dir / "nats.log")

    @property
    def url(self) -> str:
        """Every server's URL, comma separated (LIVEGIFTS_<SVC>_NATS_URL)."""
        return ",".join(f"nats://127.0.0.1:{n.port}" for n in self.nodes.values())

    def start(self, name: str | None = None, timeout_s: float = 30.0) -> None:
        """Start one server (`name`) or all, and wait until each says JetStream is healthy; with
        all, until the cluster has a meta leader."""
        names = [name] if name else list(self.nodes)
        for n in names:
            node = self.nodes[n]
            node.proc = start_nats(node.conf, node.port, node.log)
        for n in names:
            self.wait_until(lambda n=n: self._healthy(n), f"{n} healthy", timeout_s)
        if name is None:  # else a client's first JetStream calls time out until one is elected
            self.wait_until(lambda: self.meta_leader() != "", "a meta leader elected", timeout_s)

    def kill(self, name: str) -> None:
        """SIGKILL one server (its store stays, as a pod's PVC)."""
        node = self.nodes[name]
        if node.proc is not None and node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait()
        node.proc = None

    def stop(self) -> None:
        """Stop every server."""
        for node in self.nodes.values():
            if node.proc is not None:
                stop_nats(node.proc)
                node.proc = None

    def running(self) -> list[str]:
        """The names of the servers started and not exited."""
        return [n for n, node in self.nodes.items() if node.proc is not None and node.proc.poll() is None]

    def jsz(self, name: str) -> dict[str, Any]:
        """The server's /jsz (its JetStream view: meta leader, streams)."""
        url = f"http://127.0.0.1:{self.nodes[name].http_port}/jsz"
        with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - our own server's monitor port
            return dict(json.load(r))

    def meta_leader(self) -> str:
        """The JetStream meta leader's name as a running server sees it ("" if none)."""
        for name in self.running():
            with contextlib.suppress(OSError, ValueError):
                leader = str(self.jsz(name).get("meta_cluster", {}).get("leader", ""))
                if leader:
                    return leader
        return ""

    def _healthy(self, name: str) -> bool:
        node = self.nodes[name]
        if node.proc is None or node.proc.poll() is not None:
            raise RuntimeError(f"nats-server {name} exited (see {node.log})")
        url = f"http://127.0.0.1:{node.http_port}/healthz?js-enabled-only=true"
        try:
            with urllib.request.urlopen(url, timeout=1) as r:  # noqa: S310
                return r.status == 200
        except OSError:
            return False

    @staticmethod
    def wait_until(done: Callable[[], bool], what: str, timeout_s: float) -> None:
        """Poll `done()` every 0.1 s; TimeoutError naming `what` after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"not {what} within {timeout_s:g} s")
            time.sleep(0.1)


T = TypeVar("T")


async def cluster_read(what: str, read: Callable[[], Awaitable[T]], timeout_s: float) -> T:
    """`read()` retried (a cluster electing a leader answers nothing or 503, and a read may assert
    what it waits for) for `timeout_s`; the test fails naming `what` and the last error."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await read()
        except Exception as exc:  # noqa: BLE001 - an election or quorum lost: asked again
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not answered within {timeout_s:g} s ({exc!r})")
            await asyncio.sleep(0.2)


def nats_drained(nats_url: str) -> subprocess.CompletedProcess[str]:
    """`livegifts nats-drained`, as an operator runs it: a process of its own, the URL (with the
    operator's password, where NATS has users) in its NATS_URL as the runbooks export it."""
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "nats-drained"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NATS_URL": nats_url, "COLUMNS": "300"},
        check=False,
    )
