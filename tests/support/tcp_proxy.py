"""One loopback TCP proxy for the tests: it can count what clients send (round trips, bytes) and cut connections.

It also fails the ways a network to Postgres fails, for bench/faults.py: refused
(`cut`), silent (`blackhole`: connections stay open and nothing moves either way), and
the worst moment to lose a link (`cut_after_commit`: the server committed, the client
never hears that it did).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import struct
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

# Postgres's ReadyForQuery with transaction status "idle": the last message of the server's answer
# to a COMMIT, or to a statement that committed by itself (autocommit).
READY_IDLE = b"Z\x00\x00\x00\x05I"
READY_FAILED = b"Z\x00\x00\x00\x05E"
COMMIT = re.compile(rb"COMMIT")


@dataclass(eq=False)
class _Link:
    """One client connection and its connection to the target."""

    number: int
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    wrote: bool = False  # the client sent an armed trap's pattern: the next commit on this link springs it
    # The text of each statement the client prepared, by name: a statement runs when it is bound (Bind),
    # by name only once prepared, so the trap is armed by a Bind of a matching statement (or a simple Query).
    statements: dict[bytes, bytes] = field(default_factory=dict)

    def abort(self) -> None:
        for writer in (self.client, self.server):
            if writer is not None:
                writer.transport.abort()


def _messages(data: bytes) -> list[tuple[bytes, bytes]]:
    """The frontend messages of a chunk (type, body), as far as whole ones are in it."""
    found = []
    offset = 0
    while offset + 5 <= len(data):
        kind = data[offset : offset + 1]
        (length,) = struct.unpack(">I", data[offset + 1 : offset + 5])
        if length < 4 or not kind.isalpha():
            break  # the startup packet, or not the start of a message
        found.append((kind, data[offset + 5 : offset + 1 + length]))
        offset += 1 + length
    return found


@dataclass
class _CommitTrap:
    pattern: re.Pattern[bytes]
    hold: float
    times: int


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target.

    `cut()` drops every connection and refuses new ones until `restore()`, to make Postgres
    unreachable for real. `blackhole()` keeps every connection (and accepts new ones) but
    forwards nothing in either direction until `restore()`, like a network that went silent:
    what was sent meanwhile is delivered after, as TCP would once the path is back.
    `cut_after_commit()` arms a trap: once a client has run a statement matching `pattern` (a
    regex over its text, e.g. the INSERT or COPY of a table; default: a COMMIT), the server's answer
    that commits it (the COMMIT's, or the statement's own in autocommit: the answer ending
    in ReadyForQuery "idle") is held `hold` seconds, then dropped with the connection. The
    server has committed; the client never learns it.

    While `counting` is on, each chunk a client sends is logged in `writes` (connection
    number, first bytes): with a request/response protocol such as Postgres's, one client
    write is one round trip. `bytes_sent` / `bytes_received` count all traffic from and to
    the clients.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.open = True
        self.counting = False
        self.writes: list[tuple[int, bytes]] = []
        self.bytes_sent = 0
        self.bytes_received = 0
        self.commits_cut = 0  # COMMITs whose answer the client never got
        self.commit_reached = asyncio.Event()  # set when an armed COMMIT has gone to the server
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._trap: _CommitTrap | None = None
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._connections = itertools.count(1)

    @classmethod
    def for_database(cls, url: str) -> TcpProxy:
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 5432)

    def url_for(self, url: str) -> str:
        """The database URL rewritten to go through this proxy."""
        parts = urlsplit(url)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@127.0.0.1:{self.port}" if credentials else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.cut()
        self._flowing.set()  # let blackholed pipes see their closed connections
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def mode(self) -> str:
        if not self.open:
            return "cut"
        if not self._flowing.is_set():
            return "blackhole"
        return "cut_after_commit" if self._trap is not None else "open"

    def cut(self) -> None:
        """Drop every connection and refuse new ones (until `restore`)."""
        self.open = False
        for link in list(self._links):
            link.abort()
        self._links.clear()

    def blackhole(self) -> None:
        """Keep connections open, accept new ones, forward nothing either way (until `restore`)."""
        self._flowing.clear()

    def cut_after_commit(
        self, pattern: bytes | re.Pattern[bytes] | None = None, *, hold: float = 0.0, times: int = 1
    ) -> None:
        """Arm the trap for the next `times` commits of what matches `pattern` (default: any COMMIT)."""
        self.commit_reached.clear()
        if pattern is None:
            compiled = COMMIT
        elif isinstance(pattern, bytes):
            compiled = re.compile(re.escape(pattern))
        else:
            compiled = pattern
        self._trap = _CommitTrap(compiled, hold, times)

    def restore(self) -> None:
        """Back to forwarding everything; disarms `cut_after_commit`."""
        self.open = True
        self._trap = None
        self._flowing.set()

    def start_counting(self) -> None:
        """Forget what was logged and log from now on."""
        self.writes.clear()
        self.counting = True

    def stop_counting(self) -> tuple[int, int]:
        """Stop logging; the `tally()` of what was logged."""
        self.counting = False
        return self.tally()

    def tally(self) -> tuple[int, int]:
        """(round trips, of which pool pre-pings): SQLAlchemy pings asyncpg with BEGIN; ; ROLLBACK."""
        pings, pinging = 0, set()
        for connection, data in self.writes:
            if data.startswith(b"Q") and data[5:].startswith(b"BEGIN;"):
                pinging.add(connection)
            if connection in pinging:
                pings += 1
                if data.startswith(b"Q") and data[5:].startswith(b"ROLLBACK;"):
                    pinging.discard(connection)
        return len(self.writes), pings

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.transport.abort()
            return
        link = _Link(next(self._connections), writer)
        self._links.add(link)
        try:
            await self._flowing.wait()  # a blackholed network does not connect either
            if not self.open:
                return
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
            except OSError:
                return
            link.server = upstream_writer
            if not self.open:
                return
            await asyncio.gather(
                self._pipe(reader, upstream_writer, link, to_server=True),
                self._pipe(upstream_reader, writer, link, to_server=False),
                return_exceptions=True,
            )
        finally:
            self._links.discard(link)
            link.abort()

    def _client_chunk(self, link: _Link, data: bytes) -> None:
        """Note what a client sends, and whether it arms the trap on this link."""
        self.bytes_sent += len(data)
        if self.counting:
            self.writes.append((link.number, data[:64]))
        trap = self._trap
        for kind, body in _messages(data):
            if kind == b"P":  # Parse: statement name, query text (preparing runs nothing)
                name, _, query = body.partition(b"\x00")
                link.statements[name] = query
            elif trap is None:
                continue
            elif kind == b"Q" and trap.pattern.search(body):  # a simple query: runs at once
                link.wrote = True
            elif kind == b"B":  # Bind: portal name, statement name (b"" is the unnamed one)
                name = body.partition(b"\x00")[2].partition(b"\x00")[0]
                if trap.pattern.search(link.statements.get(name, b"")):
                    link.wrote = True

    def _springs(self, link: _Link, data: bytes) -> float | None:
        """When this answer from the server commits what armed the trap: the hold before the drop."""
        trap = self._trap
        if trap is None or not link.wrote:
            return None
        if data.endswith(READY_FAILED):
            link.wrote = False  # rolled back: nothing was committed
            return None
        if not data.endswith(READY_IDLE):
            return None  # still inside the transaction
        link.wrote = False
        trap.times -= 1
        if trap.times <= 0:
            self._trap = None
        self.commit_reached.set()
        return trap.hold

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link, *, to_server: bool
    ) -> None:
        """Copy one direction of a link."""
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                if to_server:
                    self._client_chunk(link, data)
                elif (hold := self._springs(link, data)) is not None:
                    # The server has committed; the client must never learn it.
                    if hold:
                        await asyncio.sleep(hold)
                    self.commits_cut += 1
                    link.abort()
                    return
                else:
                    self.bytes_received += len(data)
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                writer.transport.abort()
