"""The array parameters of `services/common/sql.py` keep a value longer than its column whole.

On PostgreSQL a look-up and a bulk write bind one array per column, cast in the statement text.
Cast to the column's `varchar(n)[]`, a longer value was cut to n characters (an explicit cast
truncates): a look-up answered for the stored value it starts with, and a bulk INSERT stored it
cut where a plain INSERT fails. The arrays are of unbounded text, and the column's btree index
still serves the look-ups. SQLite has no lengths and no arrays: the look-ups run there too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import BigInteger, Column, Index, LargeBinary, MetaData, String, Table, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from services.common.db import normalize_url
from services.common.sql import bulk_insert, bulk_insert_new, bulk_update, one_of, one_of_array, one_of_param

metadata = MetaData()
things = Table(
    "things",
    metadata,
    Column("thing_id", String(8), primary_key=True),
    Column("owner", String(8), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("blob", LargeBinary, nullable=False),
)
Index("ix_things_owner", things.c.owner)

STORED = "abcdefgh"  # as long as the column holds
LONGER = STORED + "X"  # cut to 8 characters, it is STORED


@pytest.fixture
async def engine(empty_database: str) -> AsyncIterator[AsyncEngine]:
    """A database with `things` holding one row, STORED."""
    engine = create_async_engine(normalize_url(empty_database))
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
        await conn.execute(things.insert(), [{"thing_id": STORED, "owner": STORED, "size": 1, "blob": b"x"}])
    try:
        yield engine
    finally:
        await engine.dispose()


def _lookup(dialect: str, helper: str) -> tuple[Any, Any]:
    """`helper`'s look-up of LONGER (a bulk UPDATE's is its join), with its parameters."""
    c = things.c
    if helper == "bulk_update":
        bulk = bulk_update(
            dialect,
            things,
            {"id": c.thing_id.type, "size": c.size.type},
            lambda row: [c.thing_id == row["id"]],
            lambda row: {"size": row["size"]},
        )
        return bulk.stmt, bulk.params([{"id": LONGER, "size": 2}])
    if helper == "one_of":
        return select(c.thing_id).where(one_of(dialect, c.thing_id, [LONGER])), {}
    where = {"one_of_param": one_of_param, "one_of_array": one_of_array}[helper](dialect, c.thing_id, "ids")
    return select(c.thing_id).where(where), {"ids": [LONGER]}


@pytest.mark.parametrize("helper", ["one_of", "one_of_param", "one_of_array", "bulk_update"])
async def test_a_value_longer_than_its_column_matches_none_of_the_stored_ones(engine: AsyncEngine, helper: str) -> None:
    stmt, params = _lookup(engine.dialect.name, helper)
    async with engine.begin() as conn:
        result = await conn.execute(stmt, params)
        if helper != "bulk_update":
            assert result.all() == []
        assert (await conn.execute(select(things.c.size))).scalars().all() == [1]  # and not updated


@pytest.mark.parametrize("helper", ["bulk_insert", "bulk_insert_new"])
@pytest.mark.parametrize("column", ["thing_id", "owner"], ids=["key", "other column"])
async def test_a_bulk_insert_of_a_value_longer_than_its_column_fails_instead_of_storing_it_cut(
    engine: AsyncEngine, helper: str, column: str
) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite does not hold strings to a column's length")
    names = ["thing_id", "owner", "size", "blob"]
    bulk = (
        bulk_insert("postgresql", things, names)
        if helper == "bulk_insert"
        else bulk_insert_new("postgresql", things, names, things.c.thing_id)
    )
    row = {"thing_id": "other", "owner": "other", "size": 2, "blob": b"y"} | {column: "y" * 8 + "Z"}
    with pytest.raises(DBAPIError, match="value too long for type character varying\\(8\\)"):
        async with engine.begin() as conn:
            await conn.execute(bulk.stmt, bulk.params([row]))
    async with engine.begin() as conn:
        assert (await conn.execute(select(things.c.thing_id, things.c.owner))).all() == [(STORED, STORED)]


async def test_a_look_up_of_a_varchar_column_by_an_array_of_text_is_served_by_its_index(engine: AsyncEngine) -> None:
    """`varchar(n) = ANY($1::VARCHAR[])` is varchar's own equality, which its btree index serves (a
    cast of the column to another type would not): for the key, another indexed column, the
    hashed IN of `one_of_array` and the join of a bulk UPDATE."""
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL's plans: SQLite has no arrays")
    c = things.c
    by_owner = bulk_update(
        "postgresql",
        things,
        {"o": c.owner.type, "size": c.size.type},
        lambda r: [c.owner == r["o"]],
        lambda r: {"size": r["size"]},
    )
    cases = [
        (select(c.size).where(one_of_param("postgresql", c.thing_id, "ids")), {"ids": [STORED]}, "things_pkey"),
        (select(c.size).where(one_of_param("postgresql", c.owner, "ids")), {"ids": [STORED]}, "ix_things_owner"),
        (select(c.size).where(one_of_array("postgresql", c.owner, "ids")), {"ids": [STORED]}, "ix_things_owner"),
        (by_owner.stmt, by_owner.params([{"o": STORED, "size": 2}]), "ix_things_owner"),
    ]
    async with engine.begin() as conn:
        # An empty-ish table is cheaper to scan: forbid that, so the plan says whether the index can serve.
        await conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        for stmt, params, index in cases:
            compiled = stmt.compile(engine)
            bound = compiled.construct_params(params)
            args = tuple(bound[name] for name in compiled.positiontup or ())
            assert "VARCHAR[]" in str(compiled), str(compiled)
            plan = " ".join(str(r[0]) for r in (await conn.exec_driver_sql(f"EXPLAIN {compiled}", args)).all())
            assert index in plan, (str(compiled), plan)
