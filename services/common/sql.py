"""SQL whose text does not change with the size of a batch.

On PostgreSQL (asyncpg) a statement's text is its prepared-statement key: `col IN (...)` renders
one placeholder per value, so every batch size is a new statement for SQLAlchemy to compile and
for PostgreSQL to parse and plan. `= ANY($1)` with one array parameter is one statement for any
size. SQLite prepares statements cheaply and has no arrays: there it stays `IN`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    CHAR,
    JSON,
    Enum,
    Index,
    String,
    Table,
    and_,
    any_,
    bindparam,
    column,
    func,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.elements import ColumnElement

from services.common.errors import check


def _array_of(element: Any) -> ARRAY[Any]:
    """An array of `element`'s values, of unbounded text if `element` is a `String(n)`.

    The array's type is its parameter's cast (`$1::VARCHAR(64)[]`), and an explicit cast to
    `varchar(n)` cuts a longer value to n characters (SQL standard) where an INSERT of it would
    fail: a look-up for a 65-character id would answer for the stored one it starts with, and a
    bulk INSERT would store it cut. Of unbounded text, the value stays whole: it matches nothing
    (`varchar(n) = varchar` is the column's own operator, so its btree index still serves), and
    an INSERT or UPDATE of it fails "value too long" on the column's assignment cast. CHAR and
    Enum keep their type: a bare CHAR is char(1), an Enum has no length to cut.
    """
    if isinstance(element, String) and element.length is not None and not isinstance(element, (CHAR, Enum)):
        return ARRAY(String())
    return ARRAY(element)


def by_code_point(dialect: str, column: Any) -> Any:
    """`column` compared and sorted by code point, as Python compares str, whatever the database's
    collation: PostgreSQL's may be a language's (en_US, ICU 'und' put "a1" before "B1"), and then a
    range of ids a client cut by code point is not the range the server reads. SQLite compares
    text BINARY, the UTF-8 bytes, which is code point order: the column as it is (its own index
    serves). On PostgreSQL `code_point_index` serves it: the column's own index, in the
    database's collation, does not."""
    return column.collate("C") if dialect == "postgresql" else column


CODE_POINT_INDEXES: set[str] = set()  # the names `code_point_index` declared


def code_point_index(name: str, column: Any) -> Index:
    """The index `by_code_point(column)` ranges and sorts are read by on PostgreSQL (`COLLATE "C"`);
    none on SQLite, whose primary key index already is one. Its migration:
    `migrate.create_code_point_index`. Alembic's comparison cannot tell it: PostgreSQL reflects it
    as an index of the column (the collation left out), SQLite has none."""
    CODE_POINT_INDEXES.add(name)
    return Index(name, column.collate("C")).ddl_if(dialect="postgresql")


def after_key(time_col: Any, id_col: Any, after: tuple[Any, Any]) -> ColumnElement[bool]:
    """The rows after `after` in (time_col, id_col) order: a keyset page's or a cursor's
    predicate. The plain `time_col >= ` bound beside the OR is what an index on time_col (or on
    columns equal-bound, then time_col) seeks its range from: neither PostgreSQL nor SQLite derives
    it from the OR, which only filters the rows of `after`'s own time."""
    at_time, at_id = after
    return and_(time_col >= at_time, or_(time_col > at_time, id_col > at_id))


def one_of(dialect: str, column: Any, values: Iterable[Any]) -> ColumnElement[bool]:
    """`column` is one of `values`, as one statement text whatever their number."""
    vals = list(values)
    if dialect == "postgresql":
        return column == any_(literal(vals, _array_of(column.type)))  # type: ignore[no-any-return]
    return column.in_(vals)  # type: ignore[no-any-return]


def one_of_param(dialect: str, column: Any, name: str) -> ColumnElement[bool]:
    """`one_of` for a statement built once: the values are passed at execution as `{name: [...]}`."""
    if dialect == "postgresql":
        return column == any_(bindparam(name, type_=_array_of(column.type)))  # type: ignore[no-any-return]
    return column.in_(bindparam(name, expanding=True))  # type: ignore[no-any-return]


def one_of_array(dialect: str, column: Any, name: str) -> ColumnElement[bool]:
    """`one_of_param` with the values as one bound parameter on SQLite too (a JSON array read by
    `json_each`): any number of them, where the expanding IN binds one parameter per value and
    SQLite takes at most 32,766 in a statement.

    Either side, the values are read once into a hash (PostgreSQL's hashed SubPlan, SQLite's
    list subquery), negated too: `NOT (col = ANY(:array))` is `col <> ALL(:array)`, which the
    generic plan PostgreSQL's plan cache picks after five executions compares each row with
    each value (the relay's read past 10,000 held rows took 0.2-0.4 s, holding its claim)."""
    if dialect == "postgresql":
        values = select(func.unnest(bindparam(name, type_=_array_of(column.type))))
        return column.in_(values)  # type: ignore[no-any-return]
    values = func.json_each(bindparam(name, type_=JSON)).table_valued("value")
    return column.in_(select(values.c.value))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Bulk:
    """A statement for many rows: one execution on PostgreSQL (arrays, unnest), executemany on SQLite.

    Run it as `await conn.execute(bulk.stmt, bulk.params(rows))` with rows as dicts by name.
    With executemany PostgreSQL binds, plans (the services plan each statement for its
    parameters) and executes the statement once per row; with one array per column it does so
    once per batch, and SQLAlchemy processes one parameter set instead of one per row.
    """

    stmt: Any
    names: tuple[str, ...]
    arrays: bool
    prefix: str = "b_"  # of its parameters' names: statements run together (BulkWrites) need their own

    def params(self, rows: list[dict[str, Any]]) -> dict[str, list[Any]] | list[dict[str, Any]]:
        """The rows as this dialect's parameters."""
        p = self.prefix
        if self.arrays:
            return {f"{p}{n}": [r[n] for r in rows] for n in self.names}
        return [{f"{p}{n}": r[n] for n in self.names} for r in rows]


@dataclass(frozen=True)
class BulkWrites:
    """Bulk writes without RETURNING that run together: one statement on PostgreSQL, one each elsewhere.

    On PostgreSQL all but the last become data-modifying CTEs of the last (`WITH w0 AS (INSERT
    ...), w1 AS (UPDATE ...) INSERT ...`): one round trip, one parse and plan, instead of one
    per write. They run on one snapshot and in no defined order, so they must not depend on
    each other's effects (write different tables, or different rows). Each part needs its own
    parameter prefix. SQLite has no data-modifying CTEs: there they run one after the other.
    """

    parts: tuple[Bulk, ...]
    together: Any | None  # the PostgreSQL statement

    async def execute(self, conn: Any, rows: list[list[dict[str, Any]]]) -> None:
        """Write `rows[i]` with `parts[i]`, in the connection's transaction (parts with no rows write nothing)."""
        if self.together is not None:
            params: dict[str, Any] = {}
            for part, part_rows in zip(self.parts, rows, strict=True):
                params |= part.params(part_rows)  # type: ignore[arg-type]
            await conn.execute(self.together, params)
            return
        for part, part_rows in zip(self.parts, rows, strict=True):
            if part_rows:
                await conn.execute(part.stmt, part.params(part_rows))


def bulk_writes(dialect: str, *parts: Bulk) -> BulkWrites:
    """`BulkWrites` of `parts` (built with distinct prefixes)."""
    check(len({p.prefix for p in parts}) == len(parts), "each part of a BulkWrites has its own parameter prefix")
    if dialect != "postgresql":
        return BulkWrites(parts, None)
    *first, last = parts
    together = last.stmt.add_cte(*(p.stmt.cte(f"w{i}") for i, p in enumerate(first)))
    return BulkWrites(parts, together)


def _rows_source(dialect: str, types: dict[str, Any], prefix: str = "b_") -> tuple[Any | None, dict[str, Any]]:
    """Each row's value by name: a column of unnest(one array per name) on PostgreSQL, else a bind parameter."""
    if dialect == "postgresql":
        rows = (
            func.unnest(*(bindparam(f"{prefix}{n}", type_=_array_of(t)) for n, t in types.items()))
            .table_valued(*(column(n, t) for n, t in types.items()))
            .render_derived()
        )
        return rows, {n: rows.c[n] for n in types}
    return None, {n: bindparam(f"{prefix}{n}", type_=t) for n, t in types.items()}


def dialect_insert(dialect: str, table: Table) -> Any:
    """The dialect's own INSERT (PostgreSQL's or SQLite's), which has ON CONFLICT clauses."""
    if dialect == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def bulk_insert(
    dialect: str,
    table: Table,
    names: Iterable[str],
    on_conflict: Callable[[Any], Any] | None = None,
    prefix: str = "b_",
) -> Bulk:
    """INSERT of many rows into `names` of `table`; `on_conflict` adds an ON CONFLICT clause."""
    cols = list(names)
    rows, src = _rows_source(dialect, {n: table.c[n].type for n in cols}, prefix)
    stmt = dialect_insert(dialect, table)
    stmt = stmt.from_select(cols, select(*src.values())) if rows is not None else stmt.values(src)
    return Bulk(on_conflict(stmt) if on_conflict else stmt, tuple(cols), rows is not None, prefix)


def bulk_insert_new(dialect: str, table: Table, names: Iterable[str], returning: Any) -> Bulk:
    """INSERT of many rows that skips each row a unique key already holds, RETURNING `returning` of
    the rows it inserted: which of a batch's keys are new, in the statement that records them.

    A row a concurrent transaction is inserting is waited for, then skipped (or inserted, if that
    transaction rolled back): no unique violation, no read before the insert.
    """
    return bulk_insert(
        dialect, table, names, on_conflict=lambda stmt: stmt.on_conflict_do_nothing().returning(returning)
    )


def bulk_update(
    dialect: str,
    table: Table,
    types: dict[str, Any],
    where: Callable[[dict[str, Any]], list[Any]],
    values: Callable[[dict[str, Any]], dict[str, Any]],
    prefix: str = "b_",
) -> Bulk:
    """UPDATE of many rows, each matched and set from its own values (`types` names them).

    `where` and `values` receive each row's values by name (unnest columns or bind parameters).
    On PostgreSQL this is `UPDATE ... FROM unnest(...)`: the keys of one batch must be distinct.
    """
    rows, src = _rows_source(dialect, types, prefix)
    stmt = update(table).where(*where(src)).values(values(src))
    return Bulk(stmt, tuple(types), rows is not None, prefix)
