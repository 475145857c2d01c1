"""Time as integer microseconds since the epoch: portable across SQLite and PostgreSQL, sortable."""

import time

from google.protobuf.timestamp_pb2 import Timestamp


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
