"""`livegifts nats-drained`'s verdict (services/cli/drained.py), from stream states as JetStream gives them.

The suite may leave a NATS once nothing more is stored there and every event it holds was applied
by each consumer of the suite that reads it: a durable of services/common/consumers.py missing on
a stream that holds events (removed by hand, or its service never ran on that NATS) applied
nothing there that anyone can count, and is no less a reason to stay than a durable behind.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from services.cli import drained
from services.cli.drained import Durable, StreamState, problems
from services.cli.main import app
from services.common.consumers import GIFTING_LEADERBOARDS, PAYOUT_GIFT_SENT, PAYOUT_PURCHASE_REVERSED


def _done(name: str) -> Durable:
    return Durable(name, not_delivered=0, not_acked=0)


def _sealed(gifting: tuple[Durable, ...], gifting_messages: int = 5, wallet_messages: int = 3) -> list[StreamState]:
    return [
        StreamState("WALLET", True, sealed=True, messages=wallet_messages, durables=(_done(PAYOUT_PURCHASE_REVERSED),)),
        StreamState("GIFTING", True, sealed=True, messages=gifting_messages, durables=gifting),
        StreamState("PAYOUT", True, sealed=True, messages=2),
    ]


def test_sealed_streams_whose_suite_durables_applied_everything_are_drained() -> None:
    assert problems(_sealed((_done(GIFTING_LEADERBOARDS), _done(PAYOUT_GIFT_SENT)))) == []


def test_a_suite_durable_missing_on_a_stream_that_holds_events_is_not_drained() -> None:
    found = problems(_sealed((_done(GIFTING_LEADERBOARDS),)))
    assert len(found) == 1, found
    assert found[0].startswith(f"durable {PAYOUT_GIFT_SENT} is missing on GIFTING, which holds 5 events"), found
    assert "start payout on this NATS" in found[0], found


def test_every_missing_suite_durable_is_named_on_its_own_stream() -> None:
    states = _sealed(())
    states[0] = StreamState("WALLET", True, sealed=True, messages=3)
    found = problems(states)
    missing = sorted(p.split(" ", 2)[1] + " " + p.split(" on ", 1)[1].split(",")[0] for p in found)
    assert missing == [
        f"{GIFTING_LEADERBOARDS} GIFTING",
        f"{PAYOUT_GIFT_SENT} GIFTING",
        f"{PAYOUT_PURCHASE_REVERSED} WALLET",
    ], found


def test_a_suite_durable_missing_on_an_empty_stream_has_nothing_to_apply() -> None:
    # A stream that holds no event (none published, or all gone by max_age) loses nothing.
    assert problems(_sealed((), gifting_messages=0)) == []


def test_another_teams_durable_behind_still_holds_the_move_up() -> None:
    other = Durable("analytics", not_delivered=4, not_acked=1)
    found = problems(_sealed((_done(GIFTING_LEADERBOARDS), _done(PAYOUT_GIFT_SENT), other)))
    assert found == ["durable analytics on GIFTING has 4 events not yet delivered and 1 not yet acked"]


def test_the_command_shows_the_missing_durable_and_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    async def read(url: str, timeout_s: float) -> list[StreamState]:
        return _sealed((_done(GIFTING_LEADERBOARDS),))

    monkeypatch.setattr(drained, "read_streams", read)
    result = CliRunner().invoke(app, ["nats-drained", "nats://old:4222"], env={"COLUMNS": "300"})
    assert result.exit_code == 1, result.output
    assert f"{PAYOUT_GIFT_SENT} (missing)" in result.output, result.output
    assert "drained:" not in result.output, result.output


def test_a_nats_it_cannot_reach_is_said_with_why() -> None:
    # nats-py's own error said only "no servers available for connection": refused, no such
    # host or a firewall's timeout looked alike.
    result = CliRunner().invoke(app, ["nats-drained", "nats://127.0.0.1:1"], env={"COLUMNS": "300"})
    assert result.exit_code == 1, result.output
    assert "no servers available" in result.output and "ConnectionRefusedError" in result.output, result.output


def test_the_url_comes_from_nats_url_when_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    # As the nats CLI reads it: the operator's password in the URL stays out of `ps`.
    asked: list[str] = []

    async def read(url: str, timeout_s: float) -> list[StreamState]:
        asked.append(url)
        return _sealed((_done(GIFTING_LEADERBOARDS), _done(PAYOUT_GIFT_SENT)))

    monkeypatch.setattr(drained, "read_streams", read)
    result = CliRunner().invoke(
        app, ["nats-drained"], env={"NATS_URL": "nats://operator:pw@old:4222", "COLUMNS": "300"}
    )
    assert result.exit_code == 0, result.output
    assert asked == ["nats://operator:pw@old:4222"]
    assert "pw" not in result.output, result.output
