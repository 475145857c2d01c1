"""The /metrics server against clients that hold its connections: any pod reaching the port may.

prometheus_client's own server gave each connection a thread with no timeout, so connections
left silent held their threads for good (thousands of them: the pod's memory and thread limit).
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily

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


def test_connections_past_the_limit_are_closed_at_once_and_the_rest_served(
    metrics: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The held connections keep their slots for the whole test: with the fixture's 0.5 s timeout
    # a loaded machine that took the extra connection 0.5 s after them found their slots free
    # again, took it, and the test failed. "At once" is well within that timeout.
    monkeypatch.setattr(telemetry, "METRICS_REQUEST_TIMEOUT_S", 60.0)
    before = _handlers()
    threads = threading.active_count()
    held = [socket.create_connection(("127.0.0.1", metrics)) for _ in range(2)]
    try:
        deadline = time.monotonic() + 20
        while len(_handlers() - before) < 2:  # the server has taken both (not a fixed wait)
            assert time.monotonic() < deadline, "the held connections were not taken"
            time.sleep(0.01)
        with socket.create_connection(("127.0.0.1", metrics)) as extra:
            assert _closed_within(extra, 10.0), "a connection past the limit was taken"
        assert threading.active_count() <= threads + 2
        taken = _handlers() - before
    finally:
        for sock in held:
            sock.close()
    for thread in taken:  # their slots are free once their threads end
        thread.join(20)
        assert not thread.is_alive(), "a closed connection kept its thread"
    assert b"python_info" in _scrape(metrics)


def _ask(port: int, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request(method, path)
        answer = connection.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()
    finally:
        connection.close()


@pytest.mark.parametrize("path", ["/", "/favicon.ico", "/metrics/", "/metricsx", "/admin", "/../metrics"])
def test_only_the_metrics_path_is_answered(metrics: int, path: str) -> None:
    # prometheus_client answered the metrics at any path: whatever probed the port got them.
    status, _headers, body = _ask(metrics, "GET", path)
    assert status == 404
    assert b"python_info" not in body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"])
def test_only_get_and_head_are_answered(metrics: int, method: str) -> None:
    status, headers, body = _ask(metrics, method, "/metrics")
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"
    assert b"python_info" not in body


def test_a_head_is_answered_as_a_get_without_the_body(metrics: int) -> None:
    # prometheus_client answered HEAD 405; a HEAD check of the endpoint is answered as GET is.
    get_status, get_headers, body = _ask(metrics, "GET", "/metrics?name[]=python_info")
    status, headers, head_body = _ask(metrics, "HEAD", "/metrics?name[]=python_info")
    assert (get_status, status) == (200, 200)
    assert headers["Content-Type"] == get_headers["Content-Type"]
    assert int(headers["Content-Length"]) == len(body) > 0
    assert head_body == b""


class _Large:
    """A collector whose metrics are megabytes: an answer no socket buffer holds."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("test_large", "megabytes of samples", labels=["i"])
        for i in range(100_000):
            family.add_metric([str(i)], i)
        yield family


def _handlers() -> set[threading.Thread]:
    """The connections' threads running (each a `process_request_thread`)."""
    return {t for t in threading.enumerate() if "process_request_thread" in t.name}


def _wait_for_a_new_handler_to_end(before: set[threading.Thread]) -> None:
    """Until a connection's thread not in `before` has started, then ended."""
    deadline = time.monotonic() + 20
    while not (new := _handlers() - before):
        assert time.monotonic() < deadline, "the connection was not taken"
        time.sleep(0.01)
    for thread in new:
        thread.join(max(0.0, deadline - time.monotonic()))
        assert not thread.is_alive(), "the connection's thread is still running"


def test_an_answer_the_client_does_not_read_is_given_up_quietly(
    metrics: int, capfd: pytest.CaptureFixture[str]
) -> None:
    # Each write of the answer may wait METRICS_REQUEST_TIMEOUT_S; one that timed out was no
    # client gone for wsgiref (only a reset or broken pipe is), and its handle_error printed a
    # traceback to stderr, one per client that stopped reading.
    large = _Large()
    REGISTRY.register(large)
    try:
        before = _handlers()
        with socket.socket() as reader:
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            reader.connect(("127.0.0.1", metrics))
            reader.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            _wait_for_a_new_handler_to_end(before)  # its answer blocked, a write timed out: it gave up
            reader.settimeout(5)
            received = b""
            while chunk := reader.recv(65536):
                received += chunk
        assert received.startswith(b"HTTP/1.0 200 OK")
        assert b'test_large{i="99999"}' not in received, "the answer was not cut: the test proves nothing"
    finally:
        REGISTRY.unregister(large)
    time.sleep(0.1)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "TimeoutError" not in err, err
    assert b"python_info" in _scrape(metrics)


class _Failing:
    def describe(self) -> list[GaugeMetricFamily]:
        return []  # registered without a collect()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        raise RuntimeError("a collector failed")


def test_an_error_of_the_metrics_app_itself_is_still_answered_500_with_its_traceback(
    metrics: int, capfd: pytest.CaptureFixture[str]
) -> None:
    # Only a write's timeout is quiet: a collector's bug stays visible.
    failing = _Failing()
    REGISTRY.register(failing)
    try:
        status, _headers, _body = _ask(metrics, "GET", "/metrics")
    finally:
        REGISTRY.unregister(failing)
    assert status == 500
    assert "RuntimeError: a collector failed" in capfd.readouterr().err
