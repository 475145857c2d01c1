"""A SIGTERMed service lets its background loops finish the round they are in before it exits.

On SIGTERM every loop (consumers, relay, dispatcher, sweepers) is told to stop and ends after its
round; the service then serves its drain and grace. A round still running when the calls in flight
are done (at once, with DRAIN_DELAY_S 0 and no call in flight) was cancelled: a consumer's batch
mid-transaction was rolled back and its events, fetched and never acked, reached the next process
only after the durable's ack_wait (30 s), as after a crash.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from pathlib import Path

import grpc
import nats

from livegifts.gifting.v1 import gifting_pb2, gifting_pb2_grpc
from livegifts.wallet.v1 import wallet_pb2_grpc
from services.common.consumers import PAYOUT_GIFT_SENT
from tests.integration.conftest import WEBHOOK_SECRET, running_suite
from tests.integration.helpers import buy_coins, live_stream, uid

LOCK_HELD_AFTER_SIGTERM_S = 1.0  # below the grace (10 s) and SQLite's busy_timeout (10 s)


async def _until_fetched(nats_url: str, durable: str, timeout_s: float = 10.0) -> None:
    """Until payout's consumer holds a delivery it has not acked (its batch is in flight)."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout_s
        while (await js.consumer_info("GIFTING", durable)).num_ack_pending < 1:
            assert time.monotonic() < deadline, "payout's consumer never fetched the gift's event"
            await asyncio.sleep(0.02)
    finally:
        await nc.close()


async def test_a_consumer_batch_in_flight_at_sigterm_is_committed_before_the_service_exits(tmp_path: Path) -> None:
    with running_suite("sqlite", tmp_path, "lgstop") as suite:
        async with (
            grpc.aio.insecure_channel(suite.addr("wallet")) as wch,
            grpc.aio.insecure_channel(suite.addr("gifting")) as gch,
        ):
            viewer, creator = uid("v"), uid("c")
            await buy_coins(wallet_pb2_grpc.WalletServiceStub(wch), WEBHOOK_SECRET, viewer)
            gifting = gifting_pb2_grpc.GiftingServiceStub(gch)
            stream = await live_stream(gifting, creator)
            # Payout's writers wait on this lock (busy_timeout): its consumer's batch stays in flight.
            lock = sqlite3.connect(suite.config.database_url("payout").split("///", 1)[1], isolation_level=None)
            try:
                lock.execute("BEGIN IMMEDIATE")
                receipt = await gifting.SendGift(
                    gifting_pb2.SendGiftRequest(
                        stream_id=stream.stream_id,
                        sender_id=viewer,
                        gift_id="rose",
                        quantity=1,
                        idempotency_key=uid("g"),
                    )
                )
                await _until_fetched(suite.config.nats_url, PAYOUT_GIFT_SENT)
                proc = suite.procs["payout"]
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(LOCK_HELD_AFTER_SIGTERM_S)
            finally:
                lock.execute("ROLLBACK")
            assert await asyncio.to_thread(proc.wait, 15) == 0
            with sqlite3.connect(suite.config.database_url("payout").split("///", 1)[1]) as conn:
                applied = conn.execute(
                    "SELECT count(*) FROM inbox WHERE consumer = ? AND event_id = ?",
                    (PAYOUT_GIFT_SENT, receipt.gift_event_id),
                ).fetchone()[0]
            assert applied == 1, "payout exited with the gift's event fetched and not applied: its batch was cancelled"
