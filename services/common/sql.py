"""SQL whose text does not change with the size of a batch.

On PostgreSQL (asyncpg) a statement's text is its prepared-statement key: `col IN (...)` renders
one placeholder per value, so every batch size is a new statement for SQLAlchemy to compile and
for PostgreSQL to parse and plan. `= ANY($1)` with one array parameter is one statement for any
size. SQLite prepares statements cheaply and has no arrays: there it stays `IN`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import any_, bindparam, literal
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.elements import ColumnElement


def one_of(dialect: str, column: Any, values: Iterable[Any]) -> ColumnElement[bool]:
    """`column` is one of `values`, as one statement text whatever their number."""
    vals = list(values)
    if dialect == "postgresql":
        return column == any_(literal(vals, ARRAY(column.type)))  # type: ignore[no-any-return]
    return column.in_(vals)  # type: ignore[no-any-return]


def one_of_param(dialect: str, column: Any, name: str) -> ColumnElement[bool]:
    """`one_of` for a statement built once: the values are passed at execution as `{name: [...]}`."""
    if dialect == "postgresql":
        return column == any_(bindparam(name, type_=ARRAY(column.type)))  # type: ignore[no-any-return]
    return column.in_(bindparam(name, expanding=True))  # type: ignore[no-any-return]
