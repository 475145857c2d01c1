"""PostgreSQL's disk_full answers like SQLite's full file: UNAVAILABLE / STORAGE_FULL (the SQLite
cases run against a real file in tests/integration/test_storage_full.py); its other refusals of
class 53 stay a dependency outage."""

from __future__ import annotations

import logging

import grpc
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy.exc import OperationalError

from services.common.grpcserver import ErrorInterceptor


class _PgError(Exception):
    """What asyncpg raises: the SQLSTATE in `sqlstate`."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"SQLSTATE {sqlstate}")
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("sqlstate", "reason"),
    [("53100", "STORAGE_FULL"), ("53300", "DEPENDENCY_UNAVAILABLE"), ("08006", "DEPENDENCY_UNAVAILABLE")],
)
def test_postgresqls_disk_full_is_storage_full_and_its_other_outages_stay_a_dependency_outage(
    sqlstate: str, reason: str
) -> None:
    status = ErrorInterceptor("livegifts.test")._status_of(OperationalError("INSERT ...", {}, _PgError(sqlstate)))
    assert status.code == grpc.StatusCode.UNAVAILABLE
    assert reason.encode() in dict(status.trailing_metadata)["grpc-status-details-bin"]


def test_a_pool_timeout_and_a_statement_timeout_are_logged_apart(caplog: pytest.LogCaptureFixture) -> None:
    # Both classes are named TimeoutError: the on-call drill's log could not tell "every pooled
    # connection busy for DB_POOL_TIMEOUT_S" from "a statement unanswered for DB_STATEMENT_TIMEOUT_S".
    pool = sa_exc.TimeoutError("QueuePool limit of size 10 overflow 0 reached, connection timed out, timeout 10.00")
    with caplog.at_level(logging.WARNING, logger="services.common.grpcserver"):
        for exc in (pool, TimeoutError()):
            status = ErrorInterceptor("livegifts.test")._status_of(exc)
            assert status.code == grpc.StatusCode.UNAVAILABLE
    errors = [r.error for r in caplog.records if r.getMessage() == "dependency unavailable"]  # type: ignore[attr-defined]
    assert errors == ["TimeoutError (connection pool)", "TimeoutError"]
