"""Free TCP ports for a test's own servers, several at once."""

from __future__ import annotations

import contextlib
import socket


def free_ports(n: int) -> list[int]:
    """`n` different TCP ports of 127.0.0.1, each free a moment ago. Picked with their sockets held
    open together: one `free_port` after another, the kernel may hand out a port it handed out
    just before (it was free again), and two servers of one test then wanted the same port."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
