"""A retry of a request that took effect gets its first answer even when today's checks refuse it.

An older release (or a looser limit) accepted the request; a newer one validates more strictly.
Simulated in-process: a call is accepted, then a limit is lowered (a module constant patched, or
the use cases built again on the same database with a tighter setting, as after a restart), then
the same request is sent again under the same key. A refused request whose key recorded nothing,
or whose key recorded another request, still gets the validation error.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest

from livegifts.gifting.v1 import gifting_pb2
from livegifts.payout.v1 import payout_pb2
from livegifts.wallet.v1 import wallet_pb2
from services.common import errors
from services.common.db import Database
from services.common.errors import InvalidArgument
from services.common.idempotency import IdempotentCall, answers_retry
from services.common.migrate import upgrade_head
from services.common.outbox import Outbox
from services.gifting import usecases as gifting_usecases
from services.gifting.config import GiftingSettings
from services.gifting.storage import common
from services.gifting.usecases import Gifting
from services.payout import domain as payout_domain
from services.payout import usecases as payout_usecases
from services.wallet.usecases import Wallet
from tests.support.messages import copy_of
from tests.support.payout import gift_event, verified_method
from tests.support.wallet import buy

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "gifting" / "migrations"
LONG_ID = "sender-" + "x" * 33  # 40 characters: accepted, then refused once ID_MAX is 32 (ids are 32)


class SpendingWallet:
    """Every user may take part and every spend goes through."""

    def __init__(self) -> None:
        self.spends = 0

    async def GetAccountRestrictions(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        return wallet_pb2.AccountRestrictions(user_id=req.user_id, may_spend=True)

    async def GetAccountRestrictionsMany(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        return wallet_pb2.GetAccountRestrictionsManyResponse(
            restrictions=[wallet_pb2.AccountRestrictions(user_id=u, may_spend=True) for u in req.user_ids]
        )

    async def Spend(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        self.spends += 1
        return wallet_pb2.SpendResponse(spend_id=f"s{self.spends}", amount=req.amount, balance_after=1000 - req.amount)

    async def SpendMany(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        return wallet_pb2.SpendManyResponse(
            results=[wallet_pb2.SpendManyResult(spent=await self.Spend(s)) for s in req.spends]
        )

    async def CancelSpend(self, req: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the stub
        return wallet_pb2.CancelSpendResponse(outcome=wallet_pb2.CancelSpendResponse.OUTCOME_CANCELLED)


class Gift:
    """The gifting use cases on a migrated SQLite file; `restart` builds them again with other settings."""

    def __init__(self, tmp_path: Path) -> None:
        self.url = f"sqlite+aiosqlite:///{tmp_path / 'gifting.db'}"
        self.wallet = SpendingWallet()
        self.db: Database | None = None

    async def restart(self, **settings: Any) -> Gifting:
        if self.db is None:
            await upgrade_head(MIGRATIONS, self.url)
            self.db = Database(self.url, pool_size=2, pool_timeout_s=5, application_name="test")
        s = GiftingSettings(database_url=self.url, nats_url="nats://127.0.0.1:1", wallet_addr="127.0.0.1:1", **settings)
        return Gifting(self.db, Outbox(common.outbox), self.wallet, s)


@pytest.fixture
async def gift(tmp_path: Path) -> Any:
    g = Gift(tmp_path)
    yield g
    if g.db is not None:
        await g.db.dispose()


async def _refused(call: Any, reason: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        await call
    assert refused.value.reason == reason


async def test_a_generic_command_retried_after_its_limit_was_lowered_gets_its_first_answer(
    gift: Gift, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = await gift.restart()
    req = gifting_pb2.StartStreamRequest(creator_id="c1", title="a title of thirty characters!!", idempotency_key="s1")
    first = await g.start_stream(req)
    monkeypatch.setattr(gifting_usecases, "TITLE_MAX", 10)  # the newer release's limit
    assert await g.start_stream(req) == first
    # Refused as before: no answer under the key, or another request under it.
    await _refused(g.start_stream(copy_of(req, idempotency_key="s2")), "TITLE_TOO_LONG")
    await _refused(g.start_stream(copy_of(req, title="another title, too long")), "TITLE_TOO_LONG")
    await _refused(g.start_stream(copy_of(req, idempotency_key="")), "TITLE_TOO_LONG")


async def test_a_refusal_raised_inside_the_command_answers_a_first_call_committed_meanwhile(gift: Gift) -> None:
    """`answers_retry` looks again wherever the InvalidArgument came from: the command's look-up
    found nothing, then a concurrent first call under the key committed before this call refused."""
    g = await gift.restart()
    req = gifting_pb2.StartStreamRequest(creator_id="c1", title="t", idempotency_key="s1")

    class Late:
        db = gift.db

        @answers_retry(common.idempotency, "StartStream", gifting_pb2.Stream)
        async def start_stream(
            self, r: gifting_pb2.StartStreamRequest, meanwhile: bool, *, idem: IdempotentCall[gifting_pb2.Stream]
        ) -> gifting_pb2.Stream:
            if meanwhile:
                self.first = await g.start_stream(r)
            raise InvalidArgument("refused after the look-up", "TITLE_TOO_LONG")

    late = Late()
    await _refused(late.start_stream(copy_of(req, idempotency_key="s0"), meanwhile=False), "TITLE_TOO_LONG")
    assert await late.start_stream(req, meanwhile=True) == late.first


async def test_a_refusal_stays_the_refusal_when_the_look_up_after_it_fails() -> None:
    """The database failing `answers_retry`'s look-up (a pool timeout, a lost connection) gives
    the caller the refusal, not UNAVAILABLE some DB_POOL_TIMEOUT_S later."""

    class Down:
        @contextlib.asynccontextmanager
        async def unit_of_work(self, readonly: bool = False) -> Any:
            raise TimeoutError("QueuePool limit reached, connection timed out")
            yield

    class Refusing:
        db = Down()

        @answers_retry(common.idempotency, "StartStream", gifting_pb2.Stream)
        async def start_stream(
            self, r: gifting_pb2.StartStreamRequest, *, idem: IdempotentCall[gifting_pb2.Stream]
        ) -> gifting_pb2.Stream:
            raise InvalidArgument("refused", "TITLE_TOO_LONG")

    req = gifting_pb2.StartStreamRequest(creator_id="c1", title="t", idempotency_key="s1")
    with pytest.raises(InvalidArgument) as refused:
        await Refusing().start_stream(req)
    assert refused.value.reason == "TITLE_TOO_LONG"
    assert isinstance(refused.value.__cause__, TimeoutError)


@pytest.mark.parametrize("group_commit", [True, False])
async def test_a_gift_retried_after_validation_was_tightened_gets_its_receipt(
    gift: Gift, monkeypatch: pytest.MonkeyPatch, group_commit: bool
) -> None:
    g = await gift.restart(group_commit=group_commit)
    stream = await g.start_stream(gifting_pb2.StartStreamRequest(creator_id="c1", title="t", idempotency_key="s"))
    req = gifting_pb2.SendGiftRequest(
        stream_id=stream.stream_id, sender_id=LONG_ID, gift_id="panda", quantity=2, idempotency_key="k1"
    )
    first = await g.send_gift(req)
    assert first.status == gifting_pb2.GIFT_STATUS_SENT
    monkeypatch.setattr(errors, "ID_MAX", 32)  # the newer release's id rule
    assert await g.send_gift(req) == first
    assert gift.wallet.spends == 1  # charged once
    await _refused(g.send_gift(copy_of(req, idempotency_key="k2")), "INVALID_ID")
    await _refused(g.send_gift(copy_of(req, quantity=3)), "INVALID_ID")  # another request under k1
    assert gift.wallet.spends == 1


async def test_a_tip_retried_after_a_restart_with_a_lower_maximum_gets_its_receipt(gift: Gift) -> None:
    g = await gift.restart()
    stream = await g.start_stream(gifting_pb2.StartStreamRequest(creator_id="c1", title="t", idempotency_key="s"))
    req = gifting_pb2.SendTipRequest(stream_id=stream.stream_id, sender_id="v1", coins=500, idempotency_key="t1")
    first = await g.send_tip(req)
    g = await gift.restart(tip_coins_max=100)  # LIVEGIFTS_GIFTING_TIP_COINS_MAX lowered
    assert await g.send_tip(req) == first
    await _refused(g.send_tip(copy_of(req, idempotency_key="t2")), "INVALID_TIP_AMOUNT")
    await _refused(g.send_tip(copy_of(req, coins=400)), "INVALID_TIP_AMOUNT")
    assert gift.wallet.spends == 1


async def test_an_unlock_retried_after_validation_was_tightened_gets_its_receipt(
    gift: Gift, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = await gift.restart()
    content = await g.create_content(
        gifting_pb2.CreateContentRequest(creator_id="c1", title="t", price_coins=30, idempotency_key="c")
    )
    req = gifting_pb2.UnlockContentRequest(content_id=content.content_id, user_id=LONG_ID, idempotency_key="u1")
    first = await g.unlock_content(req)
    assert not first.already_unlocked
    monkeypatch.setattr(errors, "ID_MAX", 32)
    assert await g.unlock_content(req) == first
    await _refused(g.unlock_content(copy_of(req, idempotency_key="u2")), "INVALID_ID")
    assert gift.wallet.spends == 1


async def test_a_send_gifts_item_retried_after_validation_was_tightened_gets_its_receipt(
    gift: Gift, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = await gift.restart()
    stream = await g.start_stream(gifting_pb2.StartStreamRequest(creator_id="c1", title="t", idempotency_key="s"))
    item = gifting_pb2.SendGiftRequest(
        stream_id=stream.stream_id, sender_id=LONG_ID, gift_id="panda", quantity=1, idempotency_key="b1"
    )
    first = (await g.send_gifts(gifting_pb2.SendGiftsRequest(gifts=[item]))).results[0]
    assert first.receipt.status == gifting_pb2.GIFT_STATUS_SENT
    monkeypatch.setattr(errors, "ID_MAX", 32)
    new = copy_of(item, idempotency_key="b2")  # never recorded: refused
    other = copy_of(item, idempotency_key="b3", sender_id="v2")  # accepted today
    results = (await g.send_gifts(gifting_pb2.SendGiftsRequest(gifts=[item, new, other]))).results
    assert results[0] == first
    assert results[1].error.reason == "INVALID_ID"
    assert results[2].receipt.status == gifting_pb2.GIFT_STATUS_SENT
    assert gift.wallet.spends == 2
    # The item as a SendGift retry too (the same key space and digest).
    assert await g.send_gift(item) == first.receipt


async def test_a_purchase_retried_after_validation_was_tightened_gets_its_first_answer(
    wallet: Wallet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    req = wallet_pb2.CreatePurchaseRequest(
        user_id=LONG_ID,
        package_id="us-usd-70",
        currency_code="USD",
        payment_method=wallet_pb2.PAYMENT_METHOD_PAYPAL,
        idempotency_key="buy-1",
    )
    created = await wallet.create_purchase(req)
    monkeypatch.setattr(errors, "ID_MAX", 32)
    assert await wallet.create_purchase(req) == created
    await _refused(wallet.create_purchase(copy_of(req, idempotency_key="buy-2")), "INVALID_ID")
    await _refused(wallet.create_purchase(copy_of(req, package_id="us-usd-140")), "INVALID_ID")


async def test_a_withdrawal_retried_after_its_maximum_was_lowered_gets_its_first_answer(
    setup,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    payout, _provider, _path = setup
    async with payout.db.unit_of_work() as uow:
        await payout.credit_gifts(uow, [gift_event("creator-a", 40_000)])  # 20,000 diamonds
        await uow.commit()
    req = payout_pb2.RequestWithdrawalRequest(
        creator_id="creator-a",
        diamonds=20_000,
        method_id=await verified_method(payout, "creator-a"),
        idempotency_key="wd-1",
    )
    first = await payout.request_withdrawal(req)
    monkeypatch.setattr(payout_usecases, "DIAMONDS_MAX", 10_000)
    assert await payout.request_withdrawal(req) == first
    await _refused(payout.request_withdrawal(copy_of(req, idempotency_key="wd-2")), "AMOUNT_TOO_LARGE")
    await _refused(payout.request_withdrawal(copy_of(req, diamonds=15_000)), "AMOUNT_TOO_LARGE")


async def test_a_payout_method_retried_after_validation_was_tightened_gets_its_first_answer(
    setup,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """AddPayoutMethod's request hash is keyed: the refusal path keys it the same way."""
    payout, _provider, _path = setup
    req = payout_pb2.AddPayoutMethodRequest(
        creator_id="creator-a",
        kind=payout_pb2.PAYOUT_METHOD_KIND_PAYPAL,
        paypal_email="creator-a@example.com",
        idempotency_key="pm-1",
    )
    first = await payout.add_payout_method(req)

    def stricter(email: str) -> tuple[str, str]:
        raise InvalidArgument("paypal_email is not a valid e-mail address", "INVALID_PAYOUT_METHOD")

    monkeypatch.setattr(payout_domain, "normalize_paypal", stricter)
    assert await payout.add_payout_method(req) == first
    await _refused(payout.add_payout_method(copy_of(req, idempotency_key="pm-2")), "INVALID_PAYOUT_METHOD")
    await _refused(payout.add_payout_method(copy_of(req, paypal_email="x@example.com")), "INVALID_PAYOUT_METHOD")


async def test_a_spend_retried_after_its_maximum_was_lowered_gets_its_first_answer(
    wallet: Wallet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Spend and SpendMany items alike; the lower maximum as after a restart with SPEND_AMOUNT_MAX lowered."""
    await buy(wallet, "u")
    req = wallet_pb2.SpendRequest(
        user_id="u", amount=50, reason=wallet_pb2.SPEND_REASON_GIFT, reference_id="g", idempotency_key="sp-1"
    )
    first = await wallet.spend(req)
    monkeypatch.setattr(wallet.spending, "amount_max", 10)
    assert await wallet.spend(req) == first
    await _refused(wallet.spend(copy_of(req, idempotency_key="sp-2")), "AMOUNT_TOO_LARGE")
    await _refused(wallet.spend(copy_of(req, amount=40)), "AMOUNT_TOO_LARGE")
    many = await wallet.spend_many(wallet_pb2.SpendManyRequest(spends=[req, copy_of(req, idempotency_key="sp-3")]))
    assert many.results[0].spent == first
    assert many.results[1].error.reason == "AMOUNT_TOO_LARGE"
    assert (await wallet.get_balance("u")).coins == first.balance_after
