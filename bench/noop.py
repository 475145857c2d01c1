"""The gRPC ceiling: a tiny grpc.aio server process whose one unary method does nothing.

The load generator calls it with the same client code and concurrency as SendGift, so the
ratio SendGift / no-op says how much of one Python-to-Python gRPC hop the saga achieves.
Like the services it runs on uvloop; unlike them it has no interceptors, database or NATS.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import grpc
import uvloop

from services.common.gc_tuning import GEN0_THRESHOLD, tune_gc

METHOD = "/livegifts.bench.v1.Noop/Ping"


def _ping(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b""


async def serve(port: int) -> None:
    """Serve the no-op method on 127.0.0.1:port (0 = any) until SIGTERM; prints `READY <port>`."""
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "livegifts.bench.v1.Noop", {"Ping": grpc.unary_unary_rpc_method_handler(_ping)}
    )
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    tune_gc(freeze=True, gen0_threshold=GEN0_THRESHOLD)  # as the services do: a ceiling as high as theirs
    print(f"READY {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    """`python -m bench.noop --port N`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    uvloop.run(serve(args.port))
    sys.exit(0)


if __name__ == "__main__":
    main()
