"""Late callbacks: what payout's and the wallet's reconcilers share.

A provider reports an outcome (a withdrawal paid, a purchase paid) with a signed callback it
retries for a while only; a reconciler looks up at the provider the items whose callback is late
and applies each answer through the callback's own path. Both go through their items a batch a
round, oldest first, from a cursor (`RoundCursor`), and ask the provider with its deadline
(`look_up`): a look-up that fails leaves the item for a later round and the round goes on. Any
other error of one item (applying its answer met a bug or a constraint) is logged
(`RoundCursor.item_failed`) and counted by the caller (outcome "error"), and the round goes on
too; the database unavailable ends the round where it failed, and the next one starts from that
item.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy.sql.elements import ColumnElement

from services.common import loops, provider_calls, sql
from services.common.dependency_errors import is_unavailable

T = TypeVar("T")


class RoundCursor(loops.BatchCursor[tuple[int, str]]):
    """Where a reconciler's next round starts, by (time, id): items the provider still calls
    under way do not keep the round from the later ones, and after a short batch the next round
    starts again from the oldest."""

    def __init__(self) -> None:
        super().__init__((-1, ""))

    def after(self, time_col: Any, id_col: Any) -> ColumnElement[bool]:
        """The items after the cursor, in (time, id) order."""
        return sql.after_key(time_col, id_col, self.at)

    def item_failed(self, exc: Exception, i: int, failures: loops.ItemFailures, **context: object) -> None:
        """The round's `i`th item (`advance`) raised `exc`, which is not a look-up's failure
        (`look_up` answers those).

        As `ItemFailures.failed`: the database unavailable is raised again, and the next round
        starts from this item (`rewind`); any other error is logged as the item's own, for the
        caller to count and go on with the round. Before, either ended the round, and the rest
        of its batch waited for the next pass over every late item; the same items came in the
        same batches each pass, so one that always failed kept those after it in its batch from
        ever being looked up."""
        if is_unavailable(exc):
            self.rewind(i)
        failures.failed(exc, self.key(i)[1], **context)


@dataclass(frozen=True)
class Answer(Generic[T]):
    """What a look-up brought: `answered` False when the provider could not be asked (logged and
    counted in livegifts_provider_call_failures_total); `value` the provider's answer otherwise."""

    answered: bool
    value: T | None = None


async def look_up(
    provider: str,
    request: Awaitable[T],
    timeout_s: float,
    logger: logging.Logger,
    message: str,
    **context: object,
) -> Answer[T]:
    """Ask `provider` about one late item (its `status` call) within `timeout_s`; a timeout or an
    error is logged as a warning (`message`, with `context`) under the caller's `logger` (the
    line's `logger` field stays the service's, as before this module) and answered
    `Answer(False)`, for the caller to count and leave for a later round."""
    try:
        return Answer(True, await provider_calls.call(provider, "status", request, timeout_s))
    except Exception as exc:  # noqa: BLE001 - logged and counted; the item is asked about again
        logger.warning(
            message,
            extra={**context, "error": repr(exc)},
        )
        return Answer(False)
