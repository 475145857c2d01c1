"""Deleting the key rows of answered unlocks (KEY_ONLY in gift_events) after the idempotency retention.

An UnlockContent answered by the user's earlier unlock of the content records only its own key
(domain.KEY_ONLY): no coins, no stream, no event, no claim. A user already unlocked who calls
with a fresh key each time writes one such row per call. They are idempotency records kept in
the gifts' key space, and go like the idempotency_keys records: after IDEMPOTENCY_RETENTION_DAYS,
in chunks, every IDEMPOTENCY_PRUNE_INTERVAL_S, paced (services/common/pruning.py).

Why deleting them changes no answer but the key's: nothing reads gift_events but by a status a
KEY_ONLY row never has (the audit's totals, the sweeper, the key restorer, WatchStream, access
checks: SENT, PENDING or CANCELLED), by the event id of a gift or claim (never such a row's: no
caller is given it), or by key (the retry's look-up). The audit's per-id records list the row
with no spend or earning beside it, which is settled whether it is there or not. A retry under
the key after the retention is planned anew, as a retry under the row is (`_restarts`): it is
answered by the user's earlier unlock again (recording the key again), so only a different
request under the key, refused until then, now takes effect, which is the retention's contract.
"""

from __future__ import annotations

from sqlalchemy import text

from services.common.config import ServiceSettings
from services.common.db import Database
from services.common.metrics import KEY_ONLY_ROWS_PRUNED
from services.common.pruning import AgePruner
from services.gifting.storage import KEY_ONLY_ROWS, gift_events


class KeyOnlyPruner(AgePruner):
    """Deletes KEY_ONLY rows older than the idempotency retention, a chunk per transaction, every
    interval, on the partial index ix_gift_events_key_only (its predicate as text, so PostgreSQL
    plans on it); gifts, tips and unlocks, the ledger, are never touched."""

    def __init__(self, db: Database, settings: ServiceSettings) -> None:
        super().__init__(
            db,
            gift_events,
            gift_events.c.created_at_us,
            name="key_only_rows",
            retention_days=settings.idempotency_retention_days,
            interval_s=settings.idempotency_prune_interval_s,
            pause_s=settings.prune_pause_s,
            counter=KEY_ONLY_ROWS_PRUNED,
            done_line="answered unlocks' key rows pruned",
            progress_line="pruning the answered unlocks' key rows",
            only=(text(KEY_ONLY_ROWS),),
        )
