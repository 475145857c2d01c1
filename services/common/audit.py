"""AuditService: per-id records for cross-service reconciliation (`livegifts audit --detail`).

Each service names its record kinds and gives a keyset-paged query for each, which also reads
given ids; this servicer only validates and pages.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import Table, select

from livegifts.common.v1 import audit_pb2, audit_pb2_grpc
from services.common.db import Database
from services.common.errors import InvalidArgument, is_text
from services.common.grpcserver import ServiceRegistration

PAGE_SIZE_DEFAULT = 1000
PAGE_SIZE_MAX = 5000

IDS_MAX = 5000  # ids one request may ask for

# (after, size, ids, up_to): a page of records with after < id (<= up_to when set), or, when ids
# is not empty, those records.
Query = Callable[[str, int, list[str], str], Awaitable[list[audit_pb2.AuditRecord]]]


def table_query(
    db: Database,
    table: Table,
    *,
    id_col: str,
    amount_col: str,
    party_col: str,
    status_col: str | None = None,
    status: str = "",
) -> Query:
    """A keyset-paged query over one table: records with id > token (and <= up_to), ordered by
    id; or given ids."""
    t = table.c

    async def query(after: str, size: int, ids: list[str], up_to: str = "") -> list[audit_pb2.AuditRecord]:
        cols = [t[id_col], t[amount_col], t[party_col]] + ([t[status_col]] if status_col else [])
        if ids:
            q = select(*cols).where(t[id_col].in_(ids)).order_by(t[id_col])
        else:
            q = select(*cols).where(t[id_col] > after)
            if up_to:
                q = q.where(t[id_col] <= up_to)
            q = q.order_by(t[id_col]).limit(size)
        async with db.unit_of_work(readonly=True) as uow:
            rows = (await uow.conn.execute(q)).all()
        return [
            audit_pb2.AuditRecord(
                id=r[0], amount=int(r[1] or 0), party=r[2] or "", status=(r[3] if status_col else status) or ""
            )
            for r in rows
        ]

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
        if not all(is_text(i) for i in request.ids):
            raise InvalidArgument("ids must be text without control characters", "INVALID_ID", field="ids")
        records = await query(request.page_token, size, list(request.ids), request.up_to)
        out = audit_pb2.ListAuditRecordsResponse(records=records)
        if not request.ids and len(records) == size:
            out.next_page_token = records[-1].id
        return out


def audit_registration(kinds: dict[str, Query]) -> ServiceRegistration:
    """The AuditService registration a service adds beside its own."""
    return ServiceRegistration(
        audit_pb2_grpc.add_AuditServiceServicer_to_server,
        AuditServicer(kinds),
        audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
    )
