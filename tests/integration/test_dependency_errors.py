"""A database that refuses us answers UNAVAILABLE (retry), never INTERNAL (our bug).

After a rotated password or a role removed by mistake, every call fails until it is fixed;
callers and alerts must see a dependency outage, as for a server that is down.
"""

from __future__ import annotations

import grpc
from sqlalchemy import text
from sqlalchemy.engine import make_url

from services.common.db import Database
from services.common.grpcserver import ErrorInterceptor
from tests.integration import pg


async def test_a_role_postgresql_refuses_is_a_dependency_outage_not_an_internal_error() -> None:
    admin = pg.admin_url_or_skip()
    url = make_url(admin).set(username="livegifts_no_such_role", password=None).render_as_string(hide_password=False)
    db = Database(url, pool_size=1, pool_timeout_s=5, application_name="refused")
    try:
        async with db.unit_of_work(readonly=True) as uow:
            await uow.conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - the error is what is tested
        refused = exc
    else:
        raise AssertionError("PostgreSQL accepted a role that does not exist")
    finally:
        await db.dispose()
    status = ErrorInterceptor("livegifts.test")._status_of(refused)
    assert status.code == grpc.StatusCode.UNAVAILABLE
    assert "DEPENDENCY_UNAVAILABLE" in str(status.trailing_metadata)
