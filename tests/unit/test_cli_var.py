"""The CLI's --var folder: one that cannot be used is named in a line and exit 1, never a traceback."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from services.cli.main import app


def test_run_with_a_var_that_cannot_be_a_folder_says_so_and_exits_1(tmp_path: Path) -> None:
    a_file = tmp_path / "var"
    a_file.write_text("not a folder")
    result = CliRunner().invoke(app, ["run", "--var", str(a_file / "state"), "--port-offset", "7000"])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Not a directory" in result.output and str(a_file / "state") in " ".join(result.output.split())
