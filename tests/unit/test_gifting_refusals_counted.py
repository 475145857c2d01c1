"""Gifting counts the refusals it decides itself (livegifts_gifts_refused_total), once each, and not
the wallet's, which the wallet counts (livegifts_spends_refused_total).

A self-gift, a stream not live, or a blocked or under-age sender or creator refused by gifting's
pre-check showed only as a status code of a single SendGift, and inside a SendGifts' OK answer in
no metric at all: trust and safety could not see them.

In-process: the gifting use cases on a migrated SQLite file, with a fake wallet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from livegifts.gifting.v1 import gifting_pb2
from services.common.errors import DomainError
from services.gifting.usecases import Gifting
from tests.support.gifting import RestrictingWallet, gifting_on

METRIC = "livegifts_gifts_refused_total"
# Every series the test may move; the counter's own label set is held to the docs and
# tests/integration/test_counters_at_zero.py.
SERIES = [
    ("ACCOUNT_BLOCKED", "sender"),
    ("ACCOUNT_BLOCKED", "creator"),
    ("UNDERAGE", "sender"),
    ("UNDERAGE", "creator"),
    ("SELF_GIFT", "sender"),
    ("STREAM_NOT_LIVE", "sender"),
    ("DUPLICATE_KEY_IN_BATCH", "sender"),
    ("INVALID_BATCH_SIZE", "sender"),
    ("INVALID_TIP_AMOUNT", "sender"),
    ("UNKNOWN_GIFT", "sender"),
]


def _counts() -> dict[tuple[str, str], float]:
    return {
        (reason, role): REGISTRY.get_sample_value(METRIC, {"reason": reason, "role": role}) or 0.0
        for reason, role in SERIES
    }


async def _reason(call: Any) -> str:
    """The reason `call` is refused with."""
    with pytest.raises(DomainError) as err:
        await call
    return err.value.reason


def _gift(stream_id: str, sender: str, key: str, gift_id: str = "panda") -> gifting_pb2.SendGiftRequest:
    return gifting_pb2.SendGiftRequest(
        stream_id=stream_id, sender_id=sender, gift_id=gift_id, quantity=1, idempotency_key=key
    )


@pytest.mark.parametrize("group_commit", [False, True])
async def test_gifting_counts_each_refusal_it_decides_once_and_not_the_wallets(
    tmp_path: Path, group_commit: bool
) -> None:
    wallet = RestrictingWallet()
    wallet.blocked |= {"blocked-viewer", "blocked-creator"}
    wallet.underage.add("young-viewer")
    wallet.refuses_recipient.add("creator-blocked-since")
    async with gifting_on(tmp_path, wallet, group_commit=group_commit) as (g, _db):
        start = gifting_pb2.StartStreamRequest
        live = (await g.start_stream(start(creator_id="c1", title="t", idempotency_key="s1"))).stream_id
        to_blocked = (await g.start_stream(start(creator_id="blocked-creator", idempotency_key="s2"))).stream_id
        to_refused = (await g.start_stream(start(creator_id="creator-blocked-since", idempotency_key="s3"))).stream_id
        ending = (await g.start_stream(start(creator_id="c2", idempotency_key="s4"))).stream_id
        content = await g.create_content(
            gifting_pb2.CreateContentRequest(creator_id="c1", title="x", price_coins=5, idempotency_key="cc1")
        )
        sent = await g.send_gift(_gift(ending, "v1", "before-end"))
        assert sent.status == gifting_pb2.GIFT_STATUS_SENT
        await g.end_stream(gifting_pb2.EndStreamRequest(stream_id=ending, idempotency_key="e1"))
        before = _counts()

        # SendGift, SendTip and UnlockContent: gifting's own refusals.
        assert await _reason(g.send_gift(_gift(live, "blocked-viewer", "k1"))) == "ACCOUNT_BLOCKED"
        assert await _reason(g.send_gift(_gift(to_blocked, "v1", "k2"))) == "ACCOUNT_BLOCKED"
        assert await _reason(g.send_gift(_gift(live, "c1", "k3"))) == "SELF_GIFT"
        assert await _reason(g.send_gift(_gift(ending, "v1", "k4"))) == "STREAM_NOT_LIVE"
        tip = gifting_pb2.SendTipRequest(stream_id=live, sender_id="young-viewer", coins=5, idempotency_key="k5")
        assert await _reason(g.send_tip(tip)) == "UNDERAGE"
        bad_tip = gifting_pb2.SendTipRequest(stream_id=live, sender_id="v1", coins=0, idempotency_key="k6")
        assert await _reason(g.send_tip(bad_tip)) == "INVALID_TIP_AMOUNT"
        unlock = gifting_pb2.UnlockContentRequest(user_id="c1", content_id=content.content_id, idempotency_key="k7")
        assert await _reason(g.unlock_content(unlock)) == "SELF_GIFT"
        # The wallet's refusal, passed on with the creator named as gifting names it: the wallet counts it.
        assert await _reason(g.send_gift(_gift(to_refused, "v1", "k8"))) == "ACCOUNT_BLOCKED"
        # A retry answered from its key's gift, which today's checks would refuse (the stream
        # ended since): the gift, no refusal.
        assert (await g.send_gift(_gift(ending, "v1", "before-end"))).gift_event_id == sent.gift_event_id

        # SendGifts answers OK with its refused items inside.
        batch = gifting_pb2.SendGiftsRequest(
            gifts=[
                _gift(live, "v1", "b1"),
                _gift(live, "c1", "b2"),
                _gift(live, "v2", "b1"),  # the key of the first item again
                _gift(live, "young-viewer", "b3"),
                _gift(to_refused, "v1", "b4"),  # the wallet's refusal
                _gift(live, "v1", "b5", gift_id="no-such-gift"),
                _gift(ending, "v1", "before-end"),  # answered from its key's gift
            ]
        )
        results = (await g.send_gifts(batch)).results
        reasons = [r.error.reason if r.WhichOneof("outcome") == "error" else "" for r in results]
        assert reasons == ["", "SELF_GIFT", "DUPLICATE_KEY_IN_BATCH", "UNDERAGE", "ACCOUNT_BLOCKED", "UNKNOWN_GIFT", ""]
        assert await _reason(g.send_gifts(gifting_pb2.SendGiftsRequest())) == "INVALID_BATCH_SIZE"

        after = _counts()
        moved = {s: after[s] - before[s] for s in SERIES if after[s] != before[s]}
        assert moved == {
            ("ACCOUNT_BLOCKED", "sender"): 1,
            ("ACCOUNT_BLOCKED", "creator"): 1,  # not 3: the wallet's two are the wallet's
            ("UNDERAGE", "sender"): 2,
            ("SELF_GIFT", "sender"): 3,
            ("STREAM_NOT_LIVE", "sender"): 1,  # not 3: both retries were answered by their gift
            ("INVALID_TIP_AMOUNT", "sender"): 1,
            ("DUPLICATE_KEY_IN_BATCH", "sender"): 1,
            ("UNKNOWN_GIFT", "sender"): 1,
            ("INVALID_BATCH_SIZE", "sender"): 1,
        }


def test_the_counted_reasons_are_every_refusal_step_one_can_give() -> None:
    """A check added to step 1 without its reason in REFUSALS would go uncounted (and one left
    there after its check went would export a series nothing sets): the reasons the step's checks
    name in their source are exactly the counted ones, but for the answers to retry."""
    import inspect
    import re

    from services.common import errors, idempotency
    from services.gifting import domain, usecases

    step_one = [
        errors.require_id,
        errors.require_key,
        idempotency.key_reused,
        domain.check_can_gift,
        domain.gift_cost,
        domain.tip_coins,
        domain.tip_message,
        domain.check_eligible,
        usecases._check_parties,
        Gifting.send_gifts,
        Gifting._begin,
        Gifting._begin_many,
        Gifting._plan_tip,
        Gifting._plan_gift,
        Gifting._plan_unlock,
    ]
    named = {r for f in step_one for r in re.findall(r'"([A-Z][A-Z_]{3,})"', inspect.getsource(f))}
    retry = {"WALLET_UNAVAILABLE", "CONFLICT", "INTERNAL"}  # not refusals: answers to retry, or our bug
    assert named - retry == set(usecases.REFUSALS)
