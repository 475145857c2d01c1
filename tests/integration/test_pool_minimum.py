"""The fewest pooled connections start-up allows on PostgreSQL (`ServiceSettings.postgres_pool_min`)
leave the wallet's and gifting's calls one beside the outbox relay's, which it holds over each
publish (its batch claimed FOR UPDATE until JetStream has stored it; up to OUTGOING_DEADLINE_S a try
while NATS is down). Payout's, beside its dispatcher's too, is in test_payout_claims.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import Table, select

from livegifts.gifting.v1 import gifting_pb2
from services.common.db import Database
from services.gifting.config import GiftingSettings
from services.gifting.storage import common as gifting_tables
from services.wallet.config import WalletSettings
from services.wallet.storage import common as wallet_tables
from tests.integration.conftest import gifting_on
from tests.support.wallet import buy, spend, wallet_on

GUARD_S = 20


@contextlib.asynccontextmanager
async def relay_publishing(db: Database, outbox: Table) -> AsyncIterator[None]:
    """The outbox relay's claim of a batch, held as over a publish that waits for JetStream."""
    async with db.unit_of_work() as relay:
        await relay.conn.execute(select(outbox.c.id).with_for_update())
        yield


@pytest.mark.parametrize("empty_database", ["postgres"], indirect=True)
async def test_the_wallets_calls_go_on_while_its_relay_waits_for_jetstream_with_the_fewest_connections(
    empty_database: str,
) -> None:
    # With DB_POOL_SIZE 1 (now refused on PostgreSQL) every call waited for the relay's publish
    # and failed UNAVAILABLE past DB_POOL_TIMEOUT_S while NATS was down.
    async with wallet_on(empty_database, "pool-min", pool_size=WalletSettings.postgres_pool_min()) as w:
        async with relay_publishing(w.db, wallet_tables.outbox), asyncio.timeout(GUARD_S):
            await buy(w, "ann")
            await spend(w, "ann", 20)
            assert (await w.get_balance("ann")).coins == 50


@pytest.mark.parametrize("empty_database", ["postgres"], indirect=True)
async def test_giftings_calls_go_on_while_its_relay_waits_for_jetstream_with_the_fewest_connections(
    empty_database: str,
) -> None:
    async with gifting_on(empty_database, GiftingSettings.postgres_pool_min()) as g:
        async with relay_publishing(g.db, gifting_tables.outbox), asyncio.timeout(GUARD_S):
            live = await g.start_stream(gifting_pb2.StartStreamRequest(creator_id="c", title="t", idempotency_key="s"))
            assert (await g.get_stream(live.stream_id)).creator_id == "c"
