"""Provider callbacks as the wallet's and payout's tests race them: a concurrent delivery of the
same event id that records it between this one's look-up and its insert."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any


def unseen_at_first(recorded_for: Callable[..., Awaitable[Any]], looks: list[int]) -> Callable[..., Awaitable[Any]]:
    """An `_event_recorded_for` that finds no record at its first look (appended to `looks`): a
    concurrent delivery records the id after it, so the insert hits an IntegrityError."""

    async def look(self: Any, *args: Any) -> Any:
        looks.append(1)
        return None if len(looks) == 1 else await recorded_for(self, *args)

    return look
