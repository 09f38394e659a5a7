"""A streamed turn as named server-sent events, and storing its reply however the stream ends.

Events, in order: `message.created` (the stored user message), `message.created` (the
reply, `in_progress`), `message.delta`... (pieces of the reply's text), then
`message.completed` (the stored reply with usage, the same body as a plain turn's
answer) or `error` (our error body; the partial reply is stored as `incomplete`), and
last `done`. The event source pings (`: keep-alive`) while the upstream is silent.

The reply is stored once, by whoever ends the stream: the event generator when the
upstream finishes or fails, or `settle` (the response's close) when the client went
away (its partial text is stored as `incomplete`, reason `client_disconnected`).
Storing is shielded from the cancellation that a disconnect delivers.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import anyio
import orjson
from sqlalchemy.exc import SQLAlchemyError
from sse_starlette import ServerSentEvent

from app.db import DB_ERRORS
from app.errors import ErrorCode, GatewayError, Unavailable, UpstreamError
from app.sse import Stopping, paced, server_event
from app.threads.replies import ReplyStore
from app.threads.schemas import MessageDelta, MessagePublic, TurnDone, TurnResult
from app.threads.turn import Turn
from app.upstream.provider import EventStream
from app.usage.record import Status

log = logging.getLogger("app.threads.stream")

# How long storing a reply may take once the stream has ended (it runs shielded).
STORE_DEADLINE_SECONDS = 15.0


class TurnRelay:
    """Relays one upstream stream to the client and stores the reply once."""

    def __init__(
        self,
        turn: Turn,
        stream: EventStream,
        replies: ReplyStore,
        *,
        deadline: float,
        overtime: Callable[[], GatewayError],
        stopping: Stopping,
    ) -> None:
        self.stopping = stopping
        self.turn = turn
        self.stream = stream
        self.replies = replies
        self.deadline = deadline
        self.overtime = overtime
        self.message_id = uuid.uuid4()
        self.parts: list[str] = []
        self.usage: dict[str, Any] | None = None
        self.first_token_at: float | None = None
        self.started = False
        self.concluded = False

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
            model=turn.call.model,
            simulated=turn.call.simulated,
            created_at=datetime.now(UTC),
        )

    async def events(self) -> AsyncIterator[ServerSentEvent]:
        self.started = True
        turn = self.turn
        yield server_event("message.created", MessagePublic.of(turn.user_message))
        yield server_event("message.created", self._in_progress())
        try:
            async for event in paced(
                self.stream.events(),
                heartbeat=None,
                deadline=self.deadline,
                overtime=self.overtime,
                stopping=self.stopping,
            ):
                piece = self._take(event.data) if event is not None else None
                if piece:
                    delta = MessageDelta(id=self.message_id, thread_id=turn.thread_id, content=piece)
                    yield server_event("message.delta", delta)
        except GatewayError as failure:
            await self._conclude("incomplete", failure.code or ErrorCode.UPSTREAM_ERROR, failure)
            yield server_event("error", failure.body())
            yield server_event("done", TurnDone(status="incomplete", message_id=self.message_id))
            return
        result = await self._conclude("completed", None, None)
        if isinstance(result, GatewayError):
            yield server_event("error", result.body())
            yield server_event("done", TurnDone(status="incomplete", message_id=self.message_id))
            return
        yield server_event("message.completed", result)
        yield server_event("done", TurnDone(status="completed", message_id=self.message_id))

    def _take(self, data: bytes) -> str | None:
        """Note a chunk's usage and return its text, if any."""
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError as error:
            raise UpstreamError("The upstream sent a stream event that is not JSON.") from error
        if not isinstance(chunk, dict):
            raise UpstreamError("The upstream sent a stream event that is not a JSON object.")
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
        return str(content)

    async def _conclude(
        self, status: str, reason: str | None, error: GatewayError | None, *, cancelled: bool = False
    ) -> TurnResult | GatewayError:
        """Record the call and store the reply (the text so far), once; shielded from cancellation."""
        self.concluded = True
        call = self.turn.call
        text = "".join(self.parts)
        outcome: Status = "cancelled" if cancelled else ("error" if error else call.answered_status)
        call.finish(
            call.token_spend(self.usage, len(text)),
            status=outcome,
            stream=True,
            ttft_ms=(self.first_token_at - call.started) * 1000 if self.first_token_at else None,
            upstream_request_id=self.stream.request_id,
            error_code=error.code if error else None,
        )
        with anyio.CancelScope(shield=True), anyio.move_on_after(STORE_DEADLINE_SECONDS):
            try:
                return await self.replies.store(
                    self.turn, text=text, status=status, reason=reason, message_id=self.message_id
                )
            except GatewayError as failure:
                return failure
            except (SQLAlchemyError, *DB_ERRORS) as failure:
                log.error("could not store the reply of thread %s: %s", self.turn.thread_id, failure)
        return Unavailable("The reply could not be stored; it is lost.", code=ErrorCode.REPLY_NOT_STORED)

    async def settle(self) -> None:
        """Whatever the generator did not finish: a client gone mid-stream, or before it began."""
        if self.concluded:
            return
        turn = self.turn
        if not self.started:
            # Not one event reached the client: the turn leaves no trace, like a failed plain turn.
            self.concluded = True
            turn.call.finish(status="cancelled", stream=True, upstream_request_id=self.stream.request_id)
            await self.replies.abandon(turn.thread_id, turn.lock, turn.user_message.id)
            return
        log.info("client left thread %s mid-stream; storing the partial reply", turn.thread_id)
        await self._conclude("incomplete", "client_disconnected", None, cancelled=True)
