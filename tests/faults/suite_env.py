"""What the fault suites start their suite with and call it as: timers that fire within seconds, not
minutes, and an operator's call metadata."""

from __future__ import annotations

from tests.integration.conftest import OPERATOR_TOKEN

OPERATOR_METADATA = (("authorization", f"Bearer {OPERATOR_TOKEN}"), ("x-operator", "fault-suite"))
FAST_SWEEP = {"LIVEGIFTS_GIFTING_PENDING_TIMEOUT_S": "3", "LIVEGIFTS_GIFTING_SWEEP_INTERVAL_S": "0.5"}
# Within seconds, not minutes: a withdrawal whose dev-provider callback died with payout is looked
# up at the provider (15 min by default), and one held because the wallet could not answer for
# its creator (killed meanwhile) is asked about again (60 s by default).
FAST_PAYOUT = {
    "LIVEGIFTS_PAYOUT_RECONCILE_AFTER_S": "2",
    "LIVEGIFTS_PAYOUT_RECONCILE_INTERVAL_S": "0.5",
    "LIVEGIFTS_PAYOUT_DISPATCH_HOLD_RECHECK_S": "1",
}
