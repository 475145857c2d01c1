"""The SQL docs/sre.md gives an operator to paste runs on the services' migrated PostgreSQL databases.

The runbooks send an SRE to the databases in an incident ("A withdrawal stuck in PROCESSING", "A
high chargeback rate", a migration's check): a query naming a column a migration renamed fails
in the middle of a page. Every ```sql block and every inline `SELECT ... FROM ...` is run here,
read-only, on the database of the service that has every table it names (PostgreSQL's own
`pg_*` views are in every one).
"""

from __future__ import annotations

import asyncio
import re

import asyncpg
from sqlalchemy.engine import make_url

from services.common.migrate import upgrade_head
from tests.integration import pg
from tests.support.docs import REPO, SRE

SERVICES = ("wallet", "gifting", "payout")


def _statements() -> list[str]:
    blocks = re.findall(r"^```sql\n(.*?)^```", SRE, flags=re.M | re.S)
    inline = [
        " ".join(span.split())
        for span in re.findall(r"`(SELECT [^`]*)`", SRE)
        if " FROM " in " ".join(span.split()) and "..." not in span
    ]
    statements = []
    for text in blocks + inline:
        text = re.sub(r"--[^\n]*", "", text)
        statements += [s.strip() for s in text.split(";") if s.strip()]
    return statements


def _tables(statement: str) -> set[str]:
    # Not `extract(epoch FROM now() ...)` nor `JOIN LATERAL unnest(...)`: a function, no table.
    return set(re.findall(r"\b(?:FROM|JOIN)\s+(?:LATERAL\s+)?(?!LATERAL\b)([a-z_]+)\b(?!\s*\()", statement, flags=re.I))


def test_the_docs_have_the_queries_this_runs() -> None:
    # The parsing above finds the runbooks' queries: not silently none of them.
    statements = _statements()
    assert len(statements) >= 4, statements
    assert any("FROM withdrawals" in s for s in statements), statements
    assert any("FROM purchases" in s for s in statements), statements


async def _run_on(urls: dict[str, str]) -> list[str]:
    conns = {}
    try:
        for svc in SERVICES:
            u = make_url(urls[svc])
            conns[svc] = await asyncpg.connect(
                host=u.host, port=u.port, user=u.username, password=u.password, database=u.database
            )
        tables = {
            svc: {r["tablename"] for r in await c.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
            for svc, c in conns.items()
        }
        problems = []
        for statement in _statements():
            named = _tables(statement)
            # PostgreSQL's own views (pg_stat_activity, pg_locks) are in every database: a query of
            # only those (the lock runbook's) runs on any service's.
            own = {t for t in named if not t.startswith("pg_")}
            owners = [svc for svc in SERVICES if named and own <= tables[svc]]
            if not owners:
                problems.append(f"no service's database has every table of: {statement}")
                continue
            conn = conns[owners[0]]
            tx = conn.transaction(readonly=True)
            await tx.start()
            try:
                await conn.fetch(statement)
            except asyncpg.PostgresError as exc:
                problems.append(f"{owners[0]}: {type(exc).__name__}: {exc}: {statement}")
            finally:
                await tx.rollback()
        return problems
    finally:
        for c in conns.values():
            await c.close()


def test_every_query_of_docs_sre_runs_on_its_services_migrated_postgresql_database() -> None:
    with pg.service_databases("lgdocsql") as urls:

        async def migrate_and_run() -> list[str]:
            for svc in SERVICES:
                await upgrade_head(REPO / "services" / svc / "migrations", urls[svc])
            return await _run_on(urls)

        problems = asyncio.run(migrate_and_run())
    assert not problems, "\n".join(problems)
