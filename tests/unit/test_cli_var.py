"""The CLI's --var folder: one that cannot be used is named in a line and exit 1, never a traceback."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from services.cli.main import app
from services.cli.suite import Suite


def test_run_with_a_var_that_cannot_be_a_folder_says_so_and_exits_1(tmp_path: Path) -> None:
    a_file = tmp_path / "var"
    a_file.write_text("not a folder")
    result = CliRunner().invoke(app, ["run", "--var", str(a_file / "state"), "--port-offset", "7000"])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    joined = "".join(result.output.split())  # the console wraps long lines, paths too
    assert "Notadirectory" in joined and str(a_file / "state") in joined, result.output


@pytest.mark.parametrize(
    ("args", "missing"),
    [
        (["buy", "alice", "--wallet-addr", "127.0.0.1:1"], "nosecrettosignwith"),
        (["demo", "--wallet-addr", "127.0.0.1:1"], "nosecrettosignwith"),
        # An operator token authenticates; it signs nothing.
        (["dead-letters", "list", "--wallet-addr", "127.0.0.1:1"], "nooperatortoken"),
        (["dead-letters", "replay", "7", "--service", "payout", "--payout-addr", "127.0.0.1:1"], "nooperatortoken"),
    ],
)
def test_a_var_that_is_a_file_is_named_not_a_traceback(tmp_path: Path, args: list[str], missing: str) -> None:
    """`--var var/dev-webhook-secret` (the secret's file, not its folder) is an easy slip."""
    secret = tmp_path / "dev-webhook-secret"
    secret.write_text("s")
    result = CliRunner().invoke(app, [*args, "--var", str(secret)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    joined = "".join(result.output.split())  # the console wraps long lines, paths too
    assert missing in joined and f"cannotread{secret}/" in joined, result.output


def test_a_var_a_running_suite_holds_is_refused_naming_what_make_run_takes(tmp_path: Path) -> None:
    """`make run` passes no options: a newcomer whose second `make run` was told only "give this
    one its own --var (and --port-offset)" had nothing to give them to. The refusal names the
    variables `make run` reads too (README, "Two commands")."""
    import fcntl

    with open(tmp_path / "run.lock", "a") as held:  # what a running suite holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = CliRunner().invoke(app, ["run", "--var", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    flat = " ".join(result.output.split())
    assert "is the state of a suite still running" in flat, flat
    assert "--var and --port-offset" in flat and "LIVEGIFTS_VAR_DIR and LIVEGIFTS_RUN_PORT_OFFSET" in flat, flat
    assert not (tmp_path / "logs").exists()  # nothing started


def _git_status(repo: Path) -> str:
    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout


def _run_until_the_suite_would_start(monkeypatch: pytest.MonkeyPatch, *args: str) -> Any:
    """`livegifts run ...` up to the start of its processes, which is refused: what it made of
    its state folder by then is what these tests look at."""

    def refuse(self: Suite) -> None:
        raise RuntimeError("no suite in a unit test")

    monkeypatch.setattr(Suite, "start", refuse)
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # pytest keeps its own Ctrl-C
    result = CliRunner().invoke(app, ["run", *args, "--port-offset", "7000"])
    assert result.exit_code == 1 and "no suite in a unit test" in result.output, result.output
    return result


def test_a_state_folder_run_makes_in_a_checkout_is_ignored_by_git(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README's second suite is `livegifts run --var var2 --port-offset 100` (or `LIVEGIFTS_VAR_DIR=var2
    make run`), in the checkout, whose .gitignore names var/ only: its databases, logs and dev
    secrets (the operator token, the webhook secret) showed as files for the next `git add -A`."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.chdir(tmp_path)
    _run_until_the_suite_would_start(monkeypatch, "--var", "var2")
    assert (tmp_path / "var2" / "dev-operator-token").exists()
    assert _git_status(tmp_path) == ""


def test_a_folder_that_exists_is_left_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--var` may name a folder of the user's own (one they keep under git on purpose): `run`
    adds its state there and writes no ignore rule into it."""
    mine = tmp_path / "state"
    mine.mkdir()
    _run_until_the_suite_would_start(monkeypatch, "--var", str(mine))
    assert (mine / "dev-webhook-secret").exists() and not (mine / ".gitignore").exists()
