"""A service's counters that alerts and dashboards take rate() or increase() of are on its
/metrics at 0 from its start, for every label value the code sets: a series that first appears
at 1 (or at the first burst of failures) shows Prometheus no increase, so the first failures in a
pod's life were missed."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.cli.suite import READY_PREFIX, Suite
from services.common.auth import FAILURE_REASONS
from services.common.provider_calls import FAILURE_OUTCOMES
from services.gifting import usecases as gifting
from services.payout import usecases as payout
from services.payout.domain import HOLD_REASONS
from services.wallet import usecases as wallet
from services.wallet.spending import REFUSALS
from tests.integration.conftest import suite_config
from tests.support.ports import free_ports

# Service -> counter -> the label sets each must show at 0 once the service serves.
AT_ZERO: dict[str, dict[str, list[dict[str, str]]]] = {
    "wallet": {
        "livegifts_provider_call_failures_total": [
            {"provider": "dev", "call": c, "outcome": o} for c in wallet.PROVIDER_CALLS for o in FAILURE_OUTCOMES
        ],
        "livegifts_late_payment_failures_total": [
            {"status": s} for s in ("SUCCEEDED", "FAILED", "REFUNDED", "CHARGED_BACK")
        ],
        "livegifts_purchases_credited_restricted_total": [{"reason": r} for r in wallet.RESTRICTION_REASONS],
        "livegifts_spends_refused_total": [
            {"reason": reason, "role": role} for reason, roles in REFUSALS.items() for role in roles
        ],
        # Every outcome a callback sets, in every currency a package can be sold in (the chargeback-rate alert).
        "livegifts_purchase_outcomes_total": [
            {"outcome": o, "currency_code": c}
            for o in ("SUCCEEDED", "FAILED", "REFUNDED", "CHARGED_BACK")
            for c in ("EUR", "GBP", "JPY", "USD")
        ],
        "livegifts_purchases_reconciled_total": [{"outcome": o} for o in wallet.RECONCILE_OUTCOMES],
        "livegifts_provider_outcomes_repeated_total": [{"outcome": "SUCCEEDED"}],
        "livegifts_operator_auth_failures_total": [{"reason": r} for r in FAILURE_REASONS],
    },
    "gifting": {
        "livegifts_gifts_refused_total": [
            {"reason": reason, "role": role} for reason, roles in gifting.REFUSALS.items() for role in roles
        ],
        "livegifts_background_item_failures_total": [{"loop": gifting.SWEEP_LOOP}],
        "livegifts_operator_auth_failures_total": [{"reason": r} for r in FAILURE_REASONS],
    },
    "payout": {
        "livegifts_provider_call_failures_total": [
            {"provider": "dev", "call": c, "outcome": o} for c in payout.PROVIDER_CALLS for o in FAILURE_OUTCOMES
        ],
        "livegifts_withdrawals_held_total": [{"reason": r} for r in HOLD_REASONS],
        "livegifts_withdrawals_reconciled_total": [{"outcome": o} for o in payout.RECONCILE_OUTCOMES],
        "livegifts_provider_outcomes_repeated_total": [{"outcome": "PAID"}, {"outcome": "FAILED"}],
        "livegifts_background_item_failures_total": [{"loop": payout.DISPATCH_LOOP}, {"loop": payout.SETTLE_LOOP}],
        "livegifts_operator_auth_failures_total": [{"reason": r} for r in FAILURE_REASONS],
    },
}


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    """nats-server, the wallet, gifting and payout (on SQLite), each serving /metrics on a free port."""
    config = suite_config(tmp_path_factory.mktemp("counters"), {})
    # 0 would turn /metrics off; picked together, so no two are the same.
    config.metrics_ports = dict(zip(config.metrics_ports, free_ports(len(config.metrics_ports)), strict=True))
    suite = Suite(config)
    try:
        suite.start_nats()
        for svc in AT_ZERO:
            suite.start_service(svc)
        yield suite
    finally:
        suite.stop()


def _samples(suite: Suite, svc: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = (suite.log_dir / f"{svc}.out").read_text()
    ready = json.loads(next(line for line in out.splitlines() if line.startswith(READY_PREFIX))[len(READY_PREFIX) :])
    with urllib.request.urlopen(f"http://127.0.0.1:{ready['metrics_port']}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.mark.parametrize("svc", sorted(AT_ZERO))
def test_a_services_failure_counters_are_on_its_metrics_at_zero_from_its_start(suite: Suite, svc: str) -> None:
    samples = _samples(suite, svc)
    missing = [
        f"{name}{labels}"
        for name, label_sets in AT_ZERO[svc].items()
        for labels in label_sets
        if samples.get((name, frozenset(labels.items()))) != 0.0
    ]
    assert not missing, f"not exported at 0: {missing}"
