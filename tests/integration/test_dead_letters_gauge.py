"""livegifts_dead_letters_parked says how many events wait in dead_letters, by consumer
(SQLite and PostgreSQL).

dead_letters has no retention, and the alert on livegifts_dead_letters_total clears an hour after
the last event was parked: without this gauge a pile of parked events was visible only by listing
the table.
"""

from __future__ import annotations

from prometheus_client import REGISTRY
from sqlalchemy import delete, insert

from services.common.db import Database
from services.common.deadletters import ParkedGauge
from services.gifting.storage import common


def _parked(consumer: str) -> float | None:
    return REGISTRY.get_sample_value("livegifts_dead_letters_parked", {"consumer": consumer})


async def _park(db: Database, consumer: str, n: int, event_id: str | None = "e") -> None:
    async with db.unit_of_work() as uow:
        await uow.conn.execute(
            insert(common.dead_letters),
            [
                {
                    "consumer": consumer,
                    "subject": "s",
                    "event_id": None if event_id is None else f"{event_id}{i}",
                    "payload": b"",
                    "error": "x",
                    "received_at_us": 0,
                }
                for i in range(n)
            ],
        )
        await uow.commit()


async def test_the_gauge_counts_the_parked_rows_by_consumer_and_falls_back_to_zero(gifting_db: Database) -> None:
    gauge = ParkedGauge(gifting_db, common, ["gauge-a", "gauge-b"])
    await _park(gifting_db, "gauge-a", 3)
    await _park(gifting_db, "gauge-a", 1, event_id=None)  # a payload that could not be decoded
    await _park(gifting_db, "gauge-gone", 2)  # a consumer the service no longer runs
    await gauge.count_once()  # from the (consumer, event_id) index: its NULL event ids count too
    assert (_parked("gauge-a"), _parked("gauge-b"), _parked("gauge-gone")) == (4, 0, 2)
    # Replayed or deleted by an operator: the gauge follows at the next count.
    async with gifting_db.unit_of_work() as uow:
        await uow.conn.execute(delete(common.dead_letters))
        await uow.commit()
    await gauge.count_once()
    assert (_parked("gauge-a"), _parked("gauge-b"), _parked("gauge-gone")) == (0, 0, 0)
