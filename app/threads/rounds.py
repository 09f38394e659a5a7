"""One round of a run: one upstream call, relayed as the Assistants API's events and stored once.

A round is planned in the request (its prompt built, its worst case reserved: app/threads/runs.py)
and executed here, by a background task or as the response's event stream; both read the same
`events()`. The upstream is always called streaming, so whatever it wrote so far is at hand
however the round ends. In order:

- the prelude the request chose (`thread.created`, `thread.run.created`, `thread.run.queued`);
- `thread.run.in_progress`, once the run is marked so (a run cancelled while queued ends here);
- the first text creates the reply (a `message_creation` step and an `in_progress` message:
  `thread.run.step.created`, `thread.run.step.in_progress`, `thread.message.created`,
  `thread.message.in_progress`), then `thread.message.delta` per piece; the first tool call
  creates a `tool_calls` step, then `thread.run.step.delta` per piece;
- the end, stored in one transaction: `thread.message.completed` (or `.incomplete`), the
  step's end, and the run's: `thread.run.completed`, `.incomplete`, `.requires_action`,
  `.failed` or `.cancelled`.

`settle` (the response's close, or the task's end) concludes a round the events did not: a
client that went away leaves the partial reply stored `incomplete` and the run `cancelled`.
Concluding is shielded from the cancellation a disconnect delivers.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, TypeVar

import anyio
import orjson
from pydantic import BaseModel
from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.calls import Call, Calls
from app.db import DB_ERRORS
from app.errors import ErrorCode, GatewayError, UpstreamError, UpstreamTimeout
from app.models import RunStep, Thread, ThreadMessage, ThreadRun
from app.models.threads import StepStatus
from app.sse import Stopping, paced
from app.threads import repository
from app.threads.file_search import Citations, Searched
from app.threads.ids import MESSAGE, STEP, public_id
from app.threads.objects import message_object, run_object, step_object
from app.upstream.provider import EventStream
from app.usage.record import Status

log = logging.getLogger("app.threads.rounds")

T = TypeVar("T")
# How long storing a round's end may take once the upstream's part is over (it runs shielded).
STORE_DEADLINE_SECONDS = 15.0

Outcome = Literal["completed", "incomplete", "requires_action", "failed", "cancelled"]
# What a round yields: an event's name and its data (the stream serializes it; a background task does not).
RunEvent = tuple[str, BaseModel | dict[str, Any]]


def round_timeout() -> UpstreamTimeout:
    return UpstreamTimeout("The run exceeded its time limit.", code=ErrorCode.RUN_TIMEOUT)


class RunSignal(Stopping):
    """Ends one run's upstream read: when the server shuts down (as every stream's), or when the run is
    cancelled (`cancel`, from this process or another's NOTIFY)."""

    def __init__(self, server: Stopping) -> None:
        super().__init__()
        self.cancelled = False
        self.server = server
        server.signal.add_done_callback(self.stop)

    def stop(self, _: object = None) -> None:
        """End the upstream read (the server stops, or `RunEngine.stop`)."""
        if not self.signal.done():
            self.signal.set_result(None)

    def cancel(self) -> None:
        self.cancelled = True
        self.stop()

    def close(self) -> None:
        self.server.signal.remove_done_callback(self.stop)


@dataclass(slots=True, kw_only=True)
class Plan:
    """A round as the request prepared it: the run (as stored once written), the call that answers it
    (reserved), the payload, and the events that open its stream."""

    run: ThreadRun
    call: Call
    payload: dict[str, Any]
    stream: bool
    prelude: list[RunEvent] = field(default_factory=list)
    thread: Thread | None = None  # a thread the request makes (create-and-run)
    searched: Searched | None = None  # what file_search found for the round's prompt


@dataclass(slots=True)
class ToolCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)

    def as_api(self, output: str | None = None) -> dict[str, Any]:
        function = {"name": self.name, "arguments": "".join(self.arguments), "output": output}
        return {"id": self.id, "type": "function", "function": function}


class Round:
    def __init__(
        self,
        plan: Plan,
        calls: Calls,
        sessions: async_sessionmaker[AsyncSession],
        autocommit: async_sessionmaker[AsyncSession],
        signal: RunSignal,
        *,
        deadline: float,
        action_timeout: float,
    ) -> None:
        self.plan = plan
        self.run = plan.run
        self.call = plan.call
        self.calls = calls
        self.sessions = sessions
        self.autocommit = autocommit  # for single statements
        self.signal = signal
        self.deadline = deadline
        self.action_timeout = action_timeout
        self.stream: EventStream | None = None
        self.invoked = False
        self.started = False
        self.concluded = False
        self.parts: list[str] = []
        self.tool_calls: dict[int, ToolCall] = {}
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.first_token_at: float | None = None
        self.message: ThreadMessage | None = None
        self.message_step: RunStep | None = None
        self.tool_step: RunStep | None = None
        searched = plan.searched
        self.citations = Citations(searched) if searched is not None and searched.results else None

    # --- the events ---------------------------------------------------------------------

    async def events(self) -> AsyncIterator[RunEvent]:
        self.started = True
        for event in self.plan.prelude:
            yield event
        if not await self._begin():
            for event in await self._conclude("cancelled", None):
                yield event
            return
        yield "thread.run.in_progress", run_object(self.run)
        if self.plan.searched is not None and not self.plan.searched.recorded:
            for event in await self._search_step(self.plan.searched):
                yield event
        try:
            self.invoked = True
            self.stream = await self.calls.invoke(
                self.call, lambda provider: self._within(provider.chat_stream(self.plan.payload)), stream=True
            )
            self.call.attach(self.stream)
            async for chunk in paced(
                self.stream.events(),
                heartbeat=None,
                deadline=self.deadline,
                overtime=round_timeout,
                stopping=self.signal,
            ):
                if chunk is not None:
                    for created in await self._take(chunk.data):
                        yield created
        except GatewayError as failure:
            outcome: Outcome = "cancelled" if self.signal.cancelled else "failed"
            for event in await self._conclude(outcome, failure):
                yield event
            return
        for event in await self._conclude(self._success(), None):
            yield event

    async def settle(self) -> None:
        """Conclude what the events did not: a client gone mid-stream (or before it began), a task cancelled."""
        self.signal.close()
        if self.concluded:
            return
        log.info("run %s ended without its events (client gone): cancelled", self.run.id)
        await self._conclude("cancelled", None)

    def _success(self) -> Outcome:
        if self.tool_calls:
            return "requires_action"
        return "incomplete" if self.finish_reason == "length" else "completed"

    async def _within(self, call: Awaitable[T]) -> T:
        try:
            with anyio.fail_after(max(self.deadline - time.monotonic(), 0.0)):
                return await call
        except TimeoutError as timeout:
            raise round_timeout() from timeout

    async def _begin(self) -> bool:
        """Mark the run in progress; False when it was cancelled while queued (or its thread deleted)."""
        now = datetime.now(UTC)
        async with self.autocommit() as session:
            started = await repository.set_run(
                session,
                self.run.id,
                ThreadRun.status == "queued",
                status="in_progress",
                started_at=self.run.started_at or now,
            )
        if started:
            self.run.status, self.run.started_at = "in_progress", self.run.started_at or now
        return started

    # --- what the upstream sends --------------------------------------------------------

    async def _take(self, data: bytes) -> list[RunEvent]:
        """The events one chunk makes: text deltas, tool-call deltas, and what their first piece creates."""
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError as error:
            raise UpstreamError("The upstream sent a stream event that is not JSON.") from error
        if not isinstance(chunk, dict):
            raise UpstreamError("The upstream sent a stream event that is not a JSON object.")
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        choices = chunk.get("choices")
        if not choices or not isinstance(choices[0], dict):
            return []
        choice = choices[0]
        self.finish_reason = choice.get("finish_reason") or self.finish_reason
        delta = choice.get("delta") or {}
        events: list[RunEvent] = []
        content = delta.get("content")
        if content:
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            if self.message is None:
                events += await self._open_message()
            self.parts.append(str(content))
            events.append(("thread.message.delta", self._message_delta(str(content))))
        for piece in delta.get("tool_calls") or ():
            if isinstance(piece, dict):
                if self.tool_step is None:
                    events += await self._open_tool_step()
                events.append(("thread.run.step.delta", self._tool_delta(piece)))
        return events

    def _message_delta(self, piece: str) -> dict[str, Any]:
        assert self.message is not None
        text = {"value": piece, "annotations": self.citations.feed(piece) if self.citations else []}
        return {
            "id": public_id(MESSAGE, self.message.id),
            "object": "thread.message.delta",
            "delta": {"content": [{"index": 0, "type": "text", "text": text}]},
        }

    def _tool_delta(self, piece: dict[str, Any]) -> dict[str, Any]:
        assert self.tool_step is not None
        index = piece.get("index", 0)
        index = index if isinstance(index, int) else 0
        call = self.tool_calls.setdefault(index, ToolCall())
        function = piece.get("function") or {}
        call.id = str(piece.get("id") or call.id)
        call.name = str(function.get("name") or call.name)
        if function.get("arguments"):
            call.arguments.append(str(function["arguments"]))
        delta_call: dict[str, Any] = {"index": index, "type": "function", "function": {}}
        if piece.get("id"):
            delta_call["id"] = call.id
        if function.get("name"):
            delta_call["function"]["name"] = call.name
        delta_call["function"]["arguments"] = str(function.get("arguments") or "")
        return {
            "id": public_id(STEP, self.tool_step.id),
            "object": "thread.run.step.delta",
            "delta": {"step_details": {"type": "tool_calls", "tool_calls": [delta_call]}},
        }

    def _step(self, kind: str, details: dict[str, Any]) -> RunStep:
        return RunStep(
            id=uuid.uuid4(),
            run_id=self.run.id,
            thread_id=self.run.thread_id,
            assistant_id=self.run.assistant_id,
            type=kind,
            status="in_progress",
            step_details=details,
        )

    async def _open_message(self) -> list[RunEvent]:
        message_id = uuid.uuid4()
        step = self._step(
            "message_creation",
            {"type": "message_creation", "message_creation": {"message_id": public_id(MESSAGE, message_id)}},
        )
        message = ThreadMessage(
            id=message_id,
            thread_id=self.run.thread_id,
            role="assistant",
            content="",
            status="in_progress",
            run_id=self.run.id,
            assistant_id=self.run.assistant_id,
            model=self.call.model,
            simulated=self.call.simulated,
        )
        async with self.sessions.begin() as session:
            session.add(step)
            await session.flush()
            await repository.add_messages(session, [message])
        self.message, self.message_step = message, step
        return [
            ("thread.run.step.created", step_object(step)),
            ("thread.run.step.in_progress", step_object(step)),
            ("thread.message.created", message_object(message)),
            ("thread.message.in_progress", message_object(message)),
        ]

    async def _search_step(self, searched: Searched) -> list[RunEvent]:
        """The round's file_search, done before the call: a completed `tool_calls` step."""
        step = self._step("tool_calls", searched.step_details())
        step.status, step.ended_at = "completed", datetime.now(UTC)
        async with self.autocommit() as session:
            session.add(step)
            await session.flush()
        shown = step_object(step, include_content=False)
        in_progress = shown.model_copy(update={"status": "in_progress", "completed_at": None})
        return [
            ("thread.run.step.created", in_progress),
            ("thread.run.step.in_progress", in_progress),
            ("thread.run.step.completed", shown),
        ]

    async def _open_tool_step(self) -> list[RunEvent]:
        step = self._step("tool_calls", {"type": "tool_calls", "tool_calls": []})
        async with self.autocommit() as session:
            session.add(step)
            await session.flush()
        self.tool_step = step
        return [("thread.run.step.created", step_object(step)), ("thread.run.step.in_progress", step_object(step))]

    # --- the end ------------------------------------------------------------------------

    async def _conclude(self, outcome: Outcome, error: GatewayError | None) -> list[RunEvent]:
        """Record the call, store the round's end in one transaction, and return its events; once."""
        if self.concluded:
            return []
        self.concluded = True
        call = self.call
        text = "".join(self.parts)
        if not self.invoked:
            call.give_back()  # the upstream was never called
        else:
            status: Status = "cancelled" if outcome == "cancelled" else ("error" if error else call.answered_status)
            call.finish(
                call.token_spend(self.usage, len(text)),
                status=status,
                http_status=499 if outcome == "cancelled" else 200,
                stream=True,
                ttft_ms=(self.first_token_at - call.started) * 1000 if self.first_token_at else None,
                upstream_request_id=self.stream.request_id if self.stream else None,
                error_code=error.code if error else None,
            )
        with anyio.CancelScope(shield=True), anyio.move_on_after(STORE_DEADLINE_SECONDS):
            try:
                return await self._store(outcome, error, text)
            except (SQLAlchemyError, *DB_ERRORS) as failure:
                log.error("could not store the end of run %s (the sweep will fail it): %s", self.run.id, failure)
        return [("error", _error_body("The run's outcome could not be stored."))]

    async def _store(self, outcome: Outcome, error: GatewayError | None, text: str) -> list[RunEvent]:
        run, row = self.run, self.call.row
        prompt = row.prompt_tokens if row else 0
        completion = row.completion_tokens if row else 0
        cost = row.cost_usd if row else 0.0
        now = datetime.now(UTC)
        events: list[RunEvent] = []
        values: dict[str, Any] = {"status": outcome, "owner": None, "simulated": run.simulated or self.call.simulated}
        if outcome == "requires_action":
            calls = [call.as_api() for _, call in sorted(self.tool_calls.items())]
            values["required_action"] = {
                "type": "submit_tool_outputs",
                "submit_tool_outputs": {"tool_calls": [{**call, "function": _without_output(call)} for call in calls]},
            }
            values["expires_at"] = now + timedelta(seconds=self.action_timeout)
            said: dict[str, Any] = {"role": "assistant", "content": text or None}
            said["tool_calls"] = [{**call, "function": _without_output(call)} for call in calls]
            values["rounds"] = [*run.rounds, said]
        elif outcome == "completed":
            values["completed_at"] = now
        elif outcome == "incomplete":
            values["incomplete_reason"] = "max_completion_tokens"
        elif outcome == "cancelled":
            values["cancelled_at"] = now
        else:
            values["failed_at"] = now
            values["last_error"] = _last_error(error)
        message_reason = {"incomplete": "max_tokens", "cancelled": "run_cancelled", "failed": "run_failed"}.get(outcome)
        step_status: StepStatus = {"cancelled": "cancelled", "failed": "failed"}.get(outcome, "completed")  # type: ignore[assignment]
        async with self.sessions.begin() as session:
            if self.message is not None and self.message_step is not None:
                message = self.message
                message.content, message.completed_at = text, now
                if self.citations is not None and self.citations.annotations:
                    message.parts = [{"type": "text", "text": text, "annotations": self.citations.annotations}]
                message.status = "incomplete" if message_reason else "completed"
                message.incomplete_reason = message_reason
                message.prompt_tokens, message.completion_tokens = prompt, completion
                message.cost_usd = Decimal(str(round(0.0 if self.call.simulated else cost, 8)))
                message.simulated = self.call.simulated
                await session.execute(
                    update(ThreadMessage)
                    .where(ThreadMessage.id == message.id)
                    .values(
                        content=text,
                        parts=message.parts,
                        status=message.status,
                        incomplete_reason=message_reason,
                        prompt_tokens=prompt,
                        completion_tokens=completion,
                        cost_usd=message.cost_usd,
                        simulated=message.simulated,
                        completed_at=now,
                    )
                )
                usage = None if self.tool_step else (prompt, completion)
                await self._end_step(session, self.message_step, step_status, now, usage)
            if self.tool_step is not None:
                self.tool_step.step_details = {
                    "type": "tool_calls",
                    "tool_calls": [call.as_api() for _, call in sorted(self.tool_calls.items())],
                }
                if outcome == "requires_action":
                    self.tool_step.prompt_tokens, self.tool_step.completion_tokens = prompt, completion
                    await session.execute(
                        update(RunStep)
                        .where(RunStep.id == self.tool_step.id)
                        .values(
                            step_details=self.tool_step.step_details, prompt_tokens=prompt, completion_tokens=completion
                        )
                    )
                else:
                    await self._end_step(session, self.tool_step, step_status, now, (prompt, completion))
            spend = (prompt, completion, 0.0 if self.call.simulated else cost)
            stored, ended = await repository.end_run(session, run.id, spend, **values)
            if not ended:
                log.info("run %s was ended elsewhere (swept, or its thread deleted)", run.id)
        if stored is not None:
            self.run = stored
        if self.message is not None and self.message_step is not None:
            name = "thread.message.completed" if self.message.status == "completed" else "thread.message.incomplete"
            events.append((name, message_object(self.message)))
            events.append((f"thread.run.step.{self.message_step.status}", step_object(self.message_step)))
        if self.tool_step is not None and self.tool_step.status != "in_progress":
            events.append((f"thread.run.step.{self.tool_step.status}", step_object(self.tool_step)))
        events.append((f"thread.run.{self.run.status}", run_object(self.run)))
        return events

    @staticmethod
    async def _end_step(
        session: AsyncSession, step: RunStep, status: StepStatus, now: datetime, usage: tuple[int, int] | None
    ) -> None:
        step.status, step.ended_at = status, now
        if usage is not None:
            step.prompt_tokens, step.completion_tokens = usage
        await session.execute(
            update(RunStep)
            .where(RunStep.id == step.id)
            .values(
                status=status,
                ended_at=now,
                step_details=step.step_details,
                prompt_tokens=step.prompt_tokens,
                completion_tokens=step.completion_tokens,
            )
        )


def _without_output(call: dict[str, Any]) -> dict[str, Any]:
    return {"name": call["function"]["name"], "arguments": call["function"]["arguments"]}


def _last_error(error: GatewayError | None) -> dict[str, str]:
    if error is None:
        return {"code": "server_error", "message": "The run failed."}
    code = "rate_limit_exceeded" if error.status_code == 429 else "server_error"
    return {"code": code, "message": error.message}


def _error_body(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "server_error", "code": ErrorCode.REPLY_NOT_STORED}}
