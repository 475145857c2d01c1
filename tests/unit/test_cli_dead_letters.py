"""`livegifts dead-letters`: a list cut by --limit says so; a replay retries a lost answer under its key."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import grpc
import pytest
from typer.testing import CliRunner

from livegifts.common.v1 import dead_letters_pb2, dead_letters_pb2_grpc
from services.cli import main
from services.cli.main import app


def _stub_with(parked: int) -> type:
    """A DeadLetterService that pages `parked` events like the services' (a full page has a next id)."""

    class Stub:
        def __init__(self, channel: Any) -> None:
            pass

        def ListDeadLetters(self, request: Any, **kwargs: Any) -> dead_letters_pb2.ListDeadLettersResponse:
            size = request.page_size or 100
            ids = [i for i in range(1, parked + 1) if i > request.after_id][:size]
            out = dead_letters_pb2.ListDeadLettersResponse(
                dead_letters=[
                    dead_letters_pb2.DeadLetter(id=i, consumer="payout-gift-sent", event_id=f"e{i}") for i in ids
                ]
            )
            if len(ids) == size:
                out.next_after_id = ids[-1]
            return out

    return Stub


@pytest.mark.parametrize(("parked", "limit", "cut"), [(501, 500, True), (500, 500, False), (3, 2, True), (2, 2, False)])
def test_a_list_cut_by_limit_says_so_even_at_a_page_s_end(
    monkeypatch: pytest.MonkeyPatch, parked: int, limit: int, cut: bool
) -> None:
    monkeypatch.setattr(dead_letters_pb2_grpc, "DeadLetterServiceStub", _stub_with(parked))
    result = CliRunner().invoke(
        app, ["dead-letters", "list", "--service", "payout", "--limit", str(limit), "--operator-token", "t"]
    )
    assert result.exit_code == 0, result.output
    assert ("more parked events than --limit" in result.output) is cut, result.output


class _Lost(grpc.RpcError):
    """An answer that did not arrive (the replay may have committed)."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "the answer was lost"


def _replay_stub(failures: list[grpc.StatusCode], requests: list[Any], outcome: int = 1) -> type:
    """A DeadLetterService whose ReplayDeadLetter fails with `failures` first, then replays
    (`outcome`: OUTCOME_APPLIED unless given)."""

    class Stub:
        def __init__(self, channel: Any) -> None:
            pass

        def ReplayDeadLetter(self, request: Any, **kwargs: Any) -> dead_letters_pb2.ReplayDeadLetterResponse:
            requests.append(request)
            if failures:
                raise _Lost(failures.pop(0))
            return dead_letters_pb2.ReplayDeadLetterResponse(
                dead_letter=dead_letters_pb2.DeadLetter(id=request.id, consumer="payout-gift-sent", event_id="e7"),
                outcome=outcome,
            )

    return Stub


def _replay(*extra: str) -> Any:
    return CliRunner().invoke(
        app, ["dead-letters", "replay", "7", "--service", "payout", "--operator-token", "t", *extra]
    )


def test_a_replay_whose_answer_was_lost_is_retried_under_the_same_key(monkeypatch: pytest.MonkeyPatch) -> None:
    requests: list[Any] = []
    lost = [grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE]
    monkeypatch.setattr(dead_letters_pb2_grpc, "DeadLetterServiceStub", _replay_stub(lost, requests))
    monkeypatch.setattr(main, "REPLAY_RETRY_PAUSES_S", (0.0, 0.0))
    result = _replay()
    assert result.exit_code == 0 and "event e7 applied" in result.output, result.output
    keys = {r.idempotency_key for r in requests}
    assert len(requests) == 3 and len(keys) == 1 and keys.pop(), requests


def test_a_replay_that_keeps_failing_prints_its_key_and_a_given_key_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    requests: list[Any] = []
    lost = [grpc.StatusCode.UNAVAILABLE] * main.REPLAY_ATTEMPTS_MAX
    monkeypatch.setattr(dead_letters_pb2_grpc, "DeadLetterServiceStub", _replay_stub(lost, requests))
    monkeypatch.setattr(main, "REPLAY_RETRY_PAUSES_S", (0.0, 0.0))
    result = _replay()
    key = requests[0].idempotency_key
    assert result.exit_code == 1 and f"--idempotency-key {key}" in result.output, result.output

    requests.clear()
    result = _replay("--idempotency-key", key)  # the operator's retry: the service answers the first replay's answer
    assert result.exit_code == 0 and [r.idempotency_key for r in requests] == [key], result.output

    requests.clear()  # a refusal that is no outage is not retried
    monkeypatch.setattr(
        dead_letters_pb2_grpc, "DeadLetterServiceStub", _replay_stub([grpc.StatusCode.NOT_FOUND], requests)
    )
    result = _replay()
    assert result.exit_code == 1 and "NOT_FOUND" in result.output and len(requests) == 1, result.output


def _per_service_stub(answers: dict[str, grpc.StatusCode | None]) -> type:
    """A DeadLetterService per service (the channel is the service's name): one parked event, or an error."""

    class Stub:
        def __init__(self, service: str) -> None:
            self.service = service

        def ListDeadLetters(self, request: Any, **kwargs: Any) -> dead_letters_pb2.ListDeadLettersResponse:
            code = answers[self.service]
            if code is not None:
                raise _Lost(code)
            return dead_letters_pb2.ListDeadLettersResponse(
                dead_letters=[dead_letters_pb2.DeadLetter(id=1, consumer="c", event_id=f"event-of-{self.service}")]
            )

    return Stub


def test_a_list_with_a_service_down_shows_the_others_and_names_it_then_exits_1(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # During an incident one service may be down: what the others have parked is still wanted.
    down = {"wallet": None, "gifting": grpc.StatusCode.UNAVAILABLE, "payout": None}
    monkeypatch.setattr(main, "channel", lambda service, addr: contextlib.nullcontext(service))
    monkeypatch.setattr(dead_letters_pb2_grpc, "DeadLetterServiceStub", _per_service_stub(down))
    result = CliRunner().invoke(app, ["dead-letters", "list", "--operator-token", "t"], env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    assert "event-of-wallet" in result.output and "event-of-payout" in result.output, result.output
    assert "UNAVAILABLE: the answer was lost" in result.output, result.output


def test_a_list_refused_for_its_token_stops_at_the_first_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    refused = {svc: grpc.StatusCode.PERMISSION_DENIED for svc in ("wallet", "gifting", "payout")}
    monkeypatch.setattr(main, "channel", lambda service, addr: contextlib.nullcontext(service))
    monkeypatch.setattr(dead_letters_pb2_grpc, "DeadLetterServiceStub", _per_service_stub(refused))
    result = CliRunner().invoke(app, ["dead-letters", "list", "--operator-token", "t"], env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    assert result.output.count("PERMISSION_DENIED") == 1, result.output


# Ids and subjects as long as the services' (a UUID; the longest subject and consumer names).
_LONG = dead_letters_pb2.DeadLetter(
    id=123456,
    consumer="payout-purchase-reversed",
    subject="livegifts.wallet.purchase.reversed",
    event_id="0f9d3c1e-7b2a-4c55-9a10-2b3c4d5e6f70",
    error="failed 20 times: IntegrityError; [the use case's] message, long enough to need more than eighty columns",
    payload_bytes=4321,
)
_UNDECODABLE = dead_letters_pb2.DeadLetter(id=7, consumer="gifting-leaderboards", subject="livegifts.gifting.gift.sent")


def _listing(*extra: str) -> Any:
    """`dead-letters list` of payout's two parked events, stdout no terminal and COLUMNS unset (a pipe, a Job's log)."""

    class Stub:
        def __init__(self, channel: Any) -> None:
            pass

        def ListDeadLetters(self, request: Any, **kwargs: Any) -> dead_letters_pb2.ListDeadLettersResponse:
            return dead_letters_pb2.ListDeadLettersResponse(dead_letters=[_LONG, _UNDECODABLE])

    with pytest.MonkeyPatch.context() as m:
        m.setattr(dead_letters_pb2_grpc, "DeadLetterServiceStub", Stub)
        m.delenv("COLUMNS", raising=False)
        return CliRunner().invoke(
            app, ["dead-letters", "list", "--service", "payout", "--operator-token", "t", *extra], env={"COLUMNS": None}
        )


def test_a_list_to_no_terminal_prints_each_event_whole_on_one_line_with_its_payload_bytes() -> None:
    # The runbook searches the log by the event id it lists: an id cut to "0f9d3c1e-…" or wrapped
    # over two lines finds nothing. Without a terminal rich assumes 80 columns.
    result = _listing()
    assert result.exit_code == 0, result.output
    assert "payload bytes" in result.output, result.output
    (line,) = [row for row in result.output.splitlines() if _LONG.event_id in row]
    for value in (_LONG.consumer, _LONG.subject, _LONG.error, str(_LONG.payload_bytes), str(_LONG.id)):
        assert value in line, line
    (line,) = [row for row in result.output.splitlines() if "(undecodable)" in row]
    assert _UNDECODABLE.subject in line and "│ 0 " in line, line


def test_a_list_with_json_prints_one_object_per_event_with_every_field() -> None:
    result = _listing("--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows == [
        {
            "service": "payout",
            "id": d.id,
            "consumer": d.consumer,
            "subject": d.subject,
            "event_id": d.event_id,
            "parked_at": "1970-01-01T00:00:00Z",
            "payload_bytes": d.payload_bytes,
            "error": d.error,
        }
        for d in (_LONG, _UNDECODABLE)
    ], result.stdout


def test_a_json_list_keeps_notes_and_failures_off_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    down = {"wallet": None, "gifting": grpc.StatusCode.UNAVAILABLE, "payout": None}
    monkeypatch.setattr(main, "channel", lambda service, addr: contextlib.nullcontext(service))
    monkeypatch.setattr(dead_letters_pb2_grpc, "DeadLetterServiceStub", _per_service_stub(down))
    result = CliRunner().invoke(app, ["dead-letters", "list", "--operator-token", "t", "--json"])
    assert result.exit_code == 1, result.output
    assert [json.loads(line)["event_id"] for line in result.stdout.splitlines()] == [
        "event-of-wallet",
        "event-of-payout",
    ]
    assert "UNAVAILABLE: the answer was lost" in result.stderr, result.stderr


@pytest.mark.parametrize(
    "args", [["--service", "nope", "--operator-token", "t"], ["--var", "/nonexistent-livegifts-var"]], ids=str
)
def test_a_json_list_refused_before_any_call_says_why_on_stderr(args: list[str]) -> None:
    # --json promises stdout holds the events only: a usage error (an unknown service, no token)
    # went to stdout, where a consumer of the JSON lines reads it as a malformed event.
    result = CliRunner().invoke(app, ["dead-letters", "list", "--json", *args])
    assert result.exit_code in (1, 2), result.output
    assert result.stdout == "", result.stdout
    assert "unknown service" in result.stderr or "no operator token" in result.stderr, result.stderr


def test_a_list_no_service_answered_says_no_parked_events_nowhere(monkeypatch: pytest.MonkeyPatch) -> None:
    # "no parked events in the services that answered" on stdout when none answered: a script
    # grepping the output for "no parked events" took an outage for an empty list.
    down = {svc: grpc.StatusCode.UNAVAILABLE for svc in ("wallet", "gifting", "payout")}
    monkeypatch.setattr(main, "channel", lambda service, addr: contextlib.nullcontext(service))
    monkeypatch.setattr(dead_letters_pb2_grpc, "DeadLetterServiceStub", _per_service_stub(down))
    result = CliRunner().invoke(app, ["dead-letters", "list", "--operator-token", "t"], env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    assert "no parked events" not in result.output, result.output
    assert result.stderr.count("UNAVAILABLE") == 3, result.stderr


def test_a_replay_outcome_this_cli_does_not_know_is_shown_as_its_number(monkeypatch: pytest.MonkeyPatch) -> None:
    # A newer service's outcome (proto3 enums are open) printed "had applied event e7 already;
    # nothing changed", which the service never said.
    monkeypatch.setattr(dead_letters_pb2_grpc, "DeadLetterServiceStub", _replay_stub([], [], outcome=7))
    result = _replay()
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "replayed 7: event e7, payout-gift-sent: outcome UNKNOWN(7)", result.stdout
