"""Spends in batches: many debits, each with its own key and answer, in one transaction.

Every Spend goes through here: a single Spend is a batch of one (or joins concurrent ones by
group commit), SpendMany is a batch its caller gathered. The work per batch is a fixed number
of statements, whatever its size:

1. claim every key (INSERT ... ON CONFLICT DO NOTHING RETURNING the keys inserted, in key
   order): the keys it returns are this batch's;
2. read the others back (none, unless some are retries): a key recorded before or claimed first
   by a concurrent call gets its stored answer, once that call has finished;
3. lock the coin accounts of every sender in sorted order, then the spend counters of those
   with an account, creating the rows of a new period (PostgreSQL; SQLite serializes writers):
   whoever holds a sender's account is the only one touching its counters, so batches cannot
   deadlock on them;
4. decide each item in request order against running counters and balances, in the order a
   single spend always checked: restrictions of sender and recipient, spending limits, the
   account, enough coins;
5. write the outcome: balances, counters, journal entries and postings (one statement on
   PostgreSQL, `BulkWrites`; one each on SQLite); refused claims are dropped or, with
   `settle_refusals`, recorded CANCELLED (the key may never spend, as CancelSpend would say).

Nothing is shared between items but the transaction: an item that fails fails alone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.exc import DBAPIError

from livegifts.wallet.v1 import wallet_pb2
from services.common import faults
from services.common.db import Database, UnitOfWork, driver_sqlstate, insert_ignore
from services.common.errors import (
    Aborted,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    check,
    id_chars_max,
    require_id,
    require_key,
    require_positive,
)
from services.common.idempotency import key_reused
from services.common.metrics import SPENDS_REFUSED, TRANSACTION_RETRIES
from services.common.outbox import new_event_id
from services.common.sql import (
    Bulk,
    BulkWrites,
    bulk_insert,
    bulk_insert_new,
    bulk_update,
    bulk_writes,
    one_of,
    one_of_param,
)
from services.wallet import domain
from services.wallet.domain import LimitState, Period, SpendReason
from services.wallet.storage import accounts, journal_entries, postings, spend_counters, spending_limits, spends, users

SPENT = "SPENT"
CANCELLED = "CANCELLED"
REFERENCE_ID_MAX = id_chars_max("reference_id")
SPEND_KEY_SCOPE = "Spend"  # the `scope` of IDEMPOTENCY_KEY_REUSED: the key space Spend and SpendMany share
# Iterating an Enum and calling it on a value are slow next to a tuple and a dict look-up, and the
# batch does both per sender and per counter row.
PERIODS = tuple(Period)
PERIOD_OF = {p.value: p for p in Period}
DEADLOCK_RETRIES = 3  # a safety net: the lock order leaves no known deadlock; PostgreSQL aborts one side of any other
_RETRYABLE_SQLSTATES = {"40P01": "deadlock", "40001": "serialization"}  # SQLSTATE -> retry reason
# The refusals a batch decides (livegifts_spends_refused_total) -> the roles each is counted under.
REFUSALS = {
    "INSUFFICIENT_COINS": ("sender",),
    "SPENDING_LIMIT_EXCEEDED": ("sender",),
    "ACCOUNT_BLOCKED": ("sender", "recipient"),
    "UNDERAGE": ("sender", "recipient"),
}

log = logging.getLogger(__name__)
_REASONS = {
    wallet_pb2.SPEND_REASON_GIFT: SpendReason.GIFT,
    wallet_pb2.SPEND_REASON_TIP: SpendReason.TIP,
    wallet_pb2.SPEND_REASON_UNLOCK: SpendReason.UNLOCK,
}

Outcome = wallet_pb2.SpendResponse | DomainError


@dataclass
class _Item:
    """One request of a batch, validated."""

    req: wallet_pb2.SpendRequest
    key: str
    digest: str
    reason: SpendReason
    entry_id: str = field(default_factory=new_event_id)


def spend_digest(req: wallet_pb2.SpendRequest, reason: SpendReason) -> str:
    """What a key stands for: user, amount, reason, reference (the recipient is a check, not the effect).

    JSON, not a joined string: ids may contain any separator we could pick.
    """
    return hashlib.sha256(json.dumps([req.user_id, req.amount, reason.value, req.reference_id]).encode()).hexdigest()


def validate(req: wallet_pb2.SpendRequest, amount_max: int) -> _Item:
    """The checks a spend needs before any read, or INVALID_ARGUMENT."""
    require_id(req.user_id, "user_id")
    require_positive(req.amount, "amount", amount_max)
    key = require_key(req.idempotency_key)
    reason = _REASONS.get(req.reason)
    if reason is None:
        raise InvalidArgument("reason must be GIFT, TIP or UNLOCK", "INVALID_REASON")
    if len(req.reference_id) > REFERENCE_ID_MAX or not req.reference_id.isprintable():
        raise InvalidArgument(
            f"reference_id is at most {REFERENCE_ID_MAX} printable characters", "INVALID_ID", field="reference_id"
        )
    if req.recipient_user_id:
        require_id(req.recipient_user_id, "recipient_user_id")
    return _Item(req, key, spend_digest(req, reason), reason)


def answer_of(row: Any, digest: str) -> Outcome:
    """The answer a recorded key gives to a request with `digest`."""
    if row.status == CANCELLED:
        return Aborted("this spend was cancelled and may never happen", "SPEND_CANCELLED", settled="true")
    if row.request_hash != digest:
        return key_reused(scope=SPEND_KEY_SCOPE)
    return wallet_pb2.SpendResponse(spend_id=row.entry_id, amount=row.amount, balance_after=row.balance_after)


@functools.cache
def recorded_spends(dialect: str) -> Any:
    """The spends rows of the keys passed as `{"keys": [...]}`, each with the balance its spend left.

    The balance is the spend's user posting's `balance_after`: the spend row is claimed before
    the batch is decided, and reading the balance from the posting spares rewriting every
    claimed row once it is known. Rows written before that carry it themselves (coalesce).
    Built once per dialect (one cache key, one prepared statement for any number of keys).
    """
    s, p = spends.c, postings.c
    # A correlated subquery, not a join: one index probe (postings.entry_id) per row found,
    # whatever the planner knows of the tables' sizes (a join was planned as a scan of postings).
    user_leg = (
        select(p.balance_after).where(p.entry_id == s.entry_id, p.balance_after.is_not(None)).limit(1).scalar_subquery()
    )
    return select(
        *(c for c in spends.c if c.name != "balance_after"),
        func.coalesce(s.balance_after, user_leg).label("balance_after"),
    ).where(one_of_param(dialect, s.idempotency_key, "keys"))


@functools.cache
def users_of(dialect: str) -> Any:
    """The users rows of the ids passed as `{"ids": [...]}`, built once per dialect."""
    return select(users).where(one_of_param(dialect, users.c.user_id, "ids"))


def restrictions_of(row: Any) -> domain.Restrictions:
    """A users row as the domain's restrictions."""
    return domain.Restrictions(
        birth_date=dt.date.fromisoformat(row.birth_date) if row.birth_date else None,
        is_minor=row.is_minor,
        blocked=row.blocked,
        region=row.region,
    )


def _retry_reason(exc: DBAPIError) -> str | None:
    """ "deadlock" or "serialization" when the batch may be retried as it is; None otherwise."""
    return _RETRYABLE_SQLSTATES.get(driver_sqlstate(exc.orig))


@dataclass(frozen=True)
class _Statements:
    """The batch's reads and writes, built once: one cache key and one prepared statement whatever the batch size."""

    lock_accounts: Any
    users: Any
    limits: Any
    lock_counters: Any
    claim: Bulk
    writes: BulkWrites  # balances, counters, journal entries, postings: one statement on PostgreSQL

    @classmethod
    def build(cls, dialect: str) -> _Statements:
        a, c = accounts.c, spend_counters.c
        return cls(
            lock_accounts=select(a.account_id, a.balance)
            .where(one_of_param(dialect, a.account_id, "ids"))
            .order_by(a.account_id)
            .with_for_update(),
            users=users_of(dialect),
            limits=select(spending_limits).where(one_of_param(dialect, spending_limits.c.user_id, "ids")),
            lock_counters=select(c.user_id, c.period, c.period_key, c.spent_coins)
            .where(one_of_param(dialect, c.user_id, "ids"), one_of_param(dialect, c.period_key, "keys"))
            .order_by(c.user_id, c.period)
            .with_for_update(),
            claim=bulk_insert_new(
                dialect,
                spends,
                [
                    "idempotency_key",
                    "status",
                    "entry_id",
                    "user_id",
                    "amount",
                    "reason",
                    "reference_id",
                    "request_hash",
                    "created_at_us",
                ],
                spends.c.idempotency_key,
            ),
            writes=bulk_writes(
                dialect,
                bulk_update(
                    dialect,
                    accounts,
                    {"acc": a.account_id.type, "bal": a.balance.type, "ts": a.updated_at_us.type},
                    lambda row: [a.account_id == row["acc"]],
                    lambda row: {"balance": row["bal"], "updated_at_us": row["ts"]},
                    prefix="a_",
                ),
                bulk_update(
                    dialect,
                    spend_counters,
                    {"u": c.user_id.type, "p": c.period.type, "k": c.period_key.type, "v": c.spent_coins.type},
                    lambda row: [c.user_id == row["u"], c.period == row["p"], c.period_key == row["k"]],
                    lambda row: {"spent_coins": row["v"]},
                    prefix="c_",
                ),
                bulk_insert(
                    dialect, journal_entries, ["entry_id", "kind", "reference_id", "created_at_us"], prefix="e_"
                ),
                bulk_insert(
                    dialect,
                    postings,
                    ["entry_id", "account_id", "amount", "balance_after", "created_at_us"],
                    prefix="p_",
                ),
            ),
        )


@dataclass
class SpendBatch:
    """Runs batches of spends against the wallet's database."""

    db: Database
    amount_max: int
    adult_age: int
    region_ages: dict[str, int]
    clock: Callable[[], int]
    _stmts: _Statements = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._stmts = _Statements.build(self.db.dialect)
        for reason in _RETRYABLE_SQLSTATES.values():
            # At 0 from the start: a series that first appears at 1 shows no increase.
            TRANSACTION_RETRIES.labels("wallet_spend", reason)
        for reason, roles in REFUSALS.items():
            for role in roles:
                SPENDS_REFUSED.labels(reason, role)

    async def run(self, reqs: list[wallet_pb2.SpendRequest], *, settle_refusals: bool) -> list[Outcome]:
        """One outcome per request, in order: the spend, or the error this item fails with.

        An error whose key is now cancelled for good (settled here, or before) has `settled`
        in its metadata ("true"): the caller may cancel what it spent for.
        """
        out: list[Outcome | None] = [None] * len(reqs)
        items: list[tuple[int, _Item]] = []
        first_of: dict[str, int] = {}
        repeats: list[tuple[int, int, str]] = []  # (index, index of the key's first item, digest)
        refused: dict[str, int] = {}  # key -> first item under it a check refused (maybe a retry)
        for i, req in enumerate(reqs):
            try:
                it = validate(req, self.amount_max)
            except DomainError as exc:
                out[i] = exc
                if isinstance(exc, InvalidArgument):
                    refused.setdefault(req.idempotency_key, i)
                continue
            if it.key in first_of:
                repeats.append((i, first_of[it.key], it.digest))
                continue
            first_of[it.key] = i
            items.append((i, it))
        recorded: dict[str, Any] = {}  # spends rows of keys recorded before this batch
        if items:
            for attempt in range(DEADLOCK_RETRIES):
                try:
                    decided, recorded = await self._transaction([it for _, it in items], settle_refusals)
                    break
                except DBAPIError as exc:
                    reason = _retry_reason(exc)
                    if reason is None or attempt == DEADLOCK_RETRIES - 1:
                        raise
                    # The lock order leaves no known deadlock: each retry means it has a hole (or a
                    # new statement broke it), which callers never see unless the retries run out.
                    TRANSACTION_RETRIES.labels("wallet_spend", reason).inc()
                    log.warning(
                        "spend batch retried",
                        extra={"reason": reason, "attempt": attempt + 1, "items": len(items), "error": repr(exc)},
                    )
            faults.point("wallet.after_spend_commit_before_answer")
            for (i, _), outcome in zip(items, decided, strict=True):
                out[i] = outcome
                # Only this batch's own checks give these reasons (a recorded key answers SPEND_CANCELLED),
                # each counted once, after its commit (a retried transaction decides again).
                if isinstance(outcome, DomainError) and outcome.reason in REFUSALS:
                    SPENDS_REFUSED.labels(outcome.reason, outcome.metadata.get("role", "sender")).inc()
        digests = {it.key: it.digest for _, it in items}
        for i, j, digest in repeats:
            key = reqs[j].idempotency_key
            if key in recorded:
                # A key recorded before: each item is answered from its record, as a Spend with it
                # would be, whichever request with that key came first in the batch.
                out[i] = answer_of(recorded[key], digest)
            elif digest == digests[key]:
                # The same key twice in one batch: the second is a retry of the first.
                out[i] = out[j]
            else:
                out[i] = key_reused(scope=SPEND_KEY_SCOPE)
        if refused:
            await self._answer_retries(reqs, [i for key, i in refused.items() if key not in first_of], out)
        check(all(o is not None for o in out), "every spend has an outcome")
        return out  # type: ignore[return-value]

    async def _answer_retries(self, reqs: list[wallet_pb2.SpendRequest], indexes: list[int], out: list[Any]) -> None:
        """Spends today's checks refuse that retry one that took effect (an older release, or a higher
        SPEND_AMOUNT_MAX, accepted it): each answered from its record, as a Spend retry is.

        Read only on the refusal path, with the digest the spend was recorded with; a malformed
        key or reason, no record, another request under the key or a cancelled key keep the refusal.
        """
        digests: dict[str, tuple[int, str]] = {}
        for i in indexes:
            reason = _REASONS.get(reqs[i].reason)
            with contextlib.suppress(InvalidArgument):
                if reason is not None:
                    digests[require_key(reqs[i].idempotency_key)] = (i, spend_digest(reqs[i], reason))
        if not digests:
            return
        async with self.db.unit_of_work(readonly=True) as uow:
            rows = (await uow.conn.execute(recorded_spends(self.db.dialect), {"keys": list(digests)})).all()
        for row in rows:
            i, digest = digests[row.idempotency_key]
            answer = answer_of(row, digest)
            if isinstance(answer, wallet_pb2.SpendResponse):
                out[i] = answer

    async def _transaction(self, items: list[_Item], settle: bool) -> tuple[list[Outcome], dict[str, Any]]:
        """Each item's outcome, and the spends rows of the keys recorded before (read back, not claimed)."""
        out: dict[str, Outcome] = {}
        recorded: dict[str, Any] = {}
        async with self.db.unit_of_work() as uow:
            conn = uow.conn
            keys = sorted(it.key for it in items)
            by_key = {it.key: it for it in items}
            # One reading of the clock per batch: the instant its spends are recorded at is the one
            # whose day, week and month count them (two readings could straddle midnight).
            ts = self.clock()
            # Every key is claimed (no read before: a retried key's claim is a no-op). A key is
            # ours when the insert returns it; otherwise it was recorded before, or a concurrent
            # call claimed it first and has finished by now (the insert waited for it): only
            # those are read back.
            claim = self._stmts.claim
            inserted = await conn.execute(
                claim.stmt,
                claim.params(
                    [
                        {
                            "idempotency_key": it.key,
                            "status": SPENT,
                            "entry_id": it.entry_id,
                            "user_id": it.req.user_id,
                            "amount": it.req.amount,
                            "reason": it.reason.value,
                            "reference_id": it.req.reference_id,
                            "request_hash": it.digest,
                            "created_at_us": ts,
                        }
                        for it in (by_key[k] for k in keys)  # in key order: concurrent batches lock alike
                    ]
                ),
            )
            claimed = set(inserted.scalars())
            others = [k for k in keys if k not in claimed]
            if others:
                for r in await conn.execute(recorded_spends(self.db.dialect), {"keys": others}):
                    recorded[r.idempotency_key] = r
                    out[r.idempotency_key] = answer_of(r, by_key[r.idempotency_key].digest)
            for it in items:
                if it.key not in claimed:
                    # Claimed by a concurrent call that then dropped it (a refusal): retry.
                    out.setdefault(it.key, Aborted("the spend is being settled concurrently, retry", "CONFLICT"))
            mine = [it for it in items if it.key in claimed]  # request order
            if mine:
                out |= await self._decide_and_write(uow, mine, settle, ts)
            await uow.commit()
        return [out[it.key] for it in items], recorded

    async def _decide_and_write(self, uow: UnitOfWork, items: list[_Item], settle: bool, ts: int) -> dict[str, Outcome]:
        conn = uow.conn
        now = ts  # the batch's one instant (`_transaction`)
        periods = domain.period_keys(now)
        senders = sorted({it.req.user_id for it in items})
        parties = sorted(set(senders) | {it.req.recipient_user_id for it in items if it.req.recipient_user_id})
        acc_ids = [domain.user_account(u) for u in senders]
        balances = {
            r.account_id: int(r.balance) for r in await conn.execute(self._stmts.lock_accounts, {"ids": acc_ids})
        }
        # The accounts first: a sender's counter rows are then only ever locked, created or dropped
        # by the one batch that holds its account, so no batch can wait for another on them. Locked
        # first, a sender's counters could not be: their rows of a new period do not exist yet, so
        # the batch that locked the existing rows of some senders then had to create those of
        # others (lower ids among them) and waited for a batch creating the same rows, which in
        # turn waited for the rows it held: a deadlock on the first spends of a period.
        # A sender without an account (never credited) has 0 coins: refused INSUFFICIENT_COINS,
        # never counted a coin; its counters are 0, read from no row.
        counted = [u for u in senders if domain.user_account(u) in balances]
        counters = dict.fromkeys(((u, p) for u in senders for p in PERIODS), 0)
        counters |= await self._lock_counters(uow, counted, periods, domain.stale_period_keys(now))
        restrictions = {r.user_id: restrictions_of(r) for r in await conn.execute(self._stmts.users, {"ids": parties})}
        states: dict[str, list[tuple[Period, LimitState]]] = {}
        for r in await conn.execute(self._stmts.limits, {"ids": senders}):
            states.setdefault(r.user_id, []).append(
                (PERIOD_OF[r.period], LimitState(r.limit_coins, r.pending_limit_coins, r.pending_at_us))
            )
        caps = {
            u: {p: domain.effective_limit([st for q, st in states.get(u, []) if q is p], now) for p in PERIODS}
            for u in senders
        }
        tightest_caps = {u: domain.tightest_cap(caps[u]) for u in senders}  # per sender, not per item
        today = domain.utc_date(now)
        out: dict[str, Outcome] = {}
        done: list[tuple[_Item, int]] = []
        for it in items:
            user, amount = it.req.user_id, it.req.amount
            acc = domain.user_account(user)
            try:
                self._check_sender(restrictions.get(user), today, named=bool(it.req.recipient_user_id))
                if it.req.recipient_user_id:
                    self._check_recipient(restrictions.get(it.req.recipient_user_id), today)
                tightest = tightest_caps[user]
                if tightest is not None and amount > tightest[1]:
                    period, cap = tightest  # this spend alone passes it: no reset time helps
                    raise domain.spend_exceeds_limit(period, cap, counters[(user, period)])
                for period in PERIODS:
                    cap = caps[user][period]
                    if cap is not None and counters[(user, period)] + amount > cap:
                        # The count so far includes this batch's earlier items in the period.
                        resets_at_us = domain.period_resets_at_us(period, now)
                        raise domain.spending_limit_exceeded(period, cap, counters[(user, period)], resets_at_us)
                # A user never credited has no account row: 0 coins, refused as any user short of coins.
                balance = balances.get(acc, 0)
                if balance < amount:
                    raise FailedPrecondition("not enough coins", "INSUFFICIENT_COINS", balance=balance, required=amount)
            except DomainError as exc:
                out[it.key] = exc
                continue
            balances[acc] -= amount
            for period in PERIODS:
                counters[(user, period)] += amount
            done.append((it, balances[acc]))
            out[it.key] = wallet_pb2.SpendResponse(spend_id=it.entry_id, amount=amount, balance_after=balances[acc])
        refused = [it.key for it in items if isinstance(out[it.key], DomainError)]
        if refused:
            s = spends.c
            if settle:
                for k in refused:
                    out[k].metadata["settled"] = "true"  # type: ignore[union-attr]
                await conn.execute(
                    update(spends)
                    .where(one_of(self.db.dialect, s.idempotency_key, refused))
                    .values(status=CANCELLED, entry_id=None, balance_after=None)
                )
            else:
                await conn.execute(delete(spends).where(one_of(self.db.dialect, s.idempotency_key, refused)))
        if done:
            await self._write(uow, done, balances, counters, periods, ts)
        return out

    def _check_sender(self, r: domain.Restrictions | None, today: dt.date, *, named: bool) -> None:
        """The sender may buy and spend; `named` adds role=sender when a recipient is checked too."""
        try:
            domain.check_may_transact(r, self.adult_age, self.region_ages, today)
        except FailedPrecondition as exc:
            if named:
                exc.metadata["role"] = "sender"
            raise

    def _check_recipient(self, r: domain.Restrictions | None, today: dt.date) -> None:
        try:
            domain.check_may_transact(r, self.adult_age, self.region_ages, today)
        except FailedPrecondition as exc:
            text = (
                "the recipient's account is blocked"
                if exc.reason == "ACCOUNT_BLOCKED"
                else "the recipient is under age"
            )
            raise FailedPrecondition(text, exc.reason, role="recipient") from None

    async def _lock_counters(
        self, uow: UnitOfWork, senders: list[str], periods: dict[Period, str], stale: dict[Period, str]
    ) -> dict[tuple[str, Period], int]:
        """Each sender's counter of the current day, week and month, locked; created on first use.

        The caller holds the senders' accounts locked: no other batch creates or locks these rows meanwhile.
        """
        c = spend_counters.c
        current = list(periods.values())

        async def read(who: list[str]) -> dict[tuple[str, Period], int]:
            rows = await uow.conn.execute(self._stmts.lock_counters, {"ids": who, "keys": current})
            return {
                (r.user_id, p): int(r.spent_coins) for r in rows if periods[p := PERIOD_OF[r.period]] == r.period_key
            }

        if not senders:
            return {}
        counters = await read(senders)
        missing = [(u, p) for u in senders for p in PERIODS if (u, p) not in counters]
        if missing:
            # First spend of a period: rows of periods before the previous one are never read
            # again, so drop them. Not the previous one's: a replica whose clock runs a little
            # behind still spends in it (domain.stale_period_keys), nor any newer one.
            await uow.conn.execute(
                delete(spend_counters).where(
                    one_of(self.db.dialect, c.user_id, sorted({u for u, _ in missing})),
                    or_(*(and_(c.period == p.value, c.period_key < stale[p]) for p in PERIODS)),
                )
            )
            await uow.conn.execute(
                insert_ignore(self.db.dialect, spend_counters),
                [{"user_id": u, "period": p.value, "period_key": periods[p], "spent_coins": 0} for u, p in missing],
            )
            counters |= await read(sorted({u for u, _ in missing}))
        check(all((u, p) in counters for u in senders for p in PERIODS), "every sender has its period counters")
        return counters

    async def _write(
        self,
        uow: UnitOfWork,
        done: list[tuple[_Item, int]],
        balances: dict[str, int],
        counters: dict[tuple[str, Period], int],
        periods: dict[Period, str],
        ts: int,
    ) -> None:
        conn = uow.conn
        users_done = sorted({it.req.user_id for it, _ in done})
        balance_rows = [
            {"acc": domain.user_account(u), "bal": balances[domain.user_account(u)], "ts": ts} for u in users_done
        ]
        counter_rows = [
            {"u": u, "p": p.value, "k": periods[p], "v": counters[(u, p)]} for u in users_done for p in PERIODS
        ]
        entries, legs = [], []
        for it, after in done:
            postings_ = domain.spend_postings(it.req.user_id, it.req.amount, it.reason)
            check(domain.balanced(postings_), f"unbalanced spend entry {it.key}")
            entries.append(
                {
                    "entry_id": it.entry_id,
                    "kind": f"SPEND_{it.reason.value}",
                    "reference_id": it.req.reference_id or it.key,
                    "created_at_us": ts,
                }
            )
            for leg in postings_:
                user_leg = leg.account_id.startswith("user:")
                legs.append(
                    {
                        "entry_id": it.entry_id,
                        "account_id": leg.account_id,
                        "amount": leg.amount,
                        "balance_after": after if user_leg else None,
                        "created_at_us": ts,
                    }
                )
        await self._stmts.writes.execute(conn, [balance_rows, counter_rows, entries, legs])
        # The claimed spends rows are not rewritten: their balance is the user posting's (recorded_spends).
