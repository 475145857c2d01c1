"""Cross-service reconciliation: read every service's audit, check ARCHITECTURE.md's invariants.

Totals come from each service's GetAudit; with `detail`, the per-id records of the common
AuditService are compared too (wallet spends vs gifting gifts vs payout earnings), naming the
ids that disagree. Work still under way (unsent outbox rows, pending gifts, events not yet
consumed) is reported as "in flight", not as a failure.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from livegifts.common.v1 import audit_pb2, audit_pb2_grpc
from livegifts.gifting.v1 import gifting_pb2, gifting_pb2_grpc
from livegifts.payout.v1 import payout_pb2, payout_pb2_grpc
from livegifts.wallet.v1 import wallet_pb2, wallet_pb2_grpc

log = logging.getLogger(__name__)
# Answers worth asking again while waiting for the books to settle.
TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

OK, IN_FLIGHT, FAILED = "ok", "in flight", "FAILED"
IDS_SHOWN_MAX = 10


@dataclass(frozen=True)
class Check:
    """One invariant's verdict: ok, in flight (pending work explains it) or FAILED."""

    name: str
    status: str
    detail: str


@dataclass(frozen=True)
class Totals:
    """The three services' audit answers, and their per-id records when asked for."""

    wallet: Any
    gifting: Any
    payout: Any
    spends: dict[str, audit_pb2.AuditRecord] | None = None
    gifts: dict[str, audit_pb2.AuditRecord] | None = None
    earnings: dict[str, audit_pb2.AuditRecord] | None = None


def _records(channel: grpc.Channel, kind: str, deadline_s: float) -> dict[str, audit_pb2.AuditRecord]:
    stub = audit_pb2_grpc.AuditServiceStub(channel)
    out: dict[str, audit_pb2.AuditRecord] = {}
    token = ""
    while True:
        page = stub.ListAuditRecords(
            audit_pb2.ListAuditRecordsRequest(kind=kind, page_token=token, page_size=5000), timeout=deadline_s
        )
        out.update((r.id, r) for r in page.records)
        if not page.next_page_token:
            return out
        token = page.next_page_token


def collect(wallet_addr: str, gifting_addr: str, payout_addr: str, deadline_s: float, detail: bool = False) -> Totals:
    """Call GetAudit on every service (and page through their records with `detail`)."""
    with (
        grpc.insecure_channel(wallet_addr) as w,
        grpc.insecure_channel(gifting_addr) as g,
        grpc.insecure_channel(payout_addr) as p,
    ):
        # Downstream first: whatever payout has counted, gifting and wallet have already counted.
        pa = payout_pb2_grpc.PayoutServiceStub(p).GetAudit(payout_pb2.GetAuditRequest(), timeout=deadline_s)
        earnings = _records(p, "earnings", deadline_s) if detail else None
        ga = gifting_pb2_grpc.GiftingServiceStub(g).GetAudit(gifting_pb2.GetAuditRequest(), timeout=deadline_s)
        gifts = _records(g, "gifts", deadline_s) if detail else None
        wa = wallet_pb2_grpc.WalletServiceStub(w).GetAudit(wallet_pb2.GetAuditRequest(), timeout=deadline_s)
        spends = _records(w, "spends", deadline_s) if detail else None
        return Totals(wa, ga, pa, spends, gifts, earnings)


def _verdict(name: str, holds: bool, in_flight: bool, detail: str) -> Check:
    return Check(name, OK if holds else (IN_FLIGHT if in_flight else FAILED), detail)


def _ids(ids: list[str]) -> str:
    if not ids:
        return "none"
    shown = ", ".join(sorted(ids)[:IDS_SHOWN_MAX])
    return f"{len(ids)}: {shown}{' ...' if len(ids) > IDS_SHOWN_MAX else ''}"


def check_invariants(t: Totals) -> list[Check]:
    """The invariants of ARCHITECTURE.md, from totals (and per id when records were collected)."""
    w, g, p = t.wallet, t.gifting, t.payout
    gifts_in_flight = g.gifts_pending > 0
    events_in_flight = g.outbox_pending > 0 or p.coins_received < g.coins_sent
    out = [
        _verdict(
            "1. wallet ledger balances",
            w.ledger_sum == 0 and w.unbalanced_entries == 0 and w.postings_mismatch == 0,
            False,
            f"sum {w.ledger_sum}, unbalanced entries {w.unbalanced_entries},"
            f" balance/postings mismatches {w.postings_mismatch}",
        ),
        _verdict(
            "2. coins issued = balances + spent + reversed",
            w.coins_issued == w.coins_in_user_balances + w.coins_spent + w.coins_reversed,
            False,
            f"{w.coins_issued} = {w.coins_in_user_balances} + {w.coins_spent} + {w.coins_reversed}",
        ),
        _verdict(
            "3. sent gifts = wallet spends",
            g.coins_sent == w.coins_spent and g.gifts_sent == w.spends,
            gifts_in_flight,
            f"gifting {g.gifts_sent} sent / {g.coins_sent} coins, {g.gifts_pending} pending;"
            f" wallet {w.spends} spends / {w.coins_spent} coins",
        ),
        _verdict(
            "4. diamonds = exact share of coins received",
            # Per creator: diamonds = floor(units / 10000) and the remainder is kept; summed over creators
            # that is credited * 10000 + remainders = units, exactly.
            p.coins_received == g.coins_sent
            and p.diamonds_credited * 10_000 + p.remainder_units == p.earned_units
            and p.ledger_sum == 0,
            events_in_flight and p.coins_received <= g.coins_sent,
            f"coins received {p.coins_received} of {g.coins_sent} sent; {p.diamonds_credited} diamonds"
            f" + remainders {p.remainder_units}/10000 = {p.earned_units} units",
        ),
        _verdict(
            "5. diamonds credited = available + held + withdrawn + clawed back",
            p.diamonds_credited
            == p.diamonds_available + p.diamonds_held + p.diamonds_withdrawn + p.diamonds_clawed_back,
            False,
            f"{p.diamonds_credited} = {p.diamonds_available} + {p.diamonds_held} + {p.diamonds_withdrawn}"
            f" + {p.diamonds_clawed_back}",
        ),
        _verdict(
            "6. no negative balance without a reversal",
            w.negative_balances_without_reversal == 0,
            False,
            f"{w.negative_balances_without_reversal} accounts",
        ),
        _verdict(
            "in flight: outbox rows not yet published",
            w.outbox_pending == 0 and g.outbox_pending == 0 and p.outbox_pending == 0,
            True,
            f"wallet {w.outbox_pending}, gifting {g.outbox_pending}, payout {p.outbox_pending}",
        ),
    ]
    if t.spends is not None and t.gifts is not None and t.earnings is not None:
        out += _check_by_id(t.spends, t.gifts, t.earnings, events_in_flight)
    return out


def _check_by_id(
    spends: dict[str, audit_pb2.AuditRecord],
    gifts: dict[str, audit_pb2.AuditRecord],
    earnings: dict[str, audit_pb2.AuditRecord],
    events_in_flight: bool,
) -> list[Check]:
    sent = {k: r for k, r in gifts.items() if r.status == "SENT"}
    pending = {k for k, r in gifts.items() if r.status == "PENDING"}
    cancelled = {k for k, r in gifts.items() if r.status == "CANCELLED"}
    spent = {k: r for k, r in spends.items() if r.status == "SPENT"}
    no_spend = [k for k in sent if k not in spent]
    spend_without_gift = [k for k in spent if k not in sent and k not in pending]
    spend_pending = [k for k in spent if k in pending]
    amount_differs = [k for k in sent if k in spent and spent[k].amount != sent[k].amount]
    cancelled_but_spent = [k for k in cancelled if k in spent]
    not_credited = [k for k in sent if k not in earnings]
    credit_without_gift = [k for k in earnings if k not in sent]
    credit_differs = [k for k in sent if k in earnings and earnings[k].amount != sent[k].amount]
    return [
        _verdict(
            "3a. every sent gift has one spend of its amount",
            not no_spend and not amount_differs,
            False,
            f"missing {_ids(no_spend)}; amount differs {_ids(amount_differs)}",
        ),
        _verdict(
            "3b. every spend has a sent gift; no cancelled gift was charged",
            not spend_without_gift and not cancelled_but_spent and not spend_pending,
            bool(spend_pending) and not spend_without_gift and not cancelled_but_spent,
            f"orphan spends {_ids(spend_without_gift)}; cancelled but charged {_ids(cancelled_but_spent)};"
            f" pending with a spend {_ids(spend_pending)}",
        ),
        _verdict(
            "4a. every sent gift credited once with its coins, nothing else credited",
            not not_credited and not credit_without_gift and not credit_differs,
            events_in_flight and not credit_without_gift and not credit_differs,
            f"not yet credited {_ids(not_credited)}; credited without a gift {_ids(credit_without_gift)};"
            f" coins differ {_ids(credit_differs)}",
        ),
    ]


def wait_until_settled(
    fetch: Callable[[], Totals], timeout_s: float, progress: Callable[[list[Check]], None] | None = None
) -> list[Check]:
    """Re-check until nothing is in flight (or a failure, or the timeout); returns the last report.

    With a timeout, work still "in flight" when it runs out is reported FAILED: an event a
    consumer lost looks exactly like one not yet consumed, until it never arrives.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            totals = fetch()
        except grpc.RpcError as exc:
            # A service that lost its database connections answers UNAVAILABLE once per dead
            # pooled connection (they are not pinged before use): retry while there is time.
            if exc.code() not in TRANSIENT or time.monotonic() > deadline:
                raise
            log.warning("audit call failed, retrying", extra={"code": exc.code().name})
            time.sleep(0.5)
            continue
        report = check_invariants(totals)
        if progress is not None:
            progress(report)
        if all(c.status == OK for c in report) or any(c.status == FAILED for c in report):
            return report
        if time.monotonic() > deadline:
            if timeout_s <= 0:
                return report
            return [
                Check(c.name, FAILED, f"{c.detail} (not drained after {timeout_s:g}s)") if c.status == IN_FLIGHT else c
                for c in report
            ]
        time.sleep(0.5)
