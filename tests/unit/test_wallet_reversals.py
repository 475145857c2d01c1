"""The wallet's reversals against a real SQLite file: how many coins a reversal says were spent.

Coins that repaid an earlier reversal's debt reached no creator; `coins_already_spent` must not
count them, whether the purchase recorded them itself (wallet migration 0006) or was credited
before that revision, when they are read from the ledger.
"""

from __future__ import annotations

import logging
import uuid

import pytest
from sqlalchemy import insert, select, update

from livegifts.wallet.v1 import wallet_pb2
from services.common import signing
from services.common.errors import InvalidArgument
from services.wallet.payments import dev_event_payload
from services.wallet.storage import accounts, postings, purchases, spends
from services.wallet.usecases import Wallet
from tests.support.wallet import SECRET, buy, callback, forget, reversal_of, spend


async def test_a_refund_of_coins_that_only_repaid_a_debt_reports_none_of_them_spent(wallet: Wallet) -> None:
    user = "viewer"
    await buy(wallet, user)
    await spend(wallet, user, 70)  # P0's coins gifted; P0 is never reversed
    p1 = await buy(wallet, user)
    await spend(wallet, user, 70)
    await callback(wallet, p1, "charge.dispute.lost")
    assert (await reversal_of(wallet, p1.purchase_id)).coins_already_spent == 70

    p2 = await buy(wallet, user)  # repays P1's debt: the balance is back to 0
    async with wallet.db.unit_of_work(readonly=True) as uow:
        repaid = (
            await uow.conn.execute(
                select(purchases.c.debt_repaid_coins).where(purchases.c.purchase_id == p2.purchase_id)
            )
        ).scalar_one()
    assert repaid == 70
    await callback(wallet, p2, "charge.refunded")
    event = await reversal_of(wallet, p2.purchase_id)
    assert (event.coins, event.coins_already_spent, event.balance_after) == (70, 0, -70)


@pytest.mark.parametrize(
    "forgotten",
    [None, "debt_repaid_coins", "coins_claimed"],
    ids=["recorded", "repaid-from-ledger", "claimed-from-ledger"],
)
async def test_a_debt_repaid_by_a_purchase_kept_leaves_new_spending_to_be_claimed(
    wallet: Wallet, forgotten: str | None
) -> None:
    user = "viewer"
    p0 = await buy(wallet, user)
    await spend(wallet, user, 70)
    await callback(wallet, p0, "charge.dispute.lost")  # 70 claimed, a debt of 70
    p1 = await buy(wallet, user)  # repays it, and is kept
    p2 = await buy(wallet, user)
    await spend(wallet, user, 30)  # paid for by P2's coins: P1's went to the debt
    if forgotten == "debt_repaid_coins":
        await forget(wallet, p1.purchase_id, forgotten)
    elif forgotten == "coins_claimed":
        await forget(wallet, p0.purchase_id, forgotten)
    await callback(wallet, p2, "charge.refunded")
    event = await reversal_of(wallet, p2.purchase_id)
    assert (event.coins_already_spent, event.balance_after) == (30, -30)
    # What was read from the ledger is kept: the next reversal of this user reads it from the row.
    async with wallet.db.unit_of_work(readonly=True) as uow:
        kept = (
            await uow.conn.execute(
                select(purchases.c.purchase_id, purchases.c.debt_repaid_coins, purchases.c.coins_claimed).where(
                    purchases.c.purchase_id.in_([p0.purchase_id, p1.purchase_id])
                )
            )
        ).all()
    assert sorted((r.debt_repaid_coins, r.coins_claimed) for r in kept) == sorted([(0, 70), (70, None)])


async def test_a_purchase_that_partly_repaid_a_debt_reports_only_the_rest_as_spent(wallet: Wallet) -> None:
    user = "viewer"
    p0 = await buy(wallet, user)
    await spend(wallet, user, 50)
    await callback(wallet, p0, "charge.refunded")  # 20 left in the balance, 50 spent: a debt of 50
    assert (await reversal_of(wallet, p0.purchase_id)).coins_already_spent == 50
    p1 = await buy(wallet, user)  # 50 repay the debt, 20 reach the balance
    await spend(wallet, user, 15)
    await callback(wallet, p1, "charge.refunded")
    event = await reversal_of(wallet, p1.purchase_id)
    assert (event.coins_already_spent, event.balance_after) == (15, -65)


async def test_the_audit_ties_each_spend_row_to_what_its_entry_posted_as_spent(wallet: Wallet) -> None:
    """A spend posted for more than its row (or twice) leaves every entry balanced; the audit's
    spend rows total and per-row comparison are what tell."""
    await buy(wallet, "u")
    await spend(wallet, "u", 7)
    await spend(wallet, "u", 5)
    audit = await wallet.audit()
    assert (audit.coins_spent, audit.coins_of_spent_rows, audit.spends_posting_mismatch) == (12, 12, 0)

    async with wallet.db.unit_of_work() as uow:  # one row now says less than its entry posted
        await uow.conn.execute(update(spends).where(spends.c.amount == 5).values(amount=4))
        await uow.commit()
    audit = await wallet.audit()
    assert (audit.coins_spent, audit.coins_of_spent_rows, audit.spends_posting_mismatch) == (12, 11, 1)


async def test_the_audit_counts_an_unbalanced_entry_a_balance_its_postings_do_not_explain_and_an_unexplained_debt(
    wallet: Wallet,
) -> None:
    """Checks 1 and 6 rest on these counts: a wallet whose audit reported 0 whatever its books
    held would pass every audit. Each tampering shows in its own count."""
    await buy(wallet, "u")
    await spend(wallet, "u", 7)
    clean = await wallet.audit()
    assert (clean.ledger_sum, clean.unbalanced_entries, clean.postings_mismatch) == (0, 0, 0)
    assert clean.negative_balances_without_reversal == 0

    async with wallet.db.unit_of_work() as uow:  # one posting more in a spend's entry: coins from nowhere
        entry_id = (await uow.conn.execute(select(spends.c.entry_id))).scalar_one()
        await uow.conn.execute(
            insert(postings).values(entry_id=entry_id, account_id="system:spent:GIFT", amount=3, created_at_us=1)
        )
        await uow.commit()
    audit = await wallet.audit()
    assert (audit.ledger_sum, audit.unbalanced_entries, audit.postings_mismatch) == (3, 1, 0)

    async with wallet.db.unit_of_work() as uow:  # a balance no posting explains, below zero, with no reversal
        await uow.conn.execute(update(accounts).where(accounts.c.user_id == "u").values(balance=-5))
        await uow.commit()
    audit = await wallet.audit()
    assert (audit.unbalanced_entries, audit.postings_mismatch, audit.negative_balances_without_reversal) == (1, 1, 1)


async def test_a_debt_deeper_than_the_coins_reversed_fails_check_6_even_for_a_user_with_a_reversal(
    wallet: Wallet,
) -> None:
    """A spend never overdraws: a balance goes below zero by reversals only, and by at most the
    coins they took back. A user with any reversal once passed check 6 whatever their debt, so an
    overdraw on the spend path, for that user, passed every audit."""
    p = await buy(wallet, "u")  # 70 coins
    await spend(wallet, "u", 50)
    await callback(wallet, p, "charge.dispute.lost")  # 20 - 70: a debt of 50, explained
    explained = await wallet.audit()
    assert explained.negative_balances_without_reversal == 0
    async with wallet.db.unit_of_work() as uow:
        balance = (await uow.conn.execute(select(accounts.c.balance).where(accounts.c.user_id == "u"))).scalar_one()
    assert balance == -50
    for tampered, unexplained in ((-70, 0), (-71, 1)):  # at most the 70 coins reversed
        async with wallet.db.unit_of_work() as uow:
            await uow.conn.execute(update(accounts).where(accounts.c.user_id == "u").values(balance=tampered))
            await uow.commit()
        assert (await wallet.audit()).negative_balances_without_reversal == unexplained, tampered


async def test_a_partial_refund_is_refused_changes_nothing_and_is_logged_for_an_operator(
    wallet: Wallet, caplog: pytest.LogCaptureFixture
) -> None:
    p = await buy(wallet, "u-partial")
    half = dev_event_payload(uuid.uuid4().hex, "charge.refunded", p.purchase_id, p.price.amount_minor // 2, "USD")
    request = wallet_pb2.HandlePaymentEventRequest(provider="dev", payload=half, signature=signing.sign(SECRET, half))
    with caplog.at_level(logging.WARNING, logger="services.wallet.usecases"), pytest.raises(InvalidArgument) as err:
        await wallet.handle_payment_event(request)
    assert err.value.reason == "AMOUNT_MISMATCH"
    # The answer says what the callback must carry: the purchase's whole price and its currency.
    assert err.value.metadata == {
        "expected_amount_minor": str(p.price.amount_minor),
        "expected_currency_code": p.price.currency_code,
    }
    assert (await wallet.get_purchase(p.purchase_id)).status == wallet_pb2.PURCHASE_STATUS_SUCCEEDED
    assert (await wallet.get_balance("u-partial")).coins == p.coins
    (logged,) = [r for r in caplog.records if r.getMessage().startswith("payment callback refused")]
    assert (logged.purchase_id, logged.amount_minor, logged.purchase_amount_minor) == (  # type: ignore[attr-defined]
        p.purchase_id,
        p.price.amount_minor // 2,
        p.price.amount_minor,
    )


async def test_the_audit_sums_what_every_reversal_claimed_those_reversed_before_0007_read_from_the_ledger(
    wallet: Wallet,
) -> None:
    """`coins_claimed_by_reversals` is what the reversals' events told payout to claw back: the
    audit ties payout's clawbacks to it, so it must be each event's `coins_already_spent`, also
    for a purchase reversed before wallet migration 0007 recorded it."""
    user = "viewer-claims"
    p0 = await buy(wallet, user)  # 70 coins, 50 gifted: its refund claims 50
    await spend(wallet, user, 50)
    await callback(wallet, p0, "charge.refunded")
    p1 = await buy(wallet, user)  # repays the 50 of debt; 20 left, 20 gifted: its chargeback claims 20
    await spend(wallet, user, 20)
    await callback(wallet, p1, "charge.dispute.lost")
    p2 = await buy(wallet, user)  # 70 coins, none gifted (20 of debt repaid): claims nothing
    await callback(wallet, p2, "charge.refunded")
    events = [await reversal_of(wallet, p.purchase_id) for p in (p0, p1, p2)]
    claims = [e.coins_already_spent for e in events]
    assert claims == [50, 20, 0]
    assert (await wallet.audit()).coins_claimed_by_reversals == sum(claims)

    # As if reversed by the release before 0007, nothing recorded: its event claimed the debt the
    # reversal left beyond what the balance held (the ledger's balance_after), all that payout
    # clawed back for it. For P0 that is what today's event says too; for P1 it is the whole
    # 70 of debt, the release before 0007 knowing nothing of P0's claim.
    await forget(wallet, p0.purchase_id, "coins_claimed")
    assert (await wallet.audit()).coins_claimed_by_reversals == 50 + 20 + 0
    await forget(wallet, p1.purchase_id, "coins_claimed")
    assert (await wallet.audit()).coins_claimed_by_reversals == 50 + 70 + 0
