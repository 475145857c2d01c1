"""The command `run` suggests once the suite is up works as printed, on any --var and --port-offset."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli import main
from services.cli.suite import Suite, SuiteConfig


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
    for svc, port in (("wallet", 50551), ("gifting", 50552), ("payout", 50553)):
        assert f"--{svc}-addr 127.0.0.1:{port}" in hint, hint
    # It parses as written.
    demo = hint.split("try: ", 1)[1].split(" or ", 1)[0].split()
    assert demo[0] == "livegifts"
    assert "No such option" not in CliRunner().invoke(main.app, [*demo[1:], "--help"]).output


def test_the_default_suite_suggests_the_bare_demo(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    hint = _hint(capsys, SuiteConfig(var_dir=Path("var").resolve()))
    assert "try: livegifts demo or grpcurl" in hint, hint
