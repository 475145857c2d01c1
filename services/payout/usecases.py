"""Payout use cases: diamonds credited from gift events in batches, policy, payout methods,
withdrawals with provider callbacks, clawbacks of reversed purchases, statements, audit."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import functools
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
from sqlalchemy import Select, and_, bindparam, case, func, insert, not_, or_, select, text, update
from sqlalchemy.exc import IntegrityError

from livegifts.common.v1 import common_pb2
from livegifts.gifting.v1 import events_pb2 as gifting_events
from livegifts.payout.v1 import events_pb2, payout_pb2
from livegifts.wallet.v1 import events_pb2 as wallet_events
from livegifts.wallet.v1 import wallet_pb2
from services.common import faults, late_lookups, provider_calls, signing
from services.common.db import Database, UnitOfWork, insert_ignore
from services.common.dependency_errors import is_unavailable
from services.common.errors import (
    INT64_MAX,
    Aborted,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    check,
    is_text,
    require_id,
    require_positive,
)
from services.common.idempotency import IdempotentCall, answers_retry
from services.common.loops import FAILURE_LOG_INTERVAL_S, BatchCursor, ItemFailures, run_every
from services.common.metrics import (
    CLAWBACK_SHORTFALL_OLDEST,
    CLAWBACK_SHORTFALL_OPEN,
    CLAWBACK_SHORTFALL_SETTLED,
    PAYOUT_CALLBACKS_REFUSED,
    PROVIDER_OUTCOMES_REPEATED,
    WITHDRAWALS_HELD,
    WITHDRAWALS_PROCESSING,
    WITHDRAWALS_PROCESSING_OLDEST,
    WITHDRAWALS_RECONCILED,
    WITHDRAWALS_WAITING,
    WITHDRAWALS_WAITING_OLDEST,
)
from services.common.outbox import Outbox, new_event_id
from services.common.provider_calls import ProviderRefused
from services.common.sql import Bulk, after_key, bulk_insert, bulk_update, one_of, one_of_array, one_of_param
from services.common.telemetry import background_span
from services.common.throttle import KeyedLogThrottle
from services.common.timeutil import now_us, to_timestamp
from services.payout import domain
from services.payout.config import PayoutSettings
from services.payout.domain import BP_DENOMINATOR, OPEN_STATUSES, CurrencyTerms, Earning, WithdrawalStatus
from services.payout.providers import PayoutEvent, PayoutProvider, Submission
from services.payout.storage import (
    OPEN_SHORTFALLS,
    clawback_shortfalls,
    clawbacks,
    common,
    creators,
    daily_withdrawals,
    earnings,
    payout_events,
    payout_methods,
    policies,
    withdrawals,
)

log = logging.getLogger(__name__)

# The calls payout makes to the payout provider (provider_calls), each one's failures counted.
PROVIDER_CALLS = ("tokenize", "submit", "status")
# What came of a late withdrawal's look-up at the provider (`reconcile_once`): its outcome
# applied (paid, failed), or not.
RECONCILE_OUTCOMES = (
    "paid",
    "failed",
    "duplicate",
    "settled_meanwhile",
    "still_processing",
    "provider_error",
    "refused",
    "error",
)

# Exported at 0 from the start, so that increase() sees the first refusal, hold or look-up in a
# pod's life.
for _reason in domain.CALLBACK_REFUSALS:
    PAYOUT_CALLBACKS_REFUSED.labels(reason=_reason)
for _reason in domain.HOLD_REASONS:
    WITHDRAWALS_HELD.labels(reason=_reason)
for _outcome in RECONCILE_OUTCOMES:
    WITHDRAWALS_RECONCILED.labels(outcome=_outcome)
for _status in (WithdrawalStatus.PAID, WithdrawalStatus.FAILED):  # the provider's outcomes
    PROVIDER_OUTCOMES_REPEATED.labels(outcome=_status.value)
_REFUSED_LINE = {
    "WITHDRAWAL_NOT_SUBMITTED": "payout callback refused: the withdrawal was never submitted to the provider",
    "INVALID_WITHDRAWAL_TRANSITION": "payout callback refused: the withdrawal already has another outcome",
}

_KIND = {
    gifting_events.GIFT_KIND_GIFT: "GIFT",
    gifting_events.GIFT_KIND_TIP: "TIP",
    gifting_events.GIFT_KIND_UNLOCK: "UNLOCK",
}
PAGE_SIZE_DEFAULT = 50
SHORTFALL_BATCH = 100  # open clawback shortfalls looked at per settler round
# The dispatcher's and the clawback settler's `loop` in livegifts_background_item_failures_total.
DISPATCH_LOOP = "dispatcher"
SETTLE_LOOP = "clawback_settler"
DISPATCH_START = (-1, "")  # before every withdrawal in the dispatcher's (requested_at_us, withdrawal_id) order
PAGE_SIZE_MAX = 500
METHODS_PAGE_SIZE_DEFAULT = 100  # ListPayoutMethods: the 100 methods its one answer held before pages
DIAMONDS_MAX = 10**12
_METHOD_KIND = {payout_pb2.PAYOUT_METHOD_KIND_PAYPAL: "PAYPAL", payout_pb2.PAYOUT_METHOD_KIND_BANK: "BANK"}
_METHOD_KIND_PB = {v: k for k, v in _METHOD_KIND.items()}
_VERIFICATION_PB = {
    "PENDING": payout_pb2.VERIFICATION_STATUS_PENDING,
    "VERIFIED": payout_pb2.VERIFICATION_STATUS_VERIFIED,
    "FAILED": payout_pb2.VERIFICATION_STATUS_FAILED,
}
_STATUS_PB = {s: payout_pb2.WithdrawalStatus.Value(f"WITHDRAWAL_STATUS_{s.value}") for s in WithdrawalStatus}
_STATUS_BY_PB = {v: k for k, v in _STATUS_PB.items()}
# Not yet with the provider (livegifts_withdrawals_waiting); PROCESSING has gauges of its own.
_WAITING_STATUSES = (WithdrawalStatus.PENDING_REVIEW.value, WithdrawalStatus.APPROVED.value)
_SUBJECT = {
    WithdrawalStatus.PAID: "payout.withdrawal.paid",
    WithdrawalStatus.FAILED: "payout.withdrawal.failed",
    WithdrawalStatus.REJECTED: "payout.withdrawal.failed",
}


@dataclass(frozen=True)
class _Reversal:
    """A purchase reversal as the clawback needs it: whose, which purchase, and when."""

    event_id: str
    purchase_id: str
    sender_id: str
    kind: str
    at_us: int


@dataclass
class _Claw:
    """What one clawback entry took from a sender's earnings, per creator: [coins, units]. The
    creators' rows are written once per transaction, by `Payout._apply_claws`."""

    rv: _Reversal
    entry_id: str
    by_creator: dict[str, list[int]]


# The first key of the PostgreSQL advisory locks that serialize the clawbacks of one sender (the
# second is `_advisory_lock_key` of the sender). Two int4 keys: a space apart from the migrations'
# one-bigint lock.
SENDER_LOCK_CLASS = 7301164


def _advisory_lock_key(id_: str) -> int:
    """The second key of an advisory lock on `id_` (a sender's, a creator's, a withdrawal's; the
    first is its class): int4, the same in every replica (not Python's salted hash)."""
    return int.from_bytes(hashlib.sha256(id_.encode()).digest()[:4], "big", signed=True)


# The first key of the advisory lock that serializes one creator's AddPayoutMethod calls (the
# second is `_advisory_lock_key` of the creator): a class of its own, apart from the senders'.
METHODS_LOCK_CLASS = 7301165
# The first key of the advisory lock a dispatcher holds while it hands one withdrawal to the
# provider (the second is `_advisory_lock_key` of the withdrawal id): `Payout._submitting`.
SUBMIT_LOCK_CLASS = 7301166


@dataclass(frozen=True)
class PolicyRow:
    """The policy in force, decoded."""

    version: int
    creator_share_bp: int
    fee_bp: int
    terms: list[CurrencyTerms]
    changed_by: str
    changed_at_us: int

    def terms_for(self, currency_code: str) -> CurrencyTerms:
        """The terms of one payout currency, or FAILED_PRECONDITION."""
        for t in self.terms:
            if t.currency_code == currency_code:
                return t
        raise FailedPrecondition(f"payouts in {currency_code} are not offered", "CURRENCY_NOT_SUPPORTED")


def _page_size(size: int, default: int) -> int:
    """The rows of a page: 1..PAGE_SIZE_MAX, or `default` for 0 (page_size unset), as the wallet's
    ListTransactions; anything else is INVALID_PAGE_SIZE."""
    size = size or default
    if not 1 <= size <= PAGE_SIZE_MAX:
        raise InvalidArgument(f"page_size must be 1..{PAGE_SIZE_MAX}", "INVALID_PAGE_SIZE")
    return size


def _encode_token(ts_us: int, key: str, scope: str = "") -> str:
    """A page token: "<micros>:<id>", after "<scope>/" for a list that has one."""
    prefix = f"{scope}/" if scope else ""
    return base64.urlsafe_b64encode(f"{prefix}{ts_us}:{key}".encode()).decode()


def _token_scope(*filters: object) -> str:
    """What binds a page token to the filters of the list that made it: a short digest of them.

    Not a secret: a caller who forges one only pages their own query from another place."""
    return hashlib.sha256("\x00".join(map(str, filters)).encode()).hexdigest()[:16]


def _decode_token(token: str, scope: str = "") -> tuple[int, str]:
    """The (instant, id) of a token `_encode_token` made with this scope; INVALID_PAGE_TOKEN for
    anything else, so a token of one list is never read as a place in another.

    A token is the caller's to send back, so it may be forged: an instant outside the bigint
    column, or an id PostgreSQL cannot compare (a NUL), failed in the driver as INTERNAL. A scoped
    token has a "/" before its instant, so a list without a scope refuses it (int() fails) as
    it did before scopes, and one with a scope refuses a token without its own. Only the exact
    text `_encode_token` gives: int() alone also takes " 5", "+5", "5_0", "05" and other
    scripts' digits, and the base64 decoder skips characters not of its alphabet, tokens never
    given (the wallet's ListTransactions and the audit's windows refuse theirs too)."""
    try:
        body = base64.urlsafe_b64decode(token.encode()).decode()
        if scope:
            head, slash, body = body.partition("/")
            if not slash or head != scope:
                raise ValueError("another list's token")
        ts, _, key = body.partition(":")
        ts_us = int(ts)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("page_token is not valid", "INVALID_PAGE_TOKEN") from None
    if not 0 <= ts_us <= INT64_MAX or not is_text(key) or _encode_token(ts_us, key, scope) != token:
        raise InvalidArgument("page_token is not valid", "INVALID_PAGE_TOKEN")
    return ts_us, key


def _keyset_select(
    table: Any,
    owner: Any,
    ts_col: Any,
    id_col: Any,
    after: tuple[int, str] | None,
    limit: int,
    *,
    oldest_first: bool,
    joined: tuple[Any, tuple[Any, ...]] | None = None,
) -> Any:
    """The rows of `table` where owner matches, after (instant, id) `after` in (ts_col, id_col)
    order, newest first (or oldest first), at most `limit`; with `joined` (a join of `table`,
    columns of it), each row with those columns too, in the same one query."""
    q = select(table).where(owner) if joined is None else select(table, *joined[1]).select_from(joined[0]).where(owner)
    if after is not None:
        ts, key = after
        # The plain bound beside the OR is what the index range starts from: neither PostgreSQL
        # nor SQLite derives it from the OR, so without it every page read the owner's (the
        # status's, across creators: every PAID withdrawal) rows before the token, and dropped them.
        if oldest_first:
            q = q.where(after_key(ts_col, id_col, (ts, key)))
        else:
            q = q.where(ts_col <= ts, or_(ts_col < ts, and_(ts_col == ts, id_col < key)))
    order = (ts_col, id_col) if oldest_first else (ts_col.desc(), id_col.desc())
    return q.order_by(*order).limit(limit)


def _withdrawals_where(creator_id: str, status: WithdrawalStatus | None) -> Any:
    """ListWithdrawals' filter: one creator's, or every creator's (then with a status)."""
    w = withdrawals.c
    where = [w.creator_id == creator_id] if creator_id else []
    if status is not None:
        where.append(w.status == status.value)
    check(bool(where), "a creator or a status")
    return and_(*where)


async def _keyset_page(
    db: Database,
    table: Any,
    owner: Any,
    ts_col: Any,
    id_col: Any,
    page_token: str,
    page_size: int,
    *,
    oldest_first: bool = False,
    default_size: int = PAGE_SIZE_DEFAULT,
    scope: str = "",
    joined: tuple[Any, tuple[Any, ...]] | None = None,
) -> tuple[list[Any], str]:
    """One keyset page of `table` rows where owner matches, newest first (or oldest first); returns
    (rows, next token). `default_size` is the page of a request without page_size; `scope`
    (`_token_scope`) binds the tokens to the list's filters; `joined` as `_keyset_select`'s."""
    size = _page_size(page_size, default_size)
    after = _decode_token(page_token, scope) if page_token else None
    q = _keyset_select(table, owner, ts_col, id_col, after, size + 1, oldest_first=oldest_first, joined=joined)
    async with db.unit_of_work(readonly=True) as uow:
        rows = (await uow.conn.execute(q)).all()
    token = (
        _encode_token(getattr(rows[size - 1], ts_col.key), getattr(rows[size - 1], id_col.key), scope)
        if len(rows) > size
        else ""
    )
    return rows[:size], token


def _money(currency_code: str, amount_minor: int) -> common_pb2.Money:
    return common_pb2.Money(currency_code=currency_code, amount_minor=amount_minor)


VERIFIED = "VERIFIED"  # the one verification a withdrawal may be paid to


def _method_not_verified() -> FailedPrecondition:
    return FailedPrecondition("the payout method is not verified", "PAYOUT_METHOD_NOT_VERIFIED")


# Why an APPROVED withdrawal waits instead of going to the provider: the facts the dispatcher
# decides by, written once. It claims none whose creator's balance is negative (a clawback) or
# whose payout method is not VERIFIED (`dispatch_once` selects by them, `_claim` reads them again
# under lock), nor one of a creator the wallet's word holds (`_eligible_for_payout`, its reason
# kept in creators.wallet_hold); `_HOLD` names the first that holds, in that order, for
# Withdrawal.hold (GetWithdrawal, ListWithdrawals: `_WITH_HOLD`, one query with the withdrawals).
_BALANCE_HOLDS = creators.c.diamonds_available < 0
_METHOD_HOLDS = payout_methods.c.verification != VERIFIED
_HOLD = case(
    (_BALANCE_HOLDS, "BALANCE_NEGATIVE"),
    (_METHOD_HOLDS, "PAYOUT_METHOD_NOT_VERIFIED"),
    else_=func.coalesce(creators.c.wallet_hold, ""),
).label("hold")
# Outer joins: a withdrawal is listed whatever its creator's or method's row holds.
_WITH_HOLD = (
    withdrawals.outerjoin(creators, creators.c.creator_id == withdrawals.c.creator_id).outerjoin(
        payout_methods, payout_methods.c.method_id == withdrawals.c.method_id
    ),
    (_HOLD,),
)
_HOLD_PB = {
    reason: payout_pb2.WithdrawalHold.Value(f"WITHDRAWAL_HOLD_{reason}")
    for reason in ("BALANCE_NEGATIVE", "PAYOUT_METHOD_NOT_VERIFIED", *domain.HOLD_REASONS)
}

# When gifting recorded an earning's gift, what a purchase reversal's time is compared with; an
# event from before the field (recorded_at_us NULL) falls back to when the gift was sent.
_EARNING_RECORDED_AT = func.coalesce(earnings.c.recorded_at_us, earnings.c.occurred_at_us)


async def _method_verified(uow: UnitOfWork, method_id: str, *, lock: bool = False) -> bool:
    """Whether the payout method is VERIFIED now (not `_METHOD_HOLDS`); with `lock`, its row held
    until commit (PostgreSQL `FOR SHARE`), so a verification failing it waits for this transaction."""
    q = select(_METHOD_HOLDS).where(payout_methods.c.method_id == method_id)
    holds = (await uow.conn.execute(q.with_for_update(read=True) if lock else q)).scalar_one()
    return not holds


# What reviewed_by and changed_by hold that names no person: an automatic approval, the policy
# the first migration wrote, none yet. Any other value is an operator's x-operator header.
_NOT_A_PERSON = frozenset({"", "auto", "migration"})
# What a caller without the operator token reads in place of an operator's name.
OPERATOR_SHOWN = "operator"


def _reviewer(name: str, operator_view: bool) -> str:
    """An operator's name as a caller may read it: the name for a call made with the operator
    token, "operator" for anyone else (a creator reading their withdrawals, the payout provider's
    callback answer, a client reading the policy). The name (often an e-mail or a person's
    login) is staff's personal data; a creator learned who rejected their payout. The row and the
    log keep it for the audit trail."""
    return name if operator_view or name in _NOT_A_PERSON else OPERATOR_SHOWN


def _withdrawal_pb(r: Any, hold: str = "", *, operator_view: bool = False) -> payout_pb2.Withdrawal:
    """The withdrawal's message; `hold` (`_HOLD`: why it would wait) is shown only while it is APPROVED,
    waiting for the dispatcher; the reviewer's name only to a call made with the operator token
    (`_reviewer`)."""
    return payout_pb2.Withdrawal(
        withdrawal_id=r.withdrawal_id,
        creator_id=r.creator_id,
        method_id=r.method_id,
        diamonds=r.diamonds,
        gross=_money(r.currency_code, r.gross_minor),
        fee=_money(r.currency_code, r.fee_minor),
        net=_money(r.currency_code, r.net_minor),
        status=_STATUS_PB[WithdrawalStatus(r.status)],
        policy_version=r.policy_version,
        reviewed_by=_reviewer(r.reviewed_by, operator_view),
        failure_reason=r.failure_reason,
        provider_ref=r.provider_ref,
        requested_at=to_timestamp(r.requested_at_us),
        updated_at=to_timestamp(r.updated_at_us),
        paid_at=to_timestamp(r.paid_at_us),  # None (unset) until PAID
        hold=_HOLD_PB.get(hold, payout_pb2.WITHDRAWAL_HOLD_UNSPECIFIED)
        if r.status == WithdrawalStatus.APPROVED.value
        else payout_pb2.WITHDRAWAL_HOLD_UNSPECIFIED,
    )


def _method_pb(r: Any) -> payout_pb2.PayoutMethod:
    return payout_pb2.PayoutMethod(
        method_id=r.method_id,
        creator_id=r.creator_id,
        kind=_METHOD_KIND_PB[r.kind],
        masked=r.masked,
        currency_code=r.currency_code,
        verification=_VERIFICATION_PB[r.verification],
        created_at=to_timestamp(r.created_at_us),
    )


def _status_label(status: int) -> str:
    """A withdrawal status as a metric label: paid, failed, ..."""
    return payout_pb2.WithdrawalStatus.Name(status).removeprefix("WITHDRAWAL_STATUS_").lower()


@dataclass(frozen=True)
class _CreditStatements:
    """The statements credit_gifts runs, built once per dialect (their cache keys computed once)."""

    earnings: Bulk
    creator_row: Bulk
    lock: Any  # the creators' rows, in creator order (PostgreSQL; None on SQLite, whose writers are serialized)
    credit: Bulk
    credited: Any
    shares: Any


@functools.cache
def _credit_statements(dialect: str) -> _CreditStatements:
    c = creators.c
    p, older = policies.c, policies.alias("older").c
    in_force_at_since = select(func.max(older.version)).where(older.changed_at_us <= bindparam("since"))

    def credit(row: dict[str, Any]) -> dict[str, Any]:
        whole_after = (c.earned_units + row["units"]) // BP_DENOMINATOR
        whole_before = c.earned_units // BP_DENOMINATOR
        return {
            "coins_received": c.coins_received + row["coins"],
            "earned_units": c.earned_units + row["units"],
            "diamonds_credited": c.diamonds_credited + (whole_after - whole_before),
            "diamonds_available": c.diamonds_available + (whole_after - whole_before),
            "updated_at_us": row["at"],
        }

    return _CreditStatements(
        earnings=bulk_insert(
            dialect,
            earnings,
            [
                "event_id",
                "creator_id",
                "kind",
                "sender_id",
                "stream_id",
                "coins",
                "share_bp",
                "units",
                "occurred_at_us",
                "recorded_at_us",
                "credited_at_us",
            ],
        ),
        creator_row=bulk_insert(
            dialect,
            creators,
            [
                "creator_id",
                "coins_received",
                "earned_units",
                "diamonds_credited",
                "diamonds_available",
                "diamonds_held",
                "diamonds_withdrawn",
                "diamonds_clawed_back",
                "updated_at_us",
            ],
            on_conflict=lambda stmt: stmt.on_conflict_do_nothing(),
        ),
        # Creator order is Python's sorted() order, by code point, as clawbacks and withdrawals
        # take the rows (`Payout._apply_claws`): COLLATE "C" sorts UTF-8 text by code point. The
        # database's own collation may not (en_US, as the postgres image has it, puts "alice"
        # before "Bob"), and a gift batch and a clawback of those two creators deadlocked.
        lock=select(c.creator_id)
        .where(one_of_param(dialect, c.creator_id, "ids"))
        .order_by(c.creator_id.collate("C"))
        .with_for_update()
        if dialect == "postgresql"
        else None,
        credit=bulk_update(
            dialect,
            creators,
            {
                "creator": c.creator_id.type,
                "coins": c.coins_received.type,
                "units": c.earned_units.type,
                "at": c.updated_at_us.type,
            },
            lambda row: [c.creator_id == row["creator"]],
            credit,
        ),
        credited=select(c.creator_id, c.earned_units, c.diamonds_credited).where(
            one_of_param(dialect, c.creator_id, "ids")
        ),
        # The version in force at `since` and every later one, oldest first (few: policies change rarely).
        shares=select(p.changed_at_us, p.creator_share_bp)
        .where(p.version >= func.coalesce(in_force_at_since.scalar_subquery(), 0))
        .order_by(p.version),
    )


@dataclass
class Payout:
    """Payout use cases over its database and outbox."""

    db: Database
    outbox: Outbox
    provider: PayoutProvider | None = None
    wallet: Any = None  # WalletServiceStub: eligibility (age, blocked) at RequestWithdrawal
    settings: PayoutSettings | None = None
    # Where the shortfall settler's next round starts (by reversal id), so that shortfalls that
    # cannot settle yet do not keep it from the others.
    _shortfall_cursor: BatchCursor[str] = field(default_factory=lambda: BatchCursor(""))
    # Where the reconciler's next round starts (handed over at, withdrawal id): transfers still
    # under way at the provider do not keep it from the later ones.
    _reconcile_cursor: late_lookups.RoundCursor = field(default_factory=late_lookups.RoundCursor)
    # Where the dispatcher's next round starts (requested at, withdrawal id): a batch of
    # withdrawals that each fail on their own does not keep it from the later ones.
    _dispatch_cursor: BatchCursor[tuple[int, str]] = field(default_factory=lambda: BatchCursor(DISPATCH_START))
    _reconcile_failures: ItemFailures = field(
        default_factory=lambda: ItemFailures(log, "a late withdrawal could not be reconciled; asked again next round")
    )
    _dispatch_failures: ItemFailures = field(
        default_factory=lambda: ItemFailures(
            log, "a withdrawal was not handed to the provider; tried again next round", DISPATCH_LOOP
        )
    )
    _shortfall_failures: ItemFailures = field(
        default_factory=lambda: ItemFailures(
            log, "a clawback shortfall was not settled; tried again next round", SETTLE_LOOP
        )
    )
    _dev_callback_failures: ItemFailures = field(
        default_factory=lambda: ItemFailures(log, "dev payout callback not applied")
    )
    # The withdrawals the provider did not take, whose line is throttled per withdrawal: each is
    # submitted again every round (DISPATCH_INTERVAL_S), and an outage fails them all each time.
    _not_taken_lines: KeyedLogThrottle[str] = field(
        default_factory=lambda: KeyedLogThrottle(FAILURE_LOG_INTERVAL_S, ItemFailures.ITEMS_MAX)
    )
    # Creators whose withdrawals the dispatcher holds (not eligible, or the wallet could not
    # say), and until when (time.monotonic()) it does not ask the wallet about them again.
    _held_until: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.provider is not None:
            provider_calls.export_failures_at_zero(self.provider.name, PROVIDER_CALLS)

    async def _policy(self, uow: UnitOfWork) -> Any:
        row = (await uow.conn.execute(select(policies).order_by(policies.c.version.desc()).limit(1))).first()
        check(row is not None, "a policy row is seeded by migration 0002")
        return row

    async def _policy_row(self, uow: UnitOfWork) -> PolicyRow:
        row = await self._policy(uow)
        terms = [CurrencyTerms(**t) for t in json.loads(row.terms_json)]
        return PolicyRow(row.version, row.creator_share_bp, row.fee_bp, terms, row.changed_by, row.changed_at_us)

    async def credit_gifts(self, uow: UnitOfWork, events: list[gifting_events.GiftSent]) -> None:
        """Consumer of gifting.gift.sent: credit each creator once per event, one write per creator.

        A fixed number of statements per batch, whatever its size or number of creators: one read
        of the policy versions the gifts were sent under; the earnings rows, the missing creator
        rows and the per-creator updates each go as one bulk statement
        (`services.common.sql.Bulk`: one execution with arrays on PostgreSQL; one statement text,
        so one compiled form and one prepared statement), between the last two one lock of the
        creators' rows in creator order (PostgreSQL), then one read of the updated creators.
        """
        stmts = _credit_statements(self.db.dialect)
        ts = now_us()
        # Each gift earns the share in force when it was sent, not when its event is consumed: an
        # event that waited (consumer behind, parked and replayed) must not earn a share the
        # operator set after the gift.
        sent_us = [e.occurred_at.ToMicroseconds() if e.HasField("occurred_at") else ts for e in events]
        versions = [
            (int(r.changed_at_us), int(r.creator_share_bp))
            for r in await uow.conn.execute(stmts.shares, {"since": min(sent_us, default=ts)})
        ]
        batch: list[Earning] = []
        rows = []
        for e, e_sent_us in zip(events, sent_us, strict=True):
            check(e.coins > 0 and bool(e.creator_id), f"gift event {e.event_id} has coins and a creator")
            share_bp = domain.share_in_force(versions, e_sent_us)
            units = domain.units_for(e.coins, share_bp)
            batch.append(Earning(e.creator_id, e.coins, units))
            rows.append(
                {
                    "event_id": e.event_id,
                    "creator_id": e.creator_id,
                    "kind": _KIND.get(e.kind, "GIFT"),
                    "sender_id": e.sender_id,
                    "stream_id": e.stream_id,
                    "coins": e.coins,
                    "share_bp": share_bp,
                    "units": units,
                    "occurred_at_us": e_sent_us,
                    "recorded_at_us": e.recorded_at.ToMicroseconds() if e.HasField("recorded_at") else None,
                    "credited_at_us": ts,
                }
            )
        await uow.conn.execute(stmts.earnings.stmt, stmts.earnings.params(rows))
        totals = sorted(domain.per_creator(batch).items())  # a stable order: concurrent consumers cannot deadlock
        events_by_creator = Counter(b.creator_id for b in batch)
        await uow.conn.execute(
            stmts.creator_row.stmt,
            stmts.creator_row.params(
                [
                    {
                        "creator_id": creator_id,
                        "coins_received": 0,
                        "earned_units": 0,
                        "diamonds_credited": 0,
                        "diamonds_available": 0,
                        "diamonds_held": 0,
                        "diamonds_withdrawn": 0,
                        "diamonds_clawed_back": 0,
                        "updated_at_us": ts,
                    }
                    for creator_id, _ in totals
                ]
            ),
        )
        # The rows are locked in creator order first, as every writer of several creators' rows
        # takes them (clawbacks too, `_apply_claws`): the UPDATE below locks them in the order of
        # its plan, which, joined by hash to a scan of the table, is the rows' order on disk, and
        # met a clawback locking the same rows the other way round (a deadlock).
        if stmts.lock is not None:
            await uow.conn.execute(stmts.lock, {"ids": [creator_id for creator_id, _ in totals]})
        # Each UPDATE is one atomic statement whose right-hand sides read the old row, so
        # concurrent consumers (several replicas) cannot lose an update; the rows stay locked
        # until commit, so the read below sees exactly this batch's result.
        await uow.conn.execute(
            stmts.credit.stmt,
            stmts.credit.params(
                [
                    {"creator": creator_id, "coins": coins, "units": units, "at": ts}
                    for creator_id, (coins, units) in totals
                ]
            ),
        )
        after = {
            r.creator_id: r
            for r in await uow.conn.execute(stmts.credited, {"ids": [creator_id for creator_id, _ in totals]})
        }
        credited_events = []
        for creator_id, (coins, units) in totals:
            row = after[creator_id]
            check(row.diamonds_credited == row.earned_units // BP_DENOMINATOR, "diamonds = floor(units / 10000)")
            delta = domain.credit_delta(row.earned_units - units, units)
            eid = new_event_id()
            credited_events.append(
                (
                    "payout.diamonds.credited",
                    eid,
                    events_pb2.DiamondsCredited(
                        event_id=eid,
                        creator_id=creator_id,
                        diamonds=delta,
                        coins=coins,
                        events=events_by_creator[creator_id],
                        occurred_at=to_timestamp(ts),
                    ),
                )
            )
        await self.outbox.add_many(uow, credited_events)

    # ---- earnings ------------------------------------------------------------------------

    async def get_earnings(self, creator_id: str) -> payout_pb2.Earnings:
        """A creator's diamonds, with their cash value in each payout currency.

        A creator payout has never credited has every amount 0, as GetStatement and the lists
        answer for them (and gifting's GetCreatorStats): not NOT_FOUND, which a dashboard would
        have to tell apart from a real error."""
        require_id(creator_id, "creator_id")
        async with self.db.unit_of_work(readonly=True) as uow:
            row = (await uow.conn.execute(select(creators).where(creators.c.creator_id == creator_id))).first()
            policy = await self._policy_row(uow)
        if row is None:
            row = _Row({col.key: 0 for col in creators.c})
        return payout_pb2.Earnings(
            creator_id=creator_id,
            diamonds_available=row.diamonds_available,
            diamonds_held=row.diamonds_held,
            diamonds_withdrawn=row.diamonds_withdrawn,
            diamonds_lifetime=row.diamonds_credited,
            coins_received=row.coins_received,
            remainder_units=row.earned_units % BP_DENOMINATOR,
            diamonds_clawed_back=row.diamonds_clawed_back,
            clawback_remainder_units=row.clawed_units % BP_DENOMINATOR,
            cash_available=[
                _money(t.currency_code, domain.cash_value_minor(row.diamonds_available, t)) for t in policy.terms
            ],
            withdrawals_held=row.diamonds_available < 0,
        )

    async def list_earnings(self, req: payout_pb2.ListEarningsRequest) -> payout_pb2.ListEarningsResponse:
        """A creator's credited events, newest first, keyset-paginated."""
        require_id(req.creator_id, "creator_id")
        e = earnings.c
        rows, token = await _keyset_page(
            self.db,
            earnings,
            e.creator_id == req.creator_id,
            e.credited_at_us,
            e.event_id,
            req.page_token,
            req.page_size,
        )
        out = payout_pb2.ListEarningsResponse(
            entries=[
                payout_pb2.EarningEntry(
                    event_id=r.event_id,
                    kind=r.kind,
                    sender_id=r.sender_id,
                    stream_id=r.stream_id,
                    coins=r.coins,
                    share_bp=r.share_bp,
                    units=r.units,
                    coins_clawed_back=r.coins_clawed_back,
                    occurred_at=to_timestamp(r.occurred_at_us),
                    credited_at=to_timestamp(r.credited_at_us),
                )
                for r in rows
            ],
            next_page_token=token,
        )
        return out

    # ---- policy --------------------------------------------------------------------------

    @staticmethod
    def _policy_pb(p: PolicyRow, *, operator_view: bool = False) -> payout_pb2.Policy:
        return payout_pb2.Policy(
            version=p.version,
            creator_share_bp=p.creator_share_bp,
            fee_bp=p.fee_bp,
            currencies=[payout_pb2.CurrencyTerms(**asdict(t)) for t in p.terms],
            changed_by=_reviewer(p.changed_by, operator_view),
            changed_at=to_timestamp(p.changed_at_us),
        )

    async def get_policy(self, *, operator_view: bool = False) -> payout_pb2.Policy:
        """The policy in force; who changed it by name only for `operator_view` (`_reviewer`)."""
        async with self.db.unit_of_work(readonly=True) as uow:
            return self._policy_pb(await self._policy_row(uow), operator_view=operator_view)

    @answers_retry(common.idempotency, "SetPolicy", payout_pb2.Policy)
    async def set_policy(
        self, req: payout_pb2.SetPolicyRequest, operator: str, *, idem: IdempotentCall[payout_pb2.Policy]
    ) -> payout_pb2.Policy:
        """A new policy version (operator); the old versions stay as the record of who changed what."""
        terms = [
            CurrencyTerms(
                t.currency_code,
                t.diamonds,
                t.amount_minor,
                t.withdrawal_min_minor,
                t.daily_max_minor,
                t.fee_fixed_minor,
                t.auto_approve_below_minor,
            )
            for t in req.currencies
        ]
        domain.check_policy(req.creator_share_bp, req.fee_bp, terms)

        async def work(uow: UnitOfWork) -> payout_pb2.Policy:
            current = await self._policy(uow)
            ts = now_us()
            # The primary key on version: two concurrent changes cannot both become version n+1.
            row = PolicyRow(current.version + 1, req.creator_share_bp, req.fee_bp, terms, operator, ts)
            await uow.conn.execute(
                insert(policies).values(
                    version=row.version,
                    creator_share_bp=row.creator_share_bp,
                    fee_bp=row.fee_bp,
                    terms_json=json.dumps([asdict(t) for t in terms]),
                    changed_by=operator,
                    changed_at_us=ts,
                )
            )
            # After the commit: a change rolled back (a concurrent first call with this key won,
            # PostgreSQL) left a trail line for a version that never was.
            uow.after_commit(lambda: log.info("policy changed", extra={"version": row.version, "operator": operator}))
            return self._policy_pb(row, operator_view=True)  # SetPolicy is an operator RPC

        return await idem.run(work)

    # ---- payout methods --------------------------------------------------------------------

    @answers_retry(
        common.idempotency, "AddPayoutMethod", payout_pb2.PayoutMethod, secret=lambda p: p._request_hash_key()
    )
    async def add_payout_method(
        self, req: payout_pb2.AddPayoutMethodRequest, *, idem: IdempotentCall[payout_pb2.PayoutMethod]
    ) -> payout_pb2.PayoutMethod:
        """Validate a PayPal or bank account, vault it with the provider, keep only a mask (PENDING).

        The provider is asked outside any transaction, with PROVIDER_TIMEOUT_S; one that fails or
        does not answer in time answers UNAVAILABLE / PAYOUT_PROVIDER_UNAVAILABLE with nothing
        written (retry with the same key). A token vaulted for a call that then wrote nothing
        (the database failed, a concurrent call with the key won) is never used for a transfer.

        A creator has at most METHODS_PER_CREATOR_MAX methods that did not fail verification:
        one more answers RESOURCE_EXHAUSTED / PAYOUT_METHOD_LIMIT before the vault is asked, and
        nothing is written; a retry under a key that took effect still gets its recorded answer.

        A currency the policy in force does not pay out in answers FAILED_PRECONDITION /
        CURRENCY_NOT_SUPPORTED, as RequestWithdrawal to such a method would, before the vault is
        asked and with nothing written (a retry under a key that took effect still gets its answer).
        """
        require_id(req.creator_id, "creator_id")
        currency = domain.check_currency_code(req.currency_code or "USD")
        kind = _METHOD_KIND.get(req.kind)
        if kind == "PAYPAL":
            account, masked = domain.normalize_paypal(req.paypal_email)
        elif kind == "BANK":
            account, masked = domain.normalize_bank(req.iban, req.account_number, req.routing_number, req.holder_name)
        else:
            raise InvalidArgument("kind must be PAYPAL or BANK", "INVALID_PAYOUT_METHOD")
        check(
            self.provider is not None and self.settings is not None,
            "self.provider is not None and self.settings is not None",
        )
        limit = self.settings.methods_per_creator_max
        stored = await idem.stored()
        if stored is not None:
            return stored  # a retry: the account is not vaulted again (the provider may be down), nor counted
        try:
            async with self.db.unit_of_work(readonly=True) as uow:
                # Before the vault is asked: an account is not sent to the provider for a refused call.
                (await self._policy_row(uow)).terms_for(currency)
                domain.check_method_count(await self._active_methods(uow, req.creator_id), limit)
        except (FailedPrecondition, ResourceExhausted) as exc:
            return await self._method_added_meanwhile(idem, exc)
        token = await provider_calls.required(
            self.provider.name,
            "tokenize",
            self.provider.tokenize(kind, account),
            self.settings.provider_timeout_s,
            reason="PAYOUT_PROVIDER_UNAVAILABLE",
            message="the payout provider cannot vault the account now, retry with the same key",
            creator_id=req.creator_id,
        )
        fingerprint = self._fingerprint(kind, account)
        # The request itself holds the full account: the idempotency record keeps only its keyed
        # hash and the (masked) answer, never the request.

        async def work(uow: UnitOfWork) -> payout_pb2.PayoutMethod:
            # The currency again: a policy that dropped it while the vault was asked refuses it.
            (await self._policy_row(uow)).terms_for(currency)
            # Counted again under the creator's lock: two adds at once cannot both take the last place.
            await self._lock_creator_methods(uow, req.creator_id)
            domain.check_method_count(await self._active_methods(uow, req.creator_id), limit)
            ts = now_us()
            values = {
                "method_id": "pm_" + uuid.uuid4().hex,
                "creator_id": req.creator_id,
                "kind": kind,
                "masked": masked,
                "fingerprint": fingerprint,
                "provider_token": token,
                "currency_code": currency,
                "verification": "PENDING",
                "created_at_us": ts,
                "updated_at_us": ts,
            }
            await uow.conn.execute(insert(payout_methods).values(**values))
            return _method_pb(_Row(values))

        try:
            return await idem.run(work)
        except (FailedPrecondition, ResourceExhausted) as exc:
            return await self._method_added_meanwhile(idem, exc)

    async def _method_added_meanwhile(
        self, idem: IdempotentCall[payout_pb2.PayoutMethod], refusal: DomainError
    ) -> payout_pb2.PayoutMethod:
        """The answer of a call under this key whose method was added while this one ran (a retry
        sent before the first call answered: it took the last place, or the policy dropped its
        currency since), else `refusal` (PAYOUT_METHOD_LIMIT, CURRENCY_NOT_SUPPORTED)."""
        stored = await idem.stored()
        if stored is not None:
            return stored
        raise refusal

    @staticmethod
    async def _active_methods(uow: UnitOfWork, creator_id: str) -> int:
        """How many of the creator's payout methods count against METHODS_PER_CREATOR_MAX."""
        m = payout_methods.c
        q = select(func.count()).where(m.creator_id == creator_id, m.verification.in_(domain.ACTIVE_VERIFICATIONS))
        return int((await uow.conn.execute(q)).scalar_one())

    async def _lock_creator_methods(self, uow: UnitOfWork, creator_id: str) -> None:
        """Hold, until commit, the lock of the creator's payout methods (PostgreSQL; SQLite
        serializes writers): AddPayoutMethod's count and insert, and VerifyPayoutMethod's count
        and update, are one step for each creator."""
        if self.db.dialect != "postgresql":
            return
        await uow.conn.execute(
            text("SELECT pg_advisory_xact_lock(:cls, :key)"),
            {"cls": METHODS_LOCK_CLASS, "key": _advisory_lock_key(creator_id)},
        )

    def _request_hash_key(self) -> bytes:
        """The key of AddPayoutMethod's request hash (it covers the full account), from the same
        secret as the fingerprint, kept apart from it by its own label."""
        check(self.settings is not None, "self.settings is not None")
        secret = self.settings.payout_webhook_secret.get_secret_value().encode()
        return hmac.new(secret, b"idempotency:AddPayoutMethod", hashlib.sha256).digest()

    def _fingerprint(self, kind: str, account: str) -> str:
        check(self.settings is not None, "self.settings is not None")
        key = self.settings.payout_webhook_secret.get_secret_value().encode()
        return hmac.new(key, f"fp:{kind}:{account}".encode(), hashlib.sha256).hexdigest()

    async def list_payout_methods(
        self, req: payout_pb2.ListPayoutMethodsRequest
    ) -> payout_pb2.ListPayoutMethodsResponse:
        """A creator's payout methods (masked), oldest first, keyset-paginated.

        Oldest first, and 100 to a page unless page_size says otherwise, as the one answer it gave
        before it had pages (which silently left out every method after the 100th): a caller that
        reads no token still gets what it got before, and one that follows next_page_token gets all.
        """
        require_id(req.creator_id, "creator_id")
        m = payout_methods.c
        rows, token = await _keyset_page(
            self.db,
            payout_methods,
            m.creator_id == req.creator_id,
            m.created_at_us,
            m.method_id,
            req.page_token,
            req.page_size,
            oldest_first=True,
            default_size=METHODS_PAGE_SIZE_DEFAULT,
        )
        return payout_pb2.ListPayoutMethodsResponse(methods=[_method_pb(r) for r in rows], next_page_token=token)

    @answers_retry(common.idempotency, "VerifyPayoutMethod", payout_pb2.PayoutMethod)
    async def verify_payout_method(
        self, req: payout_pb2.VerifyPayoutMethodRequest, operator: str, *, idem: IdempotentCall[payout_pb2.PayoutMethod]
    ) -> Any:
        """Record the outcome of a method's verification (operator / KYC).

        A FAILED method marked verified counts against METHODS_PER_CREATOR_MAX again: with the
        creator already at the limit it answers RESOURCE_EXHAUSTED / PAYOUT_METHOD_LIMIT and
        nothing is written, counted under AddPayoutMethod's per-creator lock. A method that
        already counts (PENDING, VERIFIED) is never refused, and a retry under a key that took
        effect gets its recorded answer (run_idempotent looks the key up before `work`).
        """
        require_id(req.method_id, "method_id")
        check(self.settings is not None, "self.settings is not None")
        limit = self.settings.methods_per_creator_max

        async def work(uow: UnitOfWork) -> payout_pb2.PayoutMethod:
            m = payout_methods.c
            by_id = select(payout_methods).where(m.method_id == req.method_id)
            row = (await uow.conn.execute(by_id)).first()
            if row is None:
                raise NotFound("unknown payout method", "UNKNOWN_PAYOUT_METHOD")
            if req.verified:
                # Under the lock even for a method that counts: read PENDING without it, it could be
                # failed and its place taken before this update made it count again. Read again
                # under it: a call that made it count meanwhile (this key's first call, still
                # running when its retry came) has committed, and the method is not counted twice.
                await self._lock_creator_methods(uow, row.creator_id)
                row = (await uow.conn.execute(by_id)).one()
                if row.verification not in domain.ACTIVE_VERIFICATIONS:
                    domain.check_method_count(await self._active_methods(uow, row.creator_id), limit)
            status = VERIFIED if req.verified else "FAILED"
            ts = now_us()
            await uow.conn.execute(
                update(payout_methods).where(m.method_id == req.method_id).values(verification=status, updated_at_us=ts)
            )
            fields = {"method_id": req.method_id, "status": status, "operator": operator}
            uow.after_commit(lambda: log.info("payout method verified", extra=fields))  # only what committed
            return _method_pb(_Row({**row._asdict(), "verification": status}))

        return await idem.run(work)

    # ---- withdrawals -----------------------------------------------------------------------

    async def _check_eligible(self, creator_id: str) -> None:
        """18+ and not blocked, in the wallet's word (it holds ages); UNAVAILABLE if it cannot say."""
        if self.wallet is None:
            return
        try:
            r = await self.wallet.GetAccountRestrictions(wallet_pb2.GetAccountRestrictionsRequest(user_id=creator_id))
        except grpc.aio.AioRpcError as exc:
            log.warning("wallet unavailable for eligibility", extra={"code": exc.code().name})
            raise Unavailable("cannot check eligibility now, retry with the same key", "WALLET_UNAVAILABLE") from None
        if r.blocked:
            raise FailedPrecondition("the account is blocked", "ACCOUNT_BLOCKED")
        if r.is_minor or not r.may_spend:
            raise FailedPrecondition("withdrawals need an adult account", "UNDERAGE")

    @answers_retry(common.idempotency, "RequestWithdrawal", payout_pb2.Withdrawal)
    async def request_withdrawal(
        self, req: payout_pb2.RequestWithdrawalRequest, *, idem: IdempotentCall[payout_pb2.Withdrawal]
    ) -> payout_pb2.Withdrawal:
        """Hold diamonds for a payout: one transaction of conditional UPDATEs, so concurrent requests
        can never together exceed the balance or the daily maximum."""
        require_id(req.creator_id, "creator_id")
        require_positive(req.diamonds, "diamonds", DIAMONDS_MAX)
        require_id(req.method_id, "method_id")
        stored = await idem.stored()
        if stored is not None:
            return stored  # a retry: the wallet is not asked again (it may be down, or its answer changed)
        await self._check_eligible(req.creator_id)
        asked_wallet = self.wallet is not None
        if asked_wallet:
            self._held_until.pop(req.creator_id, None)  # it just said yes: the dispatcher asks again
        # What the creator's diamonds owe to recorded reversals is clawed back and committed
        # first, so it stands even when this request is refused; `work` settles again anything
        # credited in between, so none of those diamonds is ever withdrawn (the chargeback fraud).
        async with self.db.unit_of_work(readonly=True) as uow:
            owed = await self._shortfalls_owed_by(uow, req.creator_id)  # almost always none: no write
        if owed:
            async with self.db.unit_of_work() as uow:
                if await self._settle_shortfalls_of(uow, req.creator_id):
                    await uow.commit()

        async def work(uow: UnitOfWork) -> payout_pb2.Withdrawal:
            policy = await self._policy_row(uow)
            m = payout_methods.c
            method = (await uow.conn.execute(select(payout_methods).where(m.method_id == req.method_id))).first()
            if method is None or method.creator_id != req.creator_id:
                # Someone else's method answers like a missing one: no probing of other accounts.
                raise NotFound("unknown payout method", "UNKNOWN_PAYOUT_METHOD")
            if method.verification != VERIFIED:
                raise _method_not_verified()
            terms = policy.terms_for(method.currency_code)
            amounts = domain.withdrawal_amounts(req.diamonds, terms, policy.fee_bp)
            domain.check_withdrawal_limits(amounts, terms)
            if domain.above_daily_maximum(amounts, terms):  # refused before the balance, as always
                today = domain.utc_day(now_us())
                day_gross = await self._day_gross(uow, req.creator_id, terms, today)
                raise domain.daily_limit_reached(terms, day_gross, today, amount_exceeds_limit=True)
            await self._settle_shortfalls_of(uow, req.creator_id)  # credited since the first settling
            c = creators.c
            balance = (
                await uow.conn.execute(select(c.diamonds_available).where(c.creator_id == req.creator_id))
            ).scalar_one_or_none()
            if balance is not None and balance < 0:
                raise FailedPrecondition(
                    "withdrawals are held while the balance is negative (clawback)", "BALANCE_NEGATIVE"
                )
            held = await uow.conn.execute(
                update(creators)
                .where(c.creator_id == req.creator_id, c.diamonds_available >= req.diamonds)
                .values(
                    diamonds_available=c.diamonds_available - req.diamonds,
                    diamonds_held=c.diamonds_held + req.diamonds,
                    updated_at_us=now_us(),
                    # The wallet just said the creator may withdraw: no hold of its word stands.
                    **({"wallet_hold": ""} if asked_wallet else {}),
                )
            )
            if held.rowcount != 1:
                # Read again, not `balance`: a concurrent request may have taken them since.
                available = (
                    await uow.conn.execute(select(c.diamonds_available).where(c.creator_id == req.creator_id))
                ).scalar_one_or_none()
                raise FailedPrecondition(
                    "not enough diamonds available",
                    "INSUFFICIENT_DIAMONDS",
                    available_diamonds=available or 0,
                    required_diamonds=req.diamonds,
                )
            ts = now_us()
            day = domain.utc_day(ts)
            d = daily_withdrawals.c
            await uow.conn.execute(
                insert_ignore(self.db.dialect, daily_withdrawals).values(
                    creator_id=req.creator_id, day=day, currency_code=terms.currency_code, gross_minor=0
                )
            )
            counted = await uow.conn.execute(
                update(daily_withdrawals)
                .where(
                    d.creator_id == req.creator_id,
                    d.day == day,
                    d.currency_code == terms.currency_code,
                    d.gross_minor + amounts.gross_minor <= terms.daily_max_minor,
                )
                .values(gross_minor=d.gross_minor + amounts.gross_minor)
            )
            if counted.rowcount != 1:
                raise domain.daily_limit_reached(terms, await self._day_gross(uow, req.creator_id, terms, day), day)
            auto = amounts.gross_minor < terms.auto_approve_below_minor
            status = WithdrawalStatus.APPROVED if auto else WithdrawalStatus.PENDING_REVIEW
            values = {
                "withdrawal_id": "wd_" + uuid.uuid4().hex,
                "creator_id": req.creator_id,
                "method_id": req.method_id,
                "diamonds": req.diamonds,
                "currency_code": terms.currency_code,
                "gross_minor": amounts.gross_minor,
                "fee_minor": amounts.fee_minor,
                "net_minor": amounts.net_minor,
                "status": status.value,
                "policy_version": policy.version,
                "day": day,
                "reviewed_by": "auto" if auto else "",
                "failure_reason": "",
                "provider_ref": "",
                "requested_at_us": ts,
                "updated_at_us": ts,
                "paid_at_us": None,
            }
            await uow.conn.execute(insert(withdrawals).values(**values))
            row = _Row(values)
            await self._withdrawal_event(uow, "payout.withdrawal.requested", row, "")
            return _withdrawal_pb(row)

        return await idem.run(work)

    @staticmethod
    async def _day_gross(uow: UnitOfWork, creator_id: str, terms: CurrencyTerms, day: str) -> int:
        """Gross the creator requested on `day` (UTC, `domain.utc_day`) in the terms' currency, not
        failed or rejected: for a DAILY_WITHDRAWAL_LIMIT's metadata only, as the conditional
        UPDATE alone decides."""
        d = daily_withdrawals.c
        gross = await uow.conn.execute(
            select(d.gross_minor).where(
                d.creator_id == creator_id, d.day == day, d.currency_code == terms.currency_code
            )
        )
        return gross.scalar_one_or_none() or 0

    async def _withdrawal_event(self, uow: UnitOfWork, subject: str, r: Any, reason: str) -> None:
        eid = new_event_id()
        await self.outbox.add(
            uow,
            subject,
            eid,
            events_pb2.WithdrawalChanged(
                event_id=eid,
                withdrawal_id=r.withdrawal_id,
                creator_id=r.creator_id,
                diamonds=r.diamonds,
                gross=_money(r.currency_code, r.gross_minor),
                fee=_money(r.currency_code, r.fee_minor),
                net=_money(r.currency_code, r.net_minor),
                status=r.status,
                reason=reason,
                occurred_at=to_timestamp(r.updated_at_us),
            ),
        )

    async def _load_withdrawal(
        self, uow: UnitOfWork, withdrawal_id: str, *, with_hold: bool = False, lock: bool = False
    ) -> Any:
        """The withdrawal's row; `with_hold`, with its `hold` (`_HOLD`) too, in the same query;
        `lock`, held until commit (PostgreSQL `FOR UPDATE`; SQLite serializes writers)."""
        q = select(withdrawals) if not with_hold else select(withdrawals, *_WITH_HOLD[1]).select_from(_WITH_HOLD[0])
        q = q.where(withdrawals.c.withdrawal_id == withdrawal_id)
        row = (await uow.conn.execute(q.with_for_update() if lock else q)).first()
        if row is None:
            raise NotFound("unknown withdrawal", "UNKNOWN_WITHDRAWAL")
        return row

    async def _move(self, uow: UnitOfWork, row: Any, target: WithdrawalStatus, **values: Any) -> Any:
        """Compare-and-set the status; a concurrent change makes this one ABORTED (retryable)."""
        domain.check_transition(WithdrawalStatus(row.status), target)
        # A PAID withdrawal's updated_at is the paid_at its statement month is counted by, to the
        # microsecond: a client matching withdrawals to GetStatement's `paid` reads paid_at (or,
        # from a payout before that field, updated_at).
        ts = values.get("paid_at_us") or now_us()
        w = withdrawals.c
        changed = await uow.conn.execute(
            update(withdrawals)
            .where(w.withdrawal_id == row.withdrawal_id, w.status == row.status)
            .values(status=target.value, updated_at_us=ts, **values)
        )
        if changed.rowcount != 1:
            raise Aborted("the withdrawal changed concurrently, retry", "CONFLICT")
        return _Row({**row._asdict(), "status": target.value, "updated_at_us": ts, **values})

    async def _release(self, uow: UnitOfWork, row: Any) -> None:
        """Diamonds back to available and the day's gross back under the maximum (FAILED / REJECTED)."""
        c = creators.c
        await uow.conn.execute(
            update(creators)
            .where(c.creator_id == row.creator_id)
            .values(
                diamonds_held=c.diamonds_held - row.diamonds,
                diamonds_available=c.diamonds_available + row.diamonds,
                updated_at_us=now_us(),
            )
        )
        d = daily_withdrawals.c
        await uow.conn.execute(
            update(daily_withdrawals)
            .where(d.creator_id == row.creator_id, d.day == row.day, d.currency_code == row.currency_code)
            .values(gross_minor=d.gross_minor - row.gross_minor)
        )

    async def _end_unpaid(
        self, uow: UnitOfWork, row: Any, target: WithdrawalStatus, failure_reason: str, **values: Any
    ) -> Any:
        """FAILED or REJECTED: the status moved (compare-and-set), the diamonds and the day's total
        released, and the withdrawal's event; the moved row."""
        moved = await self._move(uow, row, target, failure_reason=failure_reason, **values)
        await self._release(uow, moved)
        await self._withdrawal_event(uow, _SUBJECT[target], moved, moved.failure_reason)
        return moved

    @answers_retry(common.idempotency, "ApproveWithdrawal", payout_pb2.Withdrawal)
    async def approve_withdrawal(
        self, req: payout_pb2.ApproveWithdrawalRequest, operator: str, *, idem: IdempotentCall[payout_pb2.Withdrawal]
    ) -> Any:
        """An operator approves a reviewed withdrawal; refused while the creator's balance is negative
        or its payout method is not VERIFIED (it failed verification after the request)."""
        require_id(req.withdrawal_id, "withdrawal_id")

        async def work(uow: UnitOfWork) -> payout_pb2.Withdrawal:
            row = await self._load_withdrawal(uow, req.withdrawal_id, with_hold=True)
            balance = (
                await uow.conn.execute(
                    select(creators.c.diamonds_available).where(creators.c.creator_id == row.creator_id)
                )
            ).scalar_one()
            if balance < 0:
                raise FailedPrecondition(
                    "withdrawals are held while the balance is negative (clawback)", "BALANCE_NEGATIVE"
                )
            # The method may have failed verification since the request (the dispatcher would hold
            # the withdrawal anyway): the operator learns it now, and may reject it instead. Only
            # for one approving can move: another (approved already, paid, rejected) still answers
            # INVALID_WITHDRAWAL_TRANSITION, as before, not advice to reject what cannot be.
            domain.check_transition(WithdrawalStatus(row.status), WithdrawalStatus.APPROVED)
            if not await _method_verified(uow, row.method_id):
                raise _method_not_verified()
            moved = await self._move(uow, row, WithdrawalStatus.APPROVED, reviewed_by=operator)
            # reviewed_by keeps who, but only on the row: finance's trail of money decisions
            # (with the trace id) is the log, as for every other operator change.
            fields = {"operator": operator, "withdrawal_id": row.withdrawal_id, "creator_id": row.creator_id}
            uow.after_commit(lambda: log.info("withdrawal approved by an operator", extra=fields))
            # The wallet's word may hold it; ApproveWithdrawal is an operator RPC.
            return _withdrawal_pb(moved, row.hold, operator_view=True)

        return await idem.run(work)

    @answers_retry(common.idempotency, "RejectWithdrawal", payout_pb2.Withdrawal)
    async def reject_withdrawal(
        self, req: payout_pb2.RejectWithdrawalRequest, operator: str, *, idem: IdempotentCall[payout_pb2.Withdrawal]
    ) -> Any:
        """An operator rejects a withdrawal under review, or one approved but not yet claimed by the
        dispatcher (still APPROVED, so never submitted): the diamonds are released."""
        require_id(req.withdrawal_id, "withdrawal_id")
        # Text only (errors.is_text): the reason is kept as the withdrawal's failure_reason and
        # shown to the creator; a NUL failed on PostgreSQL as INTERNAL and was kept on SQLite.
        if len(req.reason) > domain.REASON_CHARS_MAX or not is_text(req.reason):
            raise InvalidArgument(
                f"reason must be at most {domain.REASON_CHARS_MAX} characters of text without control characters",
                "INVALID_REASON",
            )

        async def work(uow: UnitOfWork) -> payout_pb2.Withdrawal:
            row = await self._load_withdrawal(uow, req.withdrawal_id)
            moved = await self._end_unpaid(
                uow, row, WithdrawalStatus.REJECTED, req.reason or "rejected", reviewed_by=operator
            )
            fields = {"operator": operator, "withdrawal_id": row.withdrawal_id, "creator_id": row.creator_id}
            uow.after_commit(lambda: log.info("withdrawal rejected by an operator", extra=fields))
            return _withdrawal_pb(moved, operator_view=True)  # RejectWithdrawal is an operator RPC

        return await idem.run(work)

    async def get_withdrawal(self, withdrawal_id: str, *, operator_view: bool = False) -> payout_pb2.Withdrawal:
        """One withdrawal; its reviewer by name only for `operator_view` (`_reviewer`)."""
        require_id(withdrawal_id, "withdrawal_id")
        async with self.db.unit_of_work(readonly=True) as uow:
            row = await self._load_withdrawal(uow, withdrawal_id, with_hold=True)
            return _withdrawal_pb(row, row.hold, operator_view=operator_view)

    async def list_withdrawals(
        self, req: payout_pb2.ListWithdrawalsRequest, *, operator_view: bool = False
    ) -> payout_pb2.ListWithdrawalsResponse:
        """A creator's withdrawals, newest first; or, without creator_id, every creator's in one
        status, oldest requested first (an operator's review queue: the servicer checks the token).
        Keyset-paginated. Reviewers by name only for `operator_view` (`_reviewer`).

        Oldest first across creators: the withdrawal waiting longest is the one to review first,
        and rows requested meanwhile join the end of the queue instead of shifting its pages. A
        status is required there: every creator's whole history is an export, not a queue, and
        (status, requested_at_us, withdrawal_id) is the index that answers it a page at a time.
        A creator's own list stays newest first, as it always was. The tokens of a list with a
        status, or across creators, are bound to its filters (`_token_scope`); those of a creator's
        unfiltered list keep the form they had, so a page token a client holds across an upgrade
        still works."""
        status = _STATUS_BY_PB.get(req.status) if req.status else None
        if req.status and status is None:
            raise InvalidArgument("status is not a withdrawal status", "INVALID_STATUS", field="status")
        if req.creator_id:
            require_id(req.creator_id, "creator_id")
        elif status is None:
            raise InvalidArgument(
                "status is required to list every creator's withdrawals", "MISSING_FIELD", field="status"
            )
        w = withdrawals.c
        rows, token = await _keyset_page(
            self.db,
            withdrawals,
            _withdrawals_where(req.creator_id, status),
            w.requested_at_us,
            w.withdrawal_id,
            req.page_token,
            req.page_size,
            oldest_first=not req.creator_id,
            scope=_token_scope("withdrawals", req.creator_id, status.value) if status is not None else "",
            joined=_WITH_HOLD,  # each row's hold in the page's one query, not a read per row
        )
        return payout_pb2.ListWithdrawalsResponse(
            withdrawals=[_withdrawal_pb(r, r.hold, operator_view=operator_view) for r in rows],
            next_page_token=token,
        )

    # ---- payout provider -------------------------------------------------------------------

    async def dispatcher(self, stop: Any) -> None:
        """Background loop: hand APPROVED withdrawals to the provider, outside any transaction."""
        check(self.settings is not None, "the dispatcher needs settings")
        # Submissions are idempotent by withdrawal id, so a failed round (or submission) is simply retried.
        await run_every(
            stop, self.settings.dispatch_interval_s, lambda: self.dispatch_once(stop), "submitted withdrawals"
        )

    async def dispatch_once(self, stop: asyncio.Event | None = None) -> int:
        """Hand up to a batch of withdrawals to the provider, one by one; returns how many were submitted.

        Once `stop` is set (a SIGTERM) no further withdrawal of the round is started: the one in
        hand finishes (its submission, its reference stored), and the next round, the next
        process's, starts from the first one left. The round went on through the shutdown grace,
        handing new withdrawals to the provider, and could be cancelled in the middle of one.

        Choices: A) submit an APPROVED withdrawal, then mark it PROCESSING (as before): a clawback
        committing between the last read of the balance and the submission paid out diamonds the
        creator owed, and a submission whose answer was lost left a transfer the provider had made
        under a withdrawal still APPROVED, which nothing looked up and an operator could not tell
        from one never sent; B) claim it first: APPROVED -> PROCESSING in a transaction that holds
        the creator's row and reads the balance again, then submit. B. Once the claim commits, the
        withdrawal is on its way: a clawback after it finds the diamonds gone, as it would had the
        transfer been made a moment earlier; an operator may reject an APPROVED withdrawal,
        because none is ever submitted before it leaves APPROVED. A claimed withdrawal the provider
        did not take (a timeout, an error, a crash in between: PROCESSING with no provider
        reference) is submitted again in the next rounds, which the provider takes as the same
        transfer (by withdrawal id), until it answers.

        Before its claim, a withdrawal's creator must still be eligible in the wallet's word
        (18+, not blocked): one who is not is held, APPROVED, asked about again after
        `DISPATCH_HOLD_RECHECK_S`, and may be rejected by an operator meanwhile.

        Each submission has PROVIDER_TIMEOUT_S; a failure is logged with the withdrawal id and
        counted (`livegifts_provider_call_failures_total{call="submit"}`), and the round goes on.
        So it does after any other error of one withdrawal (its reference not stored, the wallet
        refusing its check), logged with its id (`ItemFailures`); the database unavailable ends
        the round.
        A provider that does not answer at all makes a round last up to DISPATCH_BATCH_SIZE_MAX x
        PROVIDER_TIMEOUT_S.

        Oldest first (by requested_at_us, then withdrawal id), DISPATCH_BATCH_SIZE_MAX a round,
        from where the last round stopped (`BatchCursor`): after a full batch, after its last
        withdrawal; after a short one, from the oldest again. A full batch of withdrawals that
        each fail on their own was read again every round, and no withdrawal after it reached the
        provider; each is now tried again when the cursor comes back round to it. A round the
        database ended is taken up by the next from the withdrawal it ended at (`rewind`).
        """
        check(
            self.provider is not None and self.settings is not None,
            "self.provider is not None and self.settings is not None",
        )
        w = withdrawals.c
        # Nor are the withdrawals of creators held by the wallet's word read again before their
        # recheck: oldest first, they would fill every round and keep the later ones waiting.
        now_mono = time.monotonic()
        self._held_until = {k: until for k, until in self._held_until.items() if until > now_mono}
        unsubmitted = _UNSUBMITTED
        batch = self.settings.dispatch_batch_size_max
        held = list(self._held_until)
        to_dispatch = dispatch_select(self.db.dialect, self._dispatch_cursor.at, batch, bool(held))
        async with self.db.unit_of_work(readonly=True) as uow:
            rows = (await uow.conn.execute(to_dispatch, {"held": held} if held else {})).all()
            # What is with the provider, and since when: a callback that never came leaves a
            # withdrawal PROCESSING (docs/sre.md "A withdrawal stuck in PROCESSING").
            waiting, since_us = (
                await uow.conn.execute(
                    select(func.count(), func.min(w.updated_at_us)).where(w.status == WithdrawalStatus.PROCESSING.value)
                )
            ).one()
            # And what has not reached the provider: a review nobody does, or a hold nobody lifts,
            # keeps the diamonds held as long (docs/sre.md "A withdrawal waiting for review or held").
            before = (
                await uow.conn.execute(
                    select(w.status, func.count(), func.min(w.updated_at_us))
                    .where(w.status.in_(_WAITING_STATUSES))
                    .group_by(w.status)
                )
            ).all()
        WITHDRAWALS_PROCESSING.set(waiting)
        WITHDRAWALS_PROCESSING_OLDEST.set(0 if since_us is None else max(0, now_us() - since_us) / 1e6)
        counts = {status: (n, oldest_us) for status, n, oldest_us in before}
        for status in _WAITING_STATUSES:
            n, oldest_us = counts.get(status, (0, None))
            WITHDRAWALS_WAITING.labels(status=status).set(n)
            WITHDRAWALS_WAITING_OLDEST.labels(status=status).set(
                0 if oldest_us is None else max(0, now_us() - oldest_us) / 1e6
            )
        self._dispatch_cursor.advance([(r.requested_at_us, r.withdrawal_id) for r in rows], batch)
        submitted = 0
        for i, row in enumerate(rows):
            if self._dispatch_cursor.stopped(stop, i):
                break
            # A trace per withdrawal: its eligibility call, claim, submission and events.
            with background_span("dispatch withdrawal", **{"withdrawal.id": row.withdrawal_id}):
                try:
                    sub = await self._hand_over(row, unsubmitted)
                except Exception as exc:  # noqa: BLE001 - this withdrawal's error; the database's ends the round
                    # Passed over: ending the round there would keep each withdrawal after it in
                    # the batch from the provider. The database unavailable ends it (`failed`
                    # raises it): the next round starts from this withdrawal, not after the batch.
                    if is_unavailable(exc):
                        self._dispatch_cursor.rewind(i)
                    self._dispatch_failures.failed(exc, row.withdrawal_id, withdrawal_id=row.withdrawal_id)
                    continue
                if sub is None:
                    continue
                submitted += 1
                faults.point("payout.after_commit_before_callback")
                if sub.callback is not None:
                    payload, signature = sub.callback
                    try:
                        await self.handle_payout_event(
                            payout_pb2.HandlePayoutEventRequest(
                                provider=self.provider.name, payload=payload, signature=signature
                            )
                        )
                    except DomainError as exc:
                        log.warning("dev payout callback refused", extra={"reason": exc.reason})
                    except Exception as exc:  # noqa: BLE001 - the reconciler looks it up later
                        if is_unavailable(exc):  # the round ends: the next starts after this one, submitted
                            self._dispatch_cursor.rewind(i + 1)
                        self._dev_callback_failures.failed(exc, row.withdrawal_id, withdrawal_id=row.withdrawal_id)
        return submitted

    async def _hand_over(self, row: Any, unsubmitted: Any) -> Submission | None:
        """Claim `row` (APPROVED), submit it unless another replica is (`_submitting`), and store
        its provider reference; the provider's answer, or None if it was not submitted (held,
        submitted or being submitted by another replica, or not taken by the provider: logged)."""
        check(
            self.provider is not None and self.settings is not None,
            "self.provider is not None and self.settings is not None",
        )
        if row.status == WithdrawalStatus.APPROVED.value:
            if not await self._eligible_for_payout(row.creator_id, row.withdrawal_id, row.wallet_hold):
                return None
            if not await self._claim(row.withdrawal_id, row.creator_id, row.method_id):
                return None  # a clawback or a failed verification since the round began holds it, or it changed
        w = withdrawals.c
        store = update(withdrawals).where(w.withdrawal_id == row.withdrawal_id, unsubmitted)
        async with self._submitting(row.withdrawal_id) as (ours, held):
            if not ours:
                return None  # another replica is handing it to the provider now
            if not await self._still_unsubmitted(row.withdrawal_id, unsubmitted, held):
                return None  # another replica's submission was taken since this round read it
            faults.point("payout.after_claim_before_submit")
            try:
                sub: Submission = await provider_calls.call(
                    self.provider.name,
                    "submit",
                    self.provider.submit(row.withdrawal_id, row.provider_token, row.net_minor, row.currency_code),
                    self.settings.provider_timeout_s,
                )
            except ProviderRefused as exc:
                # Failed before the lock goes: until then another replica would submit it again.
                await self._refused_by_provider(row.withdrawal_id, str(exc), held)
                return None
            except Exception as exc:  # noqa: BLE001 - logged and counted; claimed, it is submitted again next round
                # At once, then once per FAILURE_LOG_INTERVAL_S per withdrawal (`retries`): every
                # failure is counted in livegifts_provider_call_failures_total all the same.
                if retries := self._not_taken_lines.occurred(row.withdrawal_id):
                    log.warning(
                        "the payout provider did not take a withdrawal; it is submitted again next round",
                        extra={"withdrawal_id": row.withdrawal_id, "error": repr(exc), "retries": retries},
                    )
                return None
            else:
                faults.point("payout.after_submit_before_commit")
                # Only while it waits for its reference: a callback may already have settled it.
                async with self._held_or_own_unit_of_work(held) as uow:
                    await uow.conn.execute(store.values(provider_ref=sub.provider_ref, updated_at_us=now_us()))
                    await uow.commit()
        return sub

    @contextlib.asynccontextmanager
    async def _submitting(self, withdrawal_id: str) -> AsyncIterator[tuple[bool, UnitOfWork | None]]:
        """Whether this replica may hand `withdrawal_id` to the provider now, until the block ends,
        and the transaction that holds it (None on SQLite).

        Every replica's dispatcher reads the withdrawals claimed but not yet taken by the provider
        (PROCESSING, no reference) to submit them again. Without this, one that a replica had just
        claimed and was submitting was submitted by every other replica's round (0.2 s apart) until
        its reference was stored: the provider took each as the same transfer (by withdrawal id),
        but a real one answers a request under a key still in flight with an error (counted as a
        failure) or a refusal, which failed a withdrawal the first replica was paying.

        On PostgreSQL: a transaction-level advisory lock (SUBMIT_LOCK_CLASS), tried, not waited
        for, in a transaction held open over the submission (as the outbox relay holds its claim
        over a publish; a lock only: no row, nor the withdrawals table, `_still_unsubmitted`) that
        reads the withdrawal again and stores its reference: its commit releases the lock once
        the reference is stored. One connection at a time (DB_POOL_SIZE is at least 3 on
        PostgreSQL, so the service's other work has one meanwhile, beside the outbox relay's
        over a publish): the claim comes before, in its own transaction. A replica that dies or
        is cut off mid-submission releases the lock with its session, and another's next round
        submits the withdrawal. SQLite has one process per database file, and a write
        transaction held over the submission would stop its every writer."""
        if self.db.dialect != "postgresql":
            yield True, None
            return
        async with self.db.unit_of_work() as uow:
            got = await uow.conn.execute(
                text("SELECT pg_try_advisory_xact_lock(:cls, :key)"),
                {"cls": SUBMIT_LOCK_CLASS, "key": _advisory_lock_key(withdrawal_id)},
            )
            yield bool(got.scalar_one()), uow

    async def _still_unsubmitted(self, withdrawal_id: str, unsubmitted: Any, held: UnitOfWork | None) -> bool:
        """Whether the withdrawal is still claimed and not taken by the provider, read in `held`
        (`_submitting`'s transaction, after its lock) where there is one, else in a unit of work
        of its own.

        In `held`, inside a savepoint rolled back at once: PostgreSQL releases the locks taken
        after a savepoint when it is rolled back to, so the read's ACCESS SHARE on withdrawals and
        its indexes goes with it, and the transaction waits for the provider holding the
        advisory lock only (taken before the savepoint). Kept until commit, it would hold a
        release's ALTER TABLE withdrawals up for the provider's answer (past
        MIGRATION_LOCK_TIMEOUT_S rolled back and retried, never through while the provider is
        that slow), and every statement on withdrawals would queue behind the waiting ALTER."""
        w = withdrawals.c
        still = select(w.withdrawal_id).where(w.withdrawal_id == withdrawal_id, unsubmitted)
        if held is None:
            async with self.db.unit_of_work(readonly=True) as uow:
                return (await uow.conn.execute(still)).first() is not None
        savepoint = await held.conn.begin_nested()
        try:
            return (await held.conn.execute(still)).first() is not None
        finally:
            await savepoint.rollback()

    @contextlib.asynccontextmanager
    async def _held_or_own_unit_of_work(self, held: UnitOfWork | None) -> AsyncIterator[UnitOfWork]:
        """`held` (`_submitting`'s transaction) where there is one, else a unit of work of its own."""
        if held is not None:
            yield held
            return
        async with self.db.unit_of_work() as uow:
            yield uow

    async def _refused_by_provider(self, withdrawal_id: str, reason: str, held: UnitOfWork | None) -> None:
        """A claimed withdrawal the provider refused for good (ProviderRefused: no transfer was
        made): FAILED, its diamonds and the day's total released, as a FAILED callback does.
        Retried, it would stay PROCESSING for ever, held, with no way out for an operator. In
        `held` (`_submitting`'s transaction, committed here) where there is one.

        The row is read locked: a callback settling the withdrawal at the same moment either
        committed first, and the refusal finds it settled (nothing to do), or waits for this
        one. Read unlocked, a callback committing between the read and the move failed the
        move's compare-and-set (ABORTED), counted as the dispatcher's item failure for a
        harmless race."""
        async with self._held_or_own_unit_of_work(held) as uow:
            row = await self._load_withdrawal(uow, withdrawal_id, lock=True)
            if row.status != WithdrawalStatus.PROCESSING.value or row.provider_ref:
                log.info(
                    "the payout provider refused a withdrawal settled or taken meanwhile; nothing to do",
                    extra={"withdrawal_id": withdrawal_id, "status": row.status, "reason": reason},
                )
                return  # settled meanwhile, or another replica's submission was taken
            await self._end_unpaid(
                uow, row, WithdrawalStatus.FAILED, f"refused by the provider: {reason}"[: domain.REASON_CHARS_MAX]
            )
            await uow.commit()
        log.warning(
            "the payout provider refused a withdrawal for good; it failed and its diamonds are back",
            extra={"withdrawal_id": withdrawal_id, "reason": reason},
        )

    async def _claim(self, withdrawal_id: str, creator_id: str, method_id: str) -> bool:
        """APPROVED -> PROCESSING (no provider reference yet) unless the creator's balance is now
        negative or the payout method is no longer VERIFIED; False if it was not claimed. The
        creator's and the method's rows are held (PostgreSQL `FOR SHARE`; SQLite serializes
        writers), so a clawback or a failed verification either committed before and is seen
        here, or waits for this claim and finds the withdrawal on its way.

        The withdrawal's row is taken before the creator's, as RejectWithdrawal and a callback
        take them (the withdrawal, then the creator's diamonds): the other way round, a claim and
        a rejection of the same withdrawal at once would each wait for the other (a deadlock)."""
        w, c = withdrawals.c, creators.c
        async with self.db.unit_of_work() as uow:
            claimed = await uow.conn.execute(
                update(withdrawals)
                .where(w.withdrawal_id == withdrawal_id, w.status == WithdrawalStatus.APPROVED.value)
                .values(status=WithdrawalStatus.PROCESSING.value, provider_ref="", updated_at_us=now_us())
            )
            if claimed.rowcount != 1:
                return False  # a callback, a rejection or another replica's claim came first
            balance_holds = (
                await uow.conn.execute(
                    select(_BALANCE_HOLDS).where(c.creator_id == creator_id).with_for_update(read=True)
                )
            ).scalar_one()
            if balance_holds:
                return False  # rolled back: still APPROVED, held while the balance is negative
            if not await _method_verified(uow, method_id, lock=True):
                return False  # rolled back: still APPROVED, held until the method is verified again
            await uow.commit()
        return True

    async def _eligible_for_payout(self, creator_id: str, withdrawal_id: str, recorded_hold: str = "") -> bool:
        """Whether the wallet still says the creator may withdraw (18+, not blocked); a creator it
        does not (or that it cannot answer for) is held and asked about again after
        DISPATCH_HOLD_RECHECK_S, so a held withdrawal costs no wallet call per round. The answer's
        reason is kept in creators.wallet_hold (Withdrawal.hold) when it differs from
        `recorded_hold`, the one the round read: no write while it stays the same."""
        check(self.settings is not None, "self.settings is not None")
        if self.wallet is None:
            return True  # no wallet wired (use cases alone): RequestWithdrawal did not ask either
        until = self._held_until.get(creator_id)
        if until is not None and time.monotonic() < until:
            return False
        try:
            await self._check_eligible(creator_id)
        except (FailedPrecondition, Unavailable) as exc:
            self._held_until[creator_id] = time.monotonic() + self.settings.dispatch_hold_recheck_s
            WITHDRAWALS_HELD.labels(reason=exc.reason).inc()
            if exc.reason != recorded_hold:
                await self._record_wallet_hold(creator_id, exc.reason)
            log.warning(
                "withdrawal held: the creator may not withdraw now",
                extra={"withdrawal_id": withdrawal_id, "creator_id": creator_id, "reason": exc.reason},
            )
            return False
        self._held_until.pop(creator_id, None)
        if recorded_hold:
            await self._record_wallet_hold(creator_id, "")
        return True

    async def _record_wallet_hold(self, creator_id: str, reason: str) -> None:
        """Keep why the wallet's word holds the creator's withdrawals ('' none), for Withdrawal.hold."""
        c = creators.c
        async with self.db.unit_of_work() as uow:
            await uow.conn.execute(
                update(creators).where(c.creator_id == creator_id, c.wallet_hold != reason).values(wallet_hold=reason)
            )
            await uow.commit()

    async def reconciler(self, stop: Any) -> None:
        """Background loop: look up at the provider the withdrawals whose callback is late."""
        check(self.settings is not None, "the reconciler needs settings")
        if self.settings.reconcile_after_s <= 0:
            await stop.wait()  # turned off
            return
        await run_every(
            stop,
            self.settings.reconcile_interval_s,
            lambda: self.reconcile_once(stop=stop),
            "late withdrawals settled",
        )

    async def reconcile_once(self, now: int | None = None, stop: asyncio.Event | None = None) -> int:
        """Ask the provider about up to a batch of withdrawals PROCESSING for longer than
        `reconcile_after_s` and apply each outcome it reports as its callback would be applied
        (signature, amount, once by the provider's event id); returns how many it settled.

        Choices: A) only alert on a late callback and let an operator have it resent (what
        docs/sre.md said before); B) look the transfer up, as every provider's API allows. B,
        through the callback's own path, so a look-up cannot do what a callback could not, and a
        callback that arrives after it is a duplicate.

        Each look-up has PROVIDER_TIMEOUT_S; one that times out or raises is logged with the
        withdrawal id, counted (outcome `provider_error`), and asked again in a later round like
        a transfer still under way; the rest of the round goes on. So it does after any other
        error of one withdrawal (outcome `error`), but the database unavailable, which ends the
        round at that withdrawal (`RoundCursor.item_failed`). Once `stop` is set (a SIGTERM) no
        further withdrawal of the round is looked up (`BatchCursor.stopped`): a round of
        RECONCILE_BATCH_SIZE_MAX look-ups, up to PROVIDER_TIMEOUT_S each, outlasted the shutdown
        grace against a slow provider.
        """
        check(
            self.provider is not None and self.settings is not None,
            "self.provider is not None and self.settings is not None",
        )
        w, m = withdrawals.c, payout_methods.c
        cutoff = (now_us() if now is None else now) - int(self.settings.reconcile_after_s * 1_000_000)
        batch = self.settings.reconcile_batch_size_max
        async with self.db.unit_of_work(readonly=True) as uow:
            rows = (
                await uow.conn.execute(
                    select(
                        w.withdrawal_id, w.provider_ref, w.net_minor, w.currency_code, w.updated_at_us, m.provider_token
                    )
                    .join(payout_methods, m.method_id == w.method_id)
                    .where(
                        w.status == WithdrawalStatus.PROCESSING.value,
                        # Claimed but not taken by the provider yet: the dispatcher submits those.
                        w.provider_ref != "",
                        w.updated_at_us <= cutoff,
                        self._reconcile_cursor.after(w.updated_at_us, w.withdrawal_id),
                    )
                    .order_by(w.updated_at_us, w.withdrawal_id)
                    .limit(batch)
                )
            ).all()
        # A full batch: the next round goes on after it; a short one: the next starts again.
        keys = [(r.updated_at_us, r.withdrawal_id) for r in rows]
        self._reconcile_cursor.advance(keys, batch)
        settled = 0
        for i, row in enumerate(rows):
            if self._reconcile_cursor.stopped(stop, i):
                break
            # A trace per withdrawal: its look-up at the provider, the outcome applied and its events.
            with background_span("reconcile withdrawal", **{"withdrawal.id": row.withdrawal_id}):
                try:
                    outcome, applied = await self._reconcile_withdrawal(row)
                except Exception as exc:  # noqa: BLE001 - one withdrawal's error; the database's ends the round
                    self._reconcile_cursor.item_failed(
                        exc, i, self._reconcile_failures, withdrawal_id=row.withdrawal_id
                    )
                    outcome, applied = "error", False
                WITHDRAWALS_RECONCILED.labels(outcome=outcome).inc()
                if applied:
                    settled += 1
                    log.info(
                        "late withdrawal settled from the provider's record",
                        extra={"withdrawal_id": row.withdrawal_id, "outcome": outcome},
                    )
        return settled

    async def _reconcile_withdrawal(self, row: Any) -> tuple[str, bool]:
        """Look one late withdrawal up at the provider and apply the answer: the outcome's label,
        and whether it settled the withdrawal now."""
        check(
            self.provider is not None and self.settings is not None,
            "self.provider is not None and self.settings is not None",
        )
        looked = await late_lookups.look_up(
            self.provider.name,
            self.provider.status(
                row.provider_ref, row.withdrawal_id, row.provider_token, row.net_minor, row.currency_code
            ),
            self.settings.provider_timeout_s,
            log,
            "the payout provider could not be asked about a late withdrawal; asked again next round",
            withdrawal_id=row.withdrawal_id,
        )
        if not looked.answered:  # it stays PROCESSING and is asked again
            return "provider_error", False
        answer = looked.value
        if answer is None:
            return "still_processing", False
        payload, signature = answer
        try:
            done = await self.handle_payout_event(
                payout_pb2.HandlePayoutEventRequest(provider=self.provider.name, payload=payload, signature=signature)
            )
        except DomainError as exc:
            if (await self.get_withdrawal(row.withdrawal_id)).status != payout_pb2.WITHDRAWAL_STATUS_PROCESSING:
                # Its callback (under another event id) settled it meanwhile: the status's
                # compare-and-set refused the second outcome, as it should.
                return "settled_meanwhile", False
            # Not applied (amount or currency differ, a bad signature, a transition the
            # withdrawal cannot make): still PROCESSING, asked again next round, gauge stays.
            log.warning(
                "the provider's outcome of a late withdrawal was refused",
                extra={"withdrawal_id": row.withdrawal_id, "reason": exc.reason},
            )
            return "refused", False
        if done.duplicate:
            return "duplicate", False
        return _status_label(done.withdrawal.status), True

    async def handle_payout_event(self, req: payout_pb2.HandlePayoutEventRequest) -> Any:
        """Verify a payout callback and apply it once: PAID (diamonds gone) or FAILED (diamonds back)."""
        check(self.provider is not None, "self.provider is not None")
        if req.provider != self.provider.name:
            raise InvalidArgument("unknown payout provider", "UNKNOWN_PROVIDER", provider=req.provider[:32])
        event = self.provider.parse_callback(req.payload, req.signature)
        try:
            return await self._apply_payout_event(event)
        except IntegrityError:
            # A concurrent delivery of the same provider event id committed first: a duplicate,
            # unless that delivery named another withdrawal.
            async with self.db.unit_of_work(readonly=True) as uow:
                first = await self._event_recorded_for(uow, event)
            if first is None:
                # Not this event id's unique key: nothing was recorded, so an OK would tell the
                # provider the outcome was applied and stop its retries. Let the error answer.
                raise
            self._refuse_another_event(event, first)
            return payout_pb2.HandlePayoutEventResponse(
                provider_event_id=event.provider_event_id,
                withdrawal=await self.get_withdrawal(event.withdrawal_id),
                duplicate=True,
            )

    async def _apply_payout_event(self, event: PayoutEvent) -> payout_pb2.HandlePayoutEventResponse:
        check(self.provider is not None, "self.provider is not None")
        async with self.db.unit_of_work() as uow:
            row = await self._load_withdrawal(uow, event.withdrawal_id)
            seen = await self._event_recorded_for(uow, event)
            if seen is not None:
                self._refuse_another_event(event, seen)  # another withdrawal's, or another type's
            # Checked before any duplicate is answered: every event recorded for this withdrawal
            # carried its net and currency, so one reporting another amount, under a recorded
            # event id or a new one, is no repeat of what we know, and an OK would acknowledge
            # a transfer nothing applied.
            if event.amount_minor != row.net_minor or event.currency_code != row.currency_code:
                # The provider reports moving another amount than we sent: refused on every retry
                # (a PROCESSING withdrawal stays so; a PAID or FAILED one keeps its outcome) until
                # an operator settles it with the provider (docs/sre.md, the payout callbacks row).
                log.warning(
                    "payout callback refused: its amount or currency differs from the withdrawal",
                    extra={
                        "withdrawal_id": row.withdrawal_id,
                        "provider_event_id": event.provider_event_id,
                        "event_type": event.event_type,
                        "amount_minor": event.amount_minor,
                        "currency_code": event.currency_code,
                        "withdrawal_net_minor": row.net_minor,
                        "withdrawal_currency_code": row.currency_code,
                    },
                )
                # The same metadata as the wallet's AMOUNT_MISMATCH: what the callback must carry.
                raise InvalidArgument(
                    "callback amount or currency differs from the withdrawal",
                    "AMOUNT_MISMATCH",
                    expected_amount_minor=row.net_minor,
                    expected_currency_code=row.currency_code,
                )
            if seen is not None:
                # Read again: `row` predates the look-up (PostgreSQL's READ COMMITTED takes a snapshot
                # per statement), so it can miss the outcome the delivery that recorded this event
                # applied, and the duplicate would show a settled withdrawal as still PROCESSING.
                now_row = await self._load_withdrawal(uow, event.withdrawal_id)
                return payout_pb2.HandlePayoutEventResponse(
                    provider_event_id=event.provider_event_id, withdrawal=_withdrawal_pb(now_row), duplicate=True
                )
            if row.status == event.target.value:
                # The same outcome under another event id (a reconciler look-up that came first,
                # a resend from the provider's dashboard): a duplicate, nothing recorded; its
                # amount was checked above. Logged and counted, as the wallet does a purchase's
                # success reported again: a PAID may also be a second transfer at the provider.
                PROVIDER_OUTCOMES_REPEATED.labels(outcome=row.status).inc()
                log.info(
                    "a withdrawal's outcome reported again under another event id: answered as a duplicate",
                    extra={
                        "withdrawal_id": row.withdrawal_id,
                        "provider": self.provider.name,
                        "provider_event_id": event.provider_event_id,
                        "status": row.status,
                    },
                )
                return payout_pb2.HandlePayoutEventResponse(
                    provider_event_id=event.provider_event_id, withdrawal=_withdrawal_pb(row), duplicate=True
                )
            try:
                domain.check_provider_outcome(WithdrawalStatus(row.status), event.target)
            except FailedPrecondition as exc:
                # Refused on every retry, nothing recorded (a retry after the dispatcher submits a
                # withdrawal not yet submitted applies). docs/sre.md "A payout callback refused
                # for its withdrawal's status" says what the operator does.
                PAYOUT_CALLBACKS_REFUSED.labels(reason=exc.reason).inc()
                log.warning(
                    _REFUSED_LINE[exc.reason],
                    extra={
                        "withdrawal_id": row.withdrawal_id,
                        "provider_event_id": event.provider_event_id,
                        "event_type": event.event_type,
                        "status": row.status,
                        "provider_ref": row.provider_ref,
                        "reason": exc.reason,
                    },
                )
                raise
            ts = now_us()
            await uow.conn.execute(
                insert(payout_events).values(
                    provider=self.provider.name,
                    provider_event_id=event.provider_event_id,
                    withdrawal_id=row.withdrawal_id,
                    event_type=event.event_type,
                    received_at_us=ts,
                )
            )
            c = creators.c
            if event.target is WithdrawalStatus.PAID:
                moved = await self._move(uow, row, WithdrawalStatus.PAID, paid_at_us=ts)
                await uow.conn.execute(
                    update(creators)
                    .where(c.creator_id == row.creator_id)
                    .values(
                        diamonds_held=c.diamonds_held - row.diamonds,
                        diamonds_withdrawn=c.diamonds_withdrawn + row.diamonds,
                        updated_at_us=ts,
                    )
                )
                await self._withdrawal_event(uow, _SUBJECT[WithdrawalStatus.PAID], moved, moved.failure_reason)
            else:
                moved = await self._end_unpaid(
                    uow, row, WithdrawalStatus.FAILED, event.failure_reason or "payout failed"
                )
            await uow.commit()
        return payout_pb2.HandlePayoutEventResponse(
            provider_event_id=event.provider_event_id, withdrawal=_withdrawal_pb(moved), duplicate=False
        )

    async def _event_recorded_for(self, uow: UnitOfWork, event: PayoutEvent) -> signing.RecordedEvent | None:
        """The withdrawal and event type this provider event id was recorded with, or None if it is new."""
        check(self.provider is not None, "self.provider is not None")
        pe = payout_events.c
        row = (
            await uow.conn.execute(
                select(pe.withdrawal_id, pe.event_type).where(
                    pe.provider == self.provider.name, pe.provider_event_id == event.provider_event_id
                )
            )
        ).first()
        return None if row is None else signing.RecordedEvent(row.withdrawal_id, row.event_type)

    def _refuse_another_event(self, event: PayoutEvent, first: signing.RecordedEvent) -> None:
        """PROVIDER_EVENT_ID_REUSED unless `event` is the one its id was recorded with (then a duplicate).

        A PAID under the event id of the withdrawal's FAILED, answered as a duplicate, would stop
        the provider's retries of a transfer that went out while the diamonds went back.
        """
        check(self.provider is not None, "self.provider is not None")
        signing.refuse_another_event(
            self.provider.name, event.provider_event_id, "withdrawal", first, event.withdrawal_id, event.event_type
        )

    # ---- clawback ------------------------------------------------------------------------

    async def claw_back(self, uow: UnitOfWork, events: list[wallet_events.PurchaseReversed]) -> None:
        """Consumer of wallet.purchase.reversed: take back the diamonds the reversed coins earned.

        Attribution (domain.attribute_reversal): the sender's newest earnings first, among gifts
        recorded before the reversal, up to the coins the wallet reports as already spent (the
        part of the purchase's coins that had reached creators, README "Reversals"), at the
        share each was credited at; applied after newer reversals of the sender, it may then
        stand in for them (`_stand_in_takes`). The balance may go negative; one
        clawback entry per reversal per creator records it. What cannot be taken yet (the
        gifts' events not consumed so far, or beyond CLAWBACK_ROWS_MAX) is recorded as a
        shortfall, which `settle_shortfalls_once` takes from those earnings once they arrive.
        """
        check(self.settings is not None, "self.settings is not None")
        for ev in events:
            check(ev.coins > 0 and bool(ev.user_id), f"reversal {ev.event_id} has coins and a user")
        # The wallet says how many of the coins had reached creators (README "Reversals").
        wanted = [(ev, min(ev.coins_already_spent, ev.coins)) for ev in events]
        await self._lock_senders(uow, [ev.user_id for ev, want in wanted if want > 0])
        claws: list[_Claw] = []
        for ev, want in wanted:
            if want <= 0:
                continue
            reversal = _Reversal(
                ev.event_id,
                ev.purchase_id,
                ev.user_id,
                ev.kind or "REVERSED",
                ev.occurred_at.ToMicroseconds() if ev.HasField("occurred_at") else now_us(),
            )
            # The sender's older shortfalls first: their gifts may have arrived, and this newer
            # reversal must not take them (`_settle_sender`).
            await self._settle_sender(uow, reversal.sender_id, (reversal.at_us, reversal.event_id), claws)
            taken = await self._claw(uow, reversal, want, claws, entry_id=reversal.event_id)
            if taken < want:
                ts = now_us()
                await uow.conn.execute(
                    insert(clawback_shortfalls).values(
                        reversal_event_id=reversal.event_id,
                        purchase_id=reversal.purchase_id,
                        sender_id=reversal.sender_id,
                        kind=reversal.kind,
                        coins_open=want - taken,
                        reversed_at_us=reversal.at_us,
                        created_at_us=ts,
                        updated_at_us=ts,
                    )
                )
                log.warning(
                    "purchase reversal: coins not clawed back yet (shortfall)",
                    extra={"purchase_id": ev.purchase_id, "coins_open": want - taken, "coins": want},
                )
        await self._apply_claws(uow, claws)

    async def shortfall_settler(self, stop: Any) -> None:
        """Background loop: claw back open shortfalls from earnings that arrived after their reversal."""
        check(self.settings is not None, "the settler needs settings")
        await run_every(
            stop,
            self.settings.clawback_settle_interval_s,
            lambda: self.settle_shortfalls_once(stop),
            "settled clawback shortfalls",
        )

    async def settle_shortfalls_once(self, stop: asyncio.Event | None = None) -> int:
        """Settle what it can of the next SHORTFALL_BATCH open shortfalls; returns the coins clawed back.

        Rounds go through the open shortfalls in turn (by reversal id, from where the last round
        stopped), so any number that cannot settle yet never keeps the others waiting; nor does
        one whose settling raises (logged with its reversal id, `ItemFailures`), but the database
        unavailable, which ends the round at that shortfall. Each one is
        settled in its own transaction (`_settle_shortfall`: after its sender's older ones, under
        their row locks, and with compare-and-set on each earning's clawed coins), so replicas
        settling at once take nothing twice. Once `stop` is set (a SIGTERM) no further shortfall of
        the round is started (`BatchCursor.stopped`): a round is SHORTFALL_BATCH transactions,
        each up to DB_STATEMENT_TIMEOUT_S a statement against a slow database, far past the
        shutdown grace.
        """
        sf = clawback_shortfalls.c
        async with self.db.unit_of_work(readonly=True) as uow:
            open_rows = (
                await uow.conn.execute(
                    select(clawback_shortfalls)
                    .where(sf.coins_open > 0, sf.reversal_event_id > self._shortfall_cursor.at)
                    .order_by(sf.reversal_event_id)
                    .limit(SHORTFALL_BATCH)
                )
            ).all()
        self._shortfall_cursor.advance([r.reversal_event_id for r in open_rows], SHORTFALL_BATCH)
        if not open_rows:
            await self._set_shortfall_open()  # some may lie before the cursor
            return 0
        # A trace per round with open shortfalls: its clawbacks and the clawed_back events they
        # write (which carry it on); a round with none makes no trace. Its events name the
        # shortfalls settled; one that cannot settle yet leaves a trace per round without one.
        try:
            with background_span("settle shortfalls", **{"clawback.shortfalls_open": str(len(open_rows))}) as span:
                settled = 0
                for i, row in enumerate(open_rows):
                    if self._shortfall_cursor.stopped(stop, i):
                        break
                    try:
                        async with self.db.unit_of_work() as uow:
                            taken = await self._settle_shortfall(uow, row.reversal_event_id)
                            if taken == 0:
                                continue  # nothing arrived yet (or another replica settled it): nothing written
                            await uow.commit()
                    except Exception as exc:  # noqa: BLE001 - this shortfall's error; the database's ends the round
                        if is_unavailable(exc):  # the next round starts from this one, not after the batch
                            self._shortfall_cursor.rewind(i)
                        self._shortfall_failures.failed(
                            exc, row.reversal_event_id, reversal_event_id=row.reversal_event_id
                        )
                        continue
                    settled += taken
                    span.add_event("shortfall settled", {"reversal.event_id": row.reversal_event_id, "coins": taken})
                span.set_attribute("clawback.coins_settled", settled)
        except Exception:
            # A round that fails (the database gone midway, say) still exports
            # the age: that shortfall stays open, and LivegiftsClawbackShortfallOpen must see it
            # grow, not the value of the last round that went through (a new pod's 0). The
            # round's own error is the one run_every logs, whatever the export meets.
            with contextlib.suppress(Exception):
                await self._set_shortfall_open()
            raise
        await self._set_shortfall_open()
        return settled

    async def _set_shortfall_open(self) -> None:
        """Export the coins open shortfalls still owe and how long the oldest has been open (the
        clawback shortfall gauges; LivegiftsClawbackShortfallOpen reads the age)."""
        sf = clawback_shortfalls.c
        async with self.db.unit_of_work(readonly=True) as uow:
            still_open, oldest_us = (
                await uow.conn.execute(
                    select(func.coalesce(func.sum(sf.coins_open), 0), func.min(sf.created_at_us)).where(
                        sf.coins_open > 0
                    )
                )
            ).one()
        CLAWBACK_SHORTFALL_OPEN.set(int(still_open))
        CLAWBACK_SHORTFALL_OLDEST.set(max(0, now_us() - oldest_us) / 1e6 if oldest_us is not None else 0)

    async def _settle_shortfall(self, uow: UnitOfWork, reversal_event_id: str) -> int:
        """Claw back what the sender's earnings now allow of one open shortfall, and of the
        sender's older ones first (`_settle_sender`), in `uow`; the coins taken."""
        sf = clawback_shortfalls.c
        row = (
            await uow.conn.execute(
                select(sf.sender_id, sf.reversed_at_us).where(
                    sf.reversal_event_id == reversal_event_id, sf.coins_open > 0
                )
            )
        ).first()
        if row is None:
            return 0
        return await self._settle_senders(uow, {row.sender_id: (row.reversed_at_us, reversal_event_id)})

    async def _settle_senders(
        self, uow: UnitOfWork, upto: dict[str, tuple[int, str]], also_lock: tuple[str, ...] = ()
    ) -> int:
        """Each sender's open shortfalls up to `upto[sender]` (`_settle_sender`), every sender locked
        first and the creators' rows written last (`_apply_claws`, with `also_lock`); the coins taken."""
        await self._lock_senders(uow, list(upto))
        claws: list[_Claw] = []
        taken = 0
        for sender_id, last in sorted(upto.items()):
            taken += await self._settle_sender(uow, sender_id, last, claws)
        await self._apply_claws(uow, claws, also_lock=also_lock)
        return taken

    async def _lock_senders(self, uow: UnitOfWork, sender_ids: list[str]) -> None:
        """Hold, until commit, the clawback lock of each sender (PostgreSQL; SQLite serializes writers).

        Every clawback (the reversal consumer, the settler, RequestWithdrawal's settling) takes
        the locks of the senders whose shortfalls and earnings it is about to touch, all at once
        and in one order (by key), before any row; the creators' rows come last, in creator order
        (`_apply_claws`). So the rows of one sender are clawed by one transaction at a time, and no
        two transactions take the same rows in opposite orders: before, a batch that clawed back
        for two senders, or a settling of several shortfalls, locked one sender's rows after
        another's creators, and met a transaction doing it the other way round (a deadlock: one
        side aborted, ABORTED to a RequestWithdrawal), or found an earning clawed meanwhile (CONFLICT).
        """
        if self.db.dialect != "postgresql":
            return
        for key in sorted({_advisory_lock_key(s) for s in sender_ids}):
            await uow.conn.execute(
                text("SELECT pg_advisory_xact_lock(:cls, :key)"), {"cls": SENDER_LOCK_CLASS, "key": key}
            )

    async def _settle_sender(self, uow: UnitOfWork, sender_id: str, upto: tuple[int, str], claws: list[_Claw]) -> int:
        """Claw back what the sender's earnings now allow of each of their open shortfalls reversed
        up to `upto` (reversed at, reversal id), oldest first, in `uow`; the coins taken.

        Oldest first: a reversal takes only earnings of gifts recorded before it, so what an older
        one may take a newer one may take too, not the other way round. Served first, a newer one
        could take the only earnings the older one may have, and the gifts that arrive later for
        the newer one are out of the older one's reach, and it could only stand in for the newer
        one (`_stand_in_takes`, which the reversal consumer relies on when a newer reversal was
        applied first). The rows are locked in that order and read again (PostgreSQL; SQLite
        serializes writers), so the settler, its replicas, RequestWithdrawal and the reversal
        consumer settling at once take nothing twice: the second finds what the first left.
        """
        sf = clawback_shortfalls.c
        at_us, event_id = upto
        rows = (
            await uow.conn.execute(
                select(clawback_shortfalls)
                .where(
                    sf.sender_id == sender_id,
                    sf.coins_open > 0,
                    or_(sf.reversed_at_us < at_us, and_(sf.reversed_at_us == at_us, sf.reversal_event_id <= event_id)),
                )
                .order_by(sf.reversed_at_us, sf.reversal_event_id)
                .with_for_update()
            )
        ).all()
        settled = 0
        for row in rows:
            reversal = _Reversal(row.reversal_event_id, row.purchase_id, row.sender_id, row.kind, row.reversed_at_us)
            taken = await self._claw(uow, reversal, row.coins_open, claws, entry_id=new_event_id())
            if taken:
                await uow.conn.execute(
                    update(clawback_shortfalls)
                    .where(sf.reversal_event_id == row.reversal_event_id)
                    .values(coins_open=sf.coins_open - taken, updated_at_us=now_us())
                )
                settled += taken
        if settled:
            uow.after_commit(lambda: CLAWBACK_SHORTFALL_SETTLED.inc(settled))
        return settled

    async def _shortfalls_owed_by(self, uow: UnitOfWork, creator_id: str) -> list[str]:
        """The open shortfalls (reversal ids, at most SHORTFALL_BATCH) that the creator's own open
        earnings would pay: their sender gifted this creator before the reversal."""
        sf = clawback_shortfalls.c
        e = earnings.c
        rows = await uow.conn.execute(
            select(sf.reversal_event_id)
            .where(
                sf.coins_open > 0,
                select(e.event_id)
                .where(
                    e.sender_id == sf.sender_id,
                    e.creator_id == creator_id,
                    e.coins_clawed_back < e.coins,
                    _EARNING_RECORDED_AT <= sf.reversed_at_us,
                )
                .exists(),
            )
            .order_by(sf.reversal_event_id)
            .limit(SHORTFALL_BATCH)
        )
        return list(rows.scalars())

    async def _settle_shortfalls_of(self, uow: UnitOfWork, creator_id: str) -> int:
        """Settle, in `uow`, the open shortfalls that the creator's own open earnings would pay.

        RequestWithdrawal calls it before it reads the balance: diamonds credited after a reversal
        was recorded as a shortfall are clawed back before they can be withdrawn, not up to
        CLAWBACK_SETTLE_INTERVAL_S later by the settler. Few shortfalls are ever open (the
        partial index), and only those whose sender has such an earning with this creator are
        touched (the first SHORTFALL_BATCH; the settler takes any beyond).

        Limits, on PostgreSQL (SQLite serializes writers, so neither arises there): a gift credit
        that commits between this settling and the balance read (READ COMMITTED, a window of
        milliseconds) can still be held; the settler then claws it back and the dispatcher holds
        the withdrawal while the balance is negative. The senders are locked first, all at once,
        and the creators' rows last, this creator's among them (`_lock_senders`).
        """
        owed = await self._shortfalls_owed_by(uow, creator_id)
        if not owed:
            return 0
        sf = clawback_shortfalls.c
        rows = (
            await uow.conn.execute(
                select(sf.sender_id, sf.reversed_at_us, sf.reversal_event_id)
                .where(one_of(self.db.dialect, sf.reversal_event_id, owed), sf.coins_open > 0)
                .order_by(sf.reversed_at_us, sf.reversal_event_id)
            )
        ).all()
        # Each sender's shortfalls up to its newest one owed here, oldest first (`_settle_sender`).
        # The newest is the last in the database's order, which `_settle_sender`'s `<=` compares
        # in too: Python's max compared ids by code point, and under a language's collation
        # (PostgreSQL's en_US: "a1" before "B1") the id it picked at a shared microsecond could
        # be older there, leaving the other shortfall of that microsecond unsettled.
        upto: dict[str, tuple[int, str]] = {}
        for r in rows:
            upto[r.sender_id] = (r.reversed_at_us, r.reversal_event_id)
        return await self._settle_senders(uow, upto, also_lock=(creator_id,))

    async def _claw(self, uow: UnitOfWork, rv: _Reversal, coins: int, claws: list[_Claw], *, entry_id: str) -> int:
        """Take up to `coins` from the sender's open earnings of gifts recorded before the reversal; the coins taken.

        The caller holds the sender's lock (`_lock_senders`); what each creator loses is added to
        `claws`, for `_apply_claws` to write once the transaction has taken every sender's share.
        """
        check(self.settings is not None, "self.settings is not None")
        e = earnings.c
        rows = (
            await uow.conn.execute(
                select(e.event_id, e.creator_id, e.coins, e.coins_clawed_back, e.share_bp)
                .where(
                    e.sender_id == rv.sender_id,
                    e.coins_clawed_back < e.coins,
                    # Recorded before the reversal (so paid for before it): a gift the sweeper
                    # settled after the reversal still counts; one sent after it was paid by other coins.
                    _EARNING_RECORDED_AT <= rv.at_us,
                )
                .order_by(e.occurred_at_us.desc(), e.event_id.desc())
                .limit(self.settings.clawback_rows_max)
            )
        ).all()
        takes = (
            domain.attribute_reversal(
                coins,
                [domain.EarningRow(r.event_id, r.creator_id, r.coins - r.coins_clawed_back, r.share_bp) for r in rows],
            )
            if rows
            else []
        )
        left = coins - sum(t.coins for t in takes)
        if left > 0:  # applied after newer reversals of the sender, it may stand in for them
            takes += await self._stand_in_takes(uow, rv, left, claws)
        if not takes:
            return 0
        by_creator: dict[str, list[int]] = {}
        for t in takes:
            changed = await uow.conn.execute(
                update(earnings)
                .where(e.event_id == t.event_id, e.coins_clawed_back + t.coins <= e.coins)
                .values(coins_clawed_back=e.coins_clawed_back + t.coins)
            )
            if changed.rowcount != 1:
                raise Aborted("an earning was clawed back concurrently, retry", "CONFLICT")
            acc = by_creator.setdefault(t.creator_id, [0, 0])
            acc[0] += t.coins
            acc[1] += t.units
        claws.append(_Claw(rv, entry_id, by_creator))
        taken = sum(t.coins for t in takes)
        log.info(
            "purchase reversal clawed back",
            extra={"purchase_id": rv.purchase_id, "creators": len(by_creator), "coins": taken},
        )
        return taken

    async def _stand_in_takes(
        self, uow: UnitOfWork, rv: _Reversal, coins: int, claws: list[_Claw]
    ) -> list[domain.Take]:
        """What the reversal may take, up to `coins`, of the sender's open earnings recorded after it,
        in place of newer reversals of the sender that took earnings it could have taken
        (domain.stand_in_takes: never more in all than the reversals claim).

        A newer reversal applied first (an older one nak'ed and redelivered, or parked and
        replayed) takes, newest first, earnings of gifts recorded before the older one; the gifts
        between the two, which the newer one would have taken, come later and lay out of the
        older one's reach, which left its shortfall open for good. Entries written before
        migration 0016 have no reversal time and free nothing (`clawbacks.reversed_at_us`).
        """
        check(self.settings is not None, "self.settings is not None")
        e, cb = earnings.c, clawbacks.c
        recorded = _EARNING_RECORDED_AT
        newer = [
            (int(at), int(n))
            for at, n in (
                await uow.conn.execute(
                    select(cb.reversed_at_us, func.sum(cb.coins))
                    .where(cb.sender_id == rv.sender_id, cb.reversed_at_us > rv.at_us)
                    .group_by(cb.reversed_at_us)
                )
            ).all()
        ]
        # This transaction's entries, not written yet (`_apply_claws`).
        newer += [
            (cl.rv.at_us, sum(c for c, _ in cl.by_creator.values()))
            for cl in claws
            if cl.rv.sender_id == rv.sender_id and cl.rv.at_us > rv.at_us
        ]
        if not newer:
            return []
        after = and_(e.sender_id == rv.sender_id, recorded > rv.at_us)
        open_rows = (
            await uow.conn.execute(
                select(e.event_id, e.creator_id, e.coins, e.coins_clawed_back, e.share_bp, recorded.label("at"))
                .where(
                    after,
                    # Most gifts are sent when recorded, so occurred_at_us bounds this scan by
                    # ix_earnings_sender_newest; one sent by a clock behind the one that recorded
                    # it (the sweeper on another pod) is left out, which only takes less.
                    e.occurred_at_us > rv.at_us,
                    e.coins_clawed_back < e.coins,
                    recorded <= max(at for at, _ in newer),
                )
                .order_by(e.occurred_at_us.desc(), e.event_id.desc())
                .limit(self.settings.clawback_rows_max)
            )
        ).all()
        if not open_rows:
            return []
        # Every clawed earning recorded after the reversal, by the recording time alone: one sent
        # (occurred_at_us) by a clock behind the one that recorded it, left out, was cover counted
        # twice, and the reversal took a gift no reversal after it was left to pay for.
        clawed_after = (
            await uow.conn.execute(select(recorded, e.coins_clawed_back).where(after, e.coins_clawed_back > 0))
        ).all()
        return domain.stand_in_takes(
            coins,
            rv.at_us,
            newer,
            [(int(at), int(n)) for at, n in clawed_after],
            [
                (int(r.at), domain.EarningRow(r.event_id, r.creator_id, r.coins - r.coins_clawed_back, r.share_bp))
                for r in open_rows
            ],
        )

    async def _apply_claws(self, uow: UnitOfWork, claws: list[_Claw], also_lock: tuple[str, ...] = ()) -> None:
        """Write what `claws` took to the creators' rows, each row once and in creator order (with
        `also_lock`, rows the caller writes next, locked in the same order), then one clawbacks
        row and one `payout.diamonds.clawed_back` event per entry and creator, in entry order.

        Creator order is sorted()'s, by code point, whatever the database's collation: a gift
        batch locks the same rows in that order too (`_credit_statements`, COLLATE "C")."""
        if not any(cl.by_creator for cl in claws):
            return
        ts = now_us()
        c = creators.c
        units_before: dict[str, int] = {}
        clawed = {cr for cl in claws for cr in cl.by_creator}
        for creator_id in sorted(clawed | set(also_lock)):
            if creator_id not in clawed:
                # Not clawed here: only locked, in its place in the order, for the caller's write.
                await uow.conn.execute(select(c.creator_id).where(c.creator_id == creator_id).with_for_update())
                continue
            units = sum(cl.by_creator[creator_id][1] for cl in claws if creator_id in cl.by_creator)
            # Same exact arithmetic as credits: whole diamonds of the accumulated units, remainder kept.
            whole_after = (c.clawed_units + units) // BP_DENOMINATOR
            whole_before = c.clawed_units // BP_DENOMINATOR
            row = (
                await uow.conn.execute(
                    update(creators)
                    .where(c.creator_id == creator_id)
                    .values(
                        clawed_units=c.clawed_units + units,
                        diamonds_clawed_back=c.diamonds_clawed_back + (whole_after - whole_before),
                        diamonds_available=c.diamonds_available - (whole_after - whole_before),
                        updated_at_us=ts,
                    )
                    .returning(c.clawed_units)
                )
            ).one()
            units_before[creator_id] = row.clawed_units - units
        rows, out = [], []
        for cl in claws:
            for creator_id, (creator_coins, units) in sorted(cl.by_creator.items()):
                # Each entry's whole diamonds, as if its creators' rows had been written entry by entry.
                diamonds = domain.credit_delta(units_before[creator_id], units)
                units_before[creator_id] += units
                rows.append(
                    {
                        "reversal_event_id": cl.entry_id,
                        "creator_id": creator_id,
                        "purchase_id": cl.rv.purchase_id,
                        "sender_id": cl.rv.sender_id,
                        "kind": cl.rv.kind,
                        "coins": creator_coins,
                        "units": units,
                        "diamonds": diamonds,
                        "created_at_us": ts,
                        "reversed_at_us": cl.rv.at_us,
                    }
                )
                eid = new_event_id()
                out.append(
                    (
                        "payout.diamonds.clawed_back",
                        eid,
                        events_pb2.DiamondsClawedBack(
                            event_id=eid,
                            creator_id=creator_id,
                            purchase_id=cl.rv.purchase_id,
                            coins=creator_coins,
                            diamonds=diamonds,
                            occurred_at=to_timestamp(ts),
                        ),
                    )
                )
        await uow.conn.execute(insert(clawbacks), rows)
        await self.outbox.add_many(uow, out)

    # ---- statement -----------------------------------------------------------------------

    async def get_statement(self, creator_id: str, year: int) -> payout_pb2.Statement:
        """Earnings, clawbacks and paid withdrawals by UTC month, for tax records, each month with the
        balance it opened and closed with (whole diamonds not paid out or clawed back)."""
        require_id(creator_id, "creator_id")
        if not 2000 <= year <= 2200:
            raise InvalidArgument("year must be 2000..2200", "INVALID_YEAR")
        bounds = [
            int(dt.datetime(year + (m - 1) // 12, (m - 1) % 12 + 1, 1, tzinfo=dt.UTC).timestamp() * 1_000_000)
            for m in range(1, 14)
        ]
        e, cb, w = earnings.c, clawbacks.c, withdrawals.c
        out = payout_pb2.Statement(creator_id=creator_id, year=year)
        async with self.db.unit_of_work(readonly=True, snapshot=True) as uow:  # the sections agree
            conn = uow.conn
            # Units credited before the year: the creator's total (its row, written with each
            # earning: the audit's creator_units_minus_earnings) less those credited since, so a
            # statement reads the year and after it, not every earning of the years before
            # (millions for a big creator, each read of the index and the table).
            earned = (
                await conn.execute(select(creators.c.earned_units).where(creators.c.creator_id == creator_id))
            ).scalar_one_or_none()
            since = (
                await conn.execute(
                    select(func.coalesce(func.sum(e.units), 0)).where(
                        e.creator_id == creator_id, e.credited_at_us >= bounds[0]
                    )
                )
            ).scalar_one()
            cum = int(earned or 0) - int(since)
            # The balance at the year's start, from the same rows as the months: whole diamonds
            # credited, less those clawed back and paid out before it.
            clawed_before = (
                await conn.execute(
                    select(func.coalesce(func.sum(cb.diamonds), 0)).where(
                        cb.creator_id == creator_id, cb.created_at_us < bounds[0]
                    )
                )
            ).scalar_one()
            paid_before = (
                await conn.execute(
                    select(func.coalesce(func.sum(w.diamonds), 0)).where(
                        w.creator_id == creator_id,
                        w.status == WithdrawalStatus.PAID.value,
                        w.paid_at_us < bounds[0],
                    )
                )
            ).scalar_one()
            balance = cum // BP_DENOMINATOR - int(clawed_before) - int(paid_before)
            for month in range(12):
                lo, hi = bounds[month], bounds[month + 1]
                coins, units = (
                    await conn.execute(
                        select(func.coalesce(func.sum(e.coins), 0), func.coalesce(func.sum(e.units), 0)).where(
                            e.creator_id == creator_id, e.credited_at_us >= lo, e.credited_at_us < hi
                        )
                    )
                ).one()
                clawed = (
                    await conn.execute(
                        select(func.coalesce(func.sum(cb.diamonds), 0)).where(
                            cb.creator_id == creator_id, cb.created_at_us >= lo, cb.created_at_us < hi
                        )
                    )
                ).scalar_one()
                paid = (
                    await conn.execute(
                        select(
                            w.currency_code,
                            func.sum(w.diamonds),
                            func.sum(w.gross_minor),
                            func.sum(w.fee_minor),
                            func.sum(w.net_minor),
                        )
                        .where(
                            w.creator_id == creator_id,
                            w.status == WithdrawalStatus.PAID.value,
                            w.paid_at_us >= lo,
                            w.paid_at_us < hi,
                        )
                        .group_by(w.currency_code)
                        .order_by(w.currency_code)
                    )
                ).all()
                before, cum = cum, cum + int(units)
                earned = cum // BP_DENOMINATOR - before // BP_DENOMINATOR
                opening, balance = balance, balance + earned - int(clawed) - sum(int(p[1]) for p in paid)
                out.months.append(
                    payout_pb2.StatementMonth(
                        month=month + 1,
                        coins_received=int(coins),
                        earned_units=int(units),
                        diamonds_earned=earned,
                        diamonds_clawed_back=int(clawed),
                        opening_diamonds=opening,
                        closing_diamonds=balance,
                        paid=[
                            payout_pb2.StatementPayout(
                                currency_code=p[0],
                                diamonds=int(p[1]),
                                gross_minor=int(p[2]),
                                fee_minor=int(p[3]),
                                net_minor=int(p[4]),
                            )
                            for p in paid
                        ],
                    )
                )
        return out

    # ---- audit ---------------------------------------------------------------------------

    async def audit(self) -> payout_pb2.PayoutAudit:
        """Totals for invariants 4 and 5, the entries behind held, withdrawn and clawed-back diamonds,
        the reversals consumed in coins (clawed back, still owed), creators overdrawn, earnings at
        a wrong share, parked events and the outbox's cut-off marks."""
        c = creators.c
        w = withdrawals.c
        async with self.db.unit_of_work(readonly=True, snapshot=True) as uow:
            if self.db.dialect == "postgresql":
                # One snapshot for every total, so a payout settling mid-audit cannot skew them.
                await uow.conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"))
            totals = (
                await uow.conn.execute(
                    select(
                        func.coalesce(func.sum(c.coins_received), 0),
                        func.coalesce(func.sum(c.earned_units), 0),
                        func.coalesce(func.sum(c.diamonds_credited), 0),
                        func.coalesce(func.sum(c.earned_units % BP_DENOMINATOR), 0),
                        func.coalesce(func.sum(c.diamonds_available), 0),
                        func.coalesce(func.sum(c.diamonds_held), 0),
                        func.coalesce(func.sum(c.diamonds_withdrawn), 0),
                        func.coalesce(func.sum(c.diamonds_clawed_back), 0),
                        func.coalesce(func.sum(c.clawed_units), 0),
                        func.coalesce(func.sum(c.clawed_units % BP_DENOMINATOR), 0),
                        # Creators overdrawn: a balance goes below zero by clawbacks only (a
                        # withdrawal holds only what is available), never by held + withdrawn.
                        func.coalesce(
                            func.sum(case((c.diamonds_held + c.diamonds_withdrawn > c.diamonds_credited, 1), else_=0)),
                            0,
                        ),
                    )
                )
            ).one()
            # One read of earnings for the three totals and the coins clawed back of them (the
            # reversals' side of the tie-out below): earnings is the largest table.
            ledger = (
                await uow.conn.execute(
                    select(
                        func.count(),
                        func.coalesce(func.sum(earnings.c.units), 0),
                        func.coalesce(func.sum(earnings.c.coins), 0),
                        func.coalesce(func.sum(earnings.c.coins_clawed_back), 0),
                    )
                )
            ).one()
            open_ = (
                await uow.conn.execute(
                    select(func.count(), func.coalesce(func.sum(w.diamonds), 0)).where(
                        w.status.in_([s.value for s in OPEN_STATUSES])
                    )
                )
            ).one()
            paid = (
                await uow.conn.execute(
                    select(func.coalesce(func.sum(w.diamonds), 0)).where(w.status == WithdrawalStatus.PAID.value)
                )
            ).scalar_one()
            cb = clawbacks.c
            clawed, clawed_coins, clawed_entry_units = (
                await uow.conn.execute(
                    select(
                        func.coalesce(func.sum(cb.diamonds), 0),
                        func.coalesce(func.sum(cb.coins), 0),
                        func.coalesce(func.sum(cb.units), 0),
                    )
                )
            ).one()
            # What reversals still owe (with the entries and the earnings' coins clawed back, the
            # reversals consumed in coins, to tie out with the wallet's claims).
            owed = (await uow.conn.execute(open_shortfalls_select())).scalar_one()
            e = earnings.c
            units_mismatch = (
                await uow.conn.execute(select(func.count()).where(e.units != e.coins * e.share_bp))
            ).scalar_one()
            unknown_share = (
                await uow.conn.execute(
                    select(func.count()).where(e.share_bp.not_in(select(policies.c.creator_share_bp)))
                )
            ).scalar_one()
            parked = (await uow.conn.execute(select(func.count()).select_from(common.dead_letters))).scalar_one()
            pending = await self.outbox.pending(uow)
            first_pending, last = await self.outbox.marks(uow)
        events, units_by_event, coins_by_event, earnings_clawed = ledger
        # Creator rows vs the per-event record, each 0 when they agree. Reported apart: in one sum
        # (ledger_sum, kept for older CLIs) a unit too many and a coin too few cancel out.
        units_diff = int(totals[1]) - int(units_by_event)
        coins_diff = int(totals[0]) - int(coins_by_event)
        return payout_pb2.PayoutAudit(
            coins_received=int(totals[0]),
            earned_units=int(totals[1]),
            diamonds_credited=int(totals[2]),
            remainder_units=int(totals[3]),
            diamonds_available=int(totals[4]),
            diamonds_held=int(totals[5]),
            diamonds_withdrawn=int(totals[6]),
            diamonds_clawed_back=int(totals[7]),
            events_consumed=int(events),
            outbox_pending=pending,
            ledger_sum=units_diff + coins_diff,
            creator_units_minus_earnings=units_diff,
            creator_coins_minus_earnings=coins_diff,
            clawed_units=int(totals[8]),
            clawback_remainder_units=int(totals[9]),
            withdrawals_pending=int(open_[0]),
            diamonds_in_open_withdrawals=int(open_[1]),
            diamonds_in_paid_withdrawals=int(paid),
            diamonds_in_clawback_entries=int(clawed),
            coins_in_clawback_entries=int(clawed_coins),
            coins_in_open_shortfalls=int(owed),
            earnings_coins_clawed_back=int(earnings_clawed),
            units_in_clawback_entries=int(clawed_entry_units),
            creators_overdrawn=int(totals[10]),
            earnings_units_mismatch=int(units_mismatch),
            earnings_unknown_share=int(unknown_share),
            dead_letters=int(parked),
            outbox_first_pending_id=first_pending,
            outbox_last_id=last,
        )


_UNSUBMITTED = and_(
    withdrawals.c.status == WithdrawalStatus.PROCESSING.value, withdrawals.c.provider_ref == ""
)  # claimed by the dispatcher, not yet taken by the provider


def dispatch_select(dialect: str, after: tuple[int, str], limit: int, held: bool = False) -> Any:
    """The dispatcher's read: the withdrawals to hand to the provider (claimed and not taken by it,
    or APPROVED and not held), after `after` in (requested_at_us, withdrawal_id) order, oldest
    first, at most `limit`, each with its method's provider token and its creator's wallet hold;
    if `held`, none APPROVED of the creators passed at execution as `{"held": [...]}`.

    The held creators go as one parameter (an array; JSON on SQLite, `one_of_array`): bound one
    each, past 32,766 of them (the wallet down while that many creators wait) every read failed
    on SQLite's and asyncpg's parameter limits, and nothing was paid until their holds expired.

    Only the withdrawals in flight have these statuses, read by a status index: SQLite seeks a
    range of ix_withdrawals_status_oldest (status, requested_at_us, withdrawal_id) from the
    cursor in each; PostgreSQL may take both statuses from ix_withdrawals_status and sort them."""
    w, m = withdrawals.c, payout_methods.c
    # Held while the creator owes diamonds after a clawback: an approved (or auto-approved)
    # withdrawal waits here instead of paying out cash owed back. Held too while its method is
    # not VERIFIED: an operator who marks a method FAILED after the request (KYC found the
    # account is not the creator's) stops the cash going to it; reject it to release the diamonds.
    claimable = and_(w.status == WithdrawalStatus.APPROVED.value, ~_BALANCE_HOLDS, ~_METHOD_HOLDS)
    if held:
        claimable = and_(claimable, not_(one_of_array(dialect, w.creator_id, "held")))
    return (
        select(withdrawals, m.provider_token, creators.c.wallet_hold)
        .join(payout_methods, m.method_id == w.method_id)
        .join(creators, creators.c.creator_id == w.creator_id)
        .where(
            or_(_UNSUBMITTED, claimable),
            after_key(w.requested_at_us, w.withdrawal_id, after),
        )
        .order_by(w.requested_at_us, w.withdrawal_id)
        .limit(limit)
    )


def open_shortfalls_select() -> Select[tuple[int]]:
    """The coins the reversals' shortfalls still owe, summed: the open ones only, read from their
    partial index (ix_clawback_shortfalls_open), not the settled rows kept as a record. A settled
    row holds 0 and none is ever negative, so the sum is that of every row."""
    sf = clawback_shortfalls.c
    return select(func.coalesce(func.sum(sf.coins_open), 0)).where(text(OPEN_SHORTFALLS))


class _Row:
    """A row built in Python that reads like a SQLAlchemy row (attributes and _asdict)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)

    def _asdict(self) -> dict[str, Any]:
        return dict(self.__dict__)
