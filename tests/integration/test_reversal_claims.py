"""The wallet's audit total of what reversals claimed, on each backend: the recorded claims, and
those of reversals from before wallet migration 0007, read from the ledger by a join whose
string concatenation and CASE both databases must take. The audit ties payout's clawbacks
(entries + open shortfalls) to it (README "How the audit reads a suite that keeps working")."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.wallet.usecases import Wallet
from tests.support.wallet import buy, callback, forget, reversal_of, spend, wallet_on


@pytest.fixture
async def wallet(empty_database: str) -> AsyncIterator[Wallet]:
    async with wallet_on(empty_database, "reversal-claims") as w:
        yield w


async def test_the_audit_sums_every_reversals_claim_recorded_or_read_from_the_ledger(wallet: Wallet) -> None:
    user = "viewer-claims"
    p0 = await buy(wallet, user)  # 70 coins, 50 gifted, refunded: claims 50
    await spend(wallet, user, 50)
    await callback(wallet, p0, "charge.refunded")
    p1 = await buy(wallet, user)  # repays the 50 of debt, 20 gifted, charged back: claims 20
    await spend(wallet, user, 20)
    await callback(wallet, p1, "charge.dispute.lost")
    claims = [(await reversal_of(wallet, p.purchase_id)).coins_already_spent for p in (p0, p1)]
    assert claims == [50, 20]
    assert (await wallet.audit()).coins_claimed_by_reversals == 70
    # Reversed by the release before 0007 (nothing recorded): what its event said, from the ledger.
    await forget(wallet, p0.purchase_id, "coins_claimed")
    assert (await wallet.audit()).coins_claimed_by_reversals == 70
    await forget(wallet, p1.purchase_id, "coins_claimed")
    assert (await wallet.audit()).coins_claimed_by_reversals == 50 + 70  # that release claimed P1's whole debt
