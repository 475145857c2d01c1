"""A call the CLI cannot complete ends in one line that names the service and address it went to.

An SRE reading a CronJob's log or a terminal must tell which of three services did not answer:
gRPC's own text for a deadline ("Deadline Exceeded") names none of them.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from services.cli import main
from services.cli.main import app
from services.cli.suite import free_port


@pytest.fixture
def silent_addr() -> Iterator[str]:
    """host:port of a socket that accepts connections and never answers (a hung service)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"127.0.0.1:{s.getsockname()[1]}"


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def test_a_service_nothing_listens_on_is_named_in_one_line_and_exit_1() -> None:
    addr = f"127.0.0.1:{free_port()}"
    result = CliRunner().invoke(app, ["balance", "bob", "--wallet-addr", addr], env={"COLUMNS": "80"})
    assert result.exit_code == 1, result.output
    lines = _error_lines(result.output)
    assert len(lines) == 1, result.output  # not wrapped at the terminal's width
    assert lines[0].startswith("UNAVAILABLE: ") and f"(wallet at {addr})" in lines[0], result.output


def test_an_audit_whose_service_hangs_names_that_service_in_one_line(
    monkeypatch: pytest.MonkeyPatch, silent_addr: str
) -> None:
    monkeypatch.setattr(main, "DEADLINE_S", 0.5)
    refused = f"127.0.0.1:{free_port()}"
    args = ["audit", "--wallet-addr", refused, "--gifting-addr", refused, "--payout-addr", silent_addr]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "80"})
    assert result.exit_code == 1, result.output
    lines = _error_lines(result.output)
    assert len(lines) == 1, result.output
    assert lines[0].startswith("DEADLINE_EXCEEDED: ") and f"(payout at {silent_addr})" in lines[0], result.output
    assert "Traceback" not in result.output


def test_a_demo_names_the_service_whose_call_failed(monkeypatch: pytest.MonkeyPatch, silent_addr: str) -> None:
    monkeypatch.setattr(main, "DEADLINE_S", 0.5)
    args = ["demo", "--wallet-addr", silent_addr, "--webhook-secret", "s" * 32]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "80"})
    assert result.exit_code == 1, result.output
    lines = _error_lines(result.output)
    assert len(lines) == 1 and f"(wallet at {silent_addr})" in lines[0], result.output


@pytest.mark.parametrize(
    "args",
    [
        ["dead-letters", "list", "--service", "payuot"],
        ["dead-letters", "replay", "7", "--service", "payuot"],
    ],
)
def test_an_unknown_service_is_a_usage_error_before_any_token_is_looked_for(tmp_path: Path, args: list[str]) -> None:
    # A folder without the token: the typo is what to fix first, not a token that is fine.
    result = CliRunner().invoke(app, [*args, "--var", str(tmp_path)], env={"COLUMNS": "80"})
    assert result.exit_code == 2, result.output
    assert "unknown service 'payuot'" in result.output and "token" not in result.output, result.output


@pytest.mark.parametrize("args", [["audit", "--wait", "-5"], ["demo", "--wait-s", "-5", "--webhook-secret", "s"]])
def test_a_negative_wait_is_a_usage_error_before_any_call(args: list[str]) -> None:
    # Not taken for --wait 0, whose exit 3 (in flight) a script would read as a verdict.
    refused = f"127.0.0.1:{free_port()}"
    result = CliRunner().invoke(app, [*args, "--wallet-addr", refused], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--wait" in result.output, result.output


def test_an_audit_waiting_on_the_same_work_says_so_once_in_a_while_not_every_look(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The CronJob's --wait 120 looks every 0.5 s: a line per look is 240 lines of the same words.
    from services.cli import audit

    busy = [audit.Check("3c. pending gifts", audit.IN_FLIGHT, "1 in flight")]
    moved = [audit.Check("4a. credits", audit.IN_FLIGHT, "1 in flight")]

    def wait(fetch: object, timeout_s: float, progress: Callable[[list[audit.Check]], None]) -> list[audit.Check]:
        for report in [busy] * 50 + [moved] * 50:
            progress(report)
        return [audit.Check("4a. credits", audit.FAILED, "not settled")]

    monkeypatch.setattr(audit, "wait_until_settled", wait)
    result = CliRunner().invoke(app, ["audit", "--wait", "30"], env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    waits = [line for line in result.stderr.splitlines() if line.startswith("waiting:")]
    # Once when it starts, once when what is in flight changes; the clock adds none in a blink.
    assert waits == ["waiting: 3c. pending gifts", "waiting: 4a. credits"], result.output
    assert "waiting:" not in result.stdout  # progress on stderr: stdout is the report alone


def test_every_argument_and_option_of_every_command_says_what_it_is() -> None:
    # `livegifts buy --help` listing `user <str> [required]` leaves the reader to guess.
    import typer.main

    def commands(cmd: Any, path: str) -> Iterator[tuple[str, Any]]:
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from commands(sub, f"{path} {name}")
        if not hasattr(cmd, "commands"):
            yield path, cmd

    bare = [
        f"{path} {p.name}"
        for path, cmd in commands(typer.main.get_command(app), "livegifts")
        for p in cmd.params
        if not getattr(p, "help", None)
    ]
    assert not bare, f"parameters without a help text: {bare}"


@pytest.mark.parametrize("since", ["2x", "h", "0h", "-1h", "nanh", "infm"])
def test_an_audit_window_that_is_no_positive_duration_is_a_usage_error(since: str) -> None:
    result = CliRunner().invoke(app, ["audit", "--detail-since", since], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert "--detail-since" in result.output


@pytest.mark.parametrize(("since", "seconds"), [("2h", 7200.0), ("90m", 5400.0), ("3600s", 3600.0), ("1d", 86400.0)])
def test_an_audit_window_is_read_in_seconds(since: str, seconds: float) -> None:
    from services.cli.main import _window_s

    assert _window_s(since) == seconds


@pytest.mark.parametrize("since", ["2h", "100000d"])
def test_an_audit_window_reaching_before_1970_asks_for_every_record_not_a_negative_time(
    since: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The servers refuse a negative since_us (INVALID_SINCE) and take 0 as no window at all: a
    # window longer than the clock's count (an operator's "everything") is the earliest time.
    from services.cli import audit

    asked: list[int | None] = []

    def collect(*args: Any) -> Any:
        asked.append(args[-1])
        raise SystemExit(0)

    monkeypatch.setattr(audit, "collect", collect)
    result = CliRunner().invoke(app, ["audit", "--detail-since", since])
    assert result.exit_code == 0, result.output
    (since_us,) = asked
    assert since_us is not None and since_us >= 1


@pytest.mark.parametrize("dead_letter_id", ["99999999999999999999999", "0"])
def test_a_dead_letter_id_no_row_can_have_is_a_usage_error_not_a_traceback(tmp_path: Path, dead_letter_id: str) -> None:
    # The id is an int64 (dead_letters.proto): one past it failed building the request, with a
    # ValueError traceback, after the operator token had been read.
    args = ["dead-letters", "replay", "--service", "payout", "--var", str(tmp_path), "--", dead_letter_id]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert "Invalid value for 'ID'" in result.output and "Traceback" not in result.output, result.output


def _refusing_dead_letter_service(reason: str, metadata: dict[str, str]) -> tuple[Any, str]:
    """A DeadLetterService that refuses every replay as the services do: a status with a
    google.rpc.ErrorInfo, built by the servers' own builder."""
    from concurrent import futures

    import grpc

    from livegifts.common.v1 import dead_letters_pb2_grpc
    from services.common.grpcserver import _rich_status

    class Refusing(dead_letters_pb2_grpc.DeadLetterServiceServicer):  # type: ignore[misc]
        def ReplayDeadLetter(self, request: Any, context: Any) -> Any:
            message = "the event could not be applied: IntegrityError; the service log has the error"
            status = _rich_status(grpc.StatusCode.FAILED_PRECONDITION, message, reason, "livegifts.payout", metadata)
            context.abort_with_status(status)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    dead_letters_pb2_grpc.add_DeadLetterServiceServicer_to_server(Refusing(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize(
    ("metadata", "shown"),
    [
        ({"consumer": "payout-gift-sent", "trace_id": "4bf92f35"}, " [consumer=payout-gift-sent, trace_id=4bf92f35]"),
        ({"consumer": "payout-gift-sent", "trace_id": ""}, " [consumer=payout-gift-sent]"),
        ({}, ""),
    ],
)
def test_a_refused_call_names_the_errorinfo_reason_and_its_short_metadata_in_its_one_line(
    metadata: dict[str, str], shown: str
) -> None:
    # docs/sre.md's runbooks go by the reason (`REPLAY_FAILED`): the code alone leaves it unsaid.
    server, addr = _refusing_dead_letter_service("REPLAY_FAILED", metadata)
    try:
        args = ["dead-letters", "replay", "7", "--service", "payout", "--payout-addr", addr, "--operator-token", "t"]
        result = CliRunner().invoke(app, args, env={"COLUMNS": "80"})
    finally:
        server.stop(None)
    assert result.exit_code == 1, result.output
    lines = _error_lines(result.output)
    assert lines == [
        (
            "FAILED_PRECONDITION REPLAY_FAILED: the event could not be applied: IntegrityError;"
            f" the service log has the error{shown} (payout at {addr})"
        )
    ]


def test_long_errorinfo_metadata_is_cut_and_shown_on_one_line() -> None:
    from services.cli.calls import ERROR_METADATA_SHOWN_CHARS_MAX

    server, addr = _refusing_dead_letter_service("REPLAY_FAILED", {"consumer": "x\ny" + "z" * 300})
    try:
        args = ["dead-letters", "replay", "7", "--service", "payout", "--payout-addr", addr, "--operator-token", "t"]
        result = CliRunner().invoke(app, args, env={"COLUMNS": "80"})
    finally:
        server.stop(None)
    (line,) = _error_lines(result.output)
    shown = line.split(" [", 1)[1].split("] (", 1)[0]
    assert shown.startswith("consumer=x?y") and shown.endswith("...") and len(shown) == ERROR_METADATA_SHOWN_CHARS_MAX


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ["--consumer", "payout-gift-snet"],
            "unknown consumer 'payout-gift-snet': one of gifting-leaderboards (gifting),"
            " payout-gift-sent (payout), payout-purchase-reversed (payout)",
        ),
        (["--consumer", "x", "--service", "wallet"], "unknown consumer 'x': wallet runs no consumer"),
        (
            ["--consumer", "payout-gift-sent", "--service", "gifting"],
            "consumer 'payout-gift-sent' is not gifting's: it runs in payout: give --service payout",
        ),
    ],
)
def test_a_consumer_no_listed_service_runs_is_a_usage_error_naming_the_known_ones(
    tmp_path: Path, args: list[str], said: str
) -> None:
    # A typo listed nothing and exited 0: "no parked events" while the real consumer's pile up.
    result = CliRunner().invoke(app, ["dead-letters", "list", *args, "--var", str(tmp_path)], env={"COLUMNS": "80"})
    assert result.exit_code == 2, result.output
    assert _error_lines(result.output) == [said], result.output


def test_the_consumers_the_cli_knows_are_the_ones_the_services_subscribe() -> None:
    # services/common/consumers.py is the list; each service's wiring refuses to start otherwise.
    from services.common.consumers import CONSUMERS, unlisted

    assert set(CONSUMERS) == set(main.SERVICES)
    payout = {"payout-gift-sent": "GIFTING", "payout-purchase-reversed": "WALLET"}
    assert unlisted("payout", payout) == ""
    assert "payout-new" in unlisted("payout", {**payout, "payout-new": "PAYOUT"})
    assert "gifting-leaderboards" in unlisted("gifting", {})
    # `nats-drained` looks for each durable on the stream listed for it: one bound elsewhere
    # would be looked for where it is not.
    assert "payout-gift-sent on WALLET" in unlisted("payout", {**payout, "payout-gift-sent": "WALLET"})


def _cli(*args: str, env: dict[str, str | None] | None = None, **kwargs: Any) -> Any:
    """The `livegifts` command in a process of its own: gRPC's C core writes to its file 2.
    A variable `env` gives as None is left out of its environment."""
    import os
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"} | (env or {})
    if "stdout" not in kwargs:
        kwargs["capture_output"] = True
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        text=True,
        env={k: v for k, v in environ.items() if v is not None},
        timeout=60,
        **kwargs,
    )


def test_an_address_grpc_cannot_parse_fails_in_the_clis_one_line_without_grpcs_own_log() -> None:
    # gRPC logged "E1207 ... dns_resolver.cc:554] no server name supplied in dns URI" and three
    # more lines to stderr beside the CLI's one line.
    result = _cli("balance", "bob", "--wallet-addr", "dns:///")
    assert result.returncode == 1, result
    assert _error_lines(result.stderr) == [
        "UNKNOWN: Failed to create channel to 'dns:///':the target uri is not valid: dns:/// (wallet at dns:///)"
    ], result
    assert result.stdout == "", result.stdout


def test_errors_go_to_stderr_and_leave_stdout_to_the_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # `livegifts withdrawals ... | jq`, `livegifts audit > report.txt`: an error in the data was
    # read as data. A failed call, a missing token and a usage error, each in a real process.
    monkeypatch.delenv("LIVEGIFTS_OPERATOR_TOKEN", raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens once the socket is closed
    cases = [
        (("balance", "bob", "--wallet-addr", closed), 1, "UNAVAILABLE: ", f"(wallet at {closed})"),
        (("withdrawals", "--var", str(tmp_path)), 1, "no operator token: ", "--operator-token"),
        (("withdrawals", "--status", "WAITING"), 2, "unknown status 'WAITING': ", "PENDING_REVIEW"),
    ]
    for args, code, starts, names in cases:
        result = _cli(*args)
        assert result.returncode == code, result
        assert result.stdout == "", result
        line = " ".join(result.stderr.split())
        assert line.startswith(starts) and names in line, result


def test_grpcs_own_log_stays_for_whoever_asks_for_it() -> None:
    # GRPC_VERBOSITY=error (or debug, to troubleshoot a connection) is the user's to set.
    result = _cli("balance", "bob", "--wallet-addr", "dns:///", env={"GRPC_VERBOSITY": "error"})
    assert result.returncode == 1, result
    assert "no server name supplied" in result.stderr, result


def _env_of_a_started_service(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """The environment `livegifts run` gives the wallet service it starts (Popen stopped there)."""
    from services.cli import suite

    started: list[dict[str, str]] = []

    class Started(Exception):
        pass

    def popen(args: list[str], env: dict[str, str], **kwargs: Any) -> None:
        started.append(env)
        raise Started

    monkeypatch.setattr(suite.subprocess, "Popen", popen)
    (tmp_path / "logs").mkdir()
    with pytest.raises(Started):
        suite.Suite(suite.SuiteConfig(tmp_path)).start_service("wallet")
    return started[0]


def test_the_services_run_starts_keep_grpcs_own_log(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # GRPC_VERBOSITY=NONE is for the CLI process only: a service's log keeps gRPC's lines.
    import services.cli
    from services.cli import suite

    monkeypatch.setenv("GRPC_VERBOSITY", "")  # so the test's end takes back what quiet_grpc sets
    monkeypatch.delenv("GRPC_VERBOSITY")
    monkeypatch.setattr(services.cli, "CLI_ONLY_ENV", set())
    monkeypatch.setattr(suite, "CLI_ONLY_ENV", services.cli.CLI_ONLY_ENV)
    services.cli.quiet_grpc()
    assert os.environ["GRPC_VERBOSITY"] == "NONE"
    assert "GRPC_VERBOSITY" not in _env_of_a_started_service(monkeypatch, tmp_path)


def test_the_services_run_starts_get_no_grpc_setting_the_user_did_not_give(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # main() set GRPC_ENABLE_FORK_SUPPORT=0 after gRPC was imported (no effect on the CLI), and
    # `run` passed it on: its services ran with a gRPC setting they have nowhere else.
    import sys

    import services.cli
    from services.cli import suite

    for name in ("GRPC_VERBOSITY", "GRPC_ENABLE_FORK_SUPPORT"):
        monkeypatch.setenv(name, "")  # so the test's end takes back what the CLI sets
        monkeypatch.delenv(name)
    monkeypatch.setattr(services.cli, "CLI_ONLY_ENV", set())
    monkeypatch.setattr(suite, "CLI_ONLY_ENV", services.cli.CLI_ONLY_ENV)
    given = {k: v for k, v in os.environ.items() if k.startswith("GRPC_")}
    monkeypatch.setattr(sys, "argv", ["livegifts", "--help"])
    with pytest.raises(SystemExit) as exited:
        services.cli.entry_point()
    assert exited.value.code == 0
    env = _env_of_a_started_service(monkeypatch, tmp_path)
    assert {k: v for k, v in env.items() if k.startswith("GRPC_")} == given


@pytest.mark.parametrize("option", ["--wallet-addr", "--gifting-addr", "--payout-addr"])
def test_an_empty_service_address_is_a_usage_error_in_one_line(option: str) -> None:
    result = _cli("audit", option, "")
    assert result.returncode == 2, result
    assert _error_lines(result.stderr) == [f"{option} is empty: give the service's host:port"], result
    assert result.stdout == "", result.stdout


@pytest.mark.parametrize("value", ["", "  "], ids=["empty", "blank"])
@pytest.mark.parametrize("variable", ["LIVEGIFTS_WALLET_ADDR", "LIVEGIFTS_GIFTING_ADDR", "LIVEGIFTS_PAYOUT_ADDR"])
def test_an_empty_address_variable_is_a_usage_error_naming_it(variable: str, value: str) -> None:
    # click takes a variable set to "" as unset: a script whose variable came out empty had its
    # audit read the default 127.0.0.1 addresses (a local dev suite) and say nothing of it.
    result = _cli("audit", env={variable: value})
    assert result.returncode == 2, result
    assert _error_lines(result.stderr) == [f"{variable} is empty: give the service's host:port"], result
    assert result.stdout == "", result.stdout


def test_an_address_option_wins_over_its_empty_variable() -> None:
    addr = f"127.0.0.1:{free_port()}"
    result = _cli("balance", "bob", "--wallet-addr", addr, env={"LIVEGIFTS_WALLET_ADDR": ""})
    assert result.returncode == 1, result  # the call went to the option's address, which is closed
    assert f"(wallet at {addr})" in result.stderr, result.stderr


def test_lines_printed_to_no_terminal_stay_whole(tmp_path: Path) -> None:
    """A pipe, a file or a Job's log: rich wrapped every line at 80 columns there, so a command's
    answer (`balance`, `earnings`, `demo`'s steps) and its one-line errors came out broken in two,
    and `| grep` or a log search for the whole line found nothing."""
    from concurrent import futures

    import grpc

    from livegifts.wallet.v1 import wallet_pb2, wallet_pb2_grpc

    class Wallet(wallet_pb2_grpc.WalletServiceServicer):  # type: ignore[misc]
        def GetBalance(self, request: Any, context: Any) -> Any:
            return wallet_pb2.Balance(user_id=request.user_id, coins=1_234_567)

    user = "viewer-" + "x" * 90  # the answer is longer than 80 columns
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    wallet_pb2_grpc.add_WalletServiceServicer_to_server(Wallet(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        result = _cli("balance", user, "--wallet-addr", f"127.0.0.1:{port}", env={"COLUMNS": ""})
    finally:
        server.stop(None)
    assert result.returncode == 0, result
    assert result.stdout == f"{user}: 1234567 coins\n", result.stdout
    # An error on stderr: one line too, however long the path it names.
    var = tmp_path / ("state-" + "y" * 80)
    result = _cli("buy", "bob", "--var", str(var), env={"LIVEGIFTS_WALLET_PAYMENT_WEBHOOK_SECRET": None})
    assert result.returncode == 1, result
    assert len(result.stderr.splitlines()) == 1 and str(var / "dev-webhook-secret") in result.stderr, result.stderr


def test_ids_and_paths_are_printed_as_given_not_read_as_markup(tmp_path: Path) -> None:
    """User ids and folders are text: rich read `[here]` in `--var "/x [here]"` or a user id
    `ann[bold]` as a markup tag and dropped it, so the line named another user or a path that
    does not exist."""
    from concurrent import futures

    import grpc

    from livegifts.wallet.v1 import wallet_pb2, wallet_pb2_grpc

    class Wallet(wallet_pb2_grpc.WalletServiceServicer):  # type: ignore[misc]
        def GetBalance(self, request: Any, context: Any) -> Any:
            return wallet_pb2.Balance(user_id=request.user_id, coins=7)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    wallet_pb2_grpc.add_WalletServiceServicer_to_server(Wallet(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        result = _cli("balance", "ann[bold]", "--wallet-addr", f"127.0.0.1:{port}")
    finally:
        server.stop(None)
    assert result.stdout == "ann[bold]: 7 coins\n", result
    var = tmp_path / "x [here]"
    result = _cli("buy", "bob", "--var", str(var), env={"LIVEGIFTS_WALLET_PAYMENT_WEBHOOK_SECRET": None})
    assert result.returncode == 1 and str(var / "dev-webhook-secret") in result.stderr, result.stderr
    result = _cli("run", "--var", "/proc/x [here]")  # a folder that cannot be made
    assert result.returncode == 1 and "cannot keep state in /proc/x [here]" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["audit", "--detail-since", "5x"], "'5x' is not a duration such as 2h, 90m, 3600s or 1d"),
        (["balance"], "Missing argument 'user'."),
        (["withdrawals", "--limit", "0"], "Invalid value for '--limit': Input should be greater than or equal to 1"),
    ],
    ids=["bad-value", "missing-argument", "out-of-range"],
)
def test_a_usage_error_off_a_terminal_is_one_plain_line_a_log_search_finds(args: list[str], message: str) -> None:
    # typer boxed it and wrapped it at 80 columns: a cron job's log had the message in two halves
    # between box glyphs. stderr is no terminal under CliRunner, as in a Job's log or `2> file`.
    result = CliRunner().invoke(app, args, env={"COLUMNS": "80"})
    assert result.exit_code == 2, result.output
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("Error: ")]
    assert message in line, result.stderr
    assert not any(glyph in result.stderr for glyph in "╭│╰"), result.stderr
    assert result.stdout == "", result.stdout


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full to write to")
def test_output_it_cannot_write_ends_in_one_line_and_exit_1_not_a_traceback() -> None:
    # `livegifts ... > report.txt` on a full disk: typer printed a page of rich's internals.
    import subprocess
    import sys

    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "services.cli", "withdrawals", "--help"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result.stderr
    assert _error_lines(result.stderr) == ["could not finish: [Errno 28] No space left on device"], result.stderr


def test_ctrl_c_during_a_hung_call_ends_at_once_with_exit_130_and_no_traceback() -> None:
    # README promises it to a runbook: not the call's 10 s deadline, nor a page of traceback.
    import signal
    import subprocess
    import sys
    import time

    with socket.socket() as hung:  # accepts the connection, never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        hung.settimeout(60)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.cli",
                "balance",
                "bob",
                "--wallet-addr",
                f"127.0.0.1:{hung.getsockname()[1]}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # A shell's background job ignores SIGINT, and a child inherits that: not a terminal's Ctrl-C.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            conn, _ = hung.accept()  # the call is under way (imports done, however loaded the machine)
            with conn:
                time.sleep(0.5)
                sent = time.monotonic()
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:  # it ignored the signal, or never called: not left running
                proc.kill()
                proc.communicate()
    assert proc.returncode == 130, (out, err)
    assert time.monotonic() - sent < main.DEADLINE_S / 2, "waited for the call's deadline"
    assert "Traceback" not in err and out == "", (out, err)


def test_a_usage_error_on_a_terminal_stays_typers_box_and_no_arguments_print_only_the_help(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The plain line is for stderr off a terminal only; a person at one keeps typer's box. And
    # no arguments at all is typer's help, not an error on top of it.
    monkeypatch.setattr(main, "err_console", main._Console(stderr=True, force_terminal=True))
    result = CliRunner().invoke(app, ["balance"], env={"COLUMNS": "120"})
    assert result.exit_code == 2, result.output
    assert "Missing argument 'user'." in result.stderr and "╭" in result.stderr, result.stderr
    assert not any(line.startswith("Error: ") for line in result.stderr.splitlines()), result.stderr
    monkeypatch.undo()
    result = CliRunner().invoke(app, [], env={"COLUMNS": "120"})
    assert "Usage:" in result.stdout and result.stderr == "", (result.stdout, result.stderr)


def _var_with_secrets(tmp_path: Path) -> Path:
    """A folder as `livegifts run` leaves it: its webhook secret and operator token."""
    (tmp_path / "dev-webhook-secret").write_text("s" * 32)
    (tmp_path / "dev-operator-token").write_text("t" * 32)
    return tmp_path


@pytest.mark.parametrize(
    ("variable", "args"),
    [
        ("LIVEGIFTS_OPERATOR_TOKEN", ["withdrawals"]),
        ("LIVEGIFTS_OPERATOR_TOKEN", ["dead-letters", "list"]),
        ("LIVEGIFTS_WALLET_PAYMENT_WEBHOOK_SECRET", ["buy", "bob"]),
        ("LIVEGIFTS_WALLET_PAYMENT_WEBHOOK_SECRET", ["demo"]),
        ("LIVEGIFTS_VAR_DIR", ["withdrawals"]),
        ("LIVEGIFTS_VAR_DIR", ["buy", "bob"]),
        ("LIVEGIFTS_VAR_DIR", ["run"]),
        ("LIVEGIFTS_RUN_PORT_OFFSET", ["run"]),
    ],
)
def test_an_empty_variable_is_a_usage_error_naming_it_not_var_s_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str, args: list[str]
) -> None:
    # A Secret key or a script's variable that came out empty: click took "" as unset, and the
    # command signed, authenticated or kept state with var/'s files without a word (an empty
    # address variable was refused already).
    class Suite:  # `run` without the check: no suite is started here
        def __init__(self, config: Any) -> None:
            raise RuntimeError("started a suite")

    monkeypatch.setattr(main, "Suite", Suite)
    closed = f"127.0.0.1:{free_port()}"
    var = _var_with_secrets(tmp_path)
    env = {"COLUMNS": "300", variable: ""}
    for name in ("LIVEGIFTS_WALLET_ADDR", "LIVEGIFTS_GIFTING_ADDR", "LIVEGIFTS_PAYOUT_ADDR"):
        env[name] = closed
    if variable != "LIVEGIFTS_VAR_DIR":
        env["LIVEGIFTS_VAR_DIR"] = str(var)
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 2, result.output
    (line,) = _error_lines(result.stderr)
    assert line.startswith(f"{variable} is empty: give "), result.stderr
    assert result.stdout == "", result.stdout


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["withdrawals", "--operator-token", ""], "--operator-token"),
        (["dead-letters", "replay", "7", "--service", "payout", "--operator-token", " "], "--operator-token"),
        (["buy", "bob", "--webhook-secret", ""], "--webhook-secret"),
    ],
)
def test_an_empty_secret_option_is_a_usage_error_naming_it(tmp_path: Path, args: list[str], option: str) -> None:
    # `--operator-token "$TOKEN"` with TOKEN unset read var/'s token instead, as the variable did.
    closed = f"127.0.0.1:{free_port()}"
    env = {"LIVEGIFTS_VAR_DIR": str(_var_with_secrets(tmp_path)), "COLUMNS": "300"}
    env |= {name: closed for name in ("LIVEGIFTS_WALLET_ADDR", "LIVEGIFTS_PAYOUT_ADDR")}
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 2, result.output
    (line,) = _error_lines(result.stderr)
    assert line.startswith(f"{option} is empty: give "), result.stderr


def test_a_secret_option_wins_over_its_empty_variable(tmp_path: Path) -> None:
    closed = f"127.0.0.1:{free_port()}"
    env = {"LIVEGIFTS_OPERATOR_TOKEN": "", "LIVEGIFTS_VAR_DIR": str(tmp_path), "COLUMNS": "300"}
    result = CliRunner().invoke(app, ["withdrawals", "--operator-token", "t", "--payout-addr", closed], env=env)
    assert result.exit_code == 1, result.output  # the call went to the closed address, with the option's token
    assert f"(payout at {closed})" in result.stderr, result.stderr


@pytest.mark.parametrize(
    "args",
    [["buy", "bob", "--webhook-secret", "s" * 32], ["withdrawals", "--operator-token", "t"]],
    ids=["buy", "withdrawals"],
)
def test_an_empty_var_dir_variable_is_no_error_for_a_command_given_what_it_would_read_there(args: list[str]) -> None:
    # var/ is read for a secret or token not given: given, the command reads nothing there, and
    # an empty LIVEGIFTS_VAR_DIR (a shared environment's) refused it all the same.
    closed = f"127.0.0.1:{free_port()}"
    env = {"LIVEGIFTS_VAR_DIR": "", "COLUMNS": "300"}
    env |= {name: closed for name in ("LIVEGIFTS_WALLET_ADDR", "LIVEGIFTS_PAYOUT_ADDR")}
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 1, result.output  # the call went to the closed address
    assert f"at {closed})" in result.stderr, result.stderr


def test_version_prints_the_installed_package_s_version_and_exits_0() -> None:
    # An operator's script (or a bug report) had no way to say which CLI it ran.
    import importlib.metadata

    result = _cli("--version")
    assert result.returncode == 0, result
    assert result.stdout == f"livegifts {importlib.metadata.version('livegifts')}\n", result
    assert result.stderr == "", result
    assert "--version" in CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).stdout


@pytest.fixture
def wallet_addr() -> Iterator[str]:
    """host:port of a wallet that answers GetBalance and ListTransactions."""
    from concurrent import futures

    import grpc

    from livegifts.wallet.v1 import wallet_pb2, wallet_pb2_grpc

    class Wallet(wallet_pb2_grpc.WalletServiceServicer):  # type: ignore[misc]
        def GetBalance(self, request: Any, context: Any) -> Any:
            return wallet_pb2.Balance(user_id=request.user_id, coins=7)

        def ListTransactions(self, request: Any, context: Any) -> Any:
            return wallet_pb2.ListTransactionsResponse(
                transactions=[wallet_pb2.Transaction(entry_id="1", kind="PURCHASE", amount=7, balance_after=7)]
            )

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    wallet_pb2_grpc.add_WalletServiceServicer_to_server(Wallet(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],  # typer's help, through rich
        ["withdrawals", "--help"],
        ["--version"],
        ["balance", "bob"],  # a command's line, through the CLI's console
        ["balance", "bob", "--json"],  # a JSON document
        ["transactions", "bob", "--json"],  # JSON lines
    ],
    ids=" ".join,
)
def test_a_closed_pipe_ends_quietly_with_exit_141_as_unix_tools_do(wallet_addr: str, args: list[str]) -> None:
    # `livegifts audit | head -1`: the reader is gone, as intended. It ended in exit 1, which
    # under `set -o pipefail` reads as a failed audit; Unix tools die of SIGPIPE there (128 + 13).
    reader, writer = os.pipe()
    os.close(reader)  # the reader left before the first write: every write is EPIPE
    try:
        result = _cli(*args, env={"LIVEGIFTS_WALLET_ADDR": wallet_addr}, stdout=writer, stderr=subprocess.PIPE)
    finally:
        os.close(writer)
    assert result.returncode == main.STDOUT_CLOSED_EXIT == 141, result.stderr
    assert result.stderr == "", result.stderr
