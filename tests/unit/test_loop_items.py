"""A background loop's items that fail (services/common/loops.py `ItemFailures`): each is logged
at once, then at most once per FAILURE_LOG_INTERVAL_S, and the database unavailable ends the round.

The loops themselves (gifting's sweeper, payout's dispatcher, the reconcilers) are tested going on
past a failing item in test_gift_saga.py, test_payout_dispatch.py and test_wallet_reconcile.py.
"""

from __future__ import annotations

import logging
import uuid

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import exc as sa_exc

from services.common import loops, throttle


def test_an_items_failures_are_logged_at_once_then_once_per_interval_with_the_rest_counted(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Payout's dispatcher tries every 0.2 s: a withdrawal that failed each round logged five lines
    # a second. Another item's first failure is still logged at once; the database unavailable
    # is no item's failure and ends the round.
    now = [1000.0]
    monkeypatch.setattr(throttle.time, "monotonic", lambda: now[0])
    failures = loops.ItemFailures(logging.getLogger("test.items"), "item failed")
    with caplog.at_level(logging.WARNING, logger="test.items"):
        for _ in range(3):
            failures.failed(ValueError("bug"), "a", item_id="a")
        failures.failed(ValueError("bug"), "b", item_id="b")
        now[0] += loops.FAILURE_LOG_INTERVAL_S
        failures.failed(ValueError("bug"), "a", item_id="a")
    assert [(r.item_id, r.retries) for r in caplog.records] == [("a", 1), ("b", 1), ("a", 3)]  # type: ignore[attr-defined]
    with pytest.raises(sa_exc.OperationalError):
        failures.failed(sa_exc.OperationalError("SELECT 1", {}, Exception("connection refused")), "c")


def _counted(loop: str) -> float | None:
    return REGISTRY.get_sample_value("livegifts_background_item_failures_total", {"loop": loop})


def test_a_named_loops_item_failures_are_each_counted_from_zero_the_database_unavailable_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The sweeper's, dispatcher's and settler's failing items were only logged, one line per 30 s
    # per item: nothing an alert or dashboard could count, as the reconcilers' outcome "error" is.
    loop = f"test_{uuid.uuid4().hex}"  # a series of its own, however often this runs in one process
    failures = loops.ItemFailures(logging.getLogger("test.items"), "item failed", loop)
    assert _counted(loop) == 0  # exported at 0 as it is made, so increase() sees the first
    with caplog.at_level(logging.WARNING, logger="test.items"):
        for _ in range(3):  # logged once, counted three times
            failures.failed(ValueError("bug"), "a", item_id="a")
    with pytest.raises(sa_exc.OperationalError):
        failures.failed(sa_exc.OperationalError("SELECT 1", {}, Exception("connection refused")), "b")
    assert _counted(loop) == 3
    loops.ItemFailures(logging.getLogger("test.items"), "item failed").failed(ValueError("bug"), "a")
    assert _counted(loop) == 3  # one without a loop (the reconcilers') counts nowhere here


def test_a_keyed_throttle_keeps_its_most_recent_keys_only_and_a_forgotten_one_logs_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The interceptor's "dependency unavailable" throttles were a dict never trimmed.
    monkeypatch.setattr(throttle.time, "monotonic", lambda: 1000.0)
    keyed: throttle.KeyedLogThrottle[str] = throttle.KeyedLogThrottle(30.0, keys_max=2)
    assert [keyed.occurred(k) for k in ("a", "b", "a", "c")] == [1, 1, 0, 1]  # "c" pushes out "b"
    assert keyed.occurred("a") == 0  # still throttled: seen more recently than "b"
    assert keyed.occurred("b") == 1  # forgotten: a first again
    keyed.clear()
    assert keyed.occurred("a") == 1
