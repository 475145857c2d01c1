"""Time as integer microseconds since the epoch: portable across SQLite and PostgreSQL, sortable."""

import time

from google.protobuf.timestamp_pb2 import Timestamp

US_PER_HOUR = 3_600_000_000
US_PER_DAY = 24 * US_PER_HOUR


def now_us() -> int:
    """Wall-clock now in microseconds since the epoch."""
    return time.time_ns() // 1000


def to_timestamp(us: int | None) -> Timestamp | None:
    """A protobuf Timestamp from microseconds (None stays None)."""
    if us is None:
        return None
    ts = Timestamp()
    ts.FromMicroseconds(us)
    return ts
