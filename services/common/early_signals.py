"""SIGTERM before a service serves: the process ends at once, even as a container's PID 1.

A process that is PID 1 (the service in its container) ignores every signal it has no handler
for. Until `serve()` installs its own (to drain), a SIGTERM (the pod deleted while it starts, or
while its migrate init container waits for another replica's migration) was dropped: the pod
went on starting and then served until its SIGKILL, at the end of the grace period. Each
service's `__main__` calls `exit_on_sigterm()` before its slow imports.
"""

from __future__ import annotations

import os
import signal

# What a shell reports for a process SIGTERM ended: 128 + the signal's number.
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


def exit_on_sigterm() -> None:
    """Make SIGTERM end the process at once (exit 143), as it ends any process that is not PID 1."""
    # os._exit, not sys.exit: nothing has been built that needs cleaning up, a migration's
    # transaction rolls back with its connection, and no exception lands in half-run code.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: os._exit(SIGTERM_EXIT_CODE))
