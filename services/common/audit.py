"""AuditService: per-id records for cross-service reconciliation (`livegifts audit --detail`).

Each service names its record kinds and gives a keyset-paged query for each, which also reads
given ids, or the records of a recent window by their own time column; this servicer only
validates and pages.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import ColumnElement, Select, Table, literal_column, select, tuple_
from sqlalchemy.sql.expression import UnaryExpression
from sqlalchemy.sql.operators import custom_op

from livegifts.common.v1 import audit_pb2, audit_pb2_grpc
from services.common.db import Database
from services.common.errors import InvalidArgument, is_text
from services.common.grpcserver import ServiceRegistration
from services.common.sql import by_code_point, one_of_param

PAGE_SIZE_DEFAULT = 1000
PAGE_SIZE_MAX = 5000

IDS_MAX = 5000  # ids one request may ask for

# (after, size, ids, up_to, since_us, after_id): a page of records with after < id (<= up_to when
# set); when ids is not empty, those records; when since_us > 0, a page of the records whose time
# is at or after it, in (time, id) order after the key `after` (see `window_key`), with
# after_id < id <= up_to (each bound when set). With each page the key of its last record: the
# next page starts after it.
Page = tuple[list[audit_pb2.AuditRecord], str]
Query = Callable[[str, int, list[str], str, int, str], Awaitable[Page]]


def window_key(time_us: int, record_id: str) -> str:
    """A window page's key: where the next page starts, (time, id) of the last record read."""
    return f"{time_us}/{record_id}"


def parse_window_key(key: str) -> tuple[int, str] | None:
    """(time, id) of a window page's key; None for a key `window_key` did not make."""
    time_part, sep, record_id = key.partition("/")
    # ASCII only: str.isdigit() also takes other scripts' digits, some of which int() refuses.
    if not sep or not (time_part.isascii() and time_part.isdigit()) or len(time_part) > 18:
        return None
    return int(time_part), record_id


def window_select(
    cols: list[ColumnElement[Any]],
    time_col: ColumnElement[Any],
    id_col: ColumnElement[Any],
    since_us: int,
    after: str,
    size: int,
    ids: tuple[str, str] = ("", ""),
    dialect: str = "sqlite",
) -> Select[Any]:
    """A page of a window: rows with time_col >= since_us after the key `after` (none: from the
    start), in (time_col, id_col) order, which an index on (time_col, id_col) reads as one range;
    with `ids` (after_id, up_to), only rows with after_id < id <= up_to (each when set).

    The id bounds compare by code point, as the CLI's chunks do: SQLite's BINARY does, PostgreSQL
    takes COLLATE "C" (its database collation may sort "B" after "a"). Neither may use an index of
    the id, which a planner can take for a two-sided id range (PostgreSQL did on an empty table,
    SQLite with the bounds' values in the text): that reads the range of the whole table and
    sorts it, for every page. On PostgreSQL `id || ''` is no index's expression (the primary
    key's is in the database's collation, the full read's `code_point_index` is of the id itself);
    on SQLite a unary + keeps the term off every index. So the bounds filter the window's range of
    the (time, id) index."""
    q = select(*cols).where(time_col >= since_us)
    start = parse_window_key(after) if after else None
    if start is not None:
        q = q.where(tuple_(time_col, id_col) > tuple_(*start))
    by_code_point = (
        id_col.concat(literal_column("''")).self_group().collate("C")
        if dialect == "postgresql"
        else UnaryExpression(id_col, operator=custom_op("+"), type_=id_col.type)
    )
    after_id, up_to = ids
    if after_id:
        q = q.where(by_code_point > after_id)
    if up_to:
        q = q.where(by_code_point <= up_to)
    return q.order_by(time_col, id_col).limit(size)


def full_select(
    cols: list[ColumnElement[Any]], id_col: ColumnElement[Any], after: str, up_to: str, size: int, dialect: str
) -> Select[Any]:
    """A page of the full read: rows with after < id (<= up_to when set), in id order, by code
    point whatever the database's collation (`sql.by_code_point`), as the CLI cuts its ranges:
    in a collation that sorts "a1" before "B1", a range's bound let ids fall between two ranges,
    never judged (or judged twice). On PostgreSQL the table's `sql.code_point_index` reads it."""
    key = by_code_point(dialect, id_col)
    q = select(*cols).where(key > after)
    if up_to:
        q = q.where(key <= up_to)
    return q.order_by(key).limit(size)


def table_query(
    db: Database,
    table: Table,
    *,
    id_col: str,
    amount_col: str,
    party_col: str,
    time_col: str,
    status_col: str | None = None,
    status: str = "",
) -> Query:
    """A keyset-paged query over one table: records with id > token (and <= up_to), ordered by
    id; or given ids; or the records with time_col >= since (and after_id < id <= up_to), ordered
    by (time_col, id), which the table's index on (time_col, id_col) reads a page at a time.
    Ids are ordered and bounded by code point (`full_select`, `window_select`), as the CLI's are."""
    t = table.c
    # Up to IDS_MAX ids as one array parameter on PostgreSQL (`= ANY`), not an expanding IN that
    # binds and renders one parameter per id (bench/README.md, the windowed audit's by-id reads).
    # An id longer than the column is none of them: the array is of unbounded text (sql.py `_array_of`).
    by_ids = one_of_param(db.dialect, t[id_col], "ids")

    async def query(
        after: str, size: int, ids: list[str], up_to: str = "", since_us: int = 0, after_id: str = ""
    ) -> Page:
        cols = [t[id_col], t[amount_col], t[party_col], t[time_col]] + ([t[status_col]] if status_col else [])
        params: dict[str, Any] = {}
        if ids:
            q = select(*cols).where(by_ids).order_by(by_code_point(db.dialect, t[id_col]))
            params = {"ids": ids}
        elif since_us > 0:
            q = window_select(cols, t[time_col], t[id_col], since_us, after, size, (after_id, up_to), db.dialect)
        else:
            q = full_select(cols, t[id_col], after, up_to, size, db.dialect)
        async with db.unit_of_work(readonly=True) as uow:
            rows = (await uow.conn.execute(q, params)).all()
        records = [
            audit_pb2.AuditRecord(
                id=r[0], amount=int(r[1] or 0), party=r[2] or "", status=(r[4] if status_col else status) or ""
            )
            for r in rows
        ]
        last = "" if not rows else window_key(int(rows[-1][3]), rows[-1][0]) if since_us > 0 else rows[-1][0]
        return records, last

    return query


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    """Pages through the record kinds a service declares."""

    def __init__(self, kinds: dict[str, Query]) -> None:
        self.kinds = kinds

    async def ListAuditRecords(self, request: audit_pb2.ListAuditRecordsRequest, context: Any) -> Any:
        """One page of records of a kind, or the records of the ids asked for."""
        query = self.kinds.get(request.kind)
        if query is None:
            raise InvalidArgument(f"kind must be one of {sorted(self.kinds)}", "UNKNOWN_RECORD_KIND")
        size = request.page_size or PAGE_SIZE_DEFAULT
        if not 1 <= size <= PAGE_SIZE_MAX:
            raise InvalidArgument(f"page_size must be 1..{PAGE_SIZE_MAX}", "INVALID_PAGE_SIZE")
        if len(request.ids) > IDS_MAX:
            raise InvalidArgument(f"at most {IDS_MAX} ids", "TOO_MANY_IDS")
        # Ids are compared with stored ones: text PostgreSQL cannot hold (a NUL) failed in the
        # driver, as INTERNAL, instead of naming the argument.
        if not is_text(request.page_token):
            raise InvalidArgument("page_token is not valid", "INVALID_PAGE_TOKEN")
        if not is_text(request.up_to):
            raise InvalidArgument("up_to must be text without control characters", "INVALID_ID", field="up_to")
        if not is_text(request.after_id):
            raise InvalidArgument("after_id must be text without control characters", "INVALID_ID", field="after_id")
        if not all(is_text(i) for i in request.ids):
            raise InvalidArgument("ids must be text without control characters", "INVALID_ID", field="ids")
        since = request.since_us > 0 and not request.ids
        if request.since_us < 0:
            raise InvalidArgument("since_us must not be negative", "INVALID_SINCE", field="since_us")
        if since and request.page_token and parse_window_key(request.page_token) is None:
            raise InvalidArgument("page_token is not valid", "INVALID_PAGE_TOKEN")
        # An empty range is a caller's bug (the CLI's chunks never are), named rather than answered
        # with no records. Compared as the bounds are, by code point.
        if since and request.after_id and request.up_to and request.after_id >= request.up_to:
            raise InvalidArgument("after_id must be below up_to", "INVALID_ID_RANGE", field="after_id")
        records, last = await query(
            request.page_token,
            size,
            list(request.ids),
            request.up_to,
            request.since_us if since else 0,
            request.after_id if since else "",
        )
        out = audit_pb2.ListAuditRecordsResponse(records=records, since_applied=since)
        if not request.ids and len(records) == size:
            out.next_page_token = last
        return out


def audit_registration(kinds: dict[str, Query]) -> ServiceRegistration:
    """The AuditService registration a service adds beside its own."""
    return ServiceRegistration(
        audit_pb2_grpc.add_AuditServiceServicer_to_server,
        AuditServicer(kinds),
        audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
    )
