"""A streamed turn as named server-sent events, and storing its reply however the stream ends.

Events, in order: `message.created` (the stored user message), `message.created` (the
reply, `in_progress`), `message.delta`... (pieces of the reply's text), then
`message.completed` (the stored reply with usage, the same body as a plain turn's
answer) or `error` (our error body; the partial reply is stored as `incomplete`), and
last `done`. Comment lines (`: keep-alive`) keep idle connections open.

The reply is stored by whoever ends the stream: the event generator when the upstream
finishes or fails, or the response's `finally` when the client went away (its partial
text is stored as `incomplete`, reason `client_disconnected`). Storing is shielded
from the cancellation that a disconnect delivers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import orjson
from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.db import DB_ERRORS
from app.errors import GatewayError, Unavailable, UpstreamTimeout
from app.threads.calls import Turn
from app.threads.schemas import MessageDelta, MessagePublic, TurnDone, TurnResult
from app.upstream.provider import EventStream
from app.usage.record import Status

if TYPE_CHECKING:
    from app.threads.turns import TurnRunner  # which builds this module's relays

log = logging.getLogger("app.threads.stream")

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
HEARTBEAT = b": keep-alive\n\n"
# How long storing a reply may take once the stream has ended (it runs shielded).
STORE_DEADLINE_SECONDS = 15.0


def sse(name: str, data: BaseModel | dict[str, Any]) -> bytes:
    payload = data.model_dump_json().encode() if isinstance(data, BaseModel) else orjson.dumps(data)
    return b"event: " + name.encode() + b"\ndata: " + payload + b"\n\n"


class TurnRelay:
    """Relays one upstream stream to the client and stores the reply once."""

    def __init__(self, runner: TurnRunner, turn: Turn, stream: EventStream) -> None:
        self.runner = runner
        self.turn = turn
        self.stream = stream
        self.message_id = uuid.uuid4()
        self.parts: list[str] = []
        self.usage: dict[str, Any] | None = None
        self.first_token_at: float | None = None
        self.started = False
        self.concluded = False
        self.pending: asyncio.Task[bytes] | None = None

    def _in_progress(self) -> MessagePublic:
        turn = self.turn
        return MessagePublic(
            id=self.message_id,
            thread_id=turn.thread_id,
            role="assistant",
            content="",
            status="in_progress",
            chat_type=turn.user_message.chat_type,
            goal_id=turn.user_message.goal_id,
            model=turn.spec.id,
            simulated=turn.simulated,
            created_at=datetime.now(UTC),
        )

    async def events(self) -> AsyncIterator[bytes]:
        self.started = True
        turn = self.turn
        yield sse("message.created", MessagePublic.of(turn.user_message))
        yield sse("message.created", self._in_progress())
        heartbeat = self.runner.settings.stream_heartbeat_seconds
        upstream = self.stream.events()
        try:
            while True:
                left = self.runner.time_left(turn)
                if left <= 0:
                    raise UpstreamTimeout("The turn exceeded its time limit.", code="turn_timeout")
                if self.pending is None:
                    self.pending = asyncio.ensure_future(anext(upstream))
                done, _ = await asyncio.wait((self.pending,), timeout=min(heartbeat, left))
                if not done:
                    yield HEARTBEAT
                    continue
                task, self.pending = self.pending, None
                try:
                    data = task.result()
                except StopAsyncIteration:
                    break
                piece = self._take(data)
                if piece:
                    yield sse(
                        "message.delta", MessageDelta(id=self.message_id, thread_id=turn.thread_id, content=piece)
                    )
        except GatewayError as failure:
            await self._conclude("incomplete", failure.code or "upstream_error", failure)
            yield sse("error", failure.body())
            yield sse("done", TurnDone(status="incomplete", message_id=self.message_id))
            return
        result = await self._conclude("completed", None, None)
        if isinstance(result, GatewayError):
            yield sse("error", result.body())
            yield sse("done", TurnDone(status="incomplete", message_id=self.message_id))
            return
        yield sse("message.completed", result)
        yield sse("done", TurnDone(status="completed", message_id=self.message_id))

    def _take(self, data: bytes) -> str | None:
        """Note a chunk's usage and return its text, if any."""
        chunk = orjson.loads(data)
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        choices = chunk.get("choices")
        if not choices:
            return None
        content = (choices[0].get("delta") or {}).get("content")
        if not content:
            return None
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.parts.append(content)
        return content

    def _drop_upstream(self) -> None:
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
        self.stream.close()

    async def _conclude(
        self, status: str, reason: str | None, error: GatewayError | None, *, cancelled: bool = False
    ) -> TurnResult | GatewayError:
        """Store the reply (text so far) and record usage, once; shielded from cancellation."""
        self.concluded = True
        self._drop_upstream()
        turn = self.turn
        usage_status: Status = "cancelled" if cancelled else ("error" if error else turn.status)
        with anyio.CancelScope(shield=True), anyio.move_on_after(STORE_DEADLINE_SECONDS):
            try:
                return await self.runner.conclude(
                    turn,
                    text="".join(self.parts),
                    status=status,
                    reason=reason,
                    usage=self.usage,
                    usage_status=usage_status,
                    upstream_request_id=self.stream.request_id,
                    stream=True,
                    ttft_ms=(self.first_token_at - turn.started) * 1000 if self.first_token_at else None,
                    error=error,
                    message_id=self.message_id,
                )
            except GatewayError as failure:
                return failure
            except (SQLAlchemyError, *DB_ERRORS) as failure:
                log.error("could not store the reply of thread %s: %s", turn.thread_id, failure)
        return Unavailable("The reply could not be stored; it is lost.", code="reply_not_stored")

    async def settle(self) -> None:
        """Whatever the generator did not finish: a client gone mid-stream, or before it began."""
        if self.concluded:
            return
        if not self.started:
            # Not one event reached the client: the turn leaves no trace, like a failed plain turn.
            self.concluded = True
            self._drop_upstream()
            self.runner.usage.record(self.turn.record(status="cancelled", http_status=200, stream=True))
            await self.runner.abandon(self.turn)
            return
        log.info("client left thread %s mid-stream; storing the partial reply", self.turn.thread_id)
        await self._conclude("incomplete", "client_disconnected", None, cancelled=True)


class TurnEventsResponse(StreamingResponse):
    """The event stream of a turn, which settles the turn however the response ends."""

    def __init__(self, relay: TurnRelay, headers: dict[str, str]) -> None:
        super().__init__(relay.events(), media_type="text/event-stream", headers=headers)
        self.relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                # An abandoned generator is not closed by `async for`; close it now, not at GC.
                with contextlib.suppress(BaseException):
                    await self.body_iterator.aclose()  # type: ignore[attr-defined]
                await self.relay.settle()
