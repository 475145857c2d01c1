"""Who is trying operator tokens: each failed check is counted by reason and logged with the
method and the caller's address (never the token), throttled per address.

Before, a refused operator RPC showed only as livegifts_rpc_seconds{code="PERMISSION_DENIED"}
(or UNAUTHENTICATED), with no caller, and a read that shows operators more (`is_operator`) sent a
wrong token was answered as a non-operator's with no trace at all.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace

import grpc
import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr

from services.common import auth, throttle
from services.common.auth import FAILURE_REASONS, OperatorAuth, peer_address
from services.common.grpcserver import ServiceRegistration, create_server
from services.common.telemetry import JsonFormatter
from services.common.throttle import KeyedLogThrottle

TOKEN = "s3cret-operator-token-s3cret"
WRONG = "guess-guess-guess-guess"
SERVICE = "livegifts.test.v1.Ops"


def _registration(operator_auth: OperatorAuth) -> ServiceRegistration:
    """Change: an operator RPC (require); Read: a read that shows operators more (is_operator);
    Watch: an operator stream."""

    async def change(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return operator_auth.require(context).encode()

    async def read(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"operator view" if operator_auth.is_operator(context) else b"public view"

    async def watch(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        operator_auth.require(context)
        yield b"item"

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Change": grpc.unary_unary_rpc_method_handler(change),
            "Read": grpc.unary_unary_rpc_method_handler(read),
            "Watch": grpc.unary_stream_rpc_method_handler(watch),
        },
    )
    return ServiceRegistration(lambda _servicer, server: server.add_generic_rpc_handlers((handler,)), None, SERVICE)


@pytest.fixture
def fresh_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A throttle of its own for the test (the process's is shared by every check)."""
    monkeypatch.setattr(auth, "_refused_log", KeyedLogThrottle(60.0, 16))
    yield


@pytest.fixture
async def port(fresh_log: None) -> AsyncIterator[int]:
    running = await create_server([_registration(OperatorAuth(SecretStr(TOKEN)))], "127.0.0.1", 0, "test")
    try:
        yield running.port
    finally:
        await running.stop(0)


async def _call(port: int, method: str, *metadata: tuple[str, str]) -> tuple[grpc.StatusCode, bytes]:
    """One call on a channel (a connection) of its own, from a new local port each time."""
    # A subchannel pool of its own: channels to one target otherwise share a connection.
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
    ) as channel:
        try:
            if method == "Watch":
                items = [i async for i in channel.unary_stream(f"/{SERVICE}/Watch")(b"", metadata=metadata)]
                return grpc.StatusCode.OK, b"".join(items)
            answer = await channel.unary_unary(f"/{SERVICE}/{method}")(b"", metadata=metadata)
            return grpc.StatusCode.OK, answer
        except grpc.aio.AioRpcError as err:
            return err.code(), b""


def _failures() -> dict[str, float]:
    return {
        r: REGISTRY.get_sample_value("livegifts_operator_auth_failures_total", {"reason": r}) or 0.0
        for r in FAILURE_REASONS
    }


def _lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "operator token refused"]


def _delta(before: dict[str, float]) -> dict[str, float]:
    return {r: v - before[r] for r, v in _failures().items()}


async def test_a_wrong_operator_token_is_counted_and_logged_with_the_method_and_the_caller_never_the_token(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    before = _failures()
    with caplog.at_level(logging.WARNING, logger="services.common.auth"):
        code, _ = await _call(port, "Change", ("authorization", f"Bearer {WRONG}"), ("x-operator", "mallory"))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert _delta(before) == {"missing": 0, "wrong": 1}
    [line] = _lines(caplog)
    assert line.levelno == logging.WARNING
    fields = line.__dict__
    assert fields["method"] == f"/{SERVICE}/Change"
    assert fields["peer"].startswith("ipv4:127.0.0.1:")
    assert (fields["reason"], fields["refusal"], fields["answered"], fields["attempts"]) == (
        "wrong",
        "NOT_AN_OPERATOR",
        "refused",
        1,
    )
    rendered = JsonFormatter("test").format(line)
    assert json.loads(rendered)["peer"] == fields["peer"]
    for secret in (WRONG, TOKEN):
        for part in (secret, secret[:8], secret[-8:]):
            assert part not in caplog.text and part not in rendered


async def test_an_operator_call_without_a_token_is_counted_and_logged_missing(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    before = _failures()
    with caplog.at_level(logging.WARNING, logger="services.common.auth"):
        code, _ = await _call(port, "Watch", ("x-operator", "mallory"))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert _delta(before) == {"missing": 1, "wrong": 0}
    [line] = _lines(caplog)
    assert (line.__dict__["method"], line.__dict__["reason"]) == (f"/{SERVICE}/Watch", "missing")


async def test_a_read_with_a_wrong_token_is_answered_as_before_and_counted_and_logged(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    before = _failures()
    with caplog.at_level(logging.WARNING, logger="services.common.auth"):
        assert await _call(port, "Read") == (grpc.StatusCode.OK, b"public view")  # no token: claims nothing
        assert await _call(port, "Read", ("authorization", "Basic abc")) == (grpc.StatusCode.OK, b"public view")
        assert await _call(port, "Read", ("authorization", f"Bearer {TOKEN}")) == (
            grpc.StatusCode.OK,
            b"operator view",
        )
        assert _delta(before) == {"missing": 0, "wrong": 0}
        assert not _lines(caplog)
        wrong = await _call(port, "Read", ("authorization", f"Bearer {WRONG}"))
    assert wrong == (grpc.StatusCode.OK, b"public view")  # not refused: a non-operator's answer
    assert _delta(before) == {"missing": 0, "wrong": 1}
    [line] = _lines(caplog)
    assert (line.__dict__["method"], line.__dict__["reason"], line.__dict__["answered"]) == (
        f"/{SERVICE}/Read",
        "wrong",
        "as a non-operator",
    )
    assert WRONG not in caplog.text


async def test_the_refusals_log_is_throttled_per_address_and_says_how_many_attempts_a_line_stands_for(
    port: int, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The throttle's clock is the test's: on the real one the four calls had to be made within the
    # 0.5 s interval, and on a loaded machine they were not ([1, 3] logged, not [1]).
    clock = {"s": 1000.0}
    monkeypatch.setattr(throttle, "time", SimpleNamespace(monotonic=lambda: clock["s"]))
    monkeypatch.setattr(auth, "_refused_log", KeyedLogThrottle(0.5, 16))
    before = _failures()
    wrong = ("authorization", f"Bearer {WRONG}")
    with caplog.at_level(logging.WARNING, logger="services.common.auth"):
        for method in ("Change", "Read", "Change", "Watch"):  # each on a connection of its own
            await _call(port, method, wrong)
            clock["s"] += 0.1  # all four within the interval
        assert [r.__dict__["attempts"] for r in _lines(caplog)] == [1]
        clock["s"] += 0.6  # the interval is over
        await _call(port, "Change")
    assert _delta(before) == {"missing": 1, "wrong": 4}  # every attempt counted, logged or not
    lines = _lines(caplog)
    assert [(r.__dict__["attempts"], r.__dict__["reason"]) for r in lines] == [(1, "wrong"), (4, "missing")]
    assert lines[0].__dict__["peer"] != lines[1].__dict__["peer"]  # another port, the same address


def test_a_peers_address_is_its_host_without_the_port() -> None:
    assert peer_address("ipv4:10.1.2.3:51234") == "ipv4:10.1.2.3"
    assert peer_address("ipv6:[fd00::1]:51234") == "ipv6:[fd00::1]"
    assert peer_address("unix:/run/grpc.sock") == "unix:/run/grpc.sock"
    assert peer_address("") == ""


def test_both_reasons_are_exported_at_zero_once_a_service_checks_tokens() -> None:
    # A reason's series that first appears at 1 shows Prometheus no increase().
    OperatorAuth(None)
    for reason in FAILURE_REASONS:
        assert REGISTRY.get_sample_value("livegifts_operator_auth_failures_total", {"reason": reason}) is not None
