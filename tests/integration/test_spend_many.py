"""wallet.SpendMany on SQLite and PostgreSQL: one transaction, each item its own key and answer.

What a batch must not change: every item is answered exactly as a Spend with it would be
(stored answers, reused keys, refusals), a batch never overdraws or passes a limit however many
batches and single Spends race, and a settled refusal forbids its key for good.
"""

from __future__ import annotations

import asyncio
import random

import grpc

from livegifts.wallet.v1 import wallet_pb2
from tests.integration.helpers import balance_of, buy_coins, expect_error, spend_req, uid

OK = grpc.StatusCode


def outcome(r: wallet_pb2.SpendManyResult) -> tuple[str, int | str]:
    """('spent', balance after) or (reason, settled) of one item."""
    if r.WhichOneof("outcome") == "spent":
        return ("spent", r.spent.balance_after)
    return (r.error.reason, "settled" if r.error.settled else "open")


async def test_each_item_is_answered_as_its_own_spend_would_be(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    w = clients.wallet
    rich, poor, blocked_creator = uid("rich"), uid("poor"), uid("creator")
    await buy_coins(w, deployment.webhook_secret, rich)  # 700 coins
    await buy_coins(w, deployment.webhook_secret, poor)
    await w.Spend(spend_req(poor, 690))
    await w.SetAccountRestrictions(
        wallet_pb2.SetAccountRestrictionsRequest(user_id=blocked_creator, blocked=True, idempotency_key=uid("r")),
        metadata=deployment.operator_metadata,
    )
    done = spend_req(rich, 100)
    first = await w.Spend(done)
    to_blocked = spend_req(rich, 5)
    to_blocked.recipient_user_id = blocked_creator
    reused = spend_req(rich, 7, key=done.idempotency_key)  # same key, different amount
    items = [
        spend_req(rich, 50),
        done,  # a retry: the stored answer, nothing charged again
        spend_req(poor, 11),  # 10 left
        to_blocked,
        reused,
        spend_req(rich, 0),  # invalid: refused before anything is read
        spend_req(rich, 550),  # exactly what is left after the first item
        spend_req(nobody := uid("nobody"), 1),
    ]
    resp = await w.SpendMany(wallet_pb2.SpendManyRequest(spends=items))
    assert [outcome(r) for r in resp.results] == [
        ("spent", 550),
        ("spent", first.balance_after),
        ("INSUFFICIENT_COINS", "open"),
        ("ACCOUNT_BLOCKED", "open"),
        ("IDEMPOTENCY_KEY_REUSED", "open"),
        ("AMOUNT_NOT_POSITIVE", "open"),
        ("spent", 0),
        ("INSUFFICIENT_COINS", "open"),
    ]
    assert resp.results[3].error.code == OK.FAILED_PRECONDITION.value[0]
    assert resp.results[1].spent.spend_id == first.spend_id
    assert await balance_of(w, rich) == 0
    assert await balance_of(w, poor) == 10
    # Refusals were not settled: the same keys may spend once the coins (or the account) are there.
    await buy_coins(w, deployment.webhook_secret, poor)
    assert (await w.Spend(items[2])).balance_after == 710 - 11
    await buy_coins(w, deployment.webhook_secret, nobody)
    assert (await w.Spend(items[7])).balance_after == 700 - 1


async def test_settled_refusals_forbid_their_keys_and_a_batch_is_answered_again_the_same(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    w = clients.wallet
    viewer, minor_creator = uid("viewer"), uid("creator")
    await buy_coins(w, deployment.webhook_secret, viewer)
    await w.SetAccountRestrictions(
        wallet_pb2.SetAccountRestrictionsRequest(user_id=minor_creator, is_minor=True, idempotency_key=uid("r")),
        metadata=deployment.operator_metadata,
    )
    underage = spend_req(viewer, 1)
    underage.recipient_user_id = minor_creator
    items = [spend_req(viewer, 600), spend_req(viewer, 200), underage, spend_req(viewer, 100)]
    req = wallet_pb2.SpendManyRequest(spends=items, settle_refusals=True)
    resp = await w.SpendMany(req)
    expected = [("spent", 100), ("INSUFFICIENT_COINS", "settled"), ("UNDERAGE", "settled"), ("spent", 0)]
    assert [outcome(r) for r in resp.results] == expected
    assert resp.results[2].error.code == OK.FAILED_PRECONDITION.value[0]
    # The whole call again: the spends are stored answers, the refusals are now cancelled keys.
    again = await w.SpendMany(req)
    assert [outcome(r) for r in again.results] == [
        ("spent", 100),
        ("SPEND_CANCELLED", "settled"),
        ("SPEND_CANCELLED", "settled"),
        ("spent", 0),
    ]
    await buy_coins(w, deployment.webhook_secret, viewer)
    await expect_error(w.Spend(items[1]), OK.ABORTED, "SPEND_CANCELLED")  # even with coins now
    cancel = await w.CancelSpend(wallet_pb2.CancelSpendRequest(idempotency_key=items[1].idempotency_key))
    assert cancel.outcome == wallet_pb2.CancelSpendResponse.OUTCOME_CANCELLED
    assert await balance_of(w, viewer) == 700


async def test_a_key_twice_in_one_batch_is_charged_once(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    w = clients.wallet
    viewer = uid("viewer")
    await buy_coins(w, deployment.webhook_secret, viewer)
    item = spend_req(viewer, 30)
    other = spend_req(viewer, 31, key=item.idempotency_key)
    resp = await w.SpendMany(wallet_pb2.SpendManyRequest(spends=[item, item, other]))
    assert [outcome(r) for r in resp.results] == [("spent", 670), ("spent", 670), ("IDEMPOTENCY_KEY_REUSED", "open")]
    assert resp.results[0].spent.spend_id == resp.results[1].spent.spend_id
    assert await balance_of(w, viewer) == 670
    await expect_error(w.SpendMany(wallet_pb2.SpendManyRequest()), OK.INVALID_ARGUMENT, "INVALID_BATCH_SIZE")


async def test_a_retry_of_a_recorded_key_gets_its_stored_answer_wherever_it_stands_in_a_batch(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    w = clients.wallet
    viewer = uid("viewer")
    await buy_coins(w, deployment.webhook_secret, viewer)
    done = spend_req(viewer, 30)
    first = await w.Spend(done)
    cancelled = spend_req(viewer, 5)
    await w.CancelSpend(wallet_pb2.CancelSpendRequest(idempotency_key=cancelled.idempotency_key))
    # A request reusing each key comes first in the batch; each retry after it is answered as a
    # Spend with it would be: the stored spend, and the cancelled key's refusal, settled.
    items = [
        spend_req(viewer, 7, key=done.idempotency_key),
        done,
        spend_req(viewer, 6, key=cancelled.idempotency_key),
        cancelled,
    ]
    resp = await w.SpendMany(wallet_pb2.SpendManyRequest(spends=items))
    assert [outcome(r) for r in resp.results] == [
        ("IDEMPOTENCY_KEY_REUSED", "open"),
        ("spent", first.balance_after),
        ("SPEND_CANCELLED", "settled"),
        ("SPEND_CANCELLED", "settled"),
    ]
    assert resp.results[1].spent.spend_id == first.spend_id
    assert await balance_of(w, viewer) == 700 - 30


async def test_racing_batches_and_single_spends_never_overdraw_pass_a_limit_or_charge_a_key_twice(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    w = clients.wallet
    users = [uid("viewer") for _ in range(6)]
    await asyncio.gather(*(buy_coins(w, deployment.webhook_secret, u) for u in users))  # 700 each
    capped = users[0]
    await w.SetSpendingLimits(wallet_pb2.SetSpendingLimitsRequest(user_id=capped, daily=300, idempotency_key=uid("l")))
    rnd = random.Random(8)
    keys = [(rnd.choice(users), uid("k")) for _ in range(240)]  # 240 spends of 10: 400 coins asked per user
    reqs = [spend_req(u, 10, k) for u, k in keys]
    # Every spend is asked twice, in batches of random sizes and as single Spends, all at once.
    calls, call_keys = [], []
    for _copy in range(2):
        order = list(range(len(reqs)))
        rnd.shuffle(order)
        i = 0
        while i < len(order):
            n = rnd.choice([1, 1, 7, 25, 60])
            part = [reqs[j] for j in order[i : i + n]]
            call_keys.append([r.idempotency_key for r in part])
            if n == 1:
                calls.append(w.Spend(part[0]))
            else:
                calls.append(w.SpendMany(wallet_pb2.SpendManyRequest(spends=part, settle_refusals=False)))
            i += n
    answers = await asyncio.gather(*calls, return_exceptions=True)
    charged: dict[str, set[str]] = {}  # key -> the spend ids its answers named
    for a, ks in zip(answers, call_keys, strict=True):
        if isinstance(a, grpc.aio.AioRpcError):
            assert a.code() in (OK.FAILED_PRECONDITION, OK.RESOURCE_EXHAUSTED), a
            continue
        assert not isinstance(a, BaseException), a
        results = [wallet_pb2.SpendManyResult(spent=a)] if isinstance(a, wallet_pb2.SpendResponse) else a.results
        for k, r in zip(ks, results, strict=True):
            if r.WhichOneof("outcome") == "spent":
                charged.setdefault(k, set()).add(r.spent.spend_id)
            else:
                assert r.error.reason in ("INSUFFICIENT_COINS", "SPENDING_LIMIT_EXCEEDED"), r
    balances = {u: await balance_of(w, u) for u in users}
    asked = {u: 10 * sum(1 for v, _ in keys if v == u) for u in users}
    for u in users:
        cap = 300 if u == capped else 700
        assert balances[u] == 700 - min(asked[u], cap), (u, balances[u], asked[u])
    assert all(len(ids) == 1 for ids in charged.values()), "a key answered with two different spends"
    assert len(charged) * 10 == sum(700 - b for b in balances.values())  # each charged key debited once
    limits = await w.GetSpendingLimits(wallet_pb2.GetSpendingLimitsRequest(user_id=capped))
    assert {p.period: p.spent_coins for p in limits.periods}["DAY"] == 700 - balances[capped]
