"""A provider that does not answer: the call that needs it ends at PROVIDER_TIMEOUT_S with
UNAVAILABLE and writes nothing, and the service answers every other call meanwhile.

A suite of its own per backend, whose development providers take far longer to answer
(DEV_PROVIDER_LATENCY_S) than the wallet and payout wait for them (PROVIDER_TIMEOUT_S): a real
provider that hangs, seen from outside, over gRPC.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
import pytest

from livegifts.payout.v1 import payout_pb2, payout_pb2_grpc
from livegifts.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from services.cli.suite import Suite
from tests.integration.conftest import BACKENDS, running_suite
from tests.integration.helpers import expect_error, uid

PROVIDER_TIMEOUT_S = 3.0  # long beside a local call, so the calls made meanwhile finish well inside it
PROVIDER_LATENCY_S = 600.0  # the providers "hang": they would answer long after every deadline
CALL_DEADLINE_S = 30.0  # the client's own deadline, far beyond the service's


@pytest.fixture(scope="module", params=BACKENDS)
def suite(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    if os.environ.get("LIVEGIFTS_TEST_TARGET_WALLET"):
        pytest.skip("needs providers that hang: not run against an external deployment")
    var_dir = tmp_path_factory.mktemp(f"slow-providers-{request.param}")
    slow = {
        svc: {
            f"LIVEGIFTS_{svc.upper()}_PROVIDER_TIMEOUT_S": str(PROVIDER_TIMEOUT_S),
            f"LIVEGIFTS_{svc.upper()}_DEV_PROVIDER_LATENCY_S": str(PROVIDER_LATENCY_S),
        }
        for svc in ("wallet", "payout")
    }
    with running_suite(request.param, var_dir, "lgslow", slow) as s:
        yield s


@dataclass
class Stubs:
    wallet: wallet_pb2_grpc.WalletServiceStub
    payout: payout_pb2_grpc.PayoutServiceStub


@pytest.fixture
async def stubs(suite: Suite) -> AsyncIterator[Stubs]:
    async with (
        grpc.aio.insecure_channel(suite.addr("wallet")) as wc,
        grpc.aio.insecure_channel(suite.addr("payout")) as pc,
    ):
        yield Stubs(wallet_pb2_grpc.WalletServiceStub(wc), payout_pb2_grpc.PayoutServiceStub(pc))


def _purchase(user: str, key: str, package_id: str = "us-usd-70") -> wallet_pb2.CreatePurchaseRequest:
    return wallet_pb2.CreatePurchaseRequest(
        user_id=user,
        package_id=package_id,
        currency_code="USD",
        payment_method=wallet_pb2.PAYMENT_METHOD_CARD,
        idempotency_key=key,
    )


async def test_a_purchase_whose_checkout_does_not_open_is_unavailable_and_the_wallet_answers_meanwhile(
    stubs: Stubs,
) -> None:
    buyer, key = uid("buyer"), uid("buy")
    buying = asyncio.ensure_future(stubs.wallet.CreatePurchase(_purchase(buyer, key), timeout=CALL_DEADLINE_S))

    # While the checkout waits for the provider, the wallet reads and writes for others.
    other = uid("viewer")
    packages = await stubs.wallet.ListCoinPackages(wallet_pb2.ListCoinPackagesRequest(region="US"))
    assert packages.packages
    limits = await stubs.wallet.SetSpendingLimits(
        wallet_pb2.SetSpendingLimitsRequest(user_id=other, daily=100, idempotency_key=uid("limits"))
    )
    assert {p.period: p.limit_coins for p in limits.periods}["DAY"] == 100
    read = await stubs.wallet.GetSpendingLimits(wallet_pb2.GetSpendingLimitsRequest(user_id=other))
    assert read == limits
    assert not buying.done(), "CreatePurchase answered before its provider did"

    await expect_error(buying, grpc.StatusCode.UNAVAILABLE, "PAYMENT_PROVIDER_UNAVAILABLE")
    # Nothing was written: the key was not taken, so another request under it is not refused
    # as a reuse (it waits for the provider again).
    await expect_error(
        stubs.wallet.CreatePurchase(_purchase(buyer, key, "us-usd-350"), timeout=CALL_DEADLINE_S),
        grpc.StatusCode.UNAVAILABLE,
        "PAYMENT_PROVIDER_UNAVAILABLE",
    )


async def test_a_payout_method_the_provider_does_not_vault_is_unavailable_and_payout_answers_meanwhile(
    stubs: Stubs,
) -> None:
    creator = uid("creator")
    adding = asyncio.ensure_future(
        stubs.payout.AddPayoutMethod(
            payout_pb2.AddPayoutMethodRequest(
                creator_id=creator,
                kind=payout_pb2.PAYOUT_METHOD_KIND_PAYPAL,
                paypal_email=f"{creator}@example.com",
                idempotency_key=uid("method"),
            ),
            timeout=CALL_DEADLINE_S,
        )
    )

    policy = await stubs.payout.GetPolicy(payout_pb2.GetPolicyRequest())
    assert policy.version >= 1
    others = await stubs.payout.ListPayoutMethods(payout_pb2.ListPayoutMethodsRequest(creator_id=uid("other")))
    assert not others.methods
    assert not adding.done(), "AddPayoutMethod answered before its provider did"

    await expect_error(adding, grpc.StatusCode.UNAVAILABLE, "PAYOUT_PROVIDER_UNAVAILABLE")
    methods = await stubs.payout.ListPayoutMethods(payout_pb2.ListPayoutMethodsRequest(creator_id=creator))
    assert not methods.methods
