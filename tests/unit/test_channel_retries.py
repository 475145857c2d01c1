"""Calls between services across rollouts and scaling: what a stopping callee refused is retried
(UNAVAILABLE and CANCELLED), and a client's connection does not stay on one replica for good; the
service config README "Calling it" gives clients retries what it says, against the services' own
server stack."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from services.common import grpcserver
from services.common.clients import error_reason, make_channel
from services.common.errors import (
    Aborted,
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    status_for,
)
from services.common.grpcserver import ServiceRegistration, create_server
from tests.support.docs import REPO

METHOD = "/livegifts.test.v1.Slow/Call"
CALLERS = 64
BEFORE_STOP_S = 0.5
AFTER_STOP_S = 0.5


def _slow_registration() -> ServiceRegistration:
    """A service whose one method takes 10 ms, like a short transaction."""

    async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(0.01)
        return b"ok"

    handler = grpc.method_handlers_generic_handler(
        "livegifts.test.v1.Slow", {"Call": grpc.unary_unary_rpc_method_handler(call)}
    )
    return ServiceRegistration(
        lambda _servicer, server: server.add_generic_rpc_handlers((handler,)), None, "livegifts.test.v1.Slow"
    )


async def test_a_call_a_stopping_server_cancelled_before_running_it_is_retried_not_answered_cancelled() -> None:
    # Calls that reached a server whose graceful stop begins before it handed them to a handler
    # are cancelled by gRPC itself: the client sees CANCELLED for a call that never ran. In a
    # rolling update that is gifting's Spend to a wallet pod going away: retried, it reaches
    # another pod; answered CANCELLED, the gift stays PENDING and its sender gets UNAVAILABLE.
    running = await create_server([_slow_registration()], "127.0.0.1", 0, "livegifts.test")
    channel = make_channel(f"127.0.0.1:{running.port}", 5.0)
    codes: collections.Counter[str] = collections.Counter()
    stopped = asyncio.Event()
    ran = asyncio.Event()  # more calls answered than there are callers

    async def caller() -> None:
        call = channel.unary_unary(METHOD)
        while not stopped.is_set():
            try:
                await call(b"")
                codes["OK"] += 1
                if codes["OK"] > CALLERS:
                    ran.set()
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
                await asyncio.sleep(0.05)

    callers = [asyncio.create_task(caller()) for _ in range(CALLERS)]
    try:
        await asyncio.sleep(BEFORE_STOP_S)
        # and until the calls did run: a loaded machine answered fewer than CALLERS in BEFORE_STOP_S
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ran.wait(), 30)
        await running.server.stop(5.0)
        await asyncio.sleep(AFTER_STOP_S)
    finally:
        stopped.set()
        await asyncio.gather(*callers)
        await channel.close()
    assert codes["OK"] > CALLERS, codes  # the calls did run before the stop
    assert codes["CANCELLED"] == 0, codes


def _peer_registration() -> ServiceRegistration:
    """A service whose one method answers the caller's address as the server sees it."""

    async def peer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return context.peer().encode()

    handler = grpc.method_handlers_generic_handler(
        "livegifts.test.v1.Peer", {"Call": grpc.unary_unary_rpc_method_handler(peer)}
    )
    return ServiceRegistration(
        lambda _servicer, server: server.add_generic_rpc_handlers((handler,)), None, "livegifts.test.v1.Peer"
    )


async def test_a_client_connection_is_moved_on_once_it_is_old_so_new_replicas_get_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Behind a Kubernetes Service (one virtual IP) a channel makes one connection, to the pod
    # kube-proxy picked when it connected, and keeps it: gifting's calls stay on the wallet pods
    # that were up then, however many the autoscaler adds. An aged connection is closed
    # gracefully (GOAWAY), the client connects again, and the Service picks a pod anew.
    monkeypatch.setattr(grpcserver, "CONNECTION_AGE_MAX_S", 0.3)
    running = await create_server([_peer_registration()], "127.0.0.1", 0, "livegifts.test")
    channel = make_channel(f"127.0.0.1:{running.port}", 5.0)
    peers = set()
    try:
        call = channel.unary_unary("/livegifts.test.v1.Peer/Call")
        for _ in range(40):  # 2 s: several times the age, with the core's jitter
            peers.add((await call(b"")).decode())
            await asyncio.sleep(0.05)
    finally:
        await channel.close()
        await running.server.stop(None)
    assert len(peers) > 1, f"one connection for every call: {peers}"


def _readme_service_config() -> dict[str, Any]:
    """The client service config README "Calling it" gives (its one JSON block with methodConfig)."""
    blocks = re.findall(r"```json\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    configs = [json.loads(b) for b in blocks if '"methodConfig"' in b]
    assert len(configs) == 1, f"README gives {len(configs)} service configs"
    return configs[0]


# What each call of the test method answers, in turn, then OK: a domain error goes through the
# services' own ErrorInterceptor (an ErrorInfo with its reason), a bare code through context.abort.
Answer = DomainError | grpc.StatusCode
RETRIED: dict[str, list[Answer]] = {
    "DEPENDENCY_UNAVAILABLE twice": [Unavailable("db down", "DEPENDENCY_UNAVAILABLE")] * 2,
    "CONFLICT": [Aborted("conflict", "CONFLICT")],
    "a stopping server's CANCELLED": [grpc.StatusCode.CANCELLED],
    "UNAVAILABLE without a reason": [grpc.StatusCode.UNAVAILABLE],
}
NOT_RETRIED: dict[str, Answer] = {
    "INSUFFICIENT_COINS": FailedPrecondition("no coins", "INSUFFICIENT_COINS"),
    "SPENDING_LIMIT_EXCEEDED": ResourceExhausted("limit", "SPENDING_LIMIT_EXCEEDED"),
    "IDEMPOTENCY_KEY_REUSED": AlreadyExists("reused", "IDEMPOTENCY_KEY_REUSED"),
    "INVALID_ARGUMENT": InvalidArgument("bad", "INVALID_ID"),
    "INTERNAL": RuntimeError("a bug"),
}


@contextlib.asynccontextmanager
async def _answering(service: str, answers: list[Answer | Exception]) -> AsyncIterator[tuple[Any, list[bytes]]]:
    """A server of the services' own making whose `service`/Call answers `answers` in turn, then
    OK, and a channel to it with README's service config; yields the call and the attempts seen."""
    attempts: list[bytes] = []

    async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        attempts.append(request)
        if len(attempts) <= len(answers):
            answer = answers[len(attempts) - 1]
            if isinstance(answer, grpc.StatusCode):
                await context.abort(answer, "refused")
            raise answer
        return b"done"

    handler = grpc.method_handlers_generic_handler(service, {"Call": grpc.unary_unary_rpc_method_handler(call)})
    registration = ServiceRegistration(lambda _s, server: server.add_generic_rpc_handlers((handler,)), None, service)
    running = await create_server([registration], "127.0.0.1", 0, "livegifts.test")
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{running.port}",
        options=[("grpc.service_config", json.dumps(_readme_service_config())), ("grpc.enable_retries", 1)],
    )
    try:
        yield channel.unary_unary(f"/{service}/Call"), attempts
    finally:
        await channel.close()
        await running.server.stop(None)


def _services() -> list[str]:
    return [n["service"] for c in _readme_service_config()["methodConfig"] for n in c["name"]]


@pytest.mark.parametrize("service", _services())
@pytest.mark.parametrize("refusals", list(RETRIED))
async def test_the_readme_service_config_retries_what_the_rule_says_to_retry_under_the_same_key(
    service: str, refusals: str
) -> None:
    async with _answering(service, list(RETRIED[refusals])) as (call, attempts):
        assert await call(b"key-1", timeout=10) == b"done"
    assert attempts == [b"key-1"] * (len(RETRIED[refusals]) + 1)  # the same request: the same key


@pytest.mark.parametrize("refusal", list(NOT_RETRIED))
async def test_the_readme_service_config_retries_no_refusal(refusal: str) -> None:
    async with _answering(_services()[1], [NOT_RETRIED[refusal]]) as (call, attempts):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call(b"key-1", timeout=10)
    answer = NOT_RETRIED[refusal]
    code = status_for(answer) if isinstance(answer, DomainError) else grpc.StatusCode.INTERNAL
    assert (failed.value.code(), attempts) == (code, [b"key-1"])


async def test_the_readme_service_config_gives_up_after_its_attempts_and_answers_the_last_refusal() -> None:
    attempts_max = _readme_service_config()["methodConfig"][0]["retryPolicy"]["maxAttempts"]
    down = [Unavailable("db down", "DEPENDENCY_UNAVAILABLE")] * 10
    async with _answering(_services()[1], down) as (call, attempts):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call(b"key-1", timeout=10)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(failed.value) == "DEPENDENCY_UNAVAILABLE"  # for the client's own retry
    assert len(attempts) == attempts_max
