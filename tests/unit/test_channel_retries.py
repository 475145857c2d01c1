"""Calls between services across rollouts and scaling: what a stopping callee refused is retried
(UNAVAILABLE and CANCELLED), and a client's connection does not stay on one replica for good."""

from __future__ import annotations

import asyncio
import collections

import grpc
import pytest

from services.common import grpcserver
from services.common.clients import make_channel
from services.common.grpcserver import ServiceRegistration, create_server

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

    async def caller() -> None:
        call = channel.unary_unary(METHOD)
        while not stopped.is_set():
            try:
                await call(b"")
                codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
                await asyncio.sleep(0.05)

    callers = [asyncio.create_task(caller()) for _ in range(CALLERS)]
    try:
        await asyncio.sleep(BEFORE_STOP_S)
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
