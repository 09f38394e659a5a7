"""Server-sent events, both ways: reading the upstream's streams and writing ours.

Reading: `read_events` parses an upstream's SSE lines into `Event`s and ends where the API
says a stream ends. That rule is per API (`StreamRule`): Chat Completions end with
`data: [DONE]`; the Responses API has no `[DONE]` and ends with its terminal event
(`response.completed`, `response.failed` or `response.incomplete`). A stream that stops
before its end is the upstream's failure, never a clean finish.

Writing: `paced` is the one relay loop every stream of ours runs through. It forwards
items as they arrive, yields `None` (a heartbeat) while the source is silent, and ends
the stream with an error when its deadline passes, even while items keep coming.

Responses: thread and batch event streams are sse-starlette's `EventSourceResponse`
(`EventSource` here), which also pings, watches for the client leaving and ends streams
at server shutdown. The chat completions relay writes OpenAI's wire bytes through
Starlette's plain `StreamingResponse` (`ByteStream`): it forwards the upstream's `data:`
payloads untouched, and the benchmark showed the hand-written path cheaper (README,
"Design notes"). Both run an `on_close` callback once however the response ends,
including a client gone before the first byte, so a call is always settled; then they
give back the stream's open-stream slot (app/streams.py), so the user may open another.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import orjson
from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import AppStatus
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.errors import ErrorCode, GatewayError, Unavailable, UpstreamError
from app.streams import StreamSlot

T = TypeVar("T")

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
HEARTBEAT = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"


# --- reading ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """One upstream event: its `event:` name (None when unnamed) and its `data:` payload."""

    name: str | None
    data: bytes


class StreamRule:
    """How one API's stream ends and reports failure."""

    api = "chat.completions"

    def is_done(self, event: Event) -> bool:
        """A sentinel that ends the stream and is not itself an event (Chat's `[DONE]`)."""
        return event.data == b"[DONE]"

    def is_terminal(self, event: Event) -> bool:
        """An event that is relayed and then ends the stream."""
        return False

    def error(self, event: Event) -> GatewayError | None:
        """The upstream's error, sent as an event after the stream had started."""
        if not event.data.startswith(b'{"error"'):
            return None
        try:
            fields = orjson.loads(event.data).get("error")
        except orjson.JSONDecodeError:
            fields = None
        message = fields.get("message") if isinstance(fields, dict) else None
        return UpstreamError(f"The upstream failed mid-stream: {message or 'unknown error'}")

    def unfinished(self) -> GatewayError:
        return UpstreamError("The upstream ended the stream without [DONE].")


class ResponsesRule(StreamRule):
    """The Responses API: named events, no `[DONE]`; the last event says how the response ended."""

    api = "responses"
    TERMINAL = frozenset({"response.completed", "response.failed", "response.incomplete", "error"})

    def is_done(self, event: Event) -> bool:
        return False

    def is_terminal(self, event: Event) -> bool:
        return event.name in self.TERMINAL

    def error(self, event: Event) -> GatewayError | None:
        return None  # `error` and `response.failed` are relayed to the client as the events they are

    def unfinished(self) -> GatewayError:
        return UpstreamError("The upstream ended the stream before its final response event.")


class ImagesRule(StreamRule):
    """Streamed image generations and edits: named events (`image_generation.partial_image`, ...),
    ending with the `...completed` event of the image (a `[DONE]` after it is taken as the end too).
    An `error` event is the upstream's failure."""

    api = "images"

    TERMINAL = frozenset({"image_generation.completed", "image_edit.completed"})

    def is_terminal(self, event: Event) -> bool:
        return event_type(event) in self.TERMINAL

    def error(self, event: Event) -> GatewayError | None:
        if event.name == "error" or event.data.startswith(b'{"error"'):
            fields = None
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                fields = orjson.loads(event.data).get("error")
            message = fields.get("message") if isinstance(fields, dict) else None
            return UpstreamError(f"The upstream failed mid-stream: {message or 'unknown error'}", billed=True)
        return None

    def unfinished(self) -> GatewayError:
        return UpstreamError("The upstream ended the image stream before the image.", billed=True)


CHAT_COMPLETIONS = StreamRule()
RESPONSES = ResponsesRule()
IMAGES = ImagesRule()


def event_type(event: Event) -> str | None:
    """An event's name, or (an upstream that names none) the `type` of its data."""
    if event.name is not None:
        return event.name
    with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
        kind = orjson.loads(event.data).get("type")
        return kind if isinstance(kind, str) else None
    return None


async def read_events(lines: AsyncIterable[bytes], rule: StreamRule) -> AsyncIterator[Event]:
    """Events from SSE lines, until the rule's end; raises the rule's error when the stream breaks off."""
    name: str | None = None
    data: list[bytes] = []
    async for raw in lines:
        line = raw.rstrip(b"\r\n")
        if line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
            continue
        if line.startswith(b"event:"):
            name = line[6:].strip().decode(errors="replace")
            continue
        if line or not data:
            continue  # comments, ids, retry hints, and blank lines between events
        event = Event(name, b"\n".join(data))
        name, data = None, []
        if rule.is_done(event):
            return
        failure = rule.error(event)
        if failure is not None:
            raise failure
        yield event
        if rule.is_terminal(event):
            return
    raise rule.unfinished()


# --- writing ------------------------------------------------------------------------------


def encode(name: str, data: BaseModel | Mapping[str, Any] | bytes) -> bytes:
    """One named event: `event: name` and a JSON `data:` line."""
    if isinstance(data, BaseModel):
        payload = data.model_dump_json().encode()
    elif isinstance(data, bytes):
        payload = data
    else:
        payload = orjson.dumps(data)
    return b"event: " + name.encode() + b"\ndata: " + payload + b"\n\n"


def server_event(name: str, data: BaseModel | Mapping[str, Any]) -> ServerSentEvent:
    """A named event for an `EventSource` response, its data as JSON."""
    payload = data.model_dump_json() if isinstance(data, BaseModel) else orjson.dumps(data).decode()
    return ServerSentEvent(data=payload, event=name, sep="\n")


class Stopping:
    """Whether the server is shutting down: streams end with an error event instead of being cut.

    uvicorn's exit handler (as patched by sse-starlette, which ends its own event sources the
    same way) sets `AppStatus.should_exit`; `watch` notices it within half a second and
    resolves the one future every running relay waits on beside its source.
    """

    def __init__(self) -> None:
        self.signal: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def watch(self) -> None:
        while not AppStatus.should_exit:  # noqa: ASYNC110  # a flag a signal handler sets: nothing to await
            await asyncio.sleep(0.5)
        if not self.signal.done():
            self.signal.set_result(None)


def shutting_down() -> Unavailable:
    return Unavailable(
        "The gateway is restarting; the stream ended early. Send the request again.",
        code=ErrorCode.SERVICE_UNAVAILABLE,
        headers={"retry-after": "1"},
    )


async def paced(
    source: AsyncIterator[T],
    *,
    heartbeat: float | None,
    deadline: float,
    overtime: Callable[[], GatewayError],
    stopping: Stopping | None = None,
) -> AsyncIterator[T | None]:
    """`source`'s items as they arrive; None after `heartbeat` silent seconds (None: never).

    `deadline` is a `time.monotonic()` instant: past it the relay raises `overtime()`,
    whether the source is silent or still sending; when the server starts shutting down it
    raises `shutting_down()`. The source's pending read is cancelled however the relay ends.
    """
    pending: asyncio.Future[T] | None = None
    stop = stopping.signal if stopping is not None else None
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise overtime()
            if stop is not None and stop.done():
                raise shutting_down()
            if pending is None:
                pending = asyncio.ensure_future(anext(source))
            wait = left if heartbeat is None else min(heartbeat, left)
            waited = (pending,) if stop is None else (pending, stop)
            done, _ = await asyncio.wait(waited, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            if pending not in done:
                if stop is not None and stop.done():
                    raise shutting_down()
                if heartbeat is not None and time.monotonic() < deadline:
                    yield None
                continue
            task, pending = pending, None
            try:
                item = task.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending


OnClose = Callable[[], Awaitable[None]]


async def _closed(body: Any, on_close: OnClose | None, slot: StreamSlot | None) -> None:
    """Close the body generator (its `finally` runs now, not at garbage collection), then `on_close`;
    the stream's slot is given back whatever they did."""
    try:
        with anyio.CancelScope(shield=True):
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(BaseException):
                    await aclose()
            if on_close is not None:
                await on_close()
    finally:
        if slot is not None:
            slot.release()


class ByteStream(StreamingResponse):
    """Bytes written as they come (`text/event-stream`); `on_close` runs once however it ends, then `slot`
    is released."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        *,
        headers: Mapping[str, str],
        on_close: OnClose | None = None,
        slot: StreamSlot | None = None,
    ) -> None:
        super().__init__(content, media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
        self.on_close = on_close
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await _closed(self.body_iterator, self.on_close, self.slot)


class EventSource(EventSourceResponse):
    """sse-starlette's response (pings every `heartbeat` seconds); `on_close` runs once however it ends,
    then `slot` is released."""

    def __init__(
        self,
        content: AsyncIterator[ServerSentEvent | bytes],
        *,
        heartbeat: float,
        headers: Mapping[str, str] | None = None,
        on_close: OnClose | None = None,
        slot: StreamSlot | None = None,
    ) -> None:
        super().__init__(
            content,
            headers={**SSE_HEADERS, **(headers or {})},
            ping=heartbeat,
            sep="\n",
            ping_message_factory=lambda: ServerSentEvent(comment="keep-alive", sep="\n"),
        )
        self.on_close = on_close
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await _closed(self.body_iterator, self.on_close, self.slot)
