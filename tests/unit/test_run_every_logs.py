"""`run_every`'s failure lines: throttled per kind of error, so an outage's line does not hide another error."""

from __future__ import annotations

import asyncio
import logging

import pytest

from services.common.loops import run_every


async def test_a_different_error_in_a_run_of_failures_is_logged_at_once_not_30_s_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A dispatcher whose database went away (one line, then one per 30 s) and then failed for
    # another reason (a bug of ours, a constraint) said nothing of the new error until the
    # throttle's 30 s were up, and then only if it was the one failing at that moment.
    errors = iter([ConnectionRefusedError(111, "refused")] * 3 + [KeyError("withdrawal_id")] * 3)
    stop = asyncio.Event()

    async def once() -> int:
        try:
            raise next(errors)
        except StopIteration:
            stop.set()
            return 0

    with caplog.at_level(logging.WARNING, logger="services.common.loops"):
        await asyncio.wait_for(run_every(stop, 0.001, once, "rounds"), 10)
    lines = [r for r in caplog.records if r.message == "rounds failed, retrying next round"]
    assert [r.error for r in lines] == [  # type: ignore[attr-defined]
        repr(ConnectionRefusedError(111, "refused")),
        repr(KeyError("withdrawal_id")),
    ], [r.__dict__.get("error") for r in lines]
    assert [r.retries for r in lines] == [1, 1]  # type: ignore[attr-defined]
