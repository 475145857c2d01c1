"""The command `run` suggests once the suite is up works as printed, on any --var and --port-offset."""

from __future__ import annotations

import io
import os
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from services.cli import main
from services.cli.suite import Suite, SuiteConfig


@pytest.fixture(autouse=True)
def _venv_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """An activated venv (or `pip install`): PATH finds this `livegifts`."""
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def _hint(capsys: pytest.CaptureFixture[str], config: SuiteConfig) -> str:
    main._print_running(Suite(config))
    out = capsys.readouterr().out
    return " ".join(out[out.index("try:") :].split())


def test_the_suggested_demo_names_the_var_and_addresses_of_a_second_suite(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    d = SuiteConfig(var_dir=tmp_path)
    config = SuiteConfig(
        var_dir=tmp_path,
        grpc_ports={svc: p + 500 for svc, p in d.grpc_ports.items()},
        metrics_ports={svc: p + 500 for svc, p in d.metrics_ports.items()},
    )
    hint = _hint(capsys, config)
    assert f"--var {tmp_path}" in hint, hint
    # `run --port-offset 500`'s suite: the demo takes the same option (not three addresses).
    assert "--port-offset 500" in hint and "-addr" not in hint, hint
    _parses(hint)


def _parses(hint: str) -> None:
    """The suggested demo parses as written."""
    demo = hint.split("try: ", 1)[1].split(" or ", 1)[0].split()
    assert demo[0] == "livegifts"
    assert "No such option" not in CliRunner().invoke(main.app, [*demo[1:], "--help"]).output


def test_ports_moved_unevenly_are_named_one_by_one(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = SuiteConfig(var_dir=tmp_path, grpc_ports={"wallet": 6001, "gifting": 6002, "payout": 6010})
    hint = _hint(capsys, config)
    for svc, port in (("wallet", 6001), ("gifting", 6002), ("payout", 6010)):
        assert f"--{svc}-addr 127.0.0.1:{port}" in hint, hint
    assert "--port-offset" not in hint, hint
    _parses(hint)


def test_the_default_suite_suggests_the_bare_demo(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    hint = _hint(capsys, SuiteConfig(var_dir=Path("var").resolve()))
    assert "try: livegifts demo or grpcurl" in hint, hint


def test_the_running_table_shows_every_address_and_log_whole_in_80_columns(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # An 80-column terminal, or `make run` under a supervisor writing to a file: where the logs
    # are is what the table is for, so a cell wraps rather than ending in an ellipsis.
    out = io.StringIO()
    monkeypatch.setattr(main, "console", Console(file=out, width=80))
    suite = Suite(SuiteConfig(var_dir=tmp_path / "a-folder-with-a-rather-long-name" / "var"))
    main._print_running(suite)
    table = out.getvalue().split("try:", 1)[0]
    assert "…" not in table, table
    columns: dict[int, str] = defaultdict(str)  # each column's text, its wrapped pieces joined
    for line in table.splitlines():
        cells = line.split("│")
        if len(cells) == 6:
            for i, cell in enumerate(cells[1:5]):
                columns[i] += cell.strip()
    assert suite.config.nats_url in columns[1], table
    for svc in ("wallet", "gifting", "payout"):
        assert suite.addr(svc) in columns[1], table
        assert f"http://127.0.0.1:{suite.config.metrics_ports[svc]}/metrics" in columns[2], table
        assert str(suite.log_dir / f"{svc}.log") in columns[3], table


@pytest.mark.parametrize("folder", ["my projects", "it's [here]"])
def test_the_suggested_demo_quotes_a_var_as_a_shell_reads_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, folder: str
) -> None:
    """A checkout under "~/My Projects": the hint once printed `--var /home/me/My Projects/var`,
    which a shell splits in two (and rich took `[here]` for markup and dropped it)."""
    import shlex

    var = tmp_path / folder / "var"
    main._print_running(Suite(SuiteConfig(var_dir=var)))
    out = capsys.readouterr().out
    line = out[out.index("try:") :].split("   or   ", 1)[0]
    words = shlex.split(line.removeprefix("try: "))
    assert words[words.index("--var") + 1] == str(var), line


def test_without_an_activated_venv_the_suggested_demo_is_the_venvs_own(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make run` from a fresh checkout: no activated venv, so a bare `livegifts demo` was "command
    not found"; the README's `.venv/bin/livegifts demo` is what works from the checkout."""
    venv_bin = Path(sys.executable).parent
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.chdir(venv_bin.parent.parent)  # the checkout, as `make run` runs it
    hint = _hint(capsys, SuiteConfig(var_dir=Path("var").resolve()))
    program = str((venv_bin / "livegifts").relative_to(venv_bin.parent.parent))
    assert f"try: {program} demo or grpcurl" in hint, hint
