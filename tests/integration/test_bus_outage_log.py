"""While NATS is down, a service's connection logs its error about once per
NATS_ERROR_LOG_INTERVAL_S, not at every reconnect attempt (twice a second)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from services.cli.suite import Suite, SuiteConfig, free_port
from services.common.bus import NATS_ERROR_LOG_INTERVAL_S, Bus
from services.common.config import ServiceSettings

DOWN_S = 3.0  # six reconnect attempts (each 0.5 s), within one interval


def _errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "services.common.bus" and r.getMessage() == "NATS error"]


async def test_nats_down_logs_its_error_once_per_interval_and_counts_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert DOWN_S < NATS_ERROR_LOG_INTERVAL_S
    suite = Suite(SuiteConfig(var_dir=tmp_path, nats_port=free_port()))
    suite.start_nats()
    stop = asyncio.Event()
    settings = ServiceSettings(database_url="sqlite+aiosqlite:///unused.db", nats_url=suite.config.nats_url)  # type: ignore[call-arg]
    bus = Bus(settings, "outage-log-test")
    try:
        await asyncio.wait_for(bus.connect(stop, []), 20)
        with caplog.at_level(logging.INFO, logger="services.common.bus"):
            suite.kill("nats")
            await asyncio.sleep(DOWN_S)
            errors = _errors(caplog)
            assert len(errors) == 1, f"{len(errors)} lines in {DOWN_S} s: {[r.error for r in errors]}"
            assert errors[0].errors_not_logged == 0  # the first of the outage (the server's EOF)
            # An interval later (its line moved back by one), the next line counts the errors it stood for.
            bus._error_log._logged_at -= NATS_ERROR_LOG_INTERVAL_S
            await asyncio.sleep(1.2)
            errors = _errors(caplog)
            assert len(errors) == 2 and errors[1].errors_not_logged >= 3, [r.errors_not_logged for r in errors]
            assert "ConnectionRefusedError" in errors[1].error
    finally:
        stop.set()
        await bus.close()
        suite.stop()
