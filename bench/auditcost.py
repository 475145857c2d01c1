"""How long `livegifts audit --detail` takes as the books grow, and which part of it.

Starts the real suite (nats-server + three services) on one backend, funds viewers through
signed purchase callbacks, then sends roses in SendGifts batches (the fastest honest load: every
gift goes through the saga, the wallet, the outbox, NATS and payout's consumer) up to each
checkpoint. At each checkpoint, once payout has credited every gift, it times:

- totals: the four GetAudit calls (`collect` without detail), the sums the databases compute;
- detail: `collect(detail=True)`, the totals and every id's records compared range by range;
- window: `collect(detail=True, since=...)` of the last `--window-s` seconds (when the CLI
  supports it), with `--window-gifts` sent just before it; with `--window-ids-max` at most that
  many of the window's ids held at a time (the audit's WINDOW_IDS_MAX), so a window larger than
  it is read a chunk of ids at a time and the cost of those reads shows (each read bounded by id
  on servers that take `after_id`; the whole window per chunk on older ones). With
  `--window-compare N`, the same window is then timed N times each of three ways in turn on the
  same books (fresh suites differ by more than the change): `bounded` (as the CLI reads it),
  `unbounded` (the id bounds stripped from the requests: each chunk reads the whole window, as
  before the servers took them) and `whole` (every id held at once).

Bounded: at most `--gifts` gifts and `--time-s` seconds of load; stops what it started and drops
the databases it created. Usage:

    .venv/bin/python -m bench.auditcost --backend sqlite --gifts 100000 --every 25000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

from livegifts.gifting.v1 import gifting_pb2, gifting_pb2_grpc
from livegifts.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from services.cli import audit
from services.cli.audit import CREDIT_LINE, OK, check_invariants, collect
from services.cli.suite import Suite, SuiteConfig, free_port
from services.common import signing
from services.wallet.payments import dev_event_payload

PACKAGE_ID = "us-usd-17500"  # one purchase funds 17,500 roses
BATCH = 100  # SendGifts' limit
CONCURRENCY = 4
CALL_TIMEOUT_S = 30.0
DEADLINE_S = 600.0


async def _fund(wallet: Any, secret: str, viewers: list[str]) -> None:
    sem = asyncio.Semaphore(16)

    async def one(v: str) -> None:
        async with sem:
            purchase = await wallet.CreatePurchase(
                wallet_pb2.CreatePurchaseRequest(
                    user_id=v,
                    package_id=PACKAGE_ID,
                    currency_code="USD",
                    payment_method=wallet_pb2.PAYMENT_METHOD_CARD,
                    idempotency_key=uuid.uuid4().hex,
                ),
                timeout=CALL_TIMEOUT_S,
            )
            payload = dev_event_payload(
                uuid.uuid4().hex,
                "payment.succeeded",
                purchase.purchase_id,
                purchase.price.amount_minor,
                purchase.price.currency_code,
            )
            await wallet.HandlePaymentEvent(
                wallet_pb2.HandlePaymentEventRequest(
                    provider="dev", payload=payload, signature=signing.sign(secret.encode(), payload)
                ),
                timeout=CALL_TIMEOUT_S,
            )

    await asyncio.gather(*(one(v) for v in viewers))


async def _send(gifting: Any, streams: list[str], viewers: list[str], count: int, until: float) -> int:
    """Send `count` roses in batches (or until the monotonic deadline); how many were SENT."""
    sent = 0
    left = count
    lock = asyncio.Lock()

    async def worker(w: int) -> None:
        nonlocal sent, left
        i = 0
        while time.monotonic() < until:
            async with lock:
                n = min(BATCH, left)
                left -= n
            if n <= 0:
                return
            reqs = [
                gifting_pb2.SendGiftRequest(
                    stream_id=streams[(w + i + k) % len(streams)],
                    sender_id=viewers[(w * 7919 + i * BATCH + k) % len(viewers)],
                    gift_id="rose",
                    quantity=1,
                    idempotency_key=uuid.uuid4().hex,
                )
                for k in range(n)
            ]
            i += 1
            answer = await gifting.SendGifts(gifting_pb2.SendGiftsRequest(gifts=reqs), timeout=CALL_TIMEOUT_S)
            sent += sum(1 for r in answer.results if r.WhichOneof("outcome") == "receipt")

    await asyncio.gather(*(worker(w) for w in range(CONCURRENCY)))
    return sent


def _settled(suite: Suite, timeout_s: float = 300.0) -> None:
    """Until payout has credited every sent gift and no outbox row is pending."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        t = collect(suite.addr("wallet"), suite.addr("gifting"), suite.addr("payout"), DEADLINE_S)
        if all(c.status == OK for c in check_invariants(t)):
            return
        time.sleep(1.0)
    raise RuntimeError("the books did not settle")


class _Unbounded:
    """The audit's stub without the window's id bounds: the chunked read as before them."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.stub = _STUB(channel)

    def ListAuditRecords(self, req: Any, timeout: float) -> Any:  # noqa: N802 - the gRPC name
        """The call, with after_id and up_to cleared from a window read."""
        if req.since_us and not req.ids:
            req = copy.copy(req)
            req.ClearField("after_id")
            req.ClearField("up_to")
        return self.stub.ListAuditRecords(req, timeout=timeout)


_STUB = audit.audit_pb2_grpc.AuditServiceStub


def _compare(suite: Suite, since_us: int, rounds: int, ids_max: int) -> None:
    """Time the window `rounds` times each way in turn (see the module's text), one JSON line each."""
    for n in range(rounds):
        for way in ("bounded", "unbounded", "whole"):
            audit.WINDOW_IDS_MAX = 500_000 if way == "whole" else ids_max
            audit.audit_pb2_grpc.AuditServiceStub = _Unbounded if way == "unbounded" else _STUB
            try:
                took, checks = _timed(suite, detail=True, since_us=since_us)
            finally:
                audit.audit_pb2_grpc.AuditServiceStub, audit.WINDOW_IDS_MAX = _STUB, ids_max
            if any(c.status != OK for c in checks):
                raise RuntimeError(f"windowed audit not ok: {checks}")
            print(json.dumps({"round": n, "way": way, "window_s": round(took, 2)}), flush=True)


def _timed(suite: Suite, **kw: Any) -> tuple[float, list[Any]]:
    t0 = time.perf_counter()
    t = collect(suite.addr("wallet"), suite.addr("gifting"), suite.addr("payout"), DEADLINE_S, **kw)
    took = time.perf_counter() - t0
    return took, check_invariants(t)


def measure(backend: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix=f"lg-auditcost-{backend}-"))
    services = ("wallet", "gifting", "payout")
    secret = "bench-" + uuid.uuid4().hex
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        urls: dict[str, str] = {}
        if backend == "postgres":
            from tests.integration import pg

            urls = stack.enter_context(pg.service_databases("lgauditcost"))
        suite = Suite(
            SuiteConfig(
                var_dir=work,
                nats_port=free_port(),
                grpc_ports={s: 0 for s in services},
                metrics_ports={s: 0 for s in services},
                database_urls=urls,
                webhook_secret=secret,
                operator_token="bench-" + uuid.uuid4().hex,
            )
        )
        stack.callback(suite.stop)
        suite.start()
        viewers = [f"av{uuid.uuid4().hex[:8]}" for _ in range(args.gifts // 17_000 + 40)]
        creators = [f"ac{uuid.uuid4().hex[:8]}" for _ in range(20)]
        until = time.monotonic() + args.time_s

        async def load() -> None:
            async with (
                grpc.aio.insecure_channel(suite.addr("wallet")) as wc,
                grpc.aio.insecure_channel(suite.addr("gifting")) as gc,
            ):
                wallet, gifting = wallet_pb2_grpc.WalletServiceStub(wc), gifting_pb2_grpc.GiftingServiceStub(gc)
                await _fund(wallet, secret, viewers)
                streams = [
                    (
                        await gifting.StartStream(
                            gifting_pb2.StartStreamRequest(creator_id=c, title="audit cost", idempotency_key=c),
                            timeout=CALL_TIMEOUT_S,
                        )
                    ).stream_id
                    for c in creators
                ]
                total = 0
                while total < args.gifts and time.monotonic() < until:
                    t0 = time.perf_counter()
                    n = await _send(gifting, streams, viewers, min(args.every, args.gifts - total), until)
                    total += n
                    load_s = time.perf_counter() - t0
                    await asyncio.to_thread(_settled, suite)
                    row: dict[str, Any] = {"backend": backend, "gifts": total, "load_gifts_per_s": round(n / load_s)}
                    for name, kw in (("totals_s", {}), ("detail_s", {"detail": True})):
                        took, checks = await asyncio.to_thread(_timed, suite, **kw)
                        bad = [c for c in checks if c.status != OK]
                        if bad:
                            raise RuntimeError(f"audit not ok at {total} gifts: {bad}")
                        row[name] = round(took, 2)
                    if args.window_s:
                        # The last few minutes' traffic, then the windowed audit of it.
                        await _send(gifting, streams, viewers, args.window_gifts, until + 600)
                        await asyncio.to_thread(_settled, suite)
                        since_us = int((time.time() - args.window_s) * 1_000_000)
                        took, checks = await asyncio.to_thread(_timed, suite, detail=True, since_us=since_us)
                        if any(c.status != OK for c in checks):
                            raise RuntimeError(f"windowed audit not ok: {checks}")
                        row["window_s"] = round(took, 2)
                        scope = next(c.detail for c in checks if c.name == CREDIT_LINE)
                        row["window_ids"] = int(scope.split("window: the ")[1].split()[0])
                        if args.window_compare:
                            await asyncio.to_thread(
                                _compare, suite, since_us, args.window_compare, audit.WINDOW_IDS_MAX
                            )
                    row["per_id_s"] = round(row["detail_s"] - row["totals_s"], 2)
                    print(json.dumps(row), flush=True)
                    rows.append(row)

        asyncio.run(load())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--gifts", type=int, default=100_000)
    parser.add_argument("--every", type=int, default=25_000, help="gifts between checkpoints")
    parser.add_argument("--time-s", type=float, default=300.0, help="bound on the load's time")
    parser.add_argument("--window-s", type=float, default=0.0, help="also time a windowed audit of this many s")
    parser.add_argument("--window-gifts", type=int, default=2000, help="gifts sent just before the windowed audit")
    parser.add_argument("--window-ids-max", type=int, default=0, help="window ids held at a time (0: the audit's own)")
    parser.add_argument(
        "--window-compare", type=int, default=0, help="then time the window this many rounds: bounded, unbounded, whole"
    )
    args = parser.parse_args()
    if args.window_ids_max:
        audit.WINDOW_IDS_MAX = args.window_ids_max
    # `timeout` (or kill) stops it with SIGTERM: unwind, so the suite stops and the databases drop.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    measure(args.backend, args)


if __name__ == "__main__":
    main()
