"""`Binding`: which deliveries a consumer may still reply to (ack, nak, term, +WPI).

JetStream settles a reply by the stream sequence its subject names, so a reply to a delivery of a
stream since made again settles the new stream's event at that sequence (the real case, against a
nats-server: tests/integration/test_consumer_stream_made_again.py). Here the rules around it: a
delivery that arrived after the bound stream's creation was read is its own whatever its timestamp
(a cluster server's clock behind another's must not hold an event back for ever), and no reply is
sent while the connection is down (nats-py would send it to whatever server it reconnects to).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from services.common import pull
from services.common.pull import Binding

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def _at(t: datetime.datetime, seq: int = 1) -> Any:
    ns = int(t.timestamp() * 1_000_000_000)
    return Msg(_client=None, subject="s.x", reply=f"$JS.ACK.S.d.1.{seq}.{seq}.{ns}.0")  # type: ignore[arg-type]


class _Nc:
    def __init__(self) -> None:
        self.stats = {"reconnects": 0}
        self.is_connected = True
        self.is_closed = False
        self.subscribed: dict[str, Any] = {}  # subject -> callback

    async def subscribe(self, subject: str, cb: Any) -> None:
        self.subscribed[subject] = cb

    async def advisory(self, subject: str) -> None:
        """The server sends the advisory `subject` (JetStream's, on a live connection)."""
        await self.subscribed[subject](Msg(_client=None, subject=subject))  # type: ignore[arg-type]


class _Js:
    def __init__(self, created: datetime.datetime) -> None:
        self.created = created
        self.calls = 0

    async def stream_info(self, stream: str) -> Any:
        self.calls += 1
        return SimpleNamespace(created=self.created)


async def _bound() -> tuple[_Nc, _Js, Binding]:
    """A binding of stream S (made at T0) and durable d, bound."""
    nc, js = _Nc(), _Js(T0)
    binding = Binding("S", "d")
    await binding.bind(nc, js)  # type: ignore[arg-type]
    return nc, js, binding


async def test_a_delivery_of_the_old_stream_gets_no_reply_once_the_stream_is_made_again() -> None:
    nc, js, binding = await _bound()
    old = _at(T0 + datetime.timedelta(seconds=1))
    binding.tag(old)
    assert await binding.settles(old)
    assert js.calls == 1  # no read per reply while connected throughout

    # NATS back without its store: the stream made again, a new event delivered before the read.
    js.created = T0 + datetime.timedelta(minutes=1)
    nc.stats["reconnects"] = 1
    new = _at(T0 + datetime.timedelta(minutes=2))
    binding.tag(new)
    assert not await binding.settles(old)
    assert await binding.settles(new)
    assert js.calls == 2 and binding.dropped == 1
    # One of the new stream delivered after the read, its timestamp behind the stream's creation
    # (another server's clock): its own, replied to.
    skewed = _at(T0 + datetime.timedelta(seconds=59))
    binding.tag(skewed)
    assert await binding.settles(skewed)


async def test_no_reply_while_the_connection_is_down_and_a_short_wait_once_per_outage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pull, "RECONNECT_WAIT_S", 0.2)
    nc, js, binding = await _bound()
    msg = _at(T0 + datetime.timedelta(seconds=1))
    binding.tag(msg)
    nc.is_connected = False
    loop_time = asyncio.get_running_loop().time
    started = loop_time()
    assert not await binding.settles(msg)
    assert loop_time() - started >= 0.2  # waited for the connection
    started = loop_time()
    assert not await binding.settles(msg)
    assert loop_time() - started < 0.1  # not again in the same outage
    # Back (the store kept): the stream read again, the same one, and the reply sent.
    nc.is_connected = True
    nc.stats["reconnects"] = 1
    assert await binding.settles(msg)
    assert js.calls == 2


async def test_a_reply_is_held_back_while_the_stream_cannot_be_read_after_a_reconnect() -> None:
    nc, js, binding = await _bound()
    msg = _at(T0 + datetime.timedelta(seconds=1))
    binding.tag(msg)

    async def fails(stream: str) -> Any:
        raise TimeoutError

    js.stream_info = fails  # type: ignore[method-assign]
    nc.stats["reconnects"] = 1
    assert not await binding.settles(msg)


class _FailingJs(_Js):
    """A stream that cannot be read (a leader being elected, quorum lost) once bound."""

    def __init__(self, created: datetime.datetime) -> None:
        super().__init__(created)
        self.failing = False

    async def stream_info(self, stream: str) -> Any:
        if self.failing:
            self.calls += 1
            await asyncio.sleep(0.05)  # the JetStream timeout, scaled down
            raise TimeoutError
        return await super().stream_info(stream)


async def _bound_failing() -> tuple[_Nc, _FailingJs, Binding]:
    """A binding of stream S (made at T0) and durable d, bound, on a stream that can be made unreadable."""
    nc, js = _Nc(), _FailingJs(T0)
    binding = Binding("S", "d")
    await binding.bind(nc, js)  # type: ignore[arg-type]
    return nc, js, binding


async def test_a_failed_read_of_the_stream_is_not_tried_again_for_each_reply() -> None:
    # After a reconnect the stream could not be read: each reply read it again, up to the
    # JetStream timeout (5 s) each, one after another for a batch's 256 acks.
    nc, js, binding = await _bound_failing()
    olds = [_at(T0 + datetime.timedelta(seconds=1), seq) for seq in range(1, 11)]
    for m in olds:
        binding.tag(m)
    js.failing, js.calls = True, 0
    nc.stats["reconnects"] = 1
    assert [await binding.settles(m) for m in olds] == [False] * 10  # unknown: none is settled
    assert js.calls == 1, "a read per reply"
    assert await asyncio.gather(*(binding.settles(m) for m in olds)) == [False] * 10
    assert js.calls == 1
    binding._read_again_at = 0.0  # the pause is over (pull.STREAM_READ_RETRY_S)
    js.failing = False
    assert await binding.settles(olds[0])  # read again: the same stream, its deliveries settle
    assert pull.STREAM_READ_RETRY_S >= 0.5


async def test_a_reply_held_back_for_a_stream_not_read_does_not_say_it_was_made_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A cluster electing the stream's leader (or without quorum) answers no stream info for
    # seconds: the line said "its stream was made again since", and an SRE went after lost events.
    nc, js, binding = await _bound_failing()
    msg = _at(T0 + datetime.timedelta(seconds=1))
    binding.tag(msg)
    js.failing = True
    nc.stats["reconnects"] = 1
    with caplog.at_level(logging.WARNING, logger=pull.__name__):
        assert not await binding.settles(msg)
    [line] = [r for r in caplog.records if r.name == pull.__name__]
    assert "could not be read" in line.getMessage() and "made again" not in line.getMessage()
    assert line.stream_created == "unknown"  # type: ignore[attr-defined]


async def test_a_reply_held_back_for_a_deleted_stream_says_it_is_gone(caplog: pytest.LogCaptureFixture) -> None:
    # After STREAM.DELETED the read finds no stream: the line said it "could not be read since the
    # connection was lost or a pull failed", and the SRE was not told the stream's events were lost.
    nc, js, binding = await _bound_failing()
    msg = _at(T0 + datetime.timedelta(seconds=1))
    binding.tag(msg)

    async def deleted(stream: str) -> Any:
        raise NotFoundError(code=404, err_code=10059, description="stream not found")

    js.stream_info = deleted  # type: ignore[method-assign]
    await nc.advisory(f"$JS.EVENT.ADVISORY.STREAM.DELETED.{binding.stream}")
    with caplog.at_level(logging.WARNING, logger=pull.__name__):
        assert not await binding.settles(msg)
    [line] = [r for r in caplog.records if r.name == pull.__name__]
    assert "its stream is gone (deleted" in line.getMessage() and "could not be read" not in line.getMessage()
    assert line.stream_created == "deleted"  # type: ignore[attr-defined]
    assert line.consumer == "d" and line.stream == "S" and line.replies_not_sent == 1  # type: ignore[attr-defined]


async def test_a_reply_not_sent_for_a_delivery_without_a_stream_sequence_is_logged_not_raised() -> None:
    nc, js, binding = await _bound()
    plain = Msg(_client=None, subject="s.x", reply="not-a-jetstream-reply")  # type: ignore[arg-type]
    setattr(plain, "_livegifts_epoch", 0)  # noqa: B010 - tagged under an earlier binding
    binding.epoch = 1
    binding.created = T0
    nc.is_connected = False
    binding._gave_up = 0  # the wait for the connection already ran out in this outage
    assert await binding.settles(plain) is False


@pytest.mark.parametrize(
    "advisory",
    [
        "$JS.EVENT.ADVISORY.STREAM.DELETED.S",
        "$JS.EVENT.ADVISORY.STREAM.CREATED.S",
        "$JS.EVENT.ADVISORY.CONSUMER.DELETED.S.d",
    ],
)
async def test_an_advisory_of_the_stream_or_durable_has_the_stream_read_again_before_the_next_reply(
    advisory: str,
) -> None:
    # The stream deleted and made again on a live server, while this replica had no pull request
    # open: no reconnect, no pull status, and its acks settled the new stream's events.
    nc, js, binding = await _bound()
    old = _at(T0 + datetime.timedelta(seconds=1))
    binding.tag(old)
    js.created = T0 + datetime.timedelta(minutes=1)
    await nc.advisory(advisory)
    assert not await binding.settles(old)
    assert js.calls == 2
    assert await binding.settles(_at(T0 + datetime.timedelta(minutes=2)))
    assert js.calls == 2  # one read per advisory, not one per reply


async def test_a_doubt_told_while_the_stream_is_read_is_not_cleared_by_that_read() -> None:
    # The read's answer may predate what the advisory tells (the stream deleted after the server
    # answered): the next reply reads again.
    nc, js, binding = await _bound()
    old = _at(T0 + datetime.timedelta(seconds=1))
    binding.tag(old)
    answered = js.stream_info

    async def made_again_meanwhile(stream: str) -> Any:
        info = await answered(stream)
        js.created = T0 + datetime.timedelta(minutes=1)
        await nc.advisory("$JS.EVENT.ADVISORY.STREAM.CREATED.S")
        return info

    js.stream_info = made_again_meanwhile  # type: ignore[method-assign]
    binding.doubt()
    assert await binding.settles(old)  # read: the old stream still
    js.stream_info = answered  # type: ignore[method-assign]
    assert not await binding.settles(old)  # read again: made again
    assert js.calls == 3


async def test_a_doubt_after_a_bind_that_followed_a_failed_read_reads_the_stream_again() -> None:
    # A read failed (the stream deleted), the consumer bound again to the stream made again, and
    # that one was made again within the failed read's pause: the doubt was not read, and the
    # deliveries of the stream bound at the bind were acked against the newer one's events.
    nc, js, binding = await _bound_failing()
    old = _at(T0 + datetime.timedelta(seconds=1))
    binding.tag(old)
    js.failing = True
    binding.doubt()
    assert not await binding.settles(old)  # unknown, reads paused
    js.failing, js.created = False, T0 + datetime.timedelta(minutes=1)
    await binding.bind(nc, js)  # type: ignore[arg-type]  # the consumer's bind again
    delivered = _at(T0 + datetime.timedelta(minutes=2))
    binding.tag(delivered)
    js.created = T0 + datetime.timedelta(minutes=3)  # made again once more, within the pause
    await nc.advisory(next(iter(nc.subscribed)))
    assert not await binding.settles(delivered)
