"""A commit whose outcome is unknown: the connection breaks after COMMIT was sent, before its answer.

PostgreSQL then either committed (the answer was lost on the way: a failover, a network cut,
pg_terminate_backend racing the commit) or never got the COMMIT and rolled back; the service
cannot tell. dependency_errors.py answers such errors UNAVAILABLE, on the word that every command
is idempotent by its key: if the transaction did commit, the retry returns the stored answer.
Checked here path by path, each way (committed, rolled back), with `CommitCutter` losing the
answer of a chosen COMMIT: the caller is told to retry, and the retry takes effect once.

The outbox relay's delete and a consumer's batch are in test_outbox_relay.py (they need NATS).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

import grpc
import pytest
from sqlalchemy import Table, func, select
from sqlalchemy.engine import make_url

from livegifts.gifting.v1 import gifting_pb2
from livegifts.payout.v1 import payout_pb2
from livegifts.wallet.v1 import wallet_pb2
from services.common.db import Database
from services.common.dependency_errors import is_unavailable
from services.common.errors import DomainError, Unavailable, status_for
from services.common.grpcserver import ErrorInterceptor
from services.gifting.storage import common as gifting_common
from services.gifting.storage import gift_events
from services.gifting.usecases import Gifting
from services.payout.storage import common as payout_common
from services.payout.storage import withdrawals
from services.wallet.storage import common as wallet_common
from services.wallet.storage import purchases, spends
from services.wallet.usecases import Wallet
from tests.integration import pg
from tests.integration.conftest import gifting_on
from tests.support.gifting import wallet_refusal
from tests.support.payout import approved_withdrawal, callback, payout_on
from tests.support.pgproxy import CommitCutter
from tests.support.wallet import buy, callback_request, pending_purchase, wallet_on

pytestmark = pytest.mark.timeout(60)

PACKAGE = "us-usd-700"  # each buyer's coins
OUTCOMES = pytest.mark.parametrize("committed", [True, False], ids=["committed", "rolled-back"])


@pytest.fixture
async def proxy() -> AsyncIterator[CommitCutter]:
    """A CommitCutter in front of the test server (PostgreSQL only: SQLite has no connection to lose)."""
    cutter = await CommitCutter(pg.admin_url_or_skip()).start()
    try:
        yield cutter
    finally:
        await cutter.close()


@pytest.fixture
def databases() -> Iterator[dict[str, str]]:
    """A new database per service (service -> URL), dropped after."""
    with pg.service_databases("lg_unknown_commit") as urls:
        yield urls


def name_of(url: str) -> str:
    return str(make_url(url).database)


async def answered_unavailable(call: Awaitable[Any]) -> None:
    """`call` fails as a dependency outage: UNAVAILABLE, which callers retry with the same key."""
    try:
        await call
    except Exception as exc:  # noqa: BLE001 - the error is what is tested
        status = ErrorInterceptor("livegifts.test")._status_of(exc)
        assert status.code == grpc.StatusCode.UNAVAILABLE, f"{status.code}: {exc!r}"
        assert is_unavailable(exc), repr(exc)
        return
    raise AssertionError("the call whose commit was cut succeeded")


def spend_request(user: str, amount: int, key: str) -> wallet_pb2.SpendRequest:
    return wallet_pb2.SpendRequest(
        user_id=user, amount=amount, reason=wallet_pb2.SPEND_REASON_GIFT, reference_id="r", idempotency_key=key
    )


async def events(db: Database, outbox: Table, subject: str) -> int:
    """How many `subject` events the outbox holds (none is published here: no relay runs)."""
    async with db.unit_of_work(readonly=True) as uow:
        return int((await uow.conn.execute(select(func.count()).where(outbox.c.subject == subject))).scalar_one())


async def coins(w: Wallet, user: str) -> int:
    return (await w.get_balance(user)).coins


@OUTCOMES
async def test_spends_of_one_batch_whose_commit_is_lost_each_answer_unavailable_and_their_retries_debit_once(
    proxy: CommitCutter, databases: dict[str, str], committed: bool
) -> None:
    async with wallet_on(proxy.through(databases["wallet"]), "unknown-spend") as w:
        users = [f"u{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
        for u in users:
            await buy(w, u, PACKAGE)
        reqs = [spend_request(u, 10 + i, uuid.uuid4().hex) for i, u in enumerate(users)]
        proxy.cut_next_commits(1, committed=committed)
        # Three callers of the group commit at once: one batch, one transaction, its COMMIT's answer lost.
        await asyncio.gather(*(answered_unavailable(w.spend(r)) for r in reqs))
        assert proxy.cut == 1
        first = [await w.spend(r) for r in reqs]  # the callers' retries, same keys
        again = [await w.spend(r) for r in reqs]
        assert [a.spend_id for a in again] == [f.spend_id for f in first], "a retry answered another spend"
        assert [await coins(w, u) for u in users] == [700 - r.amount for r in reqs], "not debited once each"
        async with w.db.unit_of_work(readonly=True) as uow:
            recorded = (
                await uow.conn.execute(
                    select(func.count()).where(spends.c.idempotency_key.in_([r.idempotency_key for r in reqs]))
                )
            ).scalar_one()
        assert recorded == len(reqs)


# A provider's report -> (the purchase's status after it, the buyer's coins after it, its event's subject).
REPORTS = {
    "payment.succeeded": ("SUCCEEDED", 700, "wallet.purchase.completed"),
    "charge.refunded": ("REFUNDED", 0, "wallet.purchase.reversed"),
}


@OUTCOMES
@pytest.mark.parametrize("event_type", REPORTS)
async def test_a_payment_callback_whose_commit_is_lost_takes_effect_once_when_the_provider_sends_it_again(
    proxy: CommitCutter, databases: dict[str, str], committed: bool, event_type: str
) -> None:
    async with wallet_on(proxy.through(databases["wallet"]), "unknown-callback") as w:
        user = f"buyer-{uuid.uuid4().hex[:6]}"
        p = await pending_purchase(w, user, PACKAGE)
        if event_type != "payment.succeeded":
            await w.handle_payment_event(callback_request(p, "payment.succeeded"))
        callback = callback_request(p, event_type)
        proxy.cut_next_commits(1, committed=committed)
        # The provider gets no 2xx and sends the same callback again, later, as often as it must.
        await answered_unavailable(w.handle_payment_event(callback))
        assert proxy.cut == 1
        retried = await w.handle_payment_event(callback)
        assert retried.duplicate == committed
        assert (await w.handle_payment_event(callback)).duplicate
        status, balance, subject = REPORTS[event_type]
        assert await coins(w, user) == balance, "credited or taken back other than once"
        async with w.db.unit_of_work(readonly=True) as uow:
            stored = (
                await uow.conn.execute(select(purchases.c.status).where(purchases.c.purchase_id == p.purchase_id))
            ).scalar_one()
        assert (await events(w.db, wallet_common.outbox, subject), stored) == (1, status)


class InProcessWallet:
    """The wallet's use cases as gifting's client calls them: its refusals as the wallet's server answers them."""

    def __init__(self, w: Wallet) -> None:
        self.w = w

    async def _call(self, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except DomainError as exc:
            raise wallet_refusal(status_for(exc), exc.message, exc.reason) from None

    async def GetAccountRestrictions(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        return await self._call(self.w.get_restrictions(req.user_id))

    async def GetAccountRestrictionsMany(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        return await self._call(self.w.get_restrictions_many(req))

    async def Spend(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        return await self._call(self.w.spend(req))

    async def SpendMany(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        return await self._call(self.w.spend_many(req))

    async def CancelSpend(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        return await self._call(self.w.cancel_spend(req))


# SendGift's commits in order (the eligibility check reads only): gifting records the gift
# PENDING, the wallet spends its coins (keyed by the gift), gifting flips it SENT with its event.
GIFT_COMMITS = ("recorded", "spent", "sent")


async def sent_gift(gifting: Gifting, req: gifting_pb2.SendGiftRequest, many: bool) -> gifting_pb2.GiftReceipt:
    """`req` through SendGift, or as the one item of a SendGifts (`many`): its receipt, or its error
    as the call's (UNAVAILABLE: gRPC's status, as the client sees it)."""
    if not many:
        return await gifting.send_gift(req)
    (result,) = (await gifting.send_gifts(gifting_pb2.SendGiftsRequest(gifts=[req]))).results
    if result.HasField("error"):
        raise (
            Unavailable(result.error.message, result.error.reason)
            if result.error.code == 14
            else AssertionError(result.error)
        )
    return result.receipt


@OUTCOMES
@pytest.mark.parametrize("step", GIFT_COMMITS)
@pytest.mark.parametrize("call", ["SendGift", "SendGift-alone", "SendGifts"])
async def test_a_gift_whose_commit_is_lost_is_sent_once_and_its_retry_gets_the_same_receipt(
    proxy: CommitCutter, databases: dict[str, str], committed: bool, step: str, call: str
) -> None:
    # Both databases behind the proxy; the wallet is real (its use cases, as gifting's client
    # reaches them). SendGift-alone: without group commit.
    async with (
        wallet_on(proxy.through(databases["wallet"]), "unknown-gift-wallet") as w,
        gifting_on(
            proxy.through(databases["gifting"]),
            2,
            "unknown-gift",
            wallet=InProcessWallet(w),
            group_commit=call != "SendGift-alone",
        ) as gifting,
    ):
        viewer, creator = f"v-{uuid.uuid4().hex[:6]}", f"c-{uuid.uuid4().hex[:6]}"
        await buy(w, viewer, PACKAGE)
        stream = await gifting.start_stream(
            gifting_pb2.StartStreamRequest(creator_id=creator, title="t", idempotency_key=uuid.uuid4().hex)
        )
        req = gifting_pb2.SendGiftRequest(
            stream_id=stream.stream_id, sender_id=viewer, gift_id="rose", quantity=3, idempotency_key=uuid.uuid4().hex
        )
        many = call == "SendGifts"
        proxy.cut_next_commits(1, committed=committed, after=GIFT_COMMITS.index(step))
        await answered_unavailable(sent_gift(gifting, req, many))
        assert proxy.cut_in == [name_of(databases["wallet" if step == "spent" else "gifting"])], (
            "another commit was cut"
        )
        receipt = await sent_gift(gifting, req, many)
        assert await sent_gift(gifting, req, many) == receipt, "a retry answered another gift"
        assert await gifting.send_gift(req) == receipt
        assert receipt.status == gifting_pb2.GIFT_STATUS_SENT
        assert await coins(w, viewer) == 700 - 3, "the gift was not paid for once"
        async with gifting.db.unit_of_work(readonly=True) as uow:
            g = gift_events.c
            gifts = (await uow.conn.execute(select(g.status).where(g.sender_id == viewer))).scalars().all()
        assert gifts == ["SENT"]
        assert await events(gifting.db, gifting_common.outbox, "gifting.gift.sent") == 1


@OUTCOMES
@pytest.mark.parametrize("step", ["claim", "reference"])
async def test_a_withdrawal_whose_dispatch_commit_is_lost_goes_to_the_provider_under_its_id_and_is_not_lost(
    proxy: CommitCutter, databases: dict[str, str], committed: bool, step: str
) -> None:
    # The dispatcher's two commits: the claim (APPROVED -> PROCESSING) before the provider is
    # called, and the provider's reference stored after it answered.
    async with payout_on(proxy.through(databases["payout"])) as (payout, provider):
        creator = f"c-{uuid.uuid4().hex[:6]}"
        wid = await approved_withdrawal(payout, creator)
        proxy.cut_next_commits(1, committed=committed, after=0 if step == "claim" else 1)
        # The database unavailable ends the round (run_every logs it); the next starts at this withdrawal.
        await answered_unavailable(payout.dispatch_once())
        assert proxy.cut == 1
        # The claim's answer lost: the provider not called yet; the reference's: called once.
        assert provider.submitted == ([] if step == "claim" else [wid])
        for _ in range(3):
            await payout.dispatch_once()
        assert set(provider.submitted) == {wid}, provider.submitted
        # Submitted again only while no reference was stored: the provider takes that as the same
        # transfer (by withdrawal id). A reference stored is never submitted again.
        assert len(provider.submitted) == (2 if step == "reference" and not committed else 1), provider.submitted
        async with payout.db.unit_of_work(readonly=True) as uow:
            row = (await uow.conn.execute(select(withdrawals).where(withdrawals.c.withdrawal_id == wid))).one()
        assert (row.status, row.provider_ref) == ("PROCESSING", f"po_dev_{wid}")


@OUTCOMES
@pytest.mark.parametrize("event_type", ["payout.paid", "payout.failed"])
async def test_a_payout_callback_whose_commit_is_lost_settles_the_withdrawal_once_when_sent_again(
    proxy: CommitCutter, databases: dict[str, str], committed: bool, event_type: str
) -> None:
    # A failed transfer gives the diamonds back: given back twice, they would be paid out twice.
    async with payout_on(proxy.through(databases["payout"])) as (payout, _provider):
        creator = f"c-{uuid.uuid4().hex[:6]}"
        wid = await approved_withdrawal(payout, creator)
        await payout.dispatch_once()
        before = await payout.get_earnings(creator)
        event_id = uuid.uuid4().hex
        proxy.cut_next_commits(1, committed=committed)
        await answered_unavailable(callback(payout, wid, event_id, event_type))
        assert proxy.cut == 1
        retried = await callback(payout, wid, event_id, event_type)
        assert retried.duplicate == committed
        assert (await callback(payout, wid, event_id, event_type)).duplicate
        paid = event_type == "payout.paid"
        want = payout_pb2.WITHDRAWAL_STATUS_PAID if paid else payout_pb2.WITHDRAWAL_STATUS_FAILED
        assert retried.withdrawal.status == want
        after = await payout.get_earnings(creator)
        back = 0 if paid else 20_000  # approved_withdrawal's diamonds, held until then
        assert after.diamonds_available == before.diamonds_available + back, (before, after)
        subject = "payout.withdrawal.paid" if paid else "payout.withdrawal.failed"
        assert await events(payout.db, payout_common.outbox, subject) == 1
