"""Cross-service reconciliation: read GetAudit from the three services, check the invariants."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from livegifts.gifting.v1 import gifting_pb2, gifting_pb2_grpc
from livegifts.payout.v1 import payout_pb2, payout_pb2_grpc
from livegifts.wallet.v1 import wallet_pb2, wallet_pb2_grpc


@dataclass(frozen=True)
class Check:
    """One invariant's verdict: ok, in flight (pending work explains it) or FAILED."""

    name: str
    status: str
    detail: str


@dataclass(frozen=True)
class Totals:
    """The three services' audit answers."""

    wallet: Any
    gifting: Any
    payout: Any


def collect(wallet_addr: str, gifting_addr: str, payout_addr: str, deadline_s: float) -> Totals:
    """Call GetAudit on every service."""
    with (
        grpc.insecure_channel(wallet_addr) as w,
        grpc.insecure_channel(gifting_addr) as g,
        grpc.insecure_channel(payout_addr) as p,
    ):
        return Totals(
            wallet_pb2_grpc.WalletServiceStub(w).GetAudit(wallet_pb2.GetAuditRequest(), timeout=deadline_s),
            gifting_pb2_grpc.GiftingServiceStub(g).GetAudit(gifting_pb2.GetAuditRequest(), timeout=deadline_s),
            payout_pb2_grpc.PayoutServiceStub(p).GetAudit(payout_pb2.GetAuditRequest(), timeout=deadline_s),
        )


def _verdict(name: str, holds: bool, in_flight: bool, detail: str) -> Check:
    return Check(name, "ok" if holds else ("in flight" if in_flight else "FAILED"), detail)


def check_invariants(t: Totals) -> list[Check]:
    """The invariants of ARCHITECTURE.md that totals can show."""
    w, g, p = t.wallet, t.gifting, t.payout
    gifts_in_flight = g.gifts_pending > 0 or g.outbox_pending > 0
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
            f"gifting {g.gifts_sent} gifts / {g.coins_sent} coins; wallet {w.spends} spends / {w.coins_spent} coins;"
            f" pending {g.gifts_pending}",
        ),
        _verdict(
            "4. diamonds = exact share of coins received",
            p.coins_received == g.coins_sent and p.diamonds_credited == p.earned_units // 10_000 and p.ledger_sum == 0,
            g.outbox_pending > 0 or p.coins_received < g.coins_sent,
            f"coins received {p.coins_received} of {g.coins_sent} sent; {p.diamonds_credited} diamonds"
            f" + {p.remainder_units}/10000 from {p.earned_units} units",
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
    ]
    return out
