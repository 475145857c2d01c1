"""The consumer loop treats a fetch that times out as "nothing came", not as a failure.

With nats-py's fetch (before services/common/pull.py) a bare asyncio.TimeoutError, raised when
its deadline passed before its second pull request, was taken for a failure: a warning each
time and a doubling backoff (up to 5 s) before the next fetch, so an idle consumer answered late
and a busy one lagged. Both kinds of timeout are still raised here. The puller is a stand-in (the
loop's own control flow is under test; tests/integration/test_puller.py runs the real one
against a real nats-server). Last, the puller's close never raises, which the loop relies on
when it closes it on its error and stop paths.
"""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nats.errors
import nats.js.errors
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import select

from livegifts.gifting.v1 import events_pb2
from services.common.db import Database
from services.common.inbox import Consumer, Subscription
from services.common.pull import Puller
from services.gifting.config import GiftingSettings
from services.gifting.storage import common
from tests.support.consumers import ConnectedBus


class _Timeouts:
    """A puller whose fetches time out, as TimeoutError or a subclass; the last one stops the loop."""

    created = None  # when the durable was made (Puller.created): the same one throughout

    def __init__(self, stop: asyncio.Event, fetches: int) -> None:
        self.stop = stop
        self.left = fetches
        self.calls = 0

    async def fetch(self, batch: int, timeout: float) -> list[Any]:  # noqa: ASYNC109 - mirrors nats-py
        self.calls += 1
        self.left -= 1
        if self.left == 0:
            self.stop.set()
        if self.calls % 2:
            raise TimeoutError  # what asyncio.wait_for and nats-py's second pull request raise
        raise nats.errors.TimeoutError

    async def unsubscribe(self) -> list[Any]:
        return []  # nothing buffered


def _settings_of(tmp_path: Path, **settings: Any) -> GiftingSettings:
    """A consumer's settings, `settings` over the defaults, its database in `tmp_path`."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'c.db'}"
    return GiftingSettings(database_url=url, nats_url="nats://127.0.0.1:1", wallet_addr="127.0.0.1:1", **settings)


def _settings_and_db(tmp_path: Path, **settings: Any) -> tuple[GiftingSettings, Database]:
    """`_settings_of` and its SQLite database (connected to at its first use only)."""
    got = _settings_of(tmp_path, **settings)
    return got, Database(got.database_url, pool_size=1, pool_timeout_s=1, application_name="test")


def _consumer(db: Database, settings: GiftingSettings, durable: str, handle: Any) -> Consumer:
    """A consumer of `durable` over `ConnectedBus`, GiftSent events handed to `handle`."""
    sub = Subscription(durable=durable, stream="S", subject="s.x", event_type=events_pb2.GiftSent, handle=handle)
    return Consumer(db, ConnectedBus(), common, sub, settings)  # type: ignore[arg-type]


async def _handle_nothing(uow: Any, events: list[Any]) -> None:
    return None


def _parked_count(durable: str) -> float:
    """Events `durable` parked (livegifts_dead_letters_total)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("livegifts_dead_letters_total", {"consumer": durable}) or 0.0


async def _run_fetching_nothing(tmp_path: Path, stop: asyncio.Event, caplog: pytest.LogCaptureFixture) -> None:
    """Run a consumer over `Puller.open`'s stand-in until `stop`, its warnings in `caplog`: its
    database is never reached, as no message is fetched."""

    async def handle(uow: Any, events: list[Any]) -> None:
        raise AssertionError("no message was fetched")

    settings, db = _settings_and_db(tmp_path)
    try:
        consumer = _consumer(db, settings, "d", handle)
        with caplog.at_level(logging.WARNING, logger="services.common.inbox"):
            await asyncio.wait_for(consumer.run(stop), timeout=10)
    finally:
        await db.engine.dispose()


async def test_fetch_timeouts_of_either_kind_are_quiet_and_do_not_back_off(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stop = asyncio.Event()
    psub = _Timeouts(stop, fetches=6)

    async def open_puller(*args: Any, **kwargs: Any) -> _Timeouts:
        return psub

    monkeypatch.setattr(Puller, "open", open_puller)

    slept: list[float] = []

    async def sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> None:
        slept.append(seconds)  # the loop's backoff (and linger) waits: none may happen here

    monkeypatch.setattr("services.common.inbox.sleep_unless_stopped", sleep_unless_stopped)
    await _run_fetching_nothing(tmp_path, stop, caplog)
    assert psub.calls == 6
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]
    assert slept == [], "the loop backed off after a fetch that only timed out"


class _Failing:
    """A subscription and messages whose every call fails, as on a connection that is gone."""

    def __init__(self) -> None:
        self.calls = 0

    async def unsubscribe(self) -> None:
        self.calls += 1
        raise nats.errors.ConnectionClosedError

    async def nak(self) -> None:
        self.calls += 1
        raise nats.errors.ConnectionClosedError


async def test_puller_unsubscribe_never_raises_and_tries_every_buffered_message() -> None:
    class _Nc:
        def new_inbox(self) -> str:
            return "_INBOX.t"

    class _Js:
        _prefix = "$JS.API"

    puller = Puller(_Nc(), _Js(), "S", "d")  # type: ignore[arg-type]
    sub, msgs = _Failing(), [_Failing() for _ in range(3)]
    puller._sub = sub  # type: ignore[assignment]
    puller._buffer.extend(msgs)  # type: ignore[arg-type]
    # The consumer loop calls it bare on its error and stop paths; what it gave back untried is
    # not counted towards parking its events.
    assert await puller.unsubscribe() == msgs
    assert sub.calls == 1 and [m.calls for m in msgs] == [1, 1, 1]
    assert puller._sub is None and not puller._buffer
    await puller.unsubscribe()  # a second close is a no-op
    assert sub.calls == 1


def test_a_consumers_dead_letter_and_consumed_counts_are_exported_at_zero_from_its_start(tmp_path: Path) -> None:
    # Prometheus's increase() sees nothing when a series first appears at 1: without a 0 sample
    # first, the first event parked in a pod's life never raised the dead-letter alert.
    from prometheus_client import REGISTRY

    settings, db = _settings_and_db(tmp_path)  # never connected to
    durable = "zero-before-first-park"
    assert REGISTRY.get_sample_value("livegifts_dead_letters_total", {"consumer": durable}) is None
    _consumer(db, settings, durable, _handle_nothing)
    assert REGISTRY.get_sample_value("livegifts_dead_letters_total", {"consumer": durable}) == 0.0
    # And its consumed counts, which LivegiftsConsumerStuck compares: retries with none applied.
    for result in ("applied", "duplicate", "replayed", "retry"):
        labels = {"consumer": durable, "result": result}
        assert REGISTRY.get_sample_value("livegifts_events_consumed_total", labels) == 0.0, result
    # And its failed tries to bind or pull, which LivegiftsConsumerNotPulling takes increase() of.
    assert REGISTRY.get_sample_value("livegifts_consumer_loop_failures_total", {"consumer": durable}) == 0.0
    # And its position check's results, all 0 until the check runs as it binds.
    for result in ("ok", "behind", "not_checked"):
        labels = {"consumer": durable, "result": result}
        assert REGISTRY.get_sample_value("livegifts_consumer_position_check", labels) == 0.0, result


class _Delivered:
    """A message delivered `n` times (JetStream's count), that records its nak."""

    class _Seq:
        stream = 7

    def __init__(self, n: int) -> None:
        self.metadata = type("Meta", (), {"num_delivered": n, "sequence": self._Seq()})()
        self.headers: dict[str, str] = {}
        self.data = b""
        self.naks: list[float] = []

    async def nak(self, delay: float) -> None:
        self.naks.append(delay)


@pytest.mark.parametrize("delivered", [1, 5, 20, 1100])
async def test_an_event_the_database_keeps_failing_is_naked_with_a_capped_delay_however_often_it_came(
    tmp_path: Path, delivered: int
) -> None:
    # An outage never parks an event, so its delivery count keeps growing while the outage lasts
    # (about 360 an hour at the 10 s cap); the delay was 0.1 * 2**delivered, which raised
    # OverflowError past 1023 deliveries (a database down ~3 hours) instead of nak-ing.
    from sqlalchemy import exc as sa_exc

    settings, db = _settings_and_db(tmp_path)  # never connected to
    consumer = _consumer(db, settings, "capped-delay", _handle_nothing)
    msg = _Delivered(delivered)
    outage = sa_exc.OperationalError("INSERT", {}, Exception("database is locked"))
    await consumer._failed((msg, events_pb2.GiftSent(event_id="e1")), outage)  # type: ignore[arg-type]
    assert msg.naks == [min(0.1 * 2 ** min(delivered, 8), 10.0)]
    assert 0.2 <= msg.naks[0] <= 10.0


class _Refusing:
    """A puller whose fetch JetStream refuses (a server shutting down, JetStream off); the second stops the loop."""

    created = None  # when the durable was made (Puller.created): the same one throughout

    def __init__(self, stop: asyncio.Event) -> None:
        self.stop = stop
        self.calls = 0

    async def fetch(self, batch: int, timeout: float) -> list[Any]:  # noqa: ASYNC109 - mirrors nats-py
        self.calls += 1
        if self.calls == 2:
            self.stop.set()
        raise nats.js.errors.ServiceUnavailableError(
            code=503, err_code=10008, description="JetStream system temporarily unavailable"
        )

    async def unsubscribe(self) -> list[Any]:
        return []  # nothing buffered


async def test_a_fetch_jetstream_refuses_is_logged_with_the_servers_code_and_description(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A nats-server restarted during load: each consumer logged "consumer loop failed, retrying"
    # with `error` "APIError()" (nats-py's repr is the class alone), which told the SRE nothing.
    stop = asyncio.Event()
    psub = _Refusing(stop)

    async def open_puller(*args: Any, **kwargs: Any) -> _Refusing:
        return psub

    async def no_wait(stop: asyncio.Event, seconds: float) -> None:
        return None

    monkeypatch.setattr(Puller, "open", open_puller)
    monkeypatch.setattr("services.common.inbox.sleep_unless_stopped", no_wait)

    await _run_fetching_nothing(tmp_path, stop, caplog)
    errors = [r.error for r in caplog.records if r.getMessage() == "consumer loop failed, retrying"]  # type: ignore[attr-defined]
    assert len(errors) == 2
    assert all("err_code=10008" in e and "temporarily unavailable" in e for e in errors), errors


class _Stream:
    """A durable that acked stream sequences 1 and 2, two events of its subject (`e1`, `e2`); or,
    `unanswered`, a JetStream that does not answer the position check."""

    def __init__(self, unanswered: bool = False) -> None:
        self.unanswered = unanswered

    async def consumer_info(self, stream: str, durable: str) -> Any:
        if self.unanswered:
            raise nats.errors.TimeoutError
        floor = SimpleNamespace(stream_seq=2)
        return SimpleNamespace(ack_floor=floor, delivered=floor, num_ack_pending=0)

    async def get_msg(self, stream: str, seq: int) -> Any:
        return SimpleNamespace(subject="s.x", data=events_pb2.GiftSent(event_id=f"e{seq}").SerializeToString())


@pytest.mark.parametrize(
    ("recorded", "unanswered", "result"),
    [(["e1"], False, "behind"), (["e1", "e2"], False, "ok"), (["e1", "e2"], True, "not_checked")],
)
async def test_the_position_check_as_a_consumer_binds_sets_its_result_for_the_alerts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorded: list[str], unanswered: bool, result: str
) -> None:
    # The database behind its durable (restored to an earlier point: the inbox lacks `e2`, which
    # the durable acked) was only an ERROR line: an SRE who does not read the logs never learned
    # that credits were lost. LivegiftsConsumerDatabaseBehind reads this gauge, and
    # LivegiftsConsumerPositionNotChecked its not_checked result.
    from prometheus_client import REGISTRY

    stop = asyncio.Event()

    async def open_puller(*args: Any, **kwargs: Any) -> _Timeouts:
        return _Timeouts(stop, fetches=1)

    async def handle(uow: Any, events: list[Any]) -> None:
        raise AssertionError("no message was fetched")

    monkeypatch.setattr(Puller, "open", open_puller)
    settings, db = _settings_and_db(tmp_path)
    durable = f"position-{result}"
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(common.inbox.metadata.create_all)
            await conn.execute(
                common.inbox.insert(), [{"consumer": durable, "event_id": e, "received_at_us": 1} for e in recorded]
            )
        bus = ConnectedBus()
        bus.js = _Stream(unanswered)  # type: ignore[assignment]
        sub = Subscription(durable=durable, stream="S", subject="s.x", event_type=events_pb2.GiftSent, handle=handle)
        consumer = Consumer(db, bus, common, sub, settings)  # type: ignore[arg-type]
        await asyncio.wait_for(consumer.run(stop), timeout=10)
    finally:
        await db.engine.dispose()
    values = {
        each: REGISTRY.get_sample_value("livegifts_consumer_position_check", {"consumer": durable, "result": each})
        for each in ("ok", "behind", "not_checked")
    }
    assert values == {each: float(each == result) for each in values}, values


class _Msg:
    """A delivery of `event_id` at stream sequence `seq`, `n` times delivered, that records how it
    was settled; `term_fails`, `nak_fails` and `ack_fails` make its first term(), nak() or ack()
    raise (the connection lost). Settled once only, as nats-py's Msg (MsgAlreadyAckdError)."""

    subject = "s.x"

    def __init__(
        self,
        event_id: str,
        seq: int,
        n: int,
        term_fails: bool = False,
        nak_fails: bool = False,
        ack_fails: bool = False,
    ) -> None:
        self.data = events_pb2.GiftSent(event_id=event_id).SerializeToString()
        self.metadata = SimpleNamespace(num_delivered=n, sequence=SimpleNamespace(stream=seq))
        self.headers: dict[str, str] = {}
        self.settled: list[str] = []
        self.term_fails = term_fails
        self.nak_fails = nak_fails
        self.ack_fails = ack_fails

    @property
    def is_acked(self) -> bool:
        return bool(self.settled)

    def _settle(self, how: str, fails: str) -> None:
        if self.settled:
            raise nats.errors.MsgAlreadyAckdError(self)
        if getattr(self, fails):
            setattr(self, fails, False)
            raise nats.errors.ConnectionClosedError
        self.settled.append(how)

    async def ack(self) -> None:
        self._settle("ack", "ack_fails")

    async def nak(self, delay: float = 0) -> None:
        self._settle("nak", "nak_fails")

    async def term(self) -> None:
        self._settle("term", "term_fails")

    async def in_progress(self) -> None:
        return None


async def _parking_consumer(
    tmp_path: Path, durable: str, poisoned: str | set[str], applied: list[str], max_deliver: int = 1
) -> tuple[Consumer, Database]:
    """A consumer over SQLite that parks on the `max_deliver`th failure (1: the first) and whose
    handler fails on `poisoned` (an event id or a set of them) and records every other event it
    applies in `applied`."""
    failing = {poisoned} if isinstance(poisoned, str) else poisoned

    async def handle(uow: Any, events: list[Any]) -> None:
        for e in events:
            if e.event_id in failing:
                raise ValueError("a bug in the handler")
            applied.append(e.event_id)

    settings, db = _settings_and_db(tmp_path, consumer_max_deliver=max_deliver)
    async with db.engine.begin() as conn:
        await conn.run_sync(common.inbox.metadata.create_all)
    return _consumer(db, settings, durable, handle), db


async def _parked_ids(db: Database, durable: str) -> list[str]:
    async with db.engine.begin() as conn:
        d = common.dead_letters.c
        return list((await conn.execute(select(d.event_id).where(d.consumer == durable))).scalars())


async def test_a_new_event_at_the_sequence_of_one_parked_is_applied_when_this_process_did_not_bind_again(
    tmp_path: Path,
) -> None:
    # Another replica made the stream and the durable again (NATS back without its store) before
    # this one's next pull, which then went to the new durable with no error and no bind again:
    # the parked stream sequences kept from the old stream are not forgotten (`_bound_to`), and
    # the new event numbered as the parked one was terminated as its copy, neither applied nor
    # parked. A copy is the same message; another event at that sequence is not one.
    applied: list[str] = []
    consumer, db = await _parking_consumer(tmp_path, "stale-seq", "poisoned", applied)
    try:
        await consumer.process([_Msg("poisoned", seq=7, n=1)])  # type: ignore[list-item]
        assert await _parked_ids(db, "stale-seq") == ["poisoned"]
        copy = _Msg("poisoned", seq=7, n=2)
        await consumer.process([copy])  # type: ignore[list-item]
        assert copy.settled == ["term"], "a copy of the parked event is terminated, not tried again"
        new = _Msg("new-event", seq=7, n=1)
        await consumer.process([new])  # type: ignore[list-item]
        assert applied == ["new-event"]
        assert new.settled == ["ack"]
        assert await _parked_ids(db, "stale-seq") == ["poisoned"]
    finally:
        await db.engine.dispose()


async def test_an_event_parked_whose_term_was_lost_is_parked_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The dead_letters row committed, then the term failed (the NATS connection lost): the loop's
    # error path binds again, and JetStream redelivers the event after ack_wait.
    # - Its stream sequence was kept only after a term that succeeded, so the copy was tried and
    #   parked again: two rows for one event, and two replays for an operator to reason about.
    # - The count and the 'event parked' line came only after the term, so they were skipped, and
    #   the copy was terminated as a copy without either: an event waited for an operator with no
    #   alert (increase(livegifts_dead_letters_total)) and no line naming it.
    durable = "term-lost"
    consumer, db = await _parking_consumer(tmp_path, durable, "poisoned", [])
    try:
        with caplog.at_level(logging.INFO, logger="services.common.inbox"):
            with pytest.raises(nats.errors.ConnectionClosedError):
                await consumer.process([_Msg("poisoned", seq=3, n=1, term_fails=True)])  # type: ignore[list-item]
            again = _Msg("poisoned", seq=3, n=2)
            await consumer.process([again])  # type: ignore[list-item]
        assert again.settled == ["term"], "the copy was tried again, not terminated"
        assert await _parked_ids(db, durable) == ["poisoned"]
        assert _parked_count(durable) == 1.0, "a parked event went uncounted: no dead-letter alert"
        lines = [r for r in caplog.records if r.getMessage() == "event parked in dead_letters"]
        assert [r.event_id for r in lines] == ["poisoned"]  # type: ignore[attr-defined]
        # Terminated as this process's own park, not tried and found in dead_letters.
        assert [r for r in caplog.records if "parked already" in r.getMessage()] == []
    finally:
        await db.engine.dispose()


async def test_deliveries_not_counted_for_one_event_do_not_spare_another_at_its_sequence(tmp_path: Path) -> None:
    # This replica nak'ed an event through an outage (its deliveries not counted), and another
    # replica applied it, so nothing here forgot them. Its stream and durable were made again by
    # another replica (no bind here): a new event at that sequence had those deliveries taken off
    # its own failures, and one that kept failing went on being tried instead of being parked.
    from sqlalchemy import exc as sa_exc

    applied: list[str] = []
    consumer, db = await _parking_consumer(tmp_path, "stale-count", "poisoned", applied)
    try:
        outage = sa_exc.OperationalError("INSERT", {}, Exception("database is locked"))
        for n in (1, 2, 3):
            await consumer._failed((_Msg("applied-elsewhere", seq=9, n=n), events_pb2.GiftSent()), outage)  # type: ignore[arg-type]
        new = _Msg("poisoned", seq=9, n=1)
        await consumer.process([new])  # type: ignore[list-item]
        assert new.settled == ["term"], "failed once of its own with CONSUMER_MAX_DELIVER=1: parked"
        assert await _parked_ids(db, "stale-count") == ["poisoned"]
    finally:
        await db.engine.dispose()


async def test_an_event_applied_at_a_sequence_leaves_another_events_uncounted_deliveries_there(tmp_path: Path) -> None:
    # Two events at one sequence (the stream made again while this process kept pulling): the
    # new one is applied, and `_forget` dropped the not-counted deliveries kept at its sequence
    # without comparing their digest, so the old event's outage deliveries counted as its own
    # failures when it came again, and it was parked on its first failure of its own.
    from sqlalchemy import exc as sa_exc

    consumer, db = await _parking_consumer(tmp_path, "forget-other", "poisoned", [], max_deliver=2)
    try:
        outage = sa_exc.OperationalError("INSERT", {}, Exception("database is locked"))
        for n in (1, 2, 3):
            await consumer._failed((_Msg("poisoned", seq=9, n=n), events_pb2.GiftSent()), outage)  # type: ignore[arg-type]
        other = _Msg("new-stream", seq=9, n=1)
        await consumer.process([other])  # type: ignore[list-item]
        assert other.settled == ["ack"]
        again = _Msg("poisoned", seq=9, n=4)  # its first failure of its own, of 2 allowed
        await consumer.process([again])  # type: ignore[list-item]
        assert again.settled == ["nak"], "parked on one failure of its own: its outage deliveries were dropped"
        assert await _parked_ids(db, "forget-other") == []
    finally:
        await db.engine.dispose()


async def test_the_latest_park_at_a_sequence_is_the_last_forgotten_when_another_event_there_is_parked(
    tmp_path: Path,
) -> None:
    # Another event at the sequence of one parked before (its stream made again, no bind here) is
    # parked in its turn: it is the newest this process parked, and the bound (oldest first) must
    # drop it last. It kept the old event's place, was dropped first, and its copy was parked again.
    consumer, db = await _parking_consumer(tmp_path, "reparked", "poisoned", [])
    consumer._not_counted_max = 2  # remember two parked sequences

    def undecodable(mark: str, seq: int) -> _Msg:
        msg = _Msg("unused", seq=seq, n=1)
        msg.data = events_pb2.GiftSent(gift_id=mark).SerializeToString()  # no event_id: parked
        return msg

    try:
        for mark, seq in (("a", 1), ("b", 2), ("c", 1), ("d", 3)):  # c: another event at 1
            await consumer.process([undecodable(mark, seq)])  # type: ignore[list-item]
        copy = undecodable("c", 1)
        await consumer.process([copy])  # type: ignore[list-item]
        assert copy.settled == ["term"]
        assert len(await _parked_ids(db, "reparked")) == 4, "the copy of the latest park was parked again"
    finally:
        await db.engine.dispose()


@pytest.mark.parametrize("fails", ["nak", "park"])
async def test_a_batch_whose_one_by_one_retry_fails_midway_lets_the_untried_events_go_uncounted(
    tmp_path: Path, fails: str
) -> None:
    # A failed batch is tried one event at a time; the first event's own failure is then nak'ed
    # (NATS gone: the nak raises) or parked (the database gone: the dead_letters insert raises),
    # and the error ends the batch. The event after it was never tried, yet it was left unsettled:
    # JetStream delivered it again after ack_wait, and that delivery counted towards parking it.
    # With CONSUMER_MAX_DELIVER=2 it was parked at its first try of its own.
    applied: list[str] = []
    consumer, db = await _parking_consumer(tmp_path, f"midway-{fails}", {"first", "untried"}, applied, max_deliver=2)
    try:
        if fails == "park":
            first = _Msg("first", seq=1, n=2)  # its second failure of its own: parked
            async with db.engine.begin() as conn:
                await conn.run_sync(common.dead_letters.drop)  # the insert fails as on a database gone
            raised: type[Exception] = sa_exc.OperationalError
        else:
            first = _Msg("first", seq=1, n=1, nak_fails=True)  # its first failure: nak'ed
            raised = nats.errors.ConnectionClosedError
        untried = _Msg("untried", seq=2, n=1)
        with pytest.raises(raised):
            await consumer.process([first, untried])  # type: ignore[list-item]
        assert first.settled == [], "the one the error came from is as it failed"
        assert untried.settled == ["nak"], "the untried one is nak'ed, not left to ack_wait"
        if fails == "park":
            async with db.engine.begin() as conn:
                await conn.run_sync(common.dead_letters.create)
        # Its next delivery fails of its own, its first such failure: nak'ed, not parked.
        again = _Msg("untried", seq=2, n=2)
        await consumer.process([again])  # type: ignore[list-item]
        assert again.settled == ["nak"]
        assert await _parked_ids(db, f"midway-{fails}") == []
    finally:
        await db.engine.dispose()


async def test_a_batch_committed_whose_ack_failed_midway_is_not_acked_twice(tmp_path: Path) -> None:
    # The batch committed and the second message's ack failed (the connection lost for a moment):
    # the one-by-one retry acked the first again, which nats-py refuses (MsgAlreadyAckdError),
    # and its nak was refused alike, ending the batch before the rest were acked.
    applied: list[str] = []
    consumer, db = await _parking_consumer(tmp_path, "ack-midway", "none", applied)
    try:
        msgs = [_Msg("a", seq=1, n=1), _Msg("b", seq=2, n=1, ack_fails=True), _Msg("c", seq=3, n=1)]
        await consumer.process(msgs)  # type: ignore[arg-type]
        assert [m.settled for m in msgs] == [["ack"], ["ack"], ["ack"]]
        assert applied == ["a", "b", "c"], "applied once: the retry found them in the inbox"
    finally:
        await db.engine.dispose()


async def test_an_event_applied_whose_ack_nats_refused_is_not_parked_on_its_last_delivery(tmp_path: Path) -> None:
    # Its effect committed, then NATS refused the ack (the connection closed): the failure was
    # counted as the event's own, and on its last allowed delivery (a redelivery after failures of
    # its own) the event was parked, an applied event in dead_letters for an operator to replay.
    applied: list[str] = []
    consumer, db = await _parking_consumer(tmp_path, "ack-refused", "none", applied, max_deliver=2)
    try:
        msg = _Msg("e1", seq=1, n=2, ack_fails=True)
        await consumer.process([msg])  # type: ignore[list-item]
        assert applied == ["e1"]
        assert msg.settled == ["nak"], "nak'ed, uncounted: its redelivery is a duplicate, acked"
        assert await _parked_ids(db, "ack-refused") == []
    finally:
        await db.engine.dispose()


class _ProcessKilled(BaseException):
    """Stands for a try that ends the process (a segfault, an OOM kill, os._exit): nothing of the
    consumer's runs after it, no failure path, no nak."""


async def _killing_consumer(
    tmp_path: Path, durable: str, killer: str, calls: list[list[str]]
) -> tuple[Consumer, Database]:
    """A consumer over SQLite with the default CONSUMER_MAX_DELIVER (20) whose handler records the
    event ids of each call in `calls` and ends the "process" when it is handed `killer`."""

    async def handle(uow: Any, events: list[Any]) -> None:
        calls.append([e.event_id for e in events])
        if any(e.event_id == killer for e in events):
            raise _ProcessKilled

    settings, db = _settings_and_db(tmp_path)
    assert settings.consumer_max_deliver == 20
    async with db.engine.begin() as conn:
        await conn.run_sync(common.inbox.metadata.create_all)
    return _consumer(db, settings, durable, handle), db


async def test_an_event_delivered_past_max_deliver_unaccounted_for_is_tried_alone_after_its_batch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An event whose try kills the process never reaches `_failed`: it is delivered again after
    # every restart, and was tried in one transaction with the events fetched with it, so the
    # process died each time with none of them acked and the consumer applied nothing at all.
    # Past CONSUMER_MAX_DELIVER deliveries this process cannot account for, it is tried alone
    # after the rest (in random order: here the reverse of the batch's), and the line logged
    # before its try names it.
    monkeypatch.setattr(random, "shuffle", lambda items: items.reverse())
    calls: list[list[str]] = []
    consumer, db = await _killing_consumer(tmp_path, "killed", "killer", calls)
    try:
        killer, a, b = _Msg("killer", seq=1, n=21), _Msg("a", seq=2, n=21), _Msg("b", seq=3, n=1)  # a: fetched with it
        with caplog.at_level(logging.WARNING, logger="services.common.inbox"), pytest.raises(_ProcessKilled):
            await consumer.process([killer, a, b])  # type: ignore[list-item]
        assert calls == [["b"], ["a"], ["killer"]], "the usual batch first, then each unaccounted-for event alone"
        assert (a.settled, b.settled, killer.settled) == (["ack"], ["ack"], [])
        named = [r for r in caplog.records if "tried alone" in r.getMessage()]
        assert [(r.event_id, r.stream_seq, r.delivered) for r in named] == [("a", 2, 21), ("killer", 1, 21)]  # type: ignore[attr-defined]
        assert await _parked_ids(db, "killed") == [], "never parked untried: an outage raises the count alike"
    finally:
        await db.engine.dispose()


async def test_deliveries_this_process_saw_fail_for_the_database_keep_an_event_in_its_batch(tmp_path: Path) -> None:
    # The deliveries an outage nak'ed here are accounted for: an event back after 25 of them
    # goes in its batch as before, not one transaction of its own.
    calls: list[list[str]] = []
    consumer, db = await _killing_consumer(tmp_path, "outage-seen", "none", calls)
    try:
        outage = sa_exc.OperationalError("INSERT", {}, Exception("database is locked"))
        for n in range(1, 26):
            await consumer._failed((_Msg("waited", seq=4, n=n), events_pb2.GiftSent()), outage)  # type: ignore[arg-type]
        waited, other = _Msg("waited", seq=4, n=26), _Msg("other", seq=5, n=1)
        await consumer.process([waited, other])  # type: ignore[list-item]
        assert calls == [["waited", "other"]]
        assert (waited.settled, other.settled) == (["ack"], ["ack"])
    finally:
        await db.engine.dispose()


async def test_an_event_this_process_saw_fail_for_the_database_is_tried_alone_without_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # An outage on two replicas: each nak'ed the event 25 times, so this one cannot account for
    # 25 of its 50 deliveries and tries it alone. It was named as if it had killed the process,
    # on every fetch and for every pending event alike, though this process saw it fail for the
    # database. One it never saw fail (a process killer after a restart) is still named.
    calls: list[list[str]] = []
    consumer, db = await _killing_consumer(tmp_path, "two-replicas", "none", calls)
    try:
        outage = sa_exc.OperationalError("INSERT", {}, Exception("database is locked"))
        for n in range(1, 26):
            await consumer._failed((_Msg("waited", seq=4, n=n), events_pb2.GiftSent()), outage)  # type: ignore[arg-type]
        waited, fresh = _Msg("waited", seq=4, n=50), _Msg("fresh", seq=5, n=21)
        with caplog.at_level(logging.WARNING, logger="services.common.inbox"):
            await consumer.process([waited, fresh])  # type: ignore[list-item]
        assert sorted(calls) == [["fresh"], ["waited"]], "both tried alone"
        named = [r.event_id for r in caplog.records if "tried alone" in r.getMessage()]  # type: ignore[attr-defined]
        assert named == ["fresh"]
    finally:
        await db.engine.dispose()


async def test_an_event_parked_on_its_first_failure_here_says_its_count_is_of_deliveries(tmp_path: Path) -> None:
    # Delivered 21 times, none seen here: tried alone, it fails on its own and is parked at once.
    # "failed 21 times" read as 21 tries of the handler; most were deliveries tried elsewhere or
    # ended with the process.
    applied: list[str] = []
    consumer, db = await _parking_consumer(tmp_path, "unaccounted-park", "bad", applied, max_deliver=20)
    try:
        await consumer.process([_Msg("bad", seq=9, n=21)])  # type: ignore[list-item]
        async with db.engine.begin() as conn:
            d = common.dead_letters.c
            errors = list((await conn.execute(select(d.error).where(d.consumer == "unaccounted-park"))).scalars())
        assert len(errors) == 1 and errors[0].startswith("failed 21 times (deliveries, not all tried here): "), errors
    finally:
        await db.engine.dispose()


async def test_an_outage_of_another_kind_is_logged_at_once_while_the_first_ones_lines_are_throttled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The consumer's outage line was throttled as one for every kind of error: while one outage
    # repeated (a connection refused), a second starting within the 30 s (a full disk) logged
    # nothing until the next line was due, and that line named whichever came then.
    settings, db = _settings_and_db(tmp_path)  # never connected to
    consumer = _consumer(db, settings, "outage-kinds", _handle_nothing)
    refused = ConnectionRefusedError(111, "Connection refused")
    full = sa_exc.OperationalError("INSERT", {}, type("Full", (Exception,), {"sqlite_errorname": "SQLITE_FULL"})())
    with caplog.at_level(logging.WARNING, logger="services.common.inbox"):
        for i, exc in enumerate([refused, refused, full, full, refused]):
            await consumer._failed((_Delivered(1), events_pb2.GiftSent(event_id=f"e{i}")), exc)  # type: ignore[arg-type]
    lines = [r for r in caplog.records if r.message.startswith("event not applied, the database")]
    assert [(r.event_id, r.retries) for r in lines] == [("e0", 1), ("e2", 1)]  # type: ignore[attr-defined]
    assert [r.error.split("(")[0] for r in lines] == ["ConnectionRefusedError", "OperationalError"]  # type: ignore[attr-defined]


async def test_two_events_at_one_sequence_in_a_batch_are_each_tried_not_taken_for_copies(tmp_path: Path) -> None:
    # NATS came back without its store while this replica held the old stream's deliveries in its
    # buffer, and another replica made the stream and the durable again: one batch holds an old
    # event and the new stream's event at the same sequence. Taken for two deliveries of one
    # event, only the one delivered more often (the old) was tried; the new one was left, and the
    # old one's ack, which JetStream takes by stream sequence, settled it: never applied, never
    # parked. Each is another event (its bytes differ): both are tried, as `_parked` and
    # `_not_counted` tell them apart.
    applied: list[str] = []
    consumer, db = await _parking_consumer(tmp_path, "one-seq-two-events", "none", applied)
    try:
        old, new = _Msg("old-stream", seq=1, n=2), _Msg("new-stream", seq=1, n=1)
        await consumer.process([old, new])  # type: ignore[list-item]
        assert sorted(applied) == ["new-stream", "old-stream"]
        assert (old.settled, new.settled) == (["ack"], ["ack"])
        # Two deliveries of one event are still one try, of the newest.
        first, again = _Msg("e", seq=2, n=1), _Msg("e", seq=2, n=2)
        await consumer.process([first, again])  # type: ignore[list-item]
        assert applied.count("e") == 1 and (first.settled, again.settled) == ([], ["ack"])
    finally:
        await db.engine.dispose()


async def test_a_batch_committed_whose_ack_failed_counts_its_events_applied(tmp_path: Path) -> None:
    # The counts came after the acks: a batch whose commit applied three events and whose second
    # ack failed counted none applied, and the retry that found two of them in the inbox counted
    # those duplicates, so the dashboard showed two duplicates and nothing applied.
    from prometheus_client import REGISTRY

    durable = "ack-failed-counted"
    consumer, db = await _parking_consumer(tmp_path, durable, "none", [])

    def consumed(result: str) -> float:
        return REGISTRY.get_sample_value("livegifts_events_consumed_total", {"consumer": durable, "result": result})  # type: ignore[return-value]

    try:
        msgs = [_Msg("a", seq=1, n=1), _Msg("b", seq=2, n=1, ack_fails=True), _Msg("c", seq=3, n=1)]
        await consumer.process(msgs)  # type: ignore[arg-type]
        assert consumed("applied") == 3.0
        # The one-by-one retry tries b and c again (a's ack went through) and finds them in the
        # inbox: each such try is a duplicate, as a redelivery would be; none is applied twice.
        assert consumed("duplicate") == 2.0
    finally:
        await db.engine.dispose()


async def test_a_copy_of_an_event_another_process_parked_is_terminated_not_parked_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # One process parked the event and its term was lost (the NATS connection gone, or the
    # process killed after the commit): the copy JetStream delivers again went to another replica,
    # or to the process started after it, which kept none of the first one's parks, tried it and
    # parked it a second time: two rows for one event, two alerts, two replays to reason about.
    durable = "parked-elsewhere"
    first, db = await _parking_consumer(tmp_path, durable, "poisoned", [])
    second = Consumer(db, ConnectedBus(), common, first.sub, _settings_of(tmp_path, consumer_max_deliver=1))  # type: ignore[arg-type]
    try:
        with pytest.raises(nats.errors.ConnectionClosedError):
            await first.process([_Msg("poisoned", seq=3, n=1, term_fails=True)])  # type: ignore[list-item]
        copy = _Msg("poisoned", seq=3, n=2)
        with caplog.at_level(logging.INFO, logger="services.common.inbox"):
            await second.process([copy])  # type: ignore[list-item]
        assert copy.settled == ["term"]
        assert await _parked_ids(db, durable) == ["poisoned"], "parked a second time"
        assert _parked_count(durable) == 1.0
        assert [r for r in caplog.records if "parked already" in r.getMessage()]
        # Its own copies after that are terminated without a look-up, as the first's are.
        again = _Msg("poisoned", seq=3, n=3)
        await second.process([again])  # type: ignore[list-item]
        assert again.settled == ["term"] and await _parked_ids(db, durable) == ["poisoned"]
    finally:
        await db.engine.dispose()
