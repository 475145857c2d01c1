"""Background loops that stop promptly and survive any error but cancellation."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from opentelemetry import trace

from services.common import telemetry
from services.common.dependency_errors import error_kind, is_unavailable
from services.common.metrics import BACKGROUND_ITEM_FAILURES
from services.common.throttle import KeyedLogThrottle

log = logging.getLogger(__name__)

K = TypeVar("K")

# A loop that fails round after round (its database down, refusing connections) logs one line
# per this many seconds for each kind of error (`error_kind`), saying how many rounds failed with
# it since the previous one. Before, payout's dispatcher, every 0.2 s, logged 300 lines a minute
# per pod for as long as an outage lasted.
FAILURE_LOG_INTERVAL_S = 30.0
# The kinds of error (`error_kind`: a class and a database code, a few) a loop's failed rounds
# are throttled apart by.
ERROR_KINDS_MAX = 64


async def sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> None:
    """Wait `seconds`, or less if `stop` is set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


async def wait_until_set(event: asyncio.Event, stop: asyncio.Event, seconds: float) -> None:
    """Wait until `event` or `stop` is set, or `seconds` pass, whichever comes first."""
    waiters = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(stop.wait())]
    _done, rest = await asyncio.wait(waiters, timeout=seconds, return_when="FIRST_COMPLETED")
    for w in rest:
        w.cancel()


async def run_every(stop: asyncio.Event, interval_s: float, once: Callable[[], Awaitable[int]], what: str) -> None:
    """Call `once` every `interval_s` until `stop`; an error is logged and the next round retries.

    Every error is caught (a database or wallet outage must not end the loop, which would stop
    the service); only cancellation ends it. `once` returns how many items it handled. Failed
    rounds log "<what> failed, retrying next round" at once, then at most once per
    FAILURE_LOG_INTERVAL_S (`retries`: the failed rounds it stands for), for each kind of error
    (`error_kind`: its class and database code): another error in the middle of an outage (a
    bug, a constraint) is logged at once, not hidden behind the outage's line for 30 s. A round
    that succeeds ends the run of failures, and the next failure is logged at once again.
    """
    failures: KeyedLogThrottle[str] = KeyedLogThrottle(FAILURE_LOG_INTERVAL_S, ERROR_KINDS_MAX)
    while not stop.is_set():
        try:
            handled = await once()
            failures.clear()
            if handled:
                log.info(what, extra={"items": handled})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the work stays where it was; the next round retries
            if retries := failures.occurred(error_kind(exc)):
                log.warning(f"{what} failed, retrying next round", extra={"error": repr(exc), "retries": retries})
        await sleep_unless_stopped(stop, interval_s)


class BatchCursor(Generic[K]):
    """Where a loop's next round starts in its items' key order (`at`, from `start`), a batch a
    round: after a full batch, after its last; after a short one, from `start` again. An item
    whose error ends the round (`rewind`) is where the next round starts."""

    def __init__(self, start: K) -> None:
        self.start = start
        self.at = start
        self._round: tuple[K, Sequence[K]] = (start, ())  # where the last round started, its keys

    def advance(self, keys: Sequence[K], batch: int) -> None:
        """A round of `keys` (in order) begins: a full batch goes on after its last, a short one
        starts again."""
        self._round = (self.at, keys)
        self.at = keys[-1] if len(keys) == batch else self.start

    def key(self, i: int) -> K:
        """The key of the round's `i`th item."""
        return self._round[1][i]

    def rewind(self, i: int) -> None:
        """The round's `i`th item ended it: the next round starts from that item, not after the
        round's last."""
        started, keys = self._round
        self.at = keys[i - 1] if i else started

    def stopped(self, stop: asyncio.Event | None, i: int) -> bool:
        """Whether the round ends before its `i`th item, `stop` being set (a SIGTERM): no item is
        started once it is (the one in hand has finished), and the next round, the next
        process's, starts from this one (`rewind`). A service lets its loops finish their round
        within SHUTDOWN_GRACE_S; a round whose items each call out (a provider, the wallet, up to
        their deadline each) went on through the grace and was cancelled in the middle of one."""
        if stop is None or not stop.is_set():
            return False
        self.rewind(i)
        return True


class ItemFailures:
    """The failures of a background loop's items (a gift the sweeper settles, a withdrawal the
    dispatcher hands over, a late one a reconciler looks up), for the loop to go on with its round.

    `failed(exc, item, **context)`: the database unavailable is raised again: every item would
    fail alike, each after its own connect timeout, so the round ends there (`run_every` logs it,
    throttled). Any other error is the item's own (a bug, a constraint it breaks, a dependency
    refusing that one item): marks the current span failed (the item's `background_span`
    where the loop opens one per item; for payout's shortfall settler, the whole round's)
    (`telemetry.mark_failed`: caught here, the error would not reach the span, which would end
    OK), is logged as a warning (`message`, with `context` naming the item), the
    first of an item at once, then at most once per FAILURE_LOG_INTERVAL_S per item (`retries`:
    the failures the line stands for; payout's dispatcher tries every 0.2 s), and the caller goes
    on with the round. Before, it ended the round, and as each round starts from the oldest items,
    one that always failed kept every item after it from ever being handled. The items that
    failed last are remembered, at most ITEMS_MAX.

    With a `loop` name, each such failure (every one, not only those logged) is counted in
    livegifts_background_item_failures_total{loop}, whose series is exported at 0 from the
    moment this is made (the service's start). The reconcilers count theirs in their own
    counters (outcome "error") and give none.
    """

    ITEMS_MAX = 1024

    def __init__(self, logger: logging.Logger, message: str, loop: str | None = None) -> None:
        self._logger = logger
        self._message = message
        self._lines: KeyedLogThrottle[str] = KeyedLogThrottle(FAILURE_LOG_INTERVAL_S, self.ITEMS_MAX)
        self._counted = BACKGROUND_ITEM_FAILURES.labels(loop=loop) if loop is not None else None

    def failed(self, exc: Exception, item: str, **context: object) -> None:
        """`item` raised `exc`: the database unavailable raised again, any other error the item's own."""
        if is_unavailable(exc):
            raise exc
        # Caught here, the error never reaches the current span, which would end OK.
        telemetry.mark_failed(trace.get_current_span(), exc)
        if self._counted is not None:
            self._counted.inc()
        if retries := self._lines.occurred(item):
            self._logger.warning(self._message, extra={**context, "error": repr(exc), "retries": retries})
