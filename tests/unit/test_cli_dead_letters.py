"""`livegifts dead-letters`: a list cut by --limit says so; a replay retries a lost answer under its key."""

from __future__ import annotations

import contextlib
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


def _replay_stub(failures: list[grpc.StatusCode], requests: list[Any]) -> type:
    """A DeadLetterService whose ReplayDeadLetter fails with `failures` first, then replays."""

    class Stub:
        def __init__(self, channel: Any) -> None:
            pass

        def ReplayDeadLetter(self, request: Any, **kwargs: Any) -> dead_letters_pb2.ReplayDeadLetterResponse:
            requests.append(request)
            if failures:
                raise _Lost(failures.pop(0))
            return dead_letters_pb2.ReplayDeadLetterResponse(
                dead_letter=dead_letters_pb2.DeadLetter(id=request.id, consumer="payout-gift-sent", event_id="e7"),
                outcome=dead_letters_pb2.ReplayDeadLetterResponse.OUTCOME_APPLIED,
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
