"""While NATS is down, a service's connection logs its error about once per
NATS_ERROR_LOG_INTERVAL_S, not at every reconnect attempt (twice a second)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from services.common.bus import NATS_ERROR_LOG_INTERVAL_S
from tests.integration.helpers import bus_on_own_nats, eventually

DOWN_S = 3.0  # six reconnect attempts (each 0.5 s), within one interval
# The next reconnect attempt's error comes within 0.5 s; a loaded machine may take longer. Below the
# interval, so a third line would still show.
NEXT_LINE_WITHIN_S = 4.0


def _errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "services.common.bus" and r.getMessage() == "NATS error"]


async def test_nats_down_logs_its_error_once_per_interval_and_counts_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert DOWN_S < NATS_ERROR_LOG_INTERVAL_S
    async with bus_on_own_nats(tmp_path, "outage-log-test") as (suite, bus, stop):
        await asyncio.wait_for(bus.connect(stop, []), 20)
        with caplog.at_level(logging.INFO, logger="services.common.bus"):
            suite.kill("nats")
            await asyncio.sleep(DOWN_S)
            errors = _errors(caplog)
            assert len(errors) == 1, f"{len(errors)} lines in {DOWN_S} s: {[r.error for r in errors]}"
            assert errors[0].errors_not_logged == 0  # the first of the outage (the server's EOF)
            # An interval later (its line moved back by one), the next line counts the errors it stood for.
            bus._error_log._logged_at -= NATS_ERROR_LOG_INTERVAL_S
            errors = await eventually(
                lambda: asyncio.sleep(0, _errors(caplog)), lambda e: len(e) >= 2, NEXT_LINE_WITHIN_S
            )
            assert len(errors) == 2 and errors[1].errors_not_logged >= 3, [r.errors_not_logged for r in errors]
            assert "ConnectionRefusedError" in errors[1].error


async def test_an_outage_soon_after_a_start_without_nats_logs_its_first_error_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The errors of a start while NATS was down are not carried into the next outage: its first
    error is logged at once (the first connect does not call the reconnect callback that resets
    the throttle), counting none of the start's."""
    async with bus_on_own_nats(tmp_path, "outage-log-test", nats_started=False) as (suite, bus, stop):
        connecting = asyncio.create_task(bus.connect(stop, []))
        try:
            await asyncio.sleep(1.2)  # NATS not there yet: an attempt each 0.5 s, the first logged
            suite.start_nats()
            await asyncio.wait_for(connecting, 20)
            assert len(_errors(caplog)) == 1  # the start's first error; the others only counted
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="services.common.bus"):
                suite.kill("nats")
                await asyncio.sleep(1.0)
                errors = _errors(caplog)
                assert len(errors) == 1, "the outage's first error was not logged at once"
                assert errors[0].errors_not_logged == 0, errors[0].errors_not_logged
        finally:
            connecting.cancel()
