"""A TCP proxy to PostgreSQL that loses the answer to a COMMIT: the commit whose outcome is unknown.

A connection can break after the client sent COMMIT and before it read the answer (a failover,
a network cut, pg_terminate_backend racing the commit): the transaction may have committed, and
the client cannot tell. `CommitCutter.cut_next_commits(n)` makes that happen, deterministically,
to the next `n` COMMITs on any connection through the proxy: each is passed to PostgreSQL, its
answer is read from the server (so the transaction did commit) and dropped, and both sides of
that connection are closed. The client sees its connection lost during COMMIT. With
`committed=False` the COMMIT is not passed on: the server sees the connection close inside the
transaction and rolls it back, and the client sees the very same error. Every other message
passes untouched; connections opened later pass too (the pool's replacements).

It follows PostgreSQL's wire protocol only as far as it must: the untyped messages a connection
opens with (SSLRequest, refused by the server here or answered in plain text; then the startup
message), then typed messages, a COMMIT being a simple Query ('Q') whose text is COMMIT (what
asyncpg sends for a transaction's commit). A server with TLS on would need `?ssl=disable` in the
URL (`through` keeps the URL's query).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct

from sqlalchemy.engine import make_url

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104


def _is_commit(kind: bytes, body: bytes) -> bool:
    return kind == b"Q" and body.rstrip(b"\x00").strip().rstrip(b";").strip().upper() in (b"COMMIT", b"END")


class CommitCutter:
    """The proxy, to the server of `url`; `through(url)` is a URL of that server's database through it."""

    def __init__(self, url: str) -> None:
        u = make_url(url)
        self.target = (u.host or "127.0.0.1", u.port or 5432)
        self.port = 0
        self.to_pass = 0  # COMMITs let through before the next cut
        self.to_cut = 0  # COMMITs left to cut
        self.committed = True  # whether a cut COMMIT reaches the server
        self.cut = 0  # COMMITs cut so far
        self.cut_in: list[str] = []  # the database of each, in order
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> CommitCutter:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def through(self, url: str) -> str:
        """`url` (a database on the proxied server) through the proxy."""
        return make_url(url).set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    def cut_next_commits(self, n: int = 1, *, committed: bool = True, after: int = 0) -> None:
        """The next `n` COMMITs (on any connection), after `after` more have passed, commit (or,
        not `committed`, never reach the server), and their answers are lost with their connection."""
        self.to_cut, self.committed, self.to_pass = n, committed, after

    def _cut(self, database: str) -> None:
        self.cut += 1
        self.cut_in.append(database)

    def _passes(self) -> bool:
        """Whether this COMMIT is one of those let through before the next cut (and count it)."""
        if self.to_pass > 0:
            self.to_pass -= 1
            return True
        return False

    async def close(self) -> None:
        for w in self._writers:
            w.close()
        for t in list(self._tasks):
            t.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers += [writer, up_writer]
        committing = asyncio.Event()  # the COMMIT to cut went up: its answer is awaited
        database = ""  # as the startup message names it

        async def client_to_server() -> None:
            # Untyped: SSLRequest / GSSENCRequest (answered by one byte), then the startup message.
            while True:
                head = await reader.readexactly(4)
                (length,) = struct.unpack("!I", head)
                body = await reader.readexactly(length - 4)
                up_writer.write(head + body)
                await up_writer.drain()
                code = struct.unpack("!I", body[:4])[0] if len(body) >= 4 else 0
                if code not in (_SSL_REQUEST, _GSSENC_REQUEST):
                    words = body[4:].split(b"\x00")
                    params = dict(zip(words[::2], words[1::2], strict=False))
                    nonlocal database
                    database = params.get(b"database", params.get(b"user", b"")).decode()
                    break
            while True:
                kind = await reader.readexactly(1)
                head = await reader.readexactly(4)
                (length,) = struct.unpack("!I", head)
                body = await reader.readexactly(length - 4)
                if self.to_cut > 0 and _is_commit(kind, body) and not self._passes():
                    self.to_cut -= 1
                    if not self.committed:
                        self._cut(database)
                        return  # dropped: both sides close now, the server rolls back
                    committing.set()
                up_writer.write(kind + head + body)
                await up_writer.drain()
                if committing.is_set():
                    return  # nothing more goes up: the connection ends with the COMMIT's answer

        async def server_to_client() -> None:
            ssl_answer_pending = True
            while True:
                if ssl_answer_pending:
                    # The answer to an SSLRequest is one byte ('N': no TLS); anything else starts typed messages.
                    first = await up_reader.readexactly(1)
                    if first in (b"N", b"G"):
                        writer.write(first)
                        await writer.drain()
                        continue
                    ssl_answer_pending = False
                    kind = first
                else:
                    kind = await up_reader.readexactly(1)
                head = await up_reader.readexactly(4)
                (length,) = struct.unpack("!I", head)
                body = await up_reader.readexactly(length - 4)
                if committing.is_set() and kind == b"C":  # CommandComplete of the COMMIT: it committed
                    self._cut(database)
                    return
                writer.write(kind + head + body)
                await writer.drain()

        up, down = asyncio.create_task(client_to_server()), asyncio.create_task(server_to_client())
        try:
            await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
            if committing.is_set():
                # The COMMIT to cut went up: its answer ends `down` (or the server's EOF does).
                await asyncio.wait([down], timeout=30)
        finally:
            for t in (up, down):
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t
            # Both sides closed at once: the server has answered the COMMIT (it committed) or
            # never got it (it rolls back); the client reads EOF where the answer should be.
            for w in (writer, up_writer):
                w.close()
            if task is not None:
                self._tasks.discard(task)
