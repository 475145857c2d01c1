"""At most one log line per interval for a failure that repeats (an outage), counting the rest."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class LogThrottle:
    """Lets one occurrence in `interval_s` be logged; counts the others.

    The first occurrence is logged at once; each later one within `interval_s` of the last line is
    only counted, and the next line says how many it stands for (`occurred`). Used where an outage
    repeats a failure many times a second (a consumer's events nak'ed while the database is down,
    the NATS client's error callback on every reconnect attempt while NATS is down).
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._logged_at = float("-inf")
        self._count = 0  # occurrences since the previous line, this one included

    def occurred(self) -> int:
        """Count one occurrence. Returns 0 if no line is due now, else how many occurrences the
        line due now stands for: this one and those not logged since the previous line."""
        self._count += 1
        now = time.monotonic()
        if now - self._logged_at < self.interval_s:
            return 0
        self._logged_at = now
        count, self._count = self._count, 0
        return count

    def reset(self) -> int:
        """Start afresh (the outage is over: the next occurrence is logged at once). Returns how
        many occurrences were counted and not logged."""
        count, self._count = self._count, 0
        self._logged_at = float("-inf")
        return count


class KeyedLogThrottle(Generic[K]):
    """A `LogThrottle` of `interval_s` per key (a kind of error, a failing item), for at most
    `keys_max` keys: past that the least recently seen is forgotten, and its next occurrence is
    logged at once, as a first."""

    def __init__(self, interval_s: float, keys_max: int) -> None:
        self.interval_s = interval_s
        self.keys_max = keys_max
        self._throttles: OrderedDict[K, LogThrottle] = OrderedDict()

    def occurred(self, key: K) -> int:
        """`LogThrottle.occurred` for `key`."""
        throttle = self._throttles.pop(key, None) or LogThrottle(self.interval_s)
        self._throttles[key] = throttle
        while len(self._throttles) > self.keys_max:
            self._throttles.popitem(last=False)
        return throttle.occurred()

    def clear(self) -> None:
        """Forget every key: the next occurrence of any is logged at once."""
        self._throttles.clear()
