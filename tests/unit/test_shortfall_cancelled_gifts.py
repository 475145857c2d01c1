"""A clawback shortfall across the three services, in-process on SQLite files: the wallet's real
reversal, gifting's real saga (over the real wallet) and payout's real consumers and settler.

A reviewer's worry: a gift that fails after the reversal (refused, or cancelled by the sweeper)
leaves a shortfall no earnings ever arrive for. It cannot: the wallet's `coins_already_spent` is
the new debt, made only of spends that happened, and gifting cancels a gift only after the
wallet's arbiter (CancelSpend) forbade its spend; every spend that happened ends SENT with its
gift.sent event, recorded before the reversal, which the settler takes the shortfall from.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import select

from livegifts.gifting.v1 import events_pb2 as gifting_events
from livegifts.gifting.v1 import gifting_pb2
from livegifts.wallet.v1 import wallet_pb2
from services.cli.audit import Totals, check_invariants
from services.common.errors import DomainError, status_for
from services.common.grpcserver import _rich_status
from services.gifting.storage import common as gifting_common
from services.gifting.storage import gift_events
from services.wallet.usecases import Wallet
from tests.support.gifting import gifting_on
from tests.support.payout import consume, open_coins_of
from tests.support.wallet import buy, callback, reversal_of


def _as_rpc_error(exc: DomainError) -> grpc.aio.AioRpcError:
    """The error as gifting's client sees the wallet server's (its interceptor's rich status)."""
    status = _rich_status(status_for(exc), exc.message, exc.reason, "livegifts.wallet", exc.metadata)
    return grpc.aio.AioRpcError(
        status.code, grpc.aio.Metadata(), grpc.aio.Metadata(*status.trailing_metadata), status.details
    )


class InProcessWallet:
    """The wallet stub gifting calls, answered by the real wallet use cases. `lose` makes the next
    Spend end without an answer the saga can read (a status the wallet did not give), after the
    spend ("after_spend") or before it ("before_spend"): the gift stays PENDING for the sweeper."""

    def __init__(self, w: Wallet) -> None:
        self.w = w
        self.lose: str = ""  # "", "after_spend", "before_spend"

    async def GetAccountRestrictions(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        return wallet_pb2.AccountRestrictions(user_id=req.user_id, may_spend=True)

    async def GetAccountRestrictionsMany(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        return wallet_pb2.GetAccountRestrictionsManyResponse(
            restrictions=[wallet_pb2.AccountRestrictions(user_id=u, may_spend=True) for u in req.user_ids]
        )

    async def Spend(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        lose, self.lose = self.lose, ""
        if lose == "after_spend":
            await self.w.spend(req)
        if lose:
            raise grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata())
        try:
            return await self.w.spend(req)
        except DomainError as exc:
            raise _as_rpc_error(exc) from None

    async def CancelSpend(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        return await self.w.cancel_spend(req)


async def test_gifts_that_fail_around_a_reversal_leave_no_shortfall_open(tmp_path: Path, wallet: Wallet, setup) -> None:  # type: ignore[no-untyped-def]
    payout, _provider, _path = setup
    stub = InProcessWallet(wallet)
    purchase = await buy(wallet, "viewer")  # 70 coins
    async with gifting_on(tmp_path, stub, group_commit=False, pending_timeout_s=0.001) as (g, gdb):
        stream = await g.start_stream(
            gifting_pb2.StartStreamRequest(creator_id="creator-c", title="t", idempotency_key="s")
        )

        async def panda(quantity: int, key: str) -> Any:
            return await g.send_gift(
                gifting_pb2.SendGiftRequest(
                    stream_id=stream.stream_id,
                    sender_id="viewer",
                    gift_id="panda",
                    quantity=quantity,
                    idempotency_key=key,
                )
            )

        await panda(6, "sent")  # 30 coins, SENT
        refused = None
        try:
            await panda(20, "too-dear")  # 100 coins: refused, the arbiter forbids it, CANCELLED
        except DomainError as exc:
            refused = exc.reason
        assert refused == "INSUFFICIENT_COINS"
        stub.lose = "after_spend"  # 20 coins spent, the answer lost: PENDING until the sweeper
        try:
            await panda(4, "charged-pending")
        except DomainError as exc:
            assert exc.reason == "WALLET_UNAVAILABLE"
        stub.lose = "before_spend"  # nothing spent, the answer lost: PENDING until the sweeper
        try:
            await panda(2, "uncharged-pending")
        except DomainError as exc:
            assert exc.reason == "WALLET_UNAVAILABLE"

        # The purchase is charged back while two gifts are PENDING: 50 of its 70 coins were spent.
        await callback(wallet, purchase, "charge.dispute.lost")
        reversed_ = await reversal_of(wallet, purchase.purchase_id)
        assert (reversed_.coins, reversed_.coins_already_spent, reversed_.balance_after) == (70, 50, -50)
        # Payout consumes it before any gift event: all 50 are a shortfall.
        await consume(payout, [reversed_])
        assert await open_coins_of(payout) == 50

        # The sweeper ends the gift the wallet charged SENT, the other CANCELLED (its spend
        # forbidden for good); the refused one stays CANCELLED. Only SENT gifts have events.
        await asyncio.sleep(0.01)  # past the pending timeout
        assert await g.sweep_once() == 2
        async with gdb.unit_of_work(readonly=True) as uow:
            statuses = sorted(
                (r.quantity, r.status)
                for r in await uow.conn.execute(select(gift_events.c.quantity, gift_events.c.status))
            )
            o = gifting_common.outbox.c
            sent = [
                gifting_events.GiftSent.FromString(p)
                for p in (await uow.conn.execute(select(o.payload).where(o.subject == "gifting.gift.sent"))).scalars()
            ]
        assert statuses == [(2, "CANCELLED"), (4, "SENT"), (6, "SENT"), (20, "CANCELLED")]
        assert sorted(e.coins for e in sent) == [20, 30]

        # Their events reach payout after the reversal: the settler takes the whole shortfall.
        await consume(payout, gifts=sent)
        assert await payout.settle_shortfalls_once() == 50
        assert await open_coins_of(payout) == 0
        earned = await payout.get_earnings("creator-c")
        assert (earned.coins_received, earned.diamonds_clawed_back, earned.diamonds_available) == (50, 25, 0)

        checks = check_invariants(Totals(await wallet.audit(), await g.audit(), await payout.audit()))
        # No invariant broken; in flight only what no relay or leaderboard consumer runs here for.
        assert [c for c in checks if c.status == "FAILED"] == [], checks
        assert sorted(c.name[:2] for c in checks if c.status != "ok") == ["6.", "in"], checks
