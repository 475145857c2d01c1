"""Summarize py-spy raw (collapsed) profiles: where a service's busy samples go.

`python -m bench.profsummary bench/profiles/*.txt` prints, per file, the busy share (samples
not parked in the event loop's select or an idle thread) and the inclusive share of busy
samples of the frames that matter for the gift saga (matched by exact function name, so
`Gifting._spend` does not count `Gifting._spend_many`). Used for bench/README.md.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

IDLE_LEAVES = ("Runner.run (asyncio/runners.py", "Thread.run (threading.py", "select (selectors.py")
WATCH = (
    "OpenTelemetryAioServerInterceptor",
    "ErrorInterceptor.intercept_service",
    "Gifting.send_gift",
    "Gifting._begin",
    "Gifting._begin_many",
    "Gifting._check_eligible",
    "Gifting._check_eligible_many",
    "Gifting._spend",
    "Gifting._spend_many",
    "Gifting._mark_sent",
    "Gifting._mark_sent_many",
    "ReadModels.apply",
    "OutboxRelay.relay_once",
    "OutboxRelay._publish_atomic",
    "OutboxRelay._publish_each",
    "Consumer.process",
    "Payout.credit_gifts",
    "Wallet.spend",
    "Wallet.spend_many",
    "SpendBatch.run",
    "Wallet.get_restrictions",
    "Wallet.get_restrictions_many",
    "Gifting._restrictions",
    "Database.unit_of_work",
    "_async_ping",
    "_compile_w_cache",
    "_generate_cache_key",
    "PreparedStatement.__bind_execute",
    "UnaryUnaryAioClientInterceptor",
    "JsonFormatter",
)


def summarize(path: Path) -> str:
    """Busy share and the watched frames' inclusive share of busy samples."""
    total = busy = 0
    incl: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, n_text = line.rpartition(" ")
        if not stack:
            continue
        n = int(n_text)
        total += n
        frames = stack.split(";")
        if not frames[-1].strip() or frames[-1].startswith(IDLE_LEAVES):
            continue
        busy += n
        names = {f.split(" (")[0] for f in frames}
        for w in {
            w for w in WATCH for name in names if name == w or name.endswith("." + w) or name.startswith(w + ".")
        }:
            incl[w] += n
    lines = [f"{path.name}: {total} samples, busy {100 * busy / max(total, 1):.0f}%"]
    lines += [f"  {100 * incl[w] / max(busy, 1):5.1f}% of busy  {w}" for w in WATCH if incl[w]]
    return "\n".join(lines)


def main() -> None:
    """Print a summary of every file named on the command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.profsummary", description=__doc__)
    parser.add_argument("files", nargs="+", type=Path, help="py-spy raw profiles (bench/profiles/*.txt)")
    for path in parser.parse_args().files:
        print(summarize(path))


if __name__ == "__main__":
    main()
