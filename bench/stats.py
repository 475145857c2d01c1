"""Percentiles as the bench reports them, for call latencies, diamonds lag and the disk probe."""

from __future__ import annotations


def percentiles(samples_ms: list[float]) -> dict[str, float | None]:
    """p50 / p99 / p999 / max of a list of milliseconds (nearest rank)."""
    if not samples_ms:
        return {"p50": None, "p99": None, "p999": None, "max": None}
    s = sorted(samples_ms)

    def rank(q: float) -> float:
        return s[min(len(s) - 1, max(0, int(q * len(s) + 0.5) - 1))]

    return {"p50": rank(0.50), "p99": rank(0.99), "p999": rank(0.999), "max": s[-1]}
