"""A turn: lock the thread, store the user message, build the prompt, ask the upstream, store the reply.

No transaction is held across the upstream call. The first transaction takes the
thread's turn lock, reads the history and stores the user message (a refusal there rolls
all of it back); the reply is stored later by one statement that also releases the lock.
Database statements per turn: one read (lock + history + cached context) and the two
inserts it must make, plus the context cache upsert when a context URL was called. A
turn that fails before any reply removes its user message (`abandon`).

Single statements run on an autocommit session (`writes`): BEGIN and COMMIT around one
statement would be two more round trips that buy nothing.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar

import anyio
import orjson
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.responses import Response

from app.auth.principal import Principal
from app.config import Settings
from app.db import DB_ERRORS
from app.errors import Conflict, GatewayError, InvalidRequest, NotFound, UpstreamTimeout
from app.models import ThreadMessage
from app.ratelimit.limiter import Limiter
from app.registry import Catalog, ModelSpec
from app.threads import repository
from app.threads.calls import Turn
from app.threads.context import ContextSource, check_sent_context
from app.threads.profiles import Profile, Profiles
from app.threads.prompt import HistoryItem, PromptValues, build_messages, expand_shortcut
from app.threads.schemas import MessageCreate, MessagePublic, TurnResult
from app.threads.stream import SSE_HEADERS, TurnEventsResponse, TurnRelay
from app.upstream.http import UpstreamReply
from app.upstream.provider import ChatBackend, EventStream, Upstream
from app.upstream.simulated import chars_to_tokens, prompt_chars
from app.usage.record import Status
from app.usage.writer import UsageWriter

T = TypeVar("T")

log = logging.getLogger("app.threads")

# Reserved against the token limit when a profile sets no completion cap; settled after.
DEFAULT_RESERVED_COMPLETION = 512
# A turn lock older than the turn time limit plus this is a dead process's: it may be taken over.
LOCK_MARGIN_SECONDS = 60.0


def thread_not_found(thread_id: uuid.UUID) -> NotFound:
    return NotFound(f"No thread found with id '{thread_id}'.", param="thread_id", code="thread_not_found")


class TurnRunner:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        profiles: Profiles,
        limiter: Limiter,
        upstream: Upstream,
        usage: UsageWriter,
        sessionmaker: async_sessionmaker[AsyncSession],
        writes: async_sessionmaker[AsyncSession],
        context: ContextSource,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.profiles = profiles
        self.limiter = limiter
        self.upstream = upstream
        self.usage = usage
        self.sessionmaker = sessionmaker
        self.writes = writes
        self.context = context
        self.stale_after = settings.thread_turn_timeout + LOCK_MARGIN_SECONDS

    def resolve_model(self, principal: Principal, profile: Profile) -> ModelSpec:
        try:
            return self.catalog.resolve(profile.model, principal.tier, "chat")
        except InvalidRequest as error:
            raise InvalidRequest(
                f"Profile '{profile.name}' answers with model '{profile.model}', which your tier cannot use.",
                param="profile",
                code="model_not_found",
            ) from error

    async def run(self, principal: Principal, thread_id: uuid.UUID, body: MessageCreate, request_id: str) -> Response:
        started = time.perf_counter()
        turn_profile = self.profiles.for_chat_type(body.chat_type) if body.chat_type else None
        sent_context = check_sent_context(body.context, self.settings.thread_context_max_bytes)
        cap = self.limiter.limit(principal, "max_prompt_chars")
        if cap is not None and len(body.content) > cap:
            raise InvalidRequest(
                f"The message has {len(body.content)} characters; your tier allows at most {cap:g}.", param="content"
            )
        turn, opened = await self._open(principal, thread_id, body, turn_profile, request_id, started)
        try:
            await self._prepare(turn, opened, body, sent_context)
            backend = self.upstream.chat_for(principal)
            if body.stream:
                return await self._stream(turn, backend)
            reply = await self._complete(turn, backend)
        except BaseException:
            await self.abandon(turn)
            raise
        payload = orjson.loads(reply.body)
        choice = (payload.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        text = message.get("content") or message.get("refusal") or ""
        result = await self.conclude(
            turn,
            text=text,
            status="completed",
            reason=None,
            usage=payload.get("usage"),
            usage_status=turn.status,
            upstream_request_id=reply.request_id,
            stream=False,
        )
        return Response(
            result.model_dump_json().encode(),
            media_type="application/json",
            headers=turn.headers(reply.request_id),
        )

    async def _open(
        self,
        principal: Principal,
        thread_id: uuid.UUID,
        body: MessageCreate,
        turn_profile: Profile | None,
        request_id: str,
        started: float,
    ) -> tuple[Turn, repository.OpenedTurn]:
        """The first transaction: lock, read, store the user message. Any refusal here rolls it all back."""
        async with self.sessionmaker.begin() as session:
            opened = await repository.open_turn(
                session,
                thread_id=thread_id,
                user_id=principal.user_id,
                context_profile=turn_profile.name if turn_profile else None,
                history_limit=self.profiles.max_history,
                stale_after=self.stale_after,
            )
            if opened is None:
                if await repository.thread_is_visible(session, thread_id, principal.user_id):
                    raise Conflict(
                        "Another turn is running on this thread; send again when it has finished.",
                        code="thread_busy",
                        headers={"retry-after": "1"},
                    )
                raise thread_not_found(thread_id)
            profile = turn_profile or self.profiles.get(opened.profile)
            spec = self.resolve_model(principal, profile)
            values = PromptValues(principal.user_id, profile.name, body.chat_type, body.goal_id)
            user_message = await repository.add_message(
                session,
                ThreadMessage(
                    thread_id=thread_id,
                    role="user",
                    content=body.content,
                    prompt=expand_shortcut(profile, body.content, values),
                    chat_type=body.chat_type,
                    goal_id=body.goal_id,
                ),
            )
        turn = Turn(
            principal=principal,
            request_id=request_id,
            spec=spec,
            started=started,
            thread_id=thread_id,
            profile=profile,
            lock=opened.lock,
            user_message=user_message,
        )
        return turn, opened

    async def _prepare(
        self, turn: Turn, opened: repository.OpenedTurn, body: MessageCreate, sent_context: dict[str, Any]
    ) -> None:
        """Fetch the context, build the prompt, check the caps and take the limits."""
        principal, profile = turn.principal, turn.profile
        context = await self.context.for_turn(
            principal.user_id, profile, opened.context, opened.context_age, sent_context
        )
        values = PromptValues(principal.user_id, profile.name, body.chat_type, body.goal_id, context)
        messages = build_messages(
            profile,
            values,
            [HistoryItem(role, text) for role, text in opened.history],
            turn.user_message.prompt or turn.user_message.content,
            max_prompt_chars=self.limiter.limit(principal, "max_prompt_chars"),
            max_messages=self.limiter.limit(principal, "max_messages"),
        )
        turn.payload = {"model": turn.spec.id, "messages": messages}
        if profile.temperature is not None:
            turn.payload["temperature"] = profile.temperature
        tier_cap = self.limiter.limit(principal, "max_completion_tokens")
        caps = [int(cap) for cap in (profile.max_tokens, tier_cap) if cap is not None]
        if caps:
            turn.payload["max_completion_tokens"] = min(caps)
        turn.prompt_estimate = chars_to_tokens(prompt_chars(messages))
        reserved = min(caps) if caps else DEFAULT_RESERVED_COMPLETION
        turn.decision = await self.limiter.take(
            self.limiter.chat_buckets(
                principal,
                turn.prompt_estimate + reserved,
                turn.spec.token_cost(turn.prompt_estimate, reserved),
            )
        )

    def time_left(self, turn: Turn) -> float:
        return max(turn.started + self.settings.thread_turn_timeout - time.perf_counter(), 0.0)

    def _may_fall_back(self, turn: Turn) -> bool:
        policy = turn.profile.fallback
        return self.settings.fallback_to_simulated if policy == "default" else policy == "simulated"

    async def _within_time(self, turn: Turn, call: Awaitable[T]) -> T:
        try:
            with anyio.fail_after(self.time_left(turn)):
                return await call
        except TimeoutError as timeout:
            raise UpstreamTimeout("The turn exceeded its time limit.", code="turn_timeout") from timeout

    async def _complete(self, turn: Turn, backend: ChatBackend) -> UpstreamReply:
        return await turn.answer(
            backend.simulated,
            lambda: self._within_time(turn, backend.complete(turn.payload)),
            lambda: self.upstream.simulated_chat.complete(turn.payload),
            may_fall_back=self._may_fall_back(turn),
            record=self.usage.record,
            stream=False,
        )

    async def _stream(self, turn: Turn, backend: ChatBackend) -> Response:
        turn.payload["stream"] = True
        turn.payload["stream_options"] = {"include_usage": True}
        stream: EventStream = await turn.answer(
            backend.simulated,
            lambda: self._within_time(turn, backend.open_stream(turn.payload)),
            lambda: self.upstream.simulated_chat.open_stream(turn.payload),
            may_fall_back=self._may_fall_back(turn),
            record=self.usage.record,
            stream=True,
        )
        relay = TurnRelay(self, turn, stream)
        return TurnEventsResponse(relay, headers={**SSE_HEADERS, **turn.headers(stream.request_id)})

    async def conclude(
        self,
        turn: Turn,
        *,
        text: str,
        status: str,
        reason: str | None,
        usage: dict[str, Any] | None,
        usage_status: Status,
        upstream_request_id: str | None,
        stream: bool,
        ttft_ms: float | None = None,
        error: GatewayError | None = None,
        message_id: uuid.UUID | None = None,
    ) -> TurnResult:
        """Record the call's usage and store the reply, releasing the lock; raises when it cannot be stored."""
        record = turn.finished(
            usage,
            len(text),
            status=usage_status,
            http_status=200,
            stream=stream,
            ttft_ms=ttft_ms,
            upstream_request_id=upstream_request_id,
            error_code=error.code if error else None,
        )
        self.usage.record(record)
        prompt, completion, cost = record.prompt_tokens, record.completion_tokens, record.cost_usd
        reply = ThreadMessage(
            id=message_id or uuid.uuid4(),
            thread_id=turn.thread_id,
            role="assistant",
            content=text,
            status=status,
            incomplete_reason=reason,
            chat_type=turn.user_message.chat_type,
            goal_id=turn.user_message.goal_id,
            model=turn.spec.id,
            simulated=turn.simulated,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost_usd=cost,
        )
        async with self.writes.begin() as session:
            stored = await repository.finish_turn(session, lock=turn.lock, message=reply)
        if stored is None:
            raise NotFound(
                "The thread was deleted while the turn ran; the reply was not stored.", code="thread_deleted"
            )
        return TurnResult(
            thread_id=turn.thread_id,
            message=MessagePublic.of(stored),
            user_message=MessagePublic.of(turn.user_message),
            tokens_used=prompt + completion,
            model_used=turn.spec.id,
            cost_estimate=cost,
            simulated=turn.simulated,
        )

    async def abandon(self, turn: Turn) -> None:
        """Undo a turn that produced no reply; shielded, so a cancelled request still cleans up."""
        with anyio.CancelScope(shield=True):
            try:
                async with self.writes.begin() as session:
                    await repository.abandon_turn(
                        session, thread_id=turn.thread_id, lock=turn.lock, user_message_id=turn.user_message.id
                    )
            except (SQLAlchemyError, *DB_ERRORS) as error:
                log.error("could not undo turn on thread %s (its lock will go stale): %s", turn.thread_id, error)
