"""`wait_until_settled` rides out a service's transient answers while it waits, and only those."""

from __future__ import annotations

import logging

import grpc
import pytest

from livegifts.gifting.v1 import gifting_pb2
from livegifts.payout.v1 import payout_pb2
from livegifts.wallet.v1 import wallet_pb2
from services.cli.audit import OK, Totals, wait_until_settled


class _Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "failed to connect to all addresses; last error: 127.0.0.1:50053: Connection refused"


def _fetch(failures: list[grpc.StatusCode]) -> tuple[list[int], object]:
    calls = [0]

    def fetch() -> Totals:
        calls[0] += 1
        if failures:
            raise _Failed(failures.pop(0))
        # Empty books: every invariant holds.
        return Totals(wallet_pb2.WalletAudit(), gifting_pb2.GiftingAudit(), payout_pb2.PayoutAudit())

    return calls, fetch


def test_unavailable_and_deadline_answers_are_asked_again_until_the_books_settle() -> None:
    calls, fetch = _fetch([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
    report = wait_until_settled(fetch, 10.0)  # type: ignore[arg-type]
    assert calls == [3]
    assert report and all(c.status == OK for c in report)


def test_any_other_error_ends_the_wait_at_once() -> None:
    calls, fetch = _fetch([grpc.StatusCode.INTERNAL])
    with pytest.raises(grpc.RpcError):
        wait_until_settled(fetch, 10.0)  # type: ignore[arg-type]
    assert calls == [1]


def test_without_time_left_a_transient_error_is_raised() -> None:
    calls, fetch = _fetch([grpc.StatusCode.UNAVAILABLE])
    with pytest.raises(grpc.RpcError):
        wait_until_settled(fetch, -1.0)  # type: ignore[arg-type]
    assert calls == [1]


def test_the_cli_tells_in_flight_from_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit 3: work still in flight (--wait 0); exit 2 stays click's usage error; exit 1 a failure."""
    from typer.testing import CliRunner

    from services.cli import audit
    from services.cli.main import app

    pending = Totals(
        wallet_pb2.WalletAudit(), gifting_pb2.GiftingAudit(gifts_pending=1, coins_pending=5), payout_pb2.PayoutAudit()
    )
    monkeypatch.setattr(audit, "collect", lambda *a, **k: pending)
    runner = CliRunner()
    assert runner.invoke(app, ["audit"]).exit_code == 3
    assert runner.invoke(app, ["audit", "--no-such-option"]).exit_code == 2
    broken = Totals(wallet_pb2.WalletAudit(ledger_sum=1), gifting_pb2.GiftingAudit(), payout_pb2.PayoutAudit())
    monkeypatch.setattr(audit, "collect", lambda *a, **k: broken)
    assert runner.invoke(app, ["audit"]).exit_code == 1


def test_a_retried_call_says_which_address_failed_and_why(caplog: pytest.LogCaptureFixture) -> None:
    _calls, fetch = _fetch([grpc.StatusCode.UNAVAILABLE])
    with caplog.at_level(logging.WARNING, logger="services.cli.audit"):
        wait_until_settled(fetch, 10.0)  # type: ignore[arg-type]
    (line,) = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert "UNAVAILABLE" in line and "127.0.0.1:50053: Connection refused" in line, line


def test_a_read_of_every_id_says_how_far_it_has_come_after_each_range(monkeypatch: pytest.MonkeyPatch) -> None:
    from livegifts.common.v1 import audit_pb2
    from services.cli import audit

    ids = [f"{i:02x}" for i in range(12)]
    status = {"earnings": "CREDITED", "gifts": "SENT", "spends": "SPENT"}

    def page(channel: object, kind: str, deadline_s: float, after: str, up_to: str | None) -> tuple[dict, bool]:
        left = [i for i in ids if i > after and (up_to is None or i <= up_to)]
        got = left[:5]
        return {i: audit_pb2.AuditRecord(id=i, amount=1, status=status[kind], party="c") for i in got}, len(left) > 5

    monkeypatch.setattr(audit, "_page", page)
    monkeypatch.setattr(audit, "records_by_id", lambda channel, kind, deadline_s, wanted: {})
    seen: list[tuple[int, int]] = []
    audit._judge_every_id(None, None, None, 1.0, lambda ranges, judged: seen.append((ranges, judged)))  # type: ignore[arg-type]
    assert seen == [(1, 5), (2, 10), (3, 12)]


def test_the_audit_table_in_a_job_s_log_keeps_each_row_on_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Job's log is no terminal: rich would fit the table to 80 columns and wrap names and ids."""
    from typer.testing import CliRunner

    from services.cli import audit
    from services.cli.main import app

    pending = Totals(
        wallet_pb2.WalletAudit(outbox_pending=3), gifting_pb2.GiftingAudit(), payout_pb2.PayoutAudit(outbox_pending=2)
    )
    monkeypatch.setattr(audit, "collect", lambda *a, **k: pending)
    monkeypatch.delenv("COLUMNS", raising=False)
    result = CliRunner().invoke(app, ["audit"], env={"COLUMNS": None})
    assert result.exit_code == 3, result.output
    (line,) = [row for row in result.stdout.splitlines() if "in flight: outbox rows" in row]
    assert "in flight: outbox rows written before the audit are published" in line, result.stdout
    assert "wallet 3; payout 2" in line, result.stdout
    (line,) = [row for row in result.stdout.splitlines() if "4. diamonds = exact creator share" in row]
    assert line.rstrip(" │").endswith("at a share no policy set 0"), result.stdout  # a long detail, whole


def test_an_id_that_looks_like_markup_is_printed_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys are the clients' own strings: one holding "[/x]" made rich raise MarkupError."""
    from typer.testing import CliRunner

    from services.cli import audit
    from services.cli.main import app

    odd = "key[/x][bold]"
    report = [audit.Check(f"3a. spends of {odd}", audit.FAILED, f"first ids: {odd}")]
    monkeypatch.setattr(audit, "collect", lambda *a, **k: None)
    monkeypatch.setattr(audit, "wait_until_settled", lambda *a, **k: report)
    result = CliRunner().invoke(app, ["audit"], env={"COLUMNS": None})
    assert result.exit_code == 1, result.output
    assert f"first ids: {odd}" in result.stdout, result.stdout
    assert f"3a. spends of {odd}" in result.stdout, result.stdout
