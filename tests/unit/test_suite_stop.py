"""`Suite.stop`: the services drain while NATS still serves them, then NATS stops."""

from __future__ import annotations

import signal
from pathlib import Path

from services.cli.suite import Suite, SuiteConfig


class _Proc:
    def __init__(self, name: str, events: list[tuple[str, str]]) -> None:
        self.name, self.events, self.returncode = name, events, None

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.events.append((self.name, signal.Signals(sig).name))

    def wait(self, timeout: float | None = None) -> int:
        self.events.append((self.name, "exited"))
        self.returncode = 0
        return 0

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _stopped(tmp_path: Path) -> list[tuple[str, str]]:
    """What Suite.stop did to a suite of four processes, in order."""
    events: list[tuple[str, str]] = []
    suite = Suite(SuiteConfig(var_dir=tmp_path))
    for name in ("nats", "wallet", "payout", "gifting"):
        suite.procs[name] = _Proc(name, events)  # type: ignore[assignment]
    suite.stop()
    return events


def test_nats_is_signalled_only_once_every_service_has_exited(tmp_path: Path) -> None:
    events = _stopped(tmp_path)
    nats_term = events.index(("nats", "SIGTERM"))
    for svc in ("wallet", "payout", "gifting"):
        assert events.index((svc, "SIGTERM")) < events.index((svc, "exited")) < nats_term, events
    assert events[-1] == ("nats", "exited"), events


def test_the_wallet_is_signalled_only_once_its_callers_have_exited(tmp_path: Path) -> None:
    """A SendGift in flight at Ctrl-C finishes its spend; it is not left PENDING for the sweeper."""
    events = _stopped(tmp_path)
    wallet_term = events.index(("wallet", "SIGTERM"))
    for caller in ("gifting", "payout"):
        assert events.index((caller, "exited")) < wallet_term, events


def test_a_replica_stops_with_its_service(tmp_path: Path) -> None:
    """A second payout (`start_service("payout", "payout-2")`) is signalled with the first, before
    the wallet; a second wallet with the wallet, before NATS."""
    events: list[tuple[str, str]] = []
    suite = Suite(SuiteConfig(var_dir=tmp_path))
    for name in ("nats", "wallet", "payout", "gifting", "payout-2", "wallet-2"):
        suite.procs[name] = _Proc(name, events)  # type: ignore[assignment]
    suite.replica_of.update({"payout-2": "payout", "wallet-2": "wallet"})
    suite.stop()
    assert events.index(("payout-2", "exited")) < events.index(("wallet", "SIGTERM")), events
    assert events.index(("wallet-2", "SIGTERM")) < events.index(("wallet", "exited")), events  # together
    assert events.index(("wallet-2", "exited")) < events.index(("nats", "SIGTERM")), events
