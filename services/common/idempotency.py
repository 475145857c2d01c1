"""Idempotent commands: same key + same request -> the stored answer; different request -> ALREADY_EXISTS.

The record is written in the command's own transaction and rests on the primary key
(scope, key): two racing first calls cannot both commit. The look-up before the work is only a
fast path for retries; correctness comes from the constraint.

A record is kept `IDEMPOTENCY_RETENTION_DAYS` (30 by default): for that long at least, the key
answers as its first call did; the `IdempotencyPruner` then deletes it, and the key is free
again (a new call under it does the work anew, as Stripe's keys do after 24 hours). Nothing
reads a record but a retry under its key. The keys of gifts, tips, unlocks and spends live in
their own tables (gifting's gifts, wallet's spends), the ledger itself, and are never pruned;
but the key rows of unlocks answered by an earlier unlock (gifting's KEY_ONLY rows, no part of
the ledger) go after the same retention (services/gifting/keyrows.py).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message
from sqlalchemy import Table, insert, select
from sqlalchemy.exc import IntegrityError

from services.common.config import ServiceSettings
from services.common.db import Database, UnitOfWork
from services.common.errors import Aborted, AlreadyExists, DomainError, InvalidArgument, require_key
from services.common.metrics import IDEMPOTENCY_PRUNED
from services.common.pruning import AgePruner
from services.common.tables import CommonTables
from services.common.timeutil import now_us

R = TypeVar("R", bound=Message)

log = logging.getLogger(__name__)


def request_hash(request: Message, key_field: str = "idempotency_key", secret: bytes | None = None) -> str:
    """A stable hash of the request without its idempotency key; keyed (HMAC-SHA256) with `secret`.

    A request that holds a secret of its caller (a full bank account, an e-mail address) is
    hashed with a key: a plain hash, kept for good beside everything else the request held,
    would let whoever reads the database try guesses of the missing part until one matches."""
    copy = type(request)()
    copy.CopyFrom(request)
    if key_field in copy.DESCRIPTOR.fields_by_name:
        copy.ClearField(key_field)  # type: ignore[arg-type]
    data = copy.SerializeToString(deterministic=True)
    if secret is not None:
        return hmac.new(secret, data, hashlib.sha256).hexdigest()
    return hashlib.sha256(data).hexdigest()


def key_reused(**metadata: object) -> AlreadyExists:
    """The answer to a key that was used before with a different request (every service's wording)."""
    return AlreadyExists(
        "idempotency key was already used with a different request", "IDEMPOTENCY_KEY_REUSED", **metadata
    )


async def lookup(uow: UnitOfWork, table: Table, scope: str, key: str, digest: str, response_type: type[R]) -> R | None:
    """The stored answer for (scope, key), or None; ALREADY_EXISTS if the request differs."""
    row = (
        await uow.conn.execute(
            select(table.c.request_hash, table.c.response).where(table.c.scope == scope, table.c.key == key)
        )
    ).first()
    if row is None:
        return None
    if row.request_hash != digest:
        raise key_reused(scope=scope)
    return response_type.FromString(row.response)


async def record(uow: UnitOfWork, table: Table, scope: str, key: str, digest: str, response: Message) -> None:
    """Store the answer in the command's transaction (fails on commit race via the primary key)."""
    await uow.conn.execute(
        insert(table).values(
            scope=scope,
            key=key,
            request_hash=digest,
            response=response.SerializeToString(),
            created_at_us=now_us(),
        )
    )


async def stored_answer(
    db: Database,
    table: Table,
    scope: str,
    request: Message,
    response_type: type[R],
    *,
    key_field: str = "idempotency_key",
    secret: bytes | None = None,
) -> R | None:
    """The answer already recorded for this request's key, read before any check outside the database.

    For commands that ask another service first (payout asks the wallet about eligibility): a
    retry of a request that took effect answers as the first call did, even while that service
    is down or its answer has changed since. `run_idempotent` still decides the first call.
    """
    key = require_key(getattr(request, key_field), key_field)
    async with db.unit_of_work(readonly=True) as uow:
        return await lookup(uow, table, scope, key, request_hash(request, key_field, secret), response_type)


@dataclass(frozen=True)
class IdempotentCall(Generic[R]):
    """One call of a command decorated with `answers_retry`: its table, scope, request, answer
    type and hash key, bound once, so its look-ups and its run cannot name another scope."""

    db: Database
    table: Table
    scope: str
    request: Message
    response_type: type[R]
    key_field: str
    secret: bytes | None

    async def run(self, work: Callable[[UnitOfWork], Awaitable[R]]) -> R:
        """`run_idempotent` for this call."""
        return await run_idempotent(
            self.db,
            self.table,
            self.scope,
            self.request,
            self.response_type,
            work,
            key_field=self.key_field,
            secret=self.secret,
        )

    async def stored(self) -> R | None:
        """`stored_answer` for this call."""
        return await stored_answer(
            self.db,
            self.table,
            self.scope,
            self.request,
            self.response_type,
            key_field=self.key_field,
            secret=self.secret,
        )


def answers_retry(
    table: Table,
    scope: str,
    response_type: type[R],
    *,
    key_field: str = "idempotency_key",
    secret: Callable[[Any], bytes | None] | None = None,
) -> Callable[[Callable[..., Awaitable[R]]], Callable[..., Awaitable[R]]]:
    """Decorates a use case `method(self, req, ..., *, idem)` that runs `await idem.run(work)`:
    a request it refuses (any DomainError) gets the answer stored for it, else the refusal.

    The decorator passes `idem`, an IdempotentCall bound to this `table`, `scope`, request,
    `key_field` and `secret(self)` (the key of a keyed hash): the scope is named once, here, so
    the refusal's look-up reads the record the method's run writes (a second scope string inside
    the method, if it differed, would silently turn this answer off).

    A retry of a request that took effect answers as its first call did: one an older release or
    a looser limit accepted (refused InvalidArgument now), and one racing its first call, which
    committed while it ran, so that the retry met that call's own effect (on PostgreSQL a racing
    RequestWithdrawal of all the diamonds found them held: INSUFFICIENT_DIAMONDS; ApproveWithdrawal
    found the withdrawal moved: ABORTED). The key must be well formed and the request the one stored
    under it: a different request under the key, or one under a malformed key, gets the refusal
    as before. Only a refusal reads (`self.db`): an accepted request pays nothing. A refusal from
    anywhere in the method: one from inside the transaction rolled it back, so the look-up finds
    nothing or a concurrent first call's committed answer (the right one for a retry).
    """

    def decorate(method: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
        @functools.wraps(method)
        async def answered(self: Any, req: Message, *args: Any, **kwargs: Any) -> R:
            hash_key = secret(self) if secret is not None else None
            idem = IdempotentCall(self.db, table, scope, req, response_type, key_field, hash_key)
            try:
                return await method(self, req, *args, idem=idem, **kwargs)
            except DomainError as refusal:
                try:
                    stored = await idem.stored()
                except (InvalidArgument, AlreadyExists):  # a malformed key, or a different request under it
                    stored = None
                except Exception as lookup:
                    # The database failing the look-up (pool timeout, lost connection) must not
                    # turn a clear refusal into UNAVAILABLE: the caller gets the refusal.
                    log.debug("idempotency look-up after a refusal failed: %r", lookup)
                    raise refusal from lookup
                if stored is None:
                    raise refusal
                return stored

        return answered

    return decorate


async def run_idempotent(
    db: Database,
    table: Table,
    scope: str,
    request: Message,
    response_type: type[R],
    work: Callable[[UnitOfWork], Awaitable[R]],
    *,
    key_field: str = "idempotency_key",
    secret: bytes | None = None,
) -> R:
    """Run `work` once per key in one transaction with its idempotency record (`secret`: see request_hash)."""
    key = require_key(getattr(request, key_field), key_field)
    digest = request_hash(request, key_field, secret)
    try:
        async with db.unit_of_work() as uow:
            stored = await lookup(uow, table, scope, key, digest, response_type)
            if stored is not None:
                return stored
            response = await work(uow)
            await record(uow, table, scope, key, digest, response)
            await uow.commit()
            return response
    except IntegrityError as exc:
        # A concurrent first call with this key won the race; answer as it did.
        async with db.unit_of_work(readonly=True) as uow:
            stored = await lookup(uow, table, scope, key, digest, response_type)
        if stored is None:
            # Another unique rule lost a race (PostgreSQL; SQLite serializes writers), e.g. two
            # StartStream calls for one creator: a retry sees the winner and answers precisely.
            raise Aborted("a concurrent request conflicted, retry with the same key", "CONFLICT") from exc
        return stored


class IdempotencyPruner(AgePruner):
    """Deletes idempotency records older than the retention, a chunk per transaction, every interval."""

    def __init__(self, db: Database, tables: CommonTables, settings: ServiceSettings) -> None:
        records = tables.idempotency
        super().__init__(
            db,
            records,
            records.c.created_at_us,
            name="idempotency",
            retention_days=settings.idempotency_retention_days,
            interval_s=settings.idempotency_prune_interval_s,
            pause_s=settings.prune_pause_s,
            counter=IDEMPOTENCY_PRUNED,
            done_line="idempotency records pruned",
            progress_line="pruning the idempotency records",
        )
