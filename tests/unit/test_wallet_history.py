"""A user's coin history (`ListTransactions`) against a real SQLite file: what it lists and its tokens."""

from __future__ import annotations

import pytest

from livegifts.wallet.v1 import wallet_pb2
from services.common.errors import InvalidArgument
from services.wallet.usecases import Wallet
from tests.support.wallet import buy


@pytest.mark.parametrize("token", [" 5", "5 ", "+7", "5_0", "05", "\u0663", "\u00b2", "1" * 30])
async def test_a_page_token_not_in_the_form_the_wallet_gives_is_refused(wallet: Wallet, token: str) -> None:
    # int() takes all but the last two; each then set where a page started, a token never given.
    await buy(wallet, "viewer")
    with pytest.raises(InvalidArgument) as err:
        await wallet.list_transactions(wallet_pb2.ListTransactionsRequest(user_id="viewer", page_token=token))
    assert err.value.reason == "INVALID_PAGE_TOKEN"


async def test_the_next_page_token_the_wallet_gives_pages_through_every_entry_once(wallet: Wallet) -> None:
    for _ in range(5):
        await buy(wallet, "viewer")
    seen: list[str] = []
    token = ""
    while True:
        page = await wallet.list_transactions(
            wallet_pb2.ListTransactionsRequest(user_id="viewer", page_size=2, page_token=token)
        )
        seen += [t.entry_id for t in page.transactions]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) == 5
