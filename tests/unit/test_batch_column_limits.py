"""Every value a group-committed gift batch writes fits its column, by the checks made before the batch.

The bulk helpers bind one array per column of unbounded text on PostgreSQL (`sql._array_of`): a
value longer than its `String(n)` column is no longer cut but fails the INSERT, and with it the
whole batch, every caller's gift, tip or unlock in it (`MicroBatcher` shares the transaction). So
each limit a request is checked against must stay within the column it is written to; widening a
limit (or narrowing a column) without the other now fails here instead of failing other users'
gifts on PostgreSQL only (SQLite holds strings to no length).
"""

from __future__ import annotations

import annotated_types
import pytest
from sqlalchemy import Column

from services.common.errors import ID_MAX, IDEMPOTENCY_KEY_MAX
from services.common.outbox import new_event_id
from services.gifting import domain as gifting_domain
from services.gifting.config import GiftingSettings
from services.gifting.storage import common, content_unlocks, gift_events
from services.wallet import domain as wallet_domain
from services.wallet.spending import REFERENCE_ID_MAX
from services.wallet.storage import journal_entries, postings, spend_counters, spends

SHA256_HEX = 64  # request hashes (`_fields_digest`, `spend_digest`)


def _setting_max(name: str) -> int:
    """The largest value GiftingSettings accepts for `name` (its `le`)."""
    return next(m.le for m in GiftingSettings.model_fields[name].metadata if isinstance(m, annotated_types.Le))


def _longest(*values: str) -> int:
    return max(len(v) for v in values)


# (column, the longest value the gift path can write to it: a checked limit or a derived value)
WRITES: dict[str, tuple[Column[str], int]] = {
    # gifting, step 1 (PENDING rows, unlock claims) and step 3 (the SENT flip, its outbox events)
    "gift event id": (gift_events.c.event_id, len(new_event_id())),
    "gift idempotency key": (gift_events.c.idempotency_key, IDEMPOTENCY_KEY_MAX),
    "gift client key": (gift_events.c.client_key, IDEMPOTENCY_KEY_MAX),
    "gift request hash": (gift_events.c.request_hash, SHA256_HEX),
    "gift kind": (gift_events.c.kind, _longest(*gifting_domain.GiftKind)),
    "gift status": (gift_events.c.status, _longest(*gifting_domain.GiftStatus, gifting_domain.KEY_ONLY)),
    "gift sender": (gift_events.c.sender_id, ID_MAX),
    "gift catalog id": (gift_events.c.gift_id, gifting_domain.GIFT_ID_MAX),
    "tip message": (gift_events.c.message, _setting_max("tip_message_chars_max")),
    "unlock user": (content_unlocks.c.user_id, ID_MAX),
    "outbox event id": (common.outbox.c.event_id, len(new_event_id())),
    # wallet.SpendMany, the same batch's spends
    "spend key": (spends.c.idempotency_key, IDEMPOTENCY_KEY_MAX),
    "spend user": (spends.c.user_id, ID_MAX),
    "spend reason": (spends.c.reason, _longest(*wallet_domain.SpendReason)),
    "spend reference": (spends.c.reference_id, REFERENCE_ID_MAX),
    "spend request hash": (spends.c.request_hash, SHA256_HEX),
    "journal kind": (journal_entries.c.kind, len("SPEND_") + _longest(*wallet_domain.SpendReason)),
    "journal reference": (journal_entries.c.reference_id, max(REFERENCE_ID_MAX, IDEMPOTENCY_KEY_MAX)),
    "posting account": (
        postings.c.account_id,
        _longest(
            wallet_domain.user_account("u" * ID_MAX),
            *(wallet_domain.spent_account(r) for r in wallet_domain.SpendReason),
        ),
    ),
    "spend counter period key": (spend_counters.c.period_key, len("2026-12-31")),
}


@pytest.mark.parametrize("written", WRITES.values(), ids=WRITES.keys())
def test_the_longest_value_a_gift_batch_writes_fits_its_column(written: tuple[Column[str], int]) -> None:
    column, longest = written
    assert longest <= column.type.length, (  # type: ignore[attr-defined]
        f"{column.table.name}.{column.name} is String({column.type.length}) but the gift path may write "  # type: ignore[attr-defined]
        f"{longest} characters: one such request would fail its whole group-committed batch on PostgreSQL"
    )
