"""nats-server processes of a test's own, on free ports of 127.0.0.1 with a store under the
test's directory, syncing every write (`sync_interval: always`)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from services.cli.suite import free_port, nats_server_binary

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


def start_nats(conf: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """Start nats-server with `conf` on `port`, its output appended to `log_path`. Clients reach it
    once it listens (Bus.connect retries until then)."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [nats_server_binary(), "-c", str(conf), "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
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
