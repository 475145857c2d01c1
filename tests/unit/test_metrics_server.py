"""The /metrics server against clients that hold its connections: any pod reaching the port may.

prometheus_client's own server gave each connection a thread with no timeout, so connections
left silent held their threads for good (thousands of them: the pod's memory and thread limit).
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from services.common import telemetry


@pytest.fixture
def metrics(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setattr(telemetry, "METRICS_REQUEST_TIMEOUT_S", 0.5)
    monkeypatch.setattr(telemetry, "METRICS_CONNECTIONS_MAX", 2)
    server = telemetry.serve_metrics("127.0.0.1", 0)
    try:
        yield int(server.server_port)
    finally:
        server.shutdown()
        server.server_close()


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` within `seconds` (it sends nothing before that)."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def _scrape(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        assert answer.status == 200
        return bytes(answer.read())


def test_a_scrape_is_answered(metrics: int) -> None:
    assert b"python_info" in _scrape(metrics)


def test_a_connection_that_sends_nothing_is_closed_after_the_timeout(metrics: int) -> None:
    with socket.create_connection(("127.0.0.1", metrics)) as idle:
        assert _closed_within(idle, 5.0), "a silent connection keeps its thread for good"
    assert b"python_info" in _scrape(metrics)


def test_a_request_that_trickles_in_is_cut_at_the_timeout_not_per_read(metrics: int) -> None:
    with socket.create_connection(("127.0.0.1", metrics)) as slow:
        started = time.monotonic()
        closed = False
        for byte in b"GET /metrics HTTP/1.0\r\nX-Slow: " + b"a" * 200:
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            if _closed_within(slow, 0.1):
                closed = True
                break
            if time.monotonic() - started > 5:
                break
        assert closed, "a client sending a byte at a time kept its connection"
        assert time.monotonic() - started < 1.5, "cut per read, not at the deadline"


def test_connections_past_the_limit_are_closed_at_once_and_the_rest_served(metrics: int) -> None:
    threads = threading.active_count()
    held = [socket.create_connection(("127.0.0.1", metrics)) for _ in range(2)]
    try:
        time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", metrics)) as extra:
            assert _closed_within(extra, 0.3), "a connection past the limit was taken"
        assert threading.active_count() <= threads + 2
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    assert b"python_info" in _scrape(metrics)
