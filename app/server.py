"""The HTTP edge: uvicorn's httptools protocol, with limits on what one client connection may hold.

uvicorn by itself cuts only idle keep-alive connections: a client that never finishes its
headers or its body holds a connection forever, and httptools buffers a header of any size
before anyone sees it (a 1.3 MB JWT slowed every other request of the process). `EdgeProtocol`
adds, per connection of a worker process:

- `MAX_HEADER_BYTES`: the request line and headers together. Bytes are counted before the
  parser is fed, and the parser is never fed past the cap: 431, then the connection closes.
- `HEADER_TIMEOUT_SECONDS`: from a request's first byte (a new connection's opening) to the
  end of its headers. Then 408 and close (a connection that sent nothing is just closed).
- `BODY_TIMEOUT_SECONDS`: from the end of the headers to the end of the body, however the
  time went (slow or idle). Then 408, unless a response has started, and close; the app's
  `receive` says the client left.
- `MAX_CONNECTIONS`: connections open at once; one opened past it is answered 503 with
  `retry-after: 1` once its headers are in (the app never sees it), and closed.

uvicorn's `limit_concurrency` is not used: it counts every connection and request task, so
past it every request on every connection, old ones too, gets a text 503 with no retry-after.

Refusals are in the API's error shape (app/errors.py) with `connection: close`; the write
side is then shut and what the client still sends is read and dropped for a moment before
closing (closing with unread bytes would reset the connection, and the client could lose
the answer).

`connection_options` gives uvicorn these and its own two: `timeout_keep_alive`
(`KEEPALIVE_TIMEOUT_SECONDS`) and `forwarded_allow_ips` (`FORWARDED_ALLOW_IPS`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar, TypedDict, cast

import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from app.config import Settings, get_settings
from app.errors import GatewayError, HeadersTooLarge, RequestTimeout, Unavailable

# After a refusal, how long what the client still sends is read and dropped before closing.
LINGER_SECONDS = 2.0

log = logging.getLogger("app.edge")

# What this process's edge refused since it started, by error code (408, 431 and 503 never reach
# the app, so neither its access log nor its request metrics see them): /metrics reads it.
EDGE_REFUSALS: Counter[str] = Counter()


@dataclass(frozen=True)
class EdgeLimits:
    max_header_bytes: int
    header_timeout: float
    body_timeout: float
    max_connections: int

    @classmethod
    def of(cls, settings: Settings) -> EdgeLimits:
        return cls(
            max_header_bytes=settings.max_header_bytes,
            header_timeout=settings.header_timeout_seconds,
            body_timeout=settings.body_timeout_seconds,
            max_connections=settings.max_connections,
        )


@lru_cache(maxsize=1)
def _process_limits() -> EdgeLimits:
    return EdgeLimits.of(get_settings())


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above; one instance per connection."""

    # None: this process's settings (each worker reads its environment, as the app does).
    limits: ClassVar[EdgeLimits | None] = None

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.edge = type(self).limits or _process_limits()
        self.reading_headers = True  # until this request's headers are complete
        self.header_bytes = 0
        self.over_capacity = False
        self.refused = False  # answered (or cut) here: nothing more is parsed
        self.header_deadline: asyncio.TimerHandle | None = None
        self.body_deadline: asyncio.TimerHandle | None = None
        self.linger: asyncio.TimerHandle | None = None

    @classmethod
    def bound(cls, limits: EdgeLimits) -> type[EdgeProtocol]:
        """This protocol with `limits` rather than the settings' (a server in this process, as tests run one)."""
        return cast("type[EdgeProtocol]", type(cls.__name__, (cls,), {"limits": limits}))

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn types it
        super().connection_made(transport)
        self.over_capacity = len(self.connections) > self.edge.max_connections
        self.header_deadline = self.loop.call_later(self.edge.header_timeout, self._headers_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadlines()
        if self.linger is not None:
            self.linger.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        while data and not self.refused:
            if not self.reading_headers:
                super().data_received(data)  # a body, and whatever follows it in this read
                return
            if self.header_deadline is None:  # the first byte of a keep-alive connection's next request
                self.header_deadline = self.loop.call_later(self.edge.header_timeout, self._headers_late)
            room = self.edge.max_header_bytes - self.header_bytes
            head, data = data[:room], data[room:]
            self.header_bytes += len(head)
            if head:
                super().data_received(head)
            if self.transport.is_closing() or self.transport.get_protocol() is not self:
                return  # a 400 from the parser, or a WebSocket took the connection over
            if self.reading_headers and data:
                cap = self.edge.max_header_bytes
                self._refuse(HeadersTooLarge(f"The request's headers are larger than {cap} bytes."))

    # httptools callbacks

    def on_headers_complete(self) -> None:
        self.reading_headers = False
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None
        if self.over_capacity:
            self._refuse(Unavailable("The server is at its connection limit; retry shortly."), retry_after=1)
            return
        previous = self.cycle
        super().on_headers_complete()
        # No new cycle: a WebSocket upgrade. A request queued behind another (pipelined) is not read
        # until that one is answered.
        if self.cycle is not previous and not self.pipeline:
            self.body_deadline = self.loop.call_later(self.edge.body_timeout, self._body_late)

    def on_body(self, body: bytes) -> None:
        if not self.refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self.refused:
            return
        if self.body_deadline is not None:
            self.body_deadline.cancel()
            self.body_deadline = None
        self.reading_headers = True
        self.header_bytes = 0
        super().on_message_complete()

    # Limits

    def _headers_late(self) -> None:
        self.header_deadline = None
        if self.cycle is not None and not self.cycle.response_complete:
            # Pipelined behind a response still going: its reading waits for that one, so wait too.
            self.header_deadline = self.loop.call_later(self.edge.header_timeout, self._headers_late)
        elif self.header_bytes == 0:
            self._close()  # nothing sent: nothing to answer
        else:
            self._refuse(RequestTimeout(f"The request's headers did not arrive within {self.edge.header_timeout:g} s."))

    def _body_late(self) -> None:
        self.body_deadline = None
        timeout = self.edge.body_timeout
        self._refuse(RequestTimeout(f"The request's body did not arrive within {timeout:g} s."))

    def _refuse(self, error: GatewayError, retry_after: int | None = None) -> None:
        """Answer `error` and close, or only close when a response on this connection has started."""
        if self.refused or self.transport.is_closing():
            return
        self.refused = True
        EDGE_REFUSALS[str(error.code)] += 1
        log.info("refused a request from %s: %s", self.client[0] if self.client else "unknown", error.code)
        self._cancel_deadlines()
        self.pipeline.clear()
        cycle = self.cycle
        started = cycle is not None and cycle.response_started and not cycle.response_complete
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() reports the client gone; its send() writes nothing
            cycle.message_event.set()
        if started:
            self._close()
            return
        body = orjson.dumps(error.body())
        head = [STATUS_LINE[error.status_code]]
        extra = [(b"retry-after", str(retry_after).encode())] if retry_after is not None else []
        for name, value in [*self.server_state.default_headers, *extra]:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\ncontent-length: ",
            str(len(body)).encode(),
            b"\r\nconnection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(head))
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()  # the answer, then FIN; what the client still sends is read and dropped
        self.flow.resume_reading()
        self.linger = self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def _close(self) -> None:
        self.refused = True
        self._cancel_deadlines()
        if not self.transport.is_closing():
            self.transport.close()

    def _cancel_deadlines(self) -> None:
        for deadline in (self.header_deadline, self.body_deadline):
            if deadline is not None:
                deadline.cancel()
        self.header_deadline = self.body_deadline = None


class ConnectionOptions(TypedDict):
    http: type[EdgeProtocol]
    timeout_keep_alive: int
    proxy_headers: bool
    forwarded_allow_ips: str


def connection_options(settings: Settings, *, in_process: bool = False) -> ConnectionOptions:
    """uvicorn's arguments for connections, from `settings`.

    `serve` passes the protocol class itself: with several workers uvicorn pickles its config
    into each, and every worker reads its limits from its own settings. A server run inside
    this process (`in_process`, as tests do) gets a class bound to `settings`' limits instead.
    """
    protocol = EdgeProtocol.bound(EdgeLimits.of(settings)) if in_process else EdgeProtocol
    return {
        "http": protocol,
        "timeout_keep_alive": settings.keepalive_timeout_seconds,
        "proxy_headers": True,
        "forwarded_allow_ips": settings.forwarded_allow_ips,
    }
