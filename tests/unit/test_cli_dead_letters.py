"""`livegifts dead-letters list --limit`: a cut list always says so."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from livegifts.common.v1 import dead_letters_pb2, dead_letters_pb2_grpc
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
