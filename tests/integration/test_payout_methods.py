"""A creator's payout methods, on each backend: ListPayoutMethods pages through all of them, and
AddPayoutMethod, and VerifyPayoutMethod of a FAILED method, stop at METHODS_PER_CREATOR_MAX methods
that did not fail verification; AddPayoutMethod refuses a currency the policy does not pay out in.

ListPayoutMethods answered the 100 oldest and nothing else, with no way to ask for the rest, so a
creator's newer methods were invisible to them; and nothing bounded how many a creator could add.
AddPayoutMethod took any currency_code (XXX, or EUR with a USD-only policy): once verified, every
RequestWithdrawal to the method failed CURRENCY_NOT_SUPPORTED.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import func, insert, select

from livegifts.payout.v1 import payout_pb2
from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.common.idempotency import IdempotentCall
from services.payout import domain
from services.payout.storage import common, payout_methods
from services.payout.usecases import Payout
from tests.support.payout import method_request, payout_on

LIMIT = 3


@pytest.fixture
async def payout(empty_database: str) -> AsyncIterator[Payout]:
    async with payout_on(empty_database, pool_size=4) as (payout, _provider):
        assert payout.settings is not None
        payout.settings = payout.settings.model_copy(update={"methods_per_creator_max": LIMIT})
        yield payout


async def insert_methods(payout: Payout, creator: str, n: int, at_us: int = 1_000_000) -> list[str]:
    """`n` methods written as a payout from before the limit could have (three to each instant,
    so pages must also order ties); their ids, oldest first."""
    rows = [
        {
            "method_id": f"pm_{i:04d}_{uuid.uuid4().hex[:6]}",
            "creator_id": creator,
            "kind": "PAYPAL",
            "masked": "a•••@example.com",
            "fingerprint": "f" * 64,
            "provider_token": f"tok_{i}",
            "currency_code": "USD",
            "verification": "PENDING",
            "created_at_us": at_us + i // 3,
            "updated_at_us": at_us + i // 3,
        }
        for i in range(n)
    ]
    async with payout.db.unit_of_work() as uow:
        await uow.conn.execute(insert(payout_methods), rows)
        await uow.commit()
    return [r["method_id"] for r in rows]


async def all_pages(payout: Payout, creator: str, page_size: int) -> tuple[list[str], int]:
    """Every method id ListPayoutMethods gives, following its tokens; and how many pages it took."""
    ids: list[str] = []
    token, pages = "", 0
    while True:
        page = await payout.list_payout_methods(
            payout_pb2.ListPayoutMethodsRequest(creator_id=creator, page_token=token, page_size=page_size)
        )
        pages += 1
        ids += [m.method_id for m in page.methods]
        token = page.next_page_token
        if not token:
            return ids, pages
        assert pages < 1000, "the pages never end"


async def test_every_method_of_a_creator_with_more_than_a_page_is_listed_once_oldest_first(payout: Payout) -> None:
    expected = await insert_methods(payout, "creator-a", 205)
    await insert_methods(payout, "creator-b", 2)  # another creator's are never listed

    first = await payout.list_payout_methods(payout_pb2.ListPayoutMethodsRequest(creator_id="creator-a"))
    # A caller that sends no page_size gets the 100 oldest, as before pages, and now a token for the rest.
    assert [m.method_id for m in first.methods] == expected[:100]
    assert first.next_page_token
    assert await all_pages(payout, "creator-a", 0) == (expected, 3)
    assert await all_pages(payout, "creator-a", 7) == (expected, 30)  # ties at one instant split across pages
    assert await all_pages(payout, "creator-a", 205) == (expected, 1)  # an exact fit gives no empty last page


async def test_a_page_size_or_token_it_never_gave_is_refused(payout: Payout) -> None:
    for bad in (
        payout_pb2.ListPayoutMethodsRequest(creator_id="creator-a", page_size=501),
        payout_pb2.ListPayoutMethodsRequest(creator_id="creator-a", page_size=-1),
        payout_pb2.ListPayoutMethodsRequest(creator_id="creator-a", page_token="not a token"),
    ):
        with pytest.raises(InvalidArgument) as err:
            await payout.list_payout_methods(bad)
        assert err.value.reason in ("INVALID_PAGE_SIZE", "INVALID_PAGE_TOKEN")


async def method_count(payout: Payout, creator: str) -> int:
    m = payout_methods.c
    async with payout.db.unit_of_work(readonly=True) as uow:
        return int((await uow.conn.execute(select(func.count()).where(m.creator_id == creator))).scalar_one())


def vault_calls(payout: Payout, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The accounts the provider is asked to vault from now on, in order."""
    assert payout.provider is not None
    vaulted: list[str] = []
    tokenize = payout.provider.tokenize

    async def counting_tokenize(kind: str, account: str) -> str:
        vaulted.append(account)
        return await tokenize(kind, account)

    monkeypatch.setattr(payout.provider, "tokenize", counting_tokenize)
    return vaulted


async def test_a_creator_at_the_limit_is_refused_a_new_method_but_a_retry_gets_its_answer(
    payout: Payout, monkeypatch: pytest.MonkeyPatch
) -> None:
    added = [await payout.add_payout_method(method_request("creator-a", f"key-{i}")) for i in range(LIMIT)]
    vaulted = vault_calls(payout, monkeypatch)

    with pytest.raises(ResourceExhausted) as err:
        await payout.add_payout_method(method_request("creator-a", "key-over"))
    assert err.value.reason == "PAYOUT_METHOD_LIMIT"
    assert err.value.metadata == {"limit": str(LIMIT)}
    assert vaulted == []  # the account never went to the provider
    assert await method_count(payout, "creator-a") == LIMIT
    async with payout.db.unit_of_work(readonly=True) as uow:  # nor was the key taken
        k = common.idempotency.c
        assert (await uow.conn.execute(select(func.count()).where(k.key == "key-over"))).scalar_one() == 0

    # Retries of calls that took effect answer as they did, limit or not.
    for i in range(LIMIT):
        assert await payout.add_payout_method(method_request("creator-a", f"key-{i}")) == added[i]
    assert await method_count(payout, "creator-a") == LIMIT
    # Another creator is not counted against this one.
    await payout.add_payout_method(method_request("creator-b", "key-b"))

    # A method whose verification failed no longer counts: there is no removing one.
    await payout.verify_payout_method(
        payout_pb2.VerifyPayoutMethodRequest(method_id=added[0].method_id, verified=False, idempotency_key="v-0"),
        "ops",
    )
    again = await payout.add_payout_method(method_request("creator-a", "key-over"))
    assert again.verification == payout_pb2.VERIFICATION_STATUS_PENDING
    assert await method_count(payout, "creator-a") == LIMIT + 1
    with pytest.raises(ResourceExhausted):
        await payout.add_payout_method(method_request("creator-a", "key-over-2"))


async def test_concurrent_adds_cannot_together_pass_the_limit(payout: Payout) -> None:
    await payout.add_payout_method(method_request("creator-a", "key-0"))
    outcomes = await asyncio.gather(
        *(payout.add_payout_method(method_request("creator-a", f"key-racing-{i}")) for i in range(6)),
        return_exceptions=True,
    )
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert all(isinstance(o, ResourceExhausted) and o.reason == "PAYOUT_METHOD_LIMIT" for o in refused), refused
    assert len(refused) == 6 - (LIMIT - 1)
    assert await method_count(payout, "creator-a") == LIMIT


@pytest.mark.parametrize("where", ["before the vault", "in its transaction"])
async def test_a_retry_that_finds_the_last_place_taken_by_its_first_call_gets_that_calls_answer(
    payout: Payout, empty_database: str, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The same call twice at once (a client's retry after its deadline): the retry looked its key
    up before the first call committed, and counts the methods after, the first one's included.
    It must answer with the first call's method, not PAYOUT_METHOD_LIMIT."""
    for i in range(LIMIT - 1):
        await payout.add_payout_method(method_request("creator-a", f"key-{i}"))
    first: list[payout_pb2.PayoutMethod] = []
    started: list[bool] = []

    async def first_call_commits() -> None:
        if not started:  # once, from the retry (the first call passes through)
            started.append(True)
            first.append(await payout.add_payout_method(method_request("creator-a", "key-last")))

    if where == "before the vault":
        looked_up = IdempotentCall.stored

        async def look_up_then_the_first_call_commits(*args, **kwargs):  # type: ignore[no-untyped-def]
            answer = await looked_up(*args, **kwargs)
            await first_call_commits()
            return answer

        monkeypatch.setattr(IdempotentCall, "stored", look_up_then_the_first_call_commits)
    else:
        if empty_database.startswith("sqlite"):
            pytest.skip("SQLite serializes writers: the first call cannot commit inside the retry's transaction")
        lock = Payout._lock_creator_methods

        async def the_first_call_commits_then_lock(self: Payout, uow, creator_id: str) -> None:  # type: ignore[no-untyped-def]
            await first_call_commits()  # after the retry's own look-up of its key, in its transaction
            await lock(self, uow, creator_id)

        monkeypatch.setattr(Payout, "_lock_creator_methods", the_first_call_commits_then_lock)
    retry = await payout.add_payout_method(method_request("creator-a", "key-last"))
    assert first and retry == first[0]
    assert await method_count(payout, "creator-a") == LIMIT


def verify(method_id: str, verified: bool, key: str) -> payout_pb2.VerifyPayoutMethodRequest:
    return payout_pb2.VerifyPayoutMethodRequest(method_id=method_id, verified=verified, idempotency_key=key)


async def verifications(payout: Payout, creator: str) -> dict[str, tuple[str, int]]:
    """Each of the creator's methods: (verification, updated_at_us)."""
    m = payout_methods.c
    async with payout.db.unit_of_work(readonly=True) as uow:
        rows = await uow.conn.execute(
            select(m.method_id, m.verification, m.updated_at_us).where(m.creator_id == creator)
        )
        return {r.method_id: (r.verification, r.updated_at_us) for r in rows}


async def key_taken(payout: Payout, key: str) -> bool:
    k = common.idempotency.c
    async with payout.db.unit_of_work(readonly=True) as uow:
        return bool((await uow.conn.execute(select(func.count()).where(k.key == key))).scalar_one())


async def test_a_failed_method_verified_at_the_limit_is_refused_but_one_that_counts_never_is(payout: Payout) -> None:
    """VerifyPayoutMethod(verified=true) makes a FAILED method count again: it verified one with the
    creator already at the limit, so an operator could take a creator past METHODS_PER_CREATOR_MAX."""
    failed = await payout.add_payout_method(method_request("creator-a", "key-failed"))
    await payout.verify_payout_method(verify(failed.method_id, False, "v-fail"), "ops")
    added = [await payout.add_payout_method(method_request("creator-a", f"key-{i}")) for i in range(LIMIT)]
    before = await verifications(payout, "creator-a")

    with pytest.raises(ResourceExhausted) as err:
        await payout.verify_payout_method(verify(failed.method_id, True, "v-again"), "ops")
    assert err.value.reason == "PAYOUT_METHOD_LIMIT"
    assert err.value.metadata == {"limit": str(LIMIT)}
    assert await verifications(payout, "creator-a") == before  # nothing written
    assert not await key_taken(payout, "v-again")

    # Methods that already count are verified at the limit, and again (VERIFIED -> VERIFIED).
    for i, method in enumerate(added):
        ok = await payout.verify_payout_method(verify(method.method_id, True, f"v-{i}"), "ops")
        assert ok.verification == payout_pb2.VERIFICATION_STATUS_VERIFIED
    again = await payout.verify_payout_method(verify(added[0].method_id, True, "v-0-again"), "ops")
    assert again.verification == payout_pb2.VERIFICATION_STATUS_VERIFIED

    # Once a place is free, the failed one takes it; a retry of that call gets its answer even
    # after the creator is at the limit again without it.
    await payout.verify_payout_method(verify(added[0].method_id, False, "v-free"), "ops")
    taken = await payout.verify_payout_method(verify(failed.method_id, True, "v-again"), "ops")
    assert taken.verification == payout_pb2.VERIFICATION_STATUS_VERIFIED
    with pytest.raises(ResourceExhausted):
        await payout.add_payout_method(method_request("creator-a", "key-over"))
    await payout.verify_payout_method(verify(failed.method_id, False, "v-fail-again"), "ops")
    await payout.add_payout_method(method_request("creator-a", "key-over"))
    after = await verifications(payout, "creator-a")
    assert await payout.verify_payout_method(verify(failed.method_id, True, "v-again"), "ops") == taken
    assert await verifications(payout, "creator-a") == after
    assert sum(v in domain.ACTIVE_VERIFICATIONS for v, _ in after.values()) == LIMIT


async def test_concurrent_verifications_of_failed_methods_cannot_together_pass_the_limit(payout: Payout) -> None:
    failed = []
    for i in range(4):  # each failed before the next is added: more than the limit did not fail
        failed.append(await payout.add_payout_method(method_request("creator-a", f"key-f{i}")))
        await payout.verify_payout_method(verify(failed[-1].method_id, False, f"v-fail-{i}"), "ops")
    for i in range(LIMIT - 1):
        await payout.add_payout_method(method_request("creator-a", f"key-{i}"))
    outcomes = await asyncio.gather(
        *(payout.verify_payout_method(verify(m.method_id, True, f"v-{i}"), "ops") for i, m in enumerate(failed)),
        return_exceptions=True,
    )
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert all(isinstance(o, ResourceExhausted) and o.reason == "PAYOUT_METHOD_LIMIT" for o in refused), refused
    assert len(refused) == len(failed) - 1
    states = await verifications(payout, "creator-a")
    assert sum(v in domain.ACTIVE_VERIFICATIONS for v, _ in states.values()) == LIMIT


async def test_a_verification_retry_that_finds_the_last_place_taken_by_its_first_call_gets_that_calls_answer(
    payout: Payout, empty_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry that read the method FAILED before its first call committed, and counts after it,
    the method included: it must answer as the first call did, not PAYOUT_METHOD_LIMIT."""
    if empty_database.startswith("sqlite"):
        pytest.skip("SQLite serializes writers: the first call cannot commit inside the retry's transaction")
    failed = await payout.add_payout_method(method_request("creator-a", "key-failed"))
    await payout.verify_payout_method(verify(failed.method_id, False, "v-fail"), "ops")
    for i in range(LIMIT - 1):
        await payout.add_payout_method(method_request("creator-a", f"key-{i}"))
    first: list[payout_pb2.PayoutMethod] = []
    lock = Payout._lock_creator_methods

    async def the_first_call_commits_then_lock(self: Payout, uow, creator_id: str) -> None:  # type: ignore[no-untyped-def]
        if not first:  # once, from the retry (the first call passes through)
            first.append(payout_pb2.PayoutMethod())
            first[0] = await payout.verify_payout_method(verify(failed.method_id, True, "v-last"), "ops")
        await lock(self, uow, creator_id)

    monkeypatch.setattr(Payout, "_lock_creator_methods", the_first_call_commits_then_lock)
    retry = await payout.verify_payout_method(verify(failed.method_id, True, "v-last"), "ops")
    assert retry == first[0]
    assert retry.verification == payout_pb2.VERIFICATION_STATUS_VERIFIED


def in_currency(creator: str, key: str, currency: str) -> payout_pb2.AddPayoutMethodRequest:
    req = method_request(creator, key)
    req.currency_code = currency
    return req


async def pay_out_in(payout: Payout, key: str, *currencies: str) -> None:
    """A new policy version: the current one's terms (USD's), in each of `currencies`."""
    current = await payout.get_policy()
    terms = []
    for code in currencies:
        terms.append(payout_pb2.CurrencyTerms())
        terms[-1].CopyFrom(current.currencies[0])
        terms[-1].currency_code = code
    await payout.set_policy(
        payout_pb2.SetPolicyRequest(
            creator_share_bp=current.creator_share_bp, fee_bp=current.fee_bp, currencies=terms, idempotency_key=key
        ),
        "ops",
    )


async def test_a_currency_the_policy_does_not_pay_out_in_is_refused_before_the_vault(
    payout: Payout, monkeypatch: pytest.MonkeyPatch
) -> None:
    vaulted = vault_calls(payout, monkeypatch)
    assert [t.currency_code for t in (await payout.get_policy()).currencies] == ["USD"]
    for code in ("XXX", "EUR"):
        with pytest.raises(FailedPrecondition) as err:
            await payout.add_payout_method(in_currency("creator-a", f"key-{code}", code))
        assert err.value.reason == "CURRENCY_NOT_SUPPORTED", err.value
    assert vaulted == []  # the account never went to the provider
    assert await method_count(payout, "creator-a") == 0
    assert not await key_taken(payout, "key-EUR")

    # Once the policy pays out in EUR the same call adds it; a retry of that key still gets its
    # answer after the policy drops EUR again, and RequestWithdrawal to it is refused then too.
    await pay_out_in(payout, "p-eur", "USD", "EUR")
    added = await payout.add_payout_method(in_currency("creator-a", "key-EUR", "EUR"))
    assert added.currency_code == "EUR"
    await payout.verify_payout_method(verify(added.method_id, True, "v-eur"), "ops")
    await pay_out_in(payout, "p-usd", "USD")
    assert await payout.add_payout_method(in_currency("creator-a", "key-EUR", "EUR")) == added
    with pytest.raises(FailedPrecondition) as err:
        await payout.add_payout_method(in_currency("creator-a", "key-EUR-2", "EUR"))
    assert err.value.reason == "CURRENCY_NOT_SUPPORTED"
    with pytest.raises(FailedPrecondition) as err:
        await payout.request_withdrawal(
            payout_pb2.RequestWithdrawalRequest(
                creator_id="creator-a", diamonds=20_000, method_id=added.method_id, idempotency_key="w-eur"
            )
        )
    assert err.value.reason == "CURRENCY_NOT_SUPPORTED"
    assert await method_count(payout, "creator-a") == 1
    assert vaulted == ["creator-a@example.com"]  # the one call that took effect, never its retry


async def test_a_currency_the_policy_drops_while_the_vault_is_asked_is_refused_with_nothing_written(
    payout: Payout, monkeypatch: pytest.MonkeyPatch
) -> None:
    await pay_out_in(payout, "p-eur", "USD", "EUR")
    assert payout.provider is not None
    tokenize = payout.provider.tokenize

    async def policy_changes_meanwhile(kind: str, account: str) -> str:
        await pay_out_in(payout, "p-usd", "USD")
        return await tokenize(kind, account)

    monkeypatch.setattr(payout.provider, "tokenize", policy_changes_meanwhile)
    with pytest.raises(FailedPrecondition) as err:
        await payout.add_payout_method(in_currency("creator-a", "key-EUR", "EUR"))
    assert err.value.reason == "CURRENCY_NOT_SUPPORTED"
    assert await method_count(payout, "creator-a") == 0
    assert not await key_taken(payout, "key-EUR")


async def test_a_retry_refused_a_currency_dropped_after_its_first_call_took_effect_gets_that_calls_answer(
    payout: Payout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same call twice at once: the retry looked its key up before the first call committed,
    and the policy dropped EUR before the retry read it. It must answer with the first call's
    method, not CURRENCY_NOT_SUPPORTED."""
    await pay_out_in(payout, "p-eur", "USD", "EUR")
    first: list[payout_pb2.PayoutMethod] = []
    looked_up = IdempotentCall.stored

    async def look_up_then_the_first_call_commits(*args, **kwargs):  # type: ignore[no-untyped-def]
        answer = await looked_up(*args, **kwargs)
        if not first:  # once, from the retry (the first call passes through)
            first.append(payout_pb2.PayoutMethod())
            first[0] = await payout.add_payout_method(in_currency("creator-a", "key-EUR", "EUR"))
            await pay_out_in(payout, "p-usd", "USD")
        return answer

    monkeypatch.setattr(IdempotentCall, "stored", look_up_then_the_first_call_commits)
    retry = await payout.add_payout_method(in_currency("creator-a", "key-EUR", "EUR"))
    assert retry == first[0] and retry.currency_code == "EUR"
    assert await method_count(payout, "creator-a") == 1


async def test_a_paypal_address_on_a_long_domain_is_added_with_a_mask_that_hides_the_domain(payout: Payout) -> None:
    # The mask used to end with the whole domain: one of the 210 characters an address may have
    # there did not fit the 64 of `masked` (PostgreSQL refused the row after the vault took it).
    host = "mail." + "a" * 60 + "." + "b" * 60 + ".example.com"
    request = payout_pb2.AddPayoutMethodRequest(
        creator_id="creator-a",
        kind=payout_pb2.PAYOUT_METHOD_KIND_PAYPAL,
        paypal_email=f"jane@{host}",
        idempotency_key="k",
    )
    added = await payout.add_payout_method(request)
    assert added.masked == "j•••@m•••.com"
    listed = await payout.list_payout_methods(payout_pb2.ListPayoutMethodsRequest(creator_id="creator-a"))
    assert [m.masked for m in listed.methods] == ["j•••@m•••.com"]
