"""One loopback TCP proxy for the tests: it can count what clients send (round trips, bytes) and cut connections."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from urllib.parse import urlsplit, urlunsplit


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target.

    `cut()` drops every connection and refuses new ones until `restore()`, to make Postgres
    unreachable for real. While `counting` is on, each chunk a client sends is logged in
    `writes` (connection number, first bytes): with a request/response protocol such as
    Postgres's, one client write is one round trip. `bytes_sent` / `bytes_received` count
    all traffic from and to the clients.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.open = True
        self.counting = False
        self.writes: list[tuple[int, bytes]] = []
        self.bytes_sent = 0
        self.bytes_received = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
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
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def cut(self) -> None:
        self.open = False
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.open = True

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
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        connection = next(self._connections)
        self._writers.update((writer, upstream_writer))
        await asyncio.gather(
            self._pipe(reader, upstream_writer, connection),
            self._pipe(upstream_reader, writer, None),
            return_exceptions=True,
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: int | None) -> None:
        """Copy one direction; `client` is the connection number when this is the client's side, else None."""
        try:
            while data := await reader.read(65536):
                if client is None:
                    self.bytes_received += len(data)
                else:
                    self.bytes_sent += len(data)
                    if self.counting:
                        self.writes.append((client, data[:64]))
                writer.write(data)
                await writer.drain()
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.transport.abort()
