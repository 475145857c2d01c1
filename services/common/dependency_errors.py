"""Errors from below the domain (the database, the broker, the network), classified.

Whether an error means a dependency is down (`is_unavailable`), whether the same call may succeed
later (`is_retryable`), which storage refusal it is (`storage_refusal`) and its kind for a
throttled log line (`error_kind`). Apart from the gRPC server (grpcserver.py maps them to status
codes), since the consumers and background loops read them too.
"""

from __future__ import annotations

import grpc
from sqlalchemy import exc as sa_exc

from services.common.db import READ_ONLY_SQLSTATE, driver_sqlstate
from services.common.errors import DomainError, status_for

# Errors from below the domain that mean "a dependency is down, retry": never a wrong answer.
# Reporting them as UNAVAILABLE is safe because every command is idempotent by its key: if the
# transaction did commit after all, the retry returns the stored answer.
_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.InternalError,  # e.g. asyncpg's client state after its connection was killed
    sa_exc.TimeoutError,  # connection pool exhausted
    ConnectionError,
    OSError,
    TimeoutError,
)
# Errors that are our bugs, not outages: they stay INTERNAL.
_BUG_ERRORS: tuple[type[BaseException], ...] = (
    sa_exc.IntegrityError,
    sa_exc.DataError,
    sa_exc.ProgrammingError,
    sa_exc.NotSupportedError,
)


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says a dependency (the database, the broker) is down or refuses the service."""
    if isinstance(exc, _BUG_ERRORS):
        return False
    if isinstance(exc, _UNAVAILABLE_ERRORS):
        return True
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    # A bare DBAPIError from a connection the server closed (pg_terminate_backend, failover) or
    # would not open for the database's state (db.py marks those: 55000, 3D000), or
    # one PostgreSQL refused: the connection classes of SQLSTATE (08), a rotated or wrong role or
    # password (28), too many connections (53), a server shutting down or starting (57P), a
    # write on a read-only server (25006: after a failover, a pooled connection to the old
    # primary, now a standby; db.py drops that connection, so the retry goes to the new one).
    return bool(exc.connection_invalidated) or sqlstate(exc).startswith(_UNAVAILABLE_SQLSTATES)


_UNAVAILABLE_SQLSTATES = ("08", "28", "53", "57P", READ_ONLY_SQLSTATE)


def sqlstate(exc: BaseException) -> str:
    return driver_sqlstate(getattr(exc, "orig", None))


def _sqlite_error(exc: BaseException) -> str:
    """SQLite's name for the error (`SQLITE_FULL`, `SQLITE_READONLY_DBMOVED`...), or ""."""
    return str(getattr(getattr(exc, "orig", None), "sqlite_errorname", None) or "")


# The database's own storage refusing writes, told apart from a database that is down: the
# caller's answer (still UNAVAILABLE: the same call succeeds once an operator makes room) and the
# log name it, since a full disk needs someone to act and an outage of a moment does not.
STORAGE_FULL = "STORAGE_FULL"  # SQLite's SQLITE_FULL (disk or file size limit), PostgreSQL's 53100 disk_full
# SQLite's SQLITE_READONLY* (the file or its folder is read-only), PostgreSQL's 25006 (a standby:
# the connection reached the old primary after a failover, or the database was made read-only)
STORAGE_READ_ONLY = "STORAGE_READ_ONLY"


def storage_refusal(exc: BaseException) -> str | None:
    """STORAGE_FULL or STORAGE_READ_ONLY when `exc` is the database's storage refusing a write, else None."""
    name = _sqlite_error(exc)
    if name == "SQLITE_FULL" or sqlstate(exc) == "53100":
        return STORAGE_FULL
    if name.startswith("SQLITE_READONLY") or sqlstate(exc) == READ_ONLY_SQLSTATE:
        return STORAGE_READ_ONLY
    return None


def error_kind(exc: BaseException) -> str:
    """An error's class, with the database's own code when it has one (for the log; what a
    throttled failure line is keyed by: a few values, never the error's text).

    SQLAlchemy's pool timeout is a class named TimeoutError too, like the statement timeout's
    (DB_STATEMENT_TIMEOUT_S): the log says which, since they call for different looks (every
    pooled connection busy for DB_POOL_TIMEOUT_S, or one statement unanswered)."""
    if isinstance(exc, sa_exc.TimeoutError):
        return "TimeoutError (connection pool)"
    code = _sqlite_error(exc) or sqlstate(exc)
    return f"{type(exc).__name__} ({code})" if code else type(exc).__name__


def is_serialization_failure(exc: BaseException) -> bool:
    """Whether `exc` is PostgreSQL's serialization failure or deadlock: a conflict, retried whole."""
    return sqlstate(exc) in ("40001", "40P01")


_RETRYABLE_CODES = (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE)


def is_retryable(exc: BaseException) -> bool:
    """Whether the error mapping answers `exc` ABORTED or UNAVAILABLE: a conflict or a dependency
    that was down (a serialization failure, a deadlock, a dropped connection, or a domain error of
    those codes), not the request, so the same call may succeed later."""
    if isinstance(exc, DomainError):
        return status_for(exc) in _RETRYABLE_CODES
    return (isinstance(exc, sa_exc.DBAPIError) and is_serialization_failure(exc)) or is_unavailable(exc)
