"""GetStatement reads the year it is asked for (and what was credited after it), not a creator's
every earning of the years before: those are millions for a creator with a year of big streams,
and each statement read them all (the index of the creator's credits, then every row) to sum the
units credited before the year. Measured on PostgreSQL with EXPLAIN ANALYZE of the statement's
own reads of `earnings`, as executed.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from sqlalchemy import event, text

from tests.support.payout import payout_on

CREATOR = "creator-big"
BEFORE = 20_000  # earnings credited in 2025, a diamond each at 50%


def _at(year: int, month: int = 1, day: int = 1) -> int:
    return int(dt.datetime(year, month, day, tzinfo=dt.UTC).timestamp()) * 1_000_000


def _rows_read(plan: dict[str, Any]) -> int:
    """Rows the plan's scans of `earnings` read: returned, or thrown away by a filter or a recheck."""
    node = plan
    read = 0
    if node.get("Relation Name") == "earnings":
        loops = node.get("Actual Loops", 1)
        read += int(node.get("Actual Rows", 0) * loops)
        read += int(node.get("Rows Removed by Filter", 0)) + int(node.get("Rows Removed by Index Recheck", 0))
    for child in node.get("Plans", []):
        read += _rows_read(child)
    return read


async def test_a_statement_reads_its_year_not_the_creators_earnings_of_the_years_before(
    empty_database: str,
) -> None:
    async with payout_on(empty_database) as (payout, _provider):
        async with payout.db.unit_of_work() as uow:
            year_2025 = _at(2025)
            await uow.conn.execute(
                text(
                    "INSERT INTO earnings (event_id, creator_id, kind, sender_id, stream_id, coins, share_bp, units,"
                    " occurred_at_us, recorded_at_us, credited_at_us, coins_clawed_back)"
                    " WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < :n)"
                    " SELECT 'e' || i, :creator, 'GIFT', 'viewer', 's', 2, 5000, 10000,"
                    " CAST(:t AS BIGINT) + i, CAST(:t AS BIGINT) + i, CAST(:t AS BIGINT) + i, 0 FROM g"
                ),
                {"n": BEFORE, "creator": CREATOR, "t": year_2025},
            )
            await uow.conn.execute(
                text(
                    "INSERT INTO creators (creator_id, coins_received, earned_units, diamonds_credited,"
                    " diamonds_available, diamonds_held, diamonds_withdrawn, diamonds_clawed_back, updated_at_us)"
                    " VALUES (:creator, :coins, :units, :n, :n, 0, 0, 0, :t)"
                ),
                {"creator": CREATOR, "coins": 2 * BEFORE, "units": 10_000 * BEFORE, "n": BEFORE, "t": _at(2026)},
            )
            await uow.commit()
        postgres = payout.db.engine.dialect.name == "postgresql"
        if postgres:
            async with payout.db.engine.connect() as conn:
                await conn.exec_driver_sql("ANALYZE earnings")
        executed: list[tuple[str, Any]] = []

        def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
            if "FROM earnings" in statement:
                executed.append((statement, parameters))

        event.listen(payout.db.engine.sync_engine, "before_cursor_execute", record)
        try:
            statement = await payout.get_statement(CREATOR, 2026)
        finally:
            event.remove(payout.db.engine.sync_engine, "before_cursor_execute", record)
        # The books still open 2026 with the diamonds of 2025, and nothing moved since.
        assert statement.months[0].opening_diamonds == BEFORE
        assert statement.months[11].closing_diamonds == BEFORE
        assert executed
        if not postgres:
            return  # the rows read are measured on PostgreSQL; SQLite checks the answer above
        read = 0
        async with payout.db.engine.connect() as conn:
            for sql, params in executed:
                explained = (await conn.exec_driver_sql(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", params)).scalar_one()
                plan = explained if isinstance(explained, list) else json.loads(explained)
                read += _rows_read(plan[0]["Plan"])
        assert read < 100, f"the statement read {read} earnings rows to answer a year with none"
