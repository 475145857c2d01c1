"""The client commands call the suite the same two variables started: README's second suite is
`LIVEGIFTS_VAR_DIR=var2 LIVEGIFTS_RUN_PORT_OFFSET=100 make run`, and `LIVEGIFTS_RUN_PORT_OFFSET=100
make demo` talked to the FIRST suite on the default ports, buying coins and sending gifts there.

The address each command settles on is read from its parsed options (click's context), no call made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from services.cli.main import app
from services.cli.suite import SuiteConfig, free_port

_DEFAULT_PORTS = SuiteConfig(var_dir=Path("var")).grpc_ports  # what `run` moves by its offset
_ADDR_VARS = ("LIVEGIFTS_WALLET_ADDR", "LIVEGIFTS_GIFTING_ADDR", "LIVEGIFTS_PAYOUT_ADDR", "LIVEGIFTS_RUN_PORT_OFFSET")


def _commands() -> dict[str, Any]:
    """Every command that calls a service ("dead-letters list" by its full name), by name."""

    def walk(cmd: Any, name: str) -> dict[str, Any]:
        if hasattr(cmd, "commands"):  # a group (typer's own copy of click: not click.Group)
            return {k: v for sub, c in cmd.commands.items() for k, v in walk(c, f"{name} {sub}".strip()).items()}
        return {name: cmd} if any(p.name and p.name.endswith("_addr") for p in cmd.params) else {}

    return walk(typer.main.get_command(app), "")


_CALLING = _commands()
# What each needs beyond options to parse.
_ARGS = {"balance": ["bob"], "earnings": ["bob"], "transactions": ["bob"], "buy": ["bob"], "gift": ["ge-1"]}
_ARGS |= {"withdrawals": ["bob"], "dead-letters replay": ["7", "--service", "payout"]}


def _addresses(name: str, *args: str) -> dict[str, str]:
    """The addresses `livegifts <name> <args>` would call, by service."""
    ctx = _CALLING[name].make_context(name, [*_ARGS.get(name, []), *args])
    return {p.removesuffix("_addr"): v for p, v in ctx.params.items() if p.endswith("_addr")}


@pytest.fixture(autouse=True)
def _no_address_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _ADDR_VARS:
        monkeypatch.delenv(name, raising=False)


def test_every_calling_command_is_found() -> None:
    # The list the tests below run over: a command missing here would go untested.
    assert {"demo", "buy", "balance", "earnings", "transactions", "gift", "audit", "withdrawals"} <= set(_CALLING)
    assert {"dead-letters list", "dead-letters replay"} <= set(_CALLING)


@pytest.mark.parametrize("name", sorted(_CALLING))
def test_without_an_offset_a_command_calls_the_default_ports(name: str) -> None:
    addrs = _addresses(name)
    assert addrs, name
    assert addrs == {svc: f"127.0.0.1:{_DEFAULT_PORTS[svc]}" for svc in addrs}, addrs


@pytest.mark.parametrize("name", sorted(_CALLING))
def test_the_run_port_offset_variable_moves_every_default_address(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEGIFTS_RUN_PORT_OFFSET", "100")
    addrs = _addresses(name)
    assert addrs == {svc: f"127.0.0.1:{_DEFAULT_PORTS[svc] + 100}" for svc in addrs}, addrs


@pytest.mark.parametrize("name", sorted(_CALLING))
def test_the_port_offset_option_moves_every_default_address_as_runs_does(name: str) -> None:
    addrs = _addresses(name, "--port-offset", "7000")
    assert addrs == {svc: f"127.0.0.1:{_DEFAULT_PORTS[svc] + 7000}" for svc in addrs}, addrs


def test_an_address_given_wins_over_the_offset_as_an_option_or_a_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEGIFTS_RUN_PORT_OFFSET", "100")
    monkeypatch.setenv("LIVEGIFTS_GIFTING_ADDR", "gifting.internal:50052")
    # The default's own address, typed: taken as it is, not moved.
    addrs = _addresses("demo", "--wallet-addr", "127.0.0.1:50051")
    assert addrs == {"wallet": "127.0.0.1:50051", "gifting": "gifting.internal:50052", "payout": "127.0.0.1:50153"}


def test_the_option_wins_over_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEGIFTS_RUN_PORT_OFFSET", "100")
    assert _addresses("balance", "--port-offset", "200") == {"wallet": "127.0.0.1:50251"}


@pytest.mark.parametrize("value", ["-1", "10001", "ten", ""])
def test_an_offset_run_would_refuse_is_a_usage_error_naming_the_variable(value: str) -> None:
    closed = f"127.0.0.1:{free_port()}"  # were it ignored: a call that fails at once, exit 1
    env = {"LIVEGIFTS_RUN_PORT_OFFSET": value, "LIVEGIFTS_WALLET_ADDR": closed, "COLUMNS": "300"}
    result = CliRunner().invoke(app, ["balance", "bob"], env=env)
    assert result.exit_code == 2, result.output
    assert "LIVEGIFTS_RUN_PORT_OFFSET" in result.stderr, result.stderr
