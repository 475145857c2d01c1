"""Cross-service reconciliation: read every service's audit, check ARCHITECTURE.md's invariants.

The services are read in the order effects flow backwards: payout, gifting, the wallet, then
gifting again. A spend commits before its gift is SENT, and a gift is SENT before payout credits
it, so each read bounds the one before it, even while gifts keep coming:

- what payout had credited, gifting had sent when read after it (coins and events);
- what gifting had sent, the wallet had charged when read after it;
- what the wallet had charged, gifting holds as sent or pending when read once more.

Totals outside these bounds are FAILED at once: a gift sent without its coins, coins charged for
no gift, diamonds for coins never sent. A difference inside them is work in flight. Checks
within one service (a ledger that balances, diamonds that are the exact share of the coins
received, leaderboards that never counted more coins than were sent) hold in every snapshot and
are FAILED whenever they do not.

Totals alone settle only when traffic stops. With `detail`, the per-id records of each service's
AuditService are compared too, and the audit settles id by id: the ids in flight at the first
look (a gift pending, charged but not yet sent, sent but not yet credited) are read again, those
ids alone, until each has settled or the wait runs out. Outbox rows settle the same way, by the
highest id written at the first look, and the leaderboards by the coins sent by then. Gifts that
began after the first look are the next audit's, so an audit with `detail` passes under steady
traffic.

With `since_us` (`--detail-since`), the totals are read and judged the same, over all time, but
the per-id comparison covers only the ids of a recent window: any id one of the services wrote a
record for at or after `since_us` (a spend charged, a gift begun, an earning credited), found
through each service's index on its record time, then read from all three by id. Its cost is the
window's traffic, not the books'; its memory is a bounded chunk of the window's ids, whatever the
window holds (a larger window is read a chunk of ids at a time, the servers bounding each read to
the chunk's ids, see `_judge_window`). What it cannot see
is an id none of whose records is in the window: a gift lost or left in flight before it, which
the run whose window covered it failed on (its wait ran out), and which the full `detail` read
still finds; an old record altered by hand changes the totals, which are complete, unless the
change keeps every sum.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc

from livegifts.common.v1 import audit_pb2, audit_pb2_grpc
from livegifts.gifting.v1 import gifting_pb2, gifting_pb2_grpc
from livegifts.payout.v1 import payout_pb2, payout_pb2_grpc
from livegifts.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from services.cli.calls import channel, describe

log = logging.getLogger(__name__)
# Answers worth asking again while waiting for the books to settle.
TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

OK, IN_FLIGHT, FAILED = "ok", "in flight", "FAILED"
IDS_SHOWN_MAX = 10
PAGE_SIZE = 5000  # records per ListAuditRecords page, and ids per by-id request (the servers' limits)
# Window ids (`since_us`) held at a time, about 120 bytes each: the CLI peaks near 140 MiB of the
# Job's 256 Mi (measured; 1M ids reached 237). A larger window is read a chunk of ids at a time,
# each read bounded by id on the servers (see `_judge_window`).
WINDOW_IDS_MAX = 500_000
RECHECK_S = 0.5  # pause between looks while waiting

SENT, PENDING, CANCELLED, SPENT = "SENT", "PENDING", "CANCELLED", "SPENT"
Records = dict[str, audit_pb2.AuditRecord]


@dataclass(frozen=True)
class Check:
    """One invariant's verdict: ok, in flight (pending work explains it) or FAILED."""

    name: str
    status: str
    detail: str


@dataclass(frozen=True)
class Totals:
    """The three services' audit answers, in the order they were read, and their per-id records
    when asked for.

    `gifting_after` is gifting's answer read after the wallet's (None: the same as `gifting`);
    `gifts_after` holds, read after the spends, the gifts of every charged spend whose gift the
    first read did not see as sent. `ids` is set on a re-check that read only those ids.
    """

    wallet: Any
    gifting: Any
    payout: Any
    spends: Records | None = None
    gifts: Records | None = None
    earnings: Records | None = None
    gifting_after: Any = None
    gifts_after: Records | None = None
    ids: frozenset[str] | None = None
    findings: Findings | None = None  # the per-id verdicts of a full read, judged range by range
    scope: str = ""  # what the per-id verdicts of `findings` covered, when not every id

    @property
    def by_id(self) -> bool:
        """Whether the per-id records were read (all of them, or the ids asked for)."""
        return self.findings is not None or (
            self.spends is not None and self.gifts is not None and self.earnings is not None
        )


@dataclass
class Findings:
    """Per-id verdicts gathered range by range: for each line, status and reason how many ids
    and the first few of them, and every id still in flight (the ids the wait re-reads)."""

    counts: dict[tuple[str, str, str], int] = field(default_factory=lambda: defaultdict(int))
    shown: dict[tuple[str, str, str], list[str]] = field(default_factory=lambda: defaultdict(list))
    unsettled: set[str] = field(default_factory=set)

    def add(self, k: str, verdict: tuple[str, str, str] | None) -> None:
        """Record one id's verdict (None: settled and consistent)."""
        if verdict is None:
            return
        self.counts[verdict] += 1
        if len(self.shown[verdict]) < IDS_SHOWN_MAX:
            self.shown[verdict].append(k)
        if verdict[1] == IN_FLIGHT:
            self.unsettled.add(k)

    def judge_all(
        self, ids: Iterable[str], earnings: Records, gifts: Records, spends: Records, gifts_after: Records
    ) -> None:
        """Judge these ids from the records read for them (see `verdicts` for the order)."""
        for k in ids:
            for verdict in verdicts(earnings.get(k), gifts.get(k), spends.get(k), gifts_after.get(k)):
                self.add(k, verdict)

    def checks(self, scope: str) -> list[Check]:
        """One check per per-id line."""
        out = []
        for line in ID_LINES:
            parts = []
            for status in (FAILED, IN_FLIGHT):
                for key in sorted(k for k in self.counts if k[0] == line and k[1] == status):
                    parts.append(f"{key[2]} {_ids(self.shown[key], self.counts[key])}")
            failed = any(k[0] == line and k[1] == FAILED for k in self.counts)
            flying = any(k[0] == line and k[1] == IN_FLIGHT for k in self.counts)
            out.append(_verdict(line, not failed and not flying, not failed, ("; ".join(parts) or "none") + scope))
        return out


def unsent(spends: Records, gifts: Records) -> list[str]:
    """Charged spends whose gift the read before them did not see as sent: read their gift again."""
    return [k for k, r in spends.items() if r.status == SPENT and (k not in gifts or gifts[k].status != SENT)]


def _page(channel: grpc.Channel, kind: str, deadline_s: float, after: str, up_to: str | None) -> tuple[Records, bool]:
    """One page of a kind's records with after < id (<= up_to; None: no bound), and whether more
    of them lie past it within the bound."""
    req = audit_pb2.ListAuditRecordsRequest(kind=kind, page_token=after, page_size=PAGE_SIZE, up_to=up_to or "")
    page = audit_pb2_grpc.AuditServiceStub(channel).ListAuditRecords(req, timeout=deadline_s)
    # An older server ignores up_to: what lies past it is a later range's.
    records = {r.id: r for r in page.records if up_to is None or r.id <= up_to}
    more = bool(page.next_page_token) and (up_to is None or page.next_page_token < up_to)
    return records, more


def _judge_every_id(
    w: grpc.Channel,
    g: grpc.Channel,
    p: grpc.Channel,
    deadline_s: float,
    read: Callable[[int, int], None] | None = None,
) -> Findings:
    """Every record of the three services, range of ids by range: a page of earnings, then the
    gifts, the spends and the gifts of unsent charged spends again in that range (the order of the
    module's text, per id), judged and let go, so memory holds a range, not the books.

    A range ends where the first of its pages that had more to give ended; what was read past
    that end is read again with the next range, in the order again. `read(ranges, ids)` is told
    after each range how far the read has come (the CLI's progress line on large books).
    """
    findings = Findings()
    after = ""
    ranges = ids = 0
    while True:
        up_to: str | None = None
        earnings, more = _page(p, "earnings", deadline_s, after, up_to)
        if more:
            up_to = max(earnings)
        gifts, more = _page(g, "gifts", deadline_s, after, up_to)
        if more:
            up_to = max(gifts)
        spends, more = _page(w, "spends", deadline_s, after, up_to)
        if more:
            up_to = max(spends)
        if up_to is not None:
            earnings = {k: r for k, r in earnings.items() if k <= up_to}
            gifts = {k: r for k, r in gifts.items() if k <= up_to}
        gifts_after = records_by_id(g, "gifts", deadline_s, unsent(spends, gifts))
        judged = earnings.keys() | gifts.keys() | spends.keys()
        findings.judge_all(judged, earnings, gifts, spends, gifts_after)
        ranges, ids = ranges + 1, ids + len(judged)
        if read is not None:
            read(ranges, ids)
        if up_to is None:
            return findings
        after = up_to


class _Lowest:
    """The lowest ids above `after` of those offered, at most `limit` (2 or more) held at a time.

    Once `limit` are held, the highest quarter of them is let go and `high` becomes the highest
    kept: an id above it is refused from then on. So at the end `ids` holds every id offered in
    (after, high] (all above `after` when `high` is None), however many were offered, and what
    was let go is above `high`, for a later pass to take. `peak` is the most ever held.
    """

    def __init__(self, after: str, limit: int) -> None:
        self.after, self.limit = after, limit
        self.high: str | None = None
        self.ids: set[str] = set()
        self.peak = 0

    def offer(self, ids: Iterable[str]) -> None:
        """Hold those of `ids` within the bounds, letting the highest go when full."""
        after, high = self.after, self.high
        fresh = [k for k in ids if after < k] if high is None else [k for k in ids if after < k <= high]
        held = self.ids
        if len(held) + len(fresh) <= self.limit:  # room for all of them (the usual case)
            held.update(fresh)
        else:
            for k in fresh:
                if (high is not None and k > high) or k in held:
                    continue
                if len(held) >= self.limit:
                    self.peak = max(self.peak, len(held))
                    kept = sorted(held)[: max(1, self.limit * 3 // 4)]
                    held = self.ids = set(kept)
                    high = self.high = kept[-1]
                    if k > high:
                        continue
                held.add(k)
        self.peak = max(self.peak, len(held))


def _window_pass(
    streams: tuple[tuple[grpc.Channel, str], ...], deadline_s: float, since_us: int, after: str, limit: int
) -> _Lowest | None:
    """One read of the window from every stream (kind), keeping the lowest of its ids above
    `after` (see `_Lowest`), a page at a time; None when a server predates the window (it answered
    with every record).

    Each page asks only for ids above `after` and, once the chunk is full, at or below its
    highest kept id (`after_id`, `up_to`): ids the chunk would refuse are not sent, so the window's
    ids of earlier chunks are not read again and those of later chunks mostly not yet. A server
    that predates the bounds sends them anyway; the chunk drops them as before."""
    chunk = _Lowest(after, limit)
    for chan, kind in streams:
        stub = audit_pb2_grpc.AuditServiceStub(chan)
        token = ""
        while True:
            req = audit_pb2.ListAuditRecordsRequest(
                kind=kind,
                page_token=token,
                page_size=PAGE_SIZE,
                since_us=since_us,
                after_id=after,
                up_to=chunk.high or "",
            )
            page = stub.ListAuditRecords(req, timeout=deadline_s)
            if not page.since_applied:
                log.warning(
                    "a service ignores the audit window (an older version): reading every id", extra={"kind": kind}
                )
                return None
            chunk.offer(r.id for r in page.records)
            if not page.next_page_token:
                break
            token = page.next_page_token
    return chunk


def _judge_window(
    w: grpc.Channel,
    g: grpc.Channel,
    p: grpc.Channel,
    deadline_s: float,
    since_us: int,
    read: Callable[[int, int], None] | None = None,
) -> tuple[Findings, int] | None:
    """The ids any service wrote a record for since `since_us`, judged from all three services'
    records of them, read by id PAGE_SIZE at a time in the order of the module's text; and how
    many ids that was. None when a service predates the window (the caller reads every id instead).

    At most WINDOW_IDS_MAX ids are held, whatever the window holds: each pass reads the window
    from the three services and keeps the lowest ids above the last pass's (`_Lowest`), which are
    then judged in id order and let go. A window within the bound takes one pass; a larger one
    takes a pass per chunk, its ids judged in the same order, each once. The servers bound each
    pass's read to the ids the chunk can still take (`_window_pass`), so a pass reads its chunk's
    ids and those it lets go as it fills, not the whole window again.
    """
    streams = ((p, "earnings"), (g, "gifts"), (w, "spends"))
    findings = Findings()
    after, count, n = "", 0, 0
    while True:
        chunk = _window_pass(streams, deadline_s, since_us, after, WINDOW_IDS_MAX)
        if chunk is None:
            return None
        wanted, high = sorted(chunk.ids), chunk.high
        del chunk  # the chunk's ids once, as the sorted list
        for i in range(0, len(wanted), PAGE_SIZE):
            ids = wanted[i : i + PAGE_SIZE]
            earnings = records_by_id(p, "earnings", deadline_s, ids)
            gifts = records_by_id(g, "gifts", deadline_s, ids)
            spends = records_by_id(w, "spends", deadline_s, ids)
            gifts_after = records_by_id(g, "gifts", deadline_s, unsent(spends, gifts))
            findings.judge_all(ids, earnings, gifts, spends, gifts_after)
            n, count = n + 1, count + len(ids)
            if read is not None:
                read(n, count)
        if high is None:
            return findings, count
        after = high


def records_by_id(channel: grpc.Channel, kind: str, deadline_s: float, ids: Iterable[str]) -> Records:
    """The records of those ids that exist (`livegifts gift` reads one gift's this way too)."""
    stub = audit_pb2_grpc.AuditServiceStub(channel)
    out: Records = {}
    wanted = sorted(set(ids))
    for i in range(0, len(wanted), PAGE_SIZE):
        req = audit_pb2.ListAuditRecordsRequest(kind=kind, ids=wanted[i : i + PAGE_SIZE])
        out.update((r.id, r) for r in stub.ListAuditRecords(req, timeout=deadline_s).records)
    return out


def collect(
    wallet_addr: str,
    gifting_addr: str,
    payout_addr: str,
    deadline_s: float,
    detail: bool = False,
    ids: Iterable[str] | None = None,
    read: Callable[[int, int], None] | None = None,
    since_us: int | None = None,
) -> Totals:
    """Call GetAudit on every service, downstream first (see the module's text); with `detail`
    also judge every id from their per-id records (range by range), or with `since_us` only the
    ids of records written since then (the window); with `ids` read only those ids' records
    (implies detail)."""
    only = None if ids is None else frozenset(ids)
    with (
        channel("wallet", wallet_addr) as w,
        channel("gifting", gifting_addr) as g,
        channel("payout", payout_addr) as p,
    ):
        gifting = gifting_pb2_grpc.GiftingServiceStub(g)
        pa = payout_pb2_grpc.PayoutServiceStub(p).GetAudit(payout_pb2.GetAuditRequest(), timeout=deadline_s)
        earnings = records_by_id(p, "earnings", deadline_s, only) if only is not None else None
        ga = gifting.GetAudit(gifting_pb2.GetAuditRequest(), timeout=deadline_s)
        gifts = records_by_id(g, "gifts", deadline_s, only) if only is not None else None
        wa = wallet_pb2_grpc.WalletServiceStub(w).GetAudit(wallet_pb2.GetAuditRequest(), timeout=deadline_s)
        spends = records_by_id(w, "spends", deadline_s, only) if only is not None else None
        ga_after = gifting.GetAudit(gifting_pb2.GetAuditRequest(), timeout=deadline_s)
        if spends is not None and gifts is not None:
            gifts_after = records_by_id(g, "gifts", deadline_s, unsent(spends, gifts))
            return Totals(wa, ga, pa, spends, gifts, earnings, ga_after, gifts_after, only)
        # Every id (or the window's), after the totals: each id's records are still read payout,
        # gifting, wallet, gifting.
        scope = ""
        findings = None
        if detail and since_us is not None:
            judged = _judge_window(w, g, p, deadline_s, since_us, read)
            if judged is not None:
                findings, count = judged
                scope = f" (window: the {count} ids with a record since {_when(since_us)})"
        if detail and findings is None:
            findings = _judge_every_id(w, g, p, deadline_s, read)
        return Totals(wa, ga, pa, gifting_after=ga_after, findings=findings, scope=scope)


def _when(time_us: int) -> str:
    """A unix time in microseconds as UTC text, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time_us / 1_000_000))


def _verdict(name: str, holds: bool, in_flight: bool, detail: str) -> Check:
    return Check(name, OK if holds else (IN_FLIGHT if in_flight else FAILED), detail)


def _bounded(name: str, exact: bool, within: bool, by_id: bool, detail: str) -> Check:
    """A cross-service total: ok when equal; outside its bounds FAILED; inside them in flight, or
    ok when the per-id checks (which settle by id) decide."""
    if exact:
        return Check(name, OK, detail)
    if not within:
        return Check(name, FAILED, f"{detail}; outside the bounds of work in flight")
    if by_id:
        return Check(name, OK, f"{detail}; within the bounds of work in flight, settled id by id below")
    return Check(name, IN_FLIGHT, detail)


def _ids(shown: list[str], count: int) -> str:
    """How many ids, and the first few of them."""
    return f"{count}: {', '.join(sorted(shown))}{' ...' if count > len(shown) else ''}"


def _reported(msg: Any, field: str) -> int | None:
    """An optional audit field, or None when the service (an older version) does not report it."""
    return getattr(msg, field) if msg.HasField(field) else None


# What the audit saw at its first look, the cut-offs of later looks: per service the highest
# outbox id written, and under SENT_COINS_MARK the coins gifting had sent.
Marks = dict[str, int]
SENT_COINS_MARK = "gifting coins sent"
CLAIMED_COINS_MARK = "wallet coins claimed by reversals"


def outbox_marks(t: Totals) -> Marks:
    """Each service's highest outbox id in these totals: the cut-off of later looks."""
    out = {}
    for name, msg in (("wallet", t.wallet), ("gifting", t.gifting), ("payout", t.payout)):
        last = _reported(msg, "outbox_last_id")
        if last is not None:
            out[name] = last
    return out


def first_look_marks(t: Totals) -> Marks:
    """The outbox marks, and the coins gifting had sent by the end of these totals' reads."""
    g2 = t.gifting_after if t.gifting_after is not None else t.gifting
    marks = {**outbox_marks(t), SENT_COINS_MARK: g2.coins_sent}
    claimed = _reported(t.wallet, "coins_claimed_by_reversals")
    if claimed is not None:
        marks[CLAIMED_COINS_MARK] = claimed
    return marks


def _outbox_check(t: Totals, marks: Marks | None) -> Check:
    """Rows written up to the cut-off are published (without the marks: none is pending)."""
    busy = []
    for name, msg in (("wallet", t.wallet), ("gifting", t.gifting), ("payout", t.payout)):
        first, mark = _reported(msg, "outbox_first_pending_id"), (marks or {}).get(name)
        if first is not None and mark is not None:
            if first and first <= mark:
                busy.append(f"{name} {msg.outbox_pending} (rows up to id {mark} not all published)")
        elif msg.outbox_pending:
            busy.append(f"{name} {msg.outbox_pending}")
    pending = f"wallet {t.wallet.outbox_pending}, gifting {t.gifting.outbox_pending}, payout {t.payout.outbox_pending}"
    if busy:
        detail = "; ".join(busy)
    elif t.wallet.outbox_pending or t.gifting.outbox_pending or t.payout.outbox_pending:
        detail = f"{pending} pending, all written after the first look"
    else:
        detail = "none pending"
    return _verdict("in flight: outbox rows written before the audit are published", not busy, True, detail)


def check_invariants(t: Totals, marks: Marks | None = None) -> list[Check]:
    """The invariants of ARCHITECTURE.md, from totals (and per id when records were collected)."""
    return evaluate(t, marks)[0]


def evaluate(t: Totals, marks: Marks | None = None) -> tuple[list[Check], frozenset[str]]:
    """The checks, and the ids still in flight (empty without records)."""
    w, g, p = t.wallet, t.gifting, t.payout
    g2 = t.gifting_after if t.gifting_after is not None else g
    by_id = t.by_id
    out = [
        _verdict(
            "1. wallet ledger balances",
            w.ledger_sum == 0 and w.unbalanced_entries == 0 and w.postings_mismatch == 0,
            False,
            f"sum {w.ledger_sum}, unbalanced entries {w.unbalanced_entries},"
            f" balance/postings mismatches {w.postings_mismatch}",
        ),
        _purchases_check(w),
        _spends_check(w),
        _verdict(
            "3. every cancelled gift's spend was settled cancelled",
            # The wallet records a spend CANCELLED (CancelSpend, or a refusal SpendMany settles)
            # before gifting cancels its gift, so gifts cancelled when gifting was read have
            # their rows when the wallet is read after it. A charged gift that was cancelled
            # would leave its row SPENT, and totals could otherwise cancel it out.
            g.gifts_cancelled <= w.spends_cancelled,
            False,
            f"gifting {g.gifts_cancelled} cancelled gifts, wallet {w.spends_cancelled} cancelled spends",
        ),
        _bounded(
            "3. sent gifts = wallet spends",
            g.coins_sent == w.coins_spent == g2.coins_sent
            and g.gifts_sent == w.spends == g2.gifts_sent
            and g2.gifts_pending == 0,
            # Sent before the wallet was read, so charged; charged before gifting was read again,
            # so sent or pending then.
            g.coins_sent <= w.coins_spent <= g2.coins_sent + g2.coins_pending
            and g.gifts_sent <= w.spends <= g2.gifts_sent + g2.gifts_pending,
            by_id,
            f"gifting {g.gifts_sent} sent / {g.coins_sent} coins, then {g2.gifts_sent} / {g2.coins_sent}"
            f" with {g2.gifts_pending} pending / {g2.coins_pending} coins; wallet {w.spends} spends /"
            f" {w.coins_spent} coins",
        ),
        *_diamonds_checks(t, by_id),
        _held_check(p),
        _reversals_check(w, p, marks),
        _negative_check(w, p),
        _leaderboards_check(g, g2, marks),
        _parked_check(g, p),
        _outbox_check(t, marks),
    ]
    unsettled: frozenset[str] = frozenset()
    if by_id:
        checks, unsettled = _check_by_id(t)
        out += checks
    return out, unsettled


def _negative_check(w: Any, p: Any) -> Check:
    """Below zero only by reversals: a user's coins by at most what their reversals took back (a
    spend never overdraws), a creator's diamonds by clawbacks alone (a withdrawal holds only what
    is available; one that held more keeps invariant 5's sums, as held rises with it)."""
    overdrawn = _reported(p, "creators_overdrawn")
    detail = f"{w.negative_balances_without_reversal} accounts below what their reversals explain"
    if overdrawn is None:
        detail += "; creators not reported (an older payout)"
    else:
        detail += f"; {overdrawn} creators holding or paid more diamonds than credited"
    return _verdict(
        "6. no negative balance without a reversal",
        w.negative_balances_without_reversal == 0 and not overdrawn,
        False,
        detail,
    )


def _purchases_check(w: Any) -> Check:
    credited = _reported(w, "coins_of_credited_purchases")
    reversed_ = _reported(w, "coins_of_reversed_purchases")
    holds = w.coins_issued == w.coins_in_user_balances + w.coins_spent + w.coins_reversed
    detail = f"{w.coins_issued} = {w.coins_in_user_balances} + {w.coins_spent} + {w.coins_reversed}"
    if credited is None or reversed_ is None:
        detail += "; purchases not reported (an older wallet)"
    else:
        holds = holds and w.coins_issued == credited and w.coins_reversed == reversed_
        detail += f"; purchases credited {credited}, reversed {reversed_}"
    return _verdict("2. coins issued = balances + spent + reversed = the purchases' coins", holds, False, detail)


def _spends_check(w: Any) -> Check:
    """Within the wallet's snapshot: its spend rows are what their entries posted as spent. Check 3
    compares rows with gifts; this ties the rows to the coins that left balances, which a spend
    posted twice or for more than its row would not, with every entry still balanced."""
    rows, mismatch = _reported(w, "coins_of_spent_rows"), _reported(w, "spends_posting_mismatch")
    if rows is None or mismatch is None:
        return _verdict("3. wallet spends = their postings", True, False, "not reported (an older wallet)")
    return _verdict(
        "3. wallet spends = their postings",
        rows == w.coins_spent and mismatch == 0,
        False,
        f"spent rows {rows} coins, postings to spent {w.coins_spent}; rows whose postings differ {mismatch}",
    )


def _diamonds_checks(t: Totals, by_id: bool) -> list[Check]:
    g, p = t.gifting, t.payout
    mismatch = _reported(p, "earnings_units_mismatch") or 0
    unknown = _reported(p, "earnings_unknown_share") or 0
    units_diff = _reported(p, "creator_units_minus_earnings")
    coins_diff = _reported(p, "creator_coins_minus_earnings")
    # Per creator diamonds = floor(units / 10000) and the remainder is kept; summed over creators
    # that is credited * 10000 + remainders = units, exactly. Each event's units are its coins
    # times a share some policy version set. The creators' units and coins are each those of the
    # earnings behind them; an older payout reports only their sum (ledger_sum), in which a unit
    # too many and a coin too few cancel out.
    rows_agree = p.ledger_sum == 0
    if units_diff is None or coins_diff is None:
        rows = f"creators vs earnings differ by {p.ledger_sum} (units + coins; an older payout)"
    else:
        rows_agree = rows_agree and units_diff == 0 and coins_diff == 0
        rows = f"creators vs earnings differ by {units_diff} units, {coins_diff} coins"
    exact = (
        p.diamonds_credited * 10_000 + p.remainder_units == p.earned_units
        and rows_agree
        and mismatch == 0
        and unknown == 0
    )
    return [
        _verdict(
            "4. diamonds = exact creator share of the coins received",
            exact,
            False,
            f"{p.diamonds_credited} diamonds + remainders {p.remainder_units}/10000 = {p.earned_units} units;"
            f" {rows}; earnings with units != coins x share {mismatch},"
            f" at a share no policy set {unknown}",
        ),
        _bounded(
            "4. coins received = coins of sent gifts",
            p.coins_received == g.coins_sent and p.events_consumed == g.gifts_sent,
            # Credited before gifting was read, so sent by then.
            p.coins_received <= g.coins_sent and p.events_consumed <= g.gifts_sent,
            by_id,
            f"payout {p.events_consumed} events / {p.coins_received} coins of gifting's {g.gifts_sent} /"
            f" {g.coins_sent}",
        ),
    ]


def _held_check(p: Any) -> Check:
    holds = (
        p.diamonds_credited == p.diamonds_available + p.diamonds_held + p.diamonds_withdrawn + p.diamonds_clawed_back
        and p.diamonds_held == p.diamonds_in_open_withdrawals
        and p.diamonds_withdrawn == p.diamonds_in_paid_withdrawals
        and p.diamonds_clawed_back == p.diamonds_in_clawback_entries
    )
    detail = (
        f"{p.diamonds_credited} = {p.diamonds_available} + {p.diamonds_held} + {p.diamonds_withdrawn}"
        f" + {p.diamonds_clawed_back}; held in open withdrawals {p.diamonds_in_open_withdrawals},"
        f" paid out {p.diamonds_in_paid_withdrawals}, in clawback entries {p.diamonds_in_clawback_entries}"
    )
    # Within payout's snapshot: the clawed units on the creators' rows are the entries' units, and
    # the coins the earnings lost are the entries' coins (a clawback written to one side only
    # keeps every diamond total above when it takes less than a whole diamond).
    entry_units, entry_coins = _reported(p, "units_in_clawback_entries"), _reported(p, "coins_in_clawback_entries")
    earnings_coins = _reported(p, "earnings_coins_clawed_back")
    if entry_units is not None and entry_coins is not None and earnings_coins is not None:
        holds = holds and p.clawed_units == entry_units and earnings_coins == entry_coins
        detail += (
            f"; clawed units {p.clawed_units}, in clawback entries {entry_units};"
            f" coins the earnings lost {earnings_coins}, in clawback entries {entry_coins}"
        )
    return _verdict("5. diamonds credited = available + held + withdrawn + clawed back", holds, False, detail)


REVERSALS_LINE = "5. coins clawed back or owed = coins the wallet's reversals claimed"


def _reversals_check(w: Any, p: Any, marks: Marks | None) -> Check:
    """Payout's reversals (clawed back, and still owed by open shortfalls) against the wallet's claims.

    Each refund or chargeback records in the wallet the coins it claims back from creators (its
    event's `coins_already_spent`), in the transaction that writes its event; payout, read before
    the wallet, records each event it consumes as clawback entries plus a shortfall for what it
    cannot take yet. More in payout than the wallet claimed is a reversal applied twice or a
    clawback beyond its claim: FAILED at once. Less is reversal events not yet consumed, or lost:
    in flight until they are, or with the first look's marks (the wait) until payout has every
    claim made by the first look. Without this, a lost reversal event left creators paid for
    refunded coins while every other check passed.
    """
    claimed = _reported(w, "coins_claimed_by_reversals")
    taken, owed = _reported(p, "coins_in_clawback_entries"), _reported(p, "coins_in_open_shortfalls")
    if claimed is None or taken is None or owed is None:
        return _verdict(REVERSALS_LINE, True, False, "not reported (an older wallet or payout)")
    consumed = taken + owed
    detail = f"payout {consumed} coins ({taken} clawed back, {owed} owed by open shortfalls); wallet claimed {claimed}"
    if consumed > claimed:
        return Check(REVERSALS_LINE, FAILED, f"{detail}: more than the reversals claimed")
    mark = (marks or {}).get(CLAIMED_COINS_MARK)
    if consumed != claimed and mark is not None:
        detail += (
            f"; {'every claim' if consumed >= mark else 'not every claim'} made by the first look ({mark}) consumed"
        )
    return _verdict(REVERSALS_LINE, consumed == claimed or (mark is not None and consumed >= mark), True, detail)


LEADERBOARDS_LINE = "6. the creator leaderboards count every sent coin once"


def _leaderboards_check(g: Any, g2: Any, marks: Marks | None) -> Check:
    """Gifting's creator leaderboards (all time) against its sent gifts, tips and unlocks.

    The leaderboards are gifting's own consumer of its gift.sent events, one per SENT gift of
    every kind, each adding its coins to its creator's board once (the stream boards leave out
    unlocks, which have no stream). Within one snapshot they cannot have counted more than was
    sent: more is an event counted twice, FAILED at once. Less is events not yet consumed, or
    lost: in flight until they count every coin, or with the first look's marks (the wait) every
    coin sent by the first look, so the wait passes under steady traffic. Only once the traffic
    stops does the equality also rule out a lost event that later coins make up for.
    """
    over = [x for x in (g, g2) if x.leaderboard_coins > x.coins_sent]
    counted, sent = g2.leaderboard_coins, g2.coins_sent
    detail = f"counted {counted} of {sent} coins sent"
    if over:
        detail = "; ".join(f"counted {x.leaderboard_coins} of {x.coins_sent} coins sent" for x in over)
        return Check(LEADERBOARDS_LINE, FAILED, f"{detail}: an event counted twice")
    mark = (marks or {}).get(SENT_COINS_MARK)
    if counted != sent and mark is not None:
        detail += f"; {'every coin' if counted >= mark else 'not every coin'} sent by the first look ({mark}) counted"
    return _verdict(LEADERBOARDS_LINE, counted == sent or (mark is not None and counted >= mark), True, detail)


def _parked_check(g: Any, p: Any) -> Check:
    parked = {name: _reported(msg, "dead_letters") for name, msg in (("gifting", g), ("payout", p))}
    return _verdict(
        "no event parked in dead letters",
        not any(parked.values()),
        False,
        ", ".join(f"{name} {'not reported' if n is None else n}" for name, n in parked.items())
        + ("; see `livegifts dead-letters list`" if any(parked.values()) else ""),
    )


# The per-id checks, and what each id can be found to be.
SPEND_LINE = "3a. every sent gift has one spend of its amount"
CHARGE_LINE = "3b. every charged spend has its gift, sent; no cancelled gift was charged"
PENDING_LINE = "3c. every pending gift settles, sent or cancelled"
CREDIT_LINE = "4a. every sent gift credited once with its coins, nothing else credited"
ID_LINES = (SPEND_LINE, CHARGE_LINE, PENDING_LINE, CREDIT_LINE)


def verdicts(
    earning: audit_pb2.AuditRecord | None,
    gift: audit_pb2.AuditRecord | None,
    spend: audit_pb2.AuditRecord | None,
    gift_after: audit_pb2.AuditRecord | None,
) -> list[tuple[str, str, str]]:
    """One id's (line, status, reason)s, none when it is settled and consistent.

    Read in this order: its payout earning, its gift, its wallet spend, its gift again (only read
    when the spend is charged and the first read did not see the gift sent). A credit that fails
    does not hide what the spend says: an id gifting lost (its database restored to an earlier
    point) is credited without a gift and charged without one, and each line says so; with the
    credit's verdict alone, `3b` read "none" while the totals of `3` failed.
    """
    credit = _credit_verdict(earning, gift) if earning is not None else None
    rest = _gift_verdict(earning, gift, spend, gift_after)
    if credit is None:
        return [rest] if rest is not None else []
    # Under a failed credit, only another failure is news: work in flight there is not.
    return [credit, rest] if rest is not None and rest[1] == FAILED else [credit]


def _credit_verdict(earning: audit_pb2.AuditRecord, gift: audit_pb2.AuditRecord | None) -> tuple[str, str, str] | None:
    if gift is None or gift.status != SENT:
        return CREDIT_LINE, FAILED, "credited without a sent gift"
    if earning.amount != gift.amount:
        return CREDIT_LINE, FAILED, "credited coins differ from the gift's"
    if earning.party != gift.party:
        return CREDIT_LINE, FAILED, "credited to another creator than the gift's"
    return None


def _gift_verdict(
    earning: audit_pb2.AuditRecord | None,
    gift: audit_pb2.AuditRecord | None,
    spend: audit_pb2.AuditRecord | None,
    gift_after: audit_pb2.AuditRecord | None,
) -> tuple[str, str, str] | None:
    charged = spend is not None and spend.status == SPENT
    if gift is not None and gift.status == SENT:
        if spend is None or not charged:
            return SPEND_LINE, FAILED, "sent without a spend"
        if spend.amount != gift.amount:
            return SPEND_LINE, FAILED, "spend differs from the gift's coins"
        return None if earning is not None else (CREDIT_LINE, IN_FLIGHT, "not yet credited")
    if spend is not None and charged:
        later = gift_after if gift_after is not None else gift
        if later is None:
            return CHARGE_LINE, FAILED, "charged without a gift"
        if later.status == CANCELLED:
            return CHARGE_LINE, FAILED, "cancelled but charged"
        if later.amount != spend.amount:
            return SPEND_LINE, FAILED, "spend differs from the gift's coins"
        return CHARGE_LINE, IN_FLIGHT, "charged, gift not yet sent"
    if gift is not None and gift.status == PENDING:
        return PENDING_LINE, IN_FLIGHT, "pending"
    return None


def _check_by_id(t: Totals) -> tuple[list[Check], frozenset[str]]:
    findings = t.findings
    if findings is None:
        assert t.spends is not None and t.gifts is not None and t.earnings is not None
        findings = Findings()
        ids = t.ids if t.ids is not None else t.earnings.keys() | t.gifts.keys() | t.spends.keys()
        findings.judge_all(ids, t.earnings, t.gifts, t.spends, t.gifts_after or {})
    scope = t.scope if t.ids is None else f" (re-read {len(t.ids)} ids in flight before)"
    return findings.checks(scope), frozenset(findings.unsettled)


def wait_until_settled(
    fetch: Callable[..., Totals], timeout_s: float, progress: Callable[[list[Check]], None] | None = None
) -> list[Check]:
    """Re-check until nothing is in flight (or a failure, or the timeout); returns the last report.

    `fetch()` reads everything; when the first look has records, later looks call `fetch(ids)`
    for the ids still in flight, and the outbox is judged by the first look's marks. With a
    timeout, work still "in flight" when it runs out is reported FAILED: an event a consumer
    lost looks exactly like one not yet consumed, until it never arrives.
    """
    # The wait starts again after the first look: that look reads every record, which takes as
    # long as the books are large, and the ids in flight at it must get the whole wait to settle.
    deadline = time.monotonic() + timeout_s  # until then, for retrying the first look
    marks: Marks | None = None
    unsettled: frozenset[str] | None = None
    while True:
        try:
            totals = fetch() if unsettled is None else fetch(unsettled)
        except grpc.RpcError as exc:
            # A service that lost its database connections answers UNAVAILABLE once per dead
            # pooled connection (they are not pinged before use): retry while there is time.
            if exc.code() not in TRANSIENT or time.monotonic() > deadline:
                raise
            # In the message itself: the CLI prints a warning's message, not its fields; it
            # names the service and address that did not answer, and why.
            log.warning("audit call failed (%s), retrying", describe(exc), extra={"code": exc.code().name})
            time.sleep(RECHECK_S)
            continue
        if marks is None:
            marks = first_look_marks(totals)
            deadline = time.monotonic() + timeout_s
        report, flying = evaluate(totals, marks)
        if totals.by_id:
            unsettled = flying
        if progress is not None:
            progress(report)
        if all(c.status == OK for c in report) or any(c.status == FAILED for c in report):
            return report
        if time.monotonic() > deadline:
            if timeout_s <= 0:
                return report
            return [
                Check(c.name, FAILED, f"{c.detail} (not settled after {timeout_s:g}s)") if c.status == IN_FLIGHT else c
                for c in report
            ]
        time.sleep(RECHECK_S)
