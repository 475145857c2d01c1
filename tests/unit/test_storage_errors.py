"""PostgreSQL's disk_full answers like SQLite's full file: UNAVAILABLE / STORAGE_FULL (the SQLite
cases run against a real file in tests/integration/test_storage_full.py); its other refusals of
class 53 stay a dependency outage."""

from __future__ import annotations

import grpc
import pytest
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
