"""A turn: take the request rate, lock the thread, build the prompt, reserve, store the message, answer.

Order matters, and no transaction is held across anything slow:
1. the request is validated and the caller's request rate taken, before any write;
2. one statement locks the thread (`running_since`) and reads what the prompt needs;
3. the context is fetched, the prompt built, and the call's tokens and budget reserved
   through the call pipeline (a refusal releases the lock; nothing was written);
4. the user message is stored; the upstream answers; the reply is stored by the same
   statement that releases the lock (app/threads/replies.py).
Single statements run on autocommit sessions: BEGIN and COMMIT around one statement would
be two more round trips that buy nothing.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar

import anyio
import orjson
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.responses import Response

from app.auth.principal import Principal
from app.calls import Calls, Spent
from app.config import Settings
from app.errors import (
    Conflict,
    ErrorCode,
    InvalidRequest,
    PermissionDenied,
    ThreadNotFound,
    UpstreamError,
    UpstreamTimeout,
)
from app.instances import Instance
from app.models import ThreadMessage
from app.ratelimit.buckets import Decision
from app.ratelimit.limiter import Limiter
from app.registry import Catalog, ModelSpec
from app.sse import EventSource, Stopping
from app.streams import StreamSlot
from app.threads import repository
from app.threads.context import ContextSource, check_sent_context
from app.threads.profiles import Profile, Profiles
from app.threads.prompt import HistoryItem, PromptValues, build_messages, expand_shortcut
from app.threads.replies import ReplyStore
from app.threads.schemas import MessageCreate
from app.threads.stream import TurnRelay
from app.threads.turn import ROUTE, Turn
from app.tokens import estimate_input_tokens

T = TypeVar("T")

# A turn lock older than the turn time limit plus this is a dead process's: it may be taken over.
LOCK_MARGIN_SECONDS = 60.0


def turn_timeout() -> UpstreamTimeout:
    return UpstreamTimeout("The turn exceeded its time limit.", code=ErrorCode.TURN_TIMEOUT)


class TurnRunner:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        profiles: Profiles,
        limiter: Limiter,
        calls: Calls,
        replies: ReplyStore,
        writes: async_sessionmaker[AsyncSession],
        context: ContextSource,
        stopping: Stopping,
        instance: Instance,
    ) -> None:
        self.stopping = stopping
        self.instance = instance
        self.settings = settings
        self.catalog = catalog
        self.profiles = profiles
        self.limiter = limiter
        self.calls = calls
        self.replies = replies
        self.writes = writes
        self.context = context
        self.stale_after = settings.thread_turn_timeout + LOCK_MARGIN_SECONDS

    def resolve_model(self, principal: Principal, profile: Profile) -> ModelSpec:
        """The model `profile` answers with; 403 when the caller's tier may not use the profile."""
        if not profile.allows(principal.tier):
            raise PermissionDenied(
                f"Profile '{profile.name}' is not available on your tier '{principal.tier}'.",
                param="profile",
                code=ErrorCode.PROFILE_NOT_ALLOWED,
            )
        try:
            return self.catalog.resolve(profile.model, principal.tier, "chat")
        except InvalidRequest as error:
            raise InvalidRequest(
                f"Profile '{profile.name}' answers with model '{profile.model}', which your tier cannot use.",
                param="profile",
                code=ErrorCode.MODEL_NOT_FOUND,
            ) from error

    async def run(self, principal: Principal, thread_id: uuid.UUID, body: MessageCreate, request_id: str) -> Response:
        deadline = time.monotonic() + self.settings.thread_turn_timeout
        turn_profile = self.profiles.for_chat_type(body.chat_type) if body.chat_type else None
        sent_context = check_sent_context(body.context, self.settings.thread_context_max_bytes)
        cap = self.limiter.limit(principal, "max_prompt_chars")
        if cap is not None and len(body.content) > cap:
            raise InvalidRequest(
                f"The message has {len(body.content)} characters; your tier allows at most {cap:g}.", param="content"
            )
        # A stream is admitted before any limit is taken: refused, it costs nothing.
        slot = self.calls.streams.admit(principal) if body.stream else None
        try:
            return await self._turn(principal, thread_id, body, request_id, turn_profile, sent_context, deadline, slot)
        except BaseException:
            if slot is not None:  # the turn failed before its stream began
                slot.release()
            raise

    async def _turn(
        self,
        principal: Principal,
        thread_id: uuid.UUID,
        body: MessageCreate,
        request_id: str,
        turn_profile: Profile | None,
        sent_context: dict[str, Any],
        deadline: float,
        slot: StreamSlot | None,
    ) -> Response:
        rate = await self.limiter.take(self.limiter.chat_rate(principal))
        opened = await self._lock(principal, thread_id, turn_profile)
        message_id = uuid.uuid4()
        try:
            turn = await self._prepare(
                principal, thread_id, body, request_id, opened, turn_profile, sent_context, rate, slot
            )
            turn.user_message.id = message_id
            try:
                async with self.writes.begin() as session:
                    await repository.add_message(session, turn.user_message)
            except BaseException:
                turn.call.give_back()
                raise
            if body.stream:
                return await self._stream(turn, deadline)
            reply = await self.calls.invoke(
                turn.call, lambda provider: self._within(deadline, provider.chat(turn.payload))
            )
            try:
                text, usage = _reply(reply.body)
                spent = turn.call.token_spend(usage, len(text), strict=True)
            except UpstreamError as error:
                turn.call.fail(error)
                raise
        except BaseException:
            await self.replies.abandon(thread_id, opened.lock, message_id)
            raise
        turn.call.finish(spent, upstream_request_id=reply.request_id)
        result = await self.replies.store(turn, text=text, status="completed", reason=None)
        return Response(
            result.model_dump_json().encode(),
            media_type="application/json",
            headers=turn.call.headers(reply.request_id),
        )

    async def _lock(
        self, principal: Principal, thread_id: uuid.UUID, turn_profile: Profile | None
    ) -> repository.OpenedTurn:
        """Take the thread's turn lock and read the prompt's inputs in one statement; 409 or 404 otherwise."""
        async with self.writes.begin() as session:
            opened = await repository.open_turn(
                session,
                thread_id=thread_id,
                user_id=principal.user_id,
                context_profile=turn_profile.name if turn_profile else None,
                history_limit=self.profiles.max_history,
                stale_after=self.stale_after,
                owner=self.instance.id,
                lease=self.instance.lease_seconds,
            )
            if opened is not None:
                return opened
            if await repository.thread_is_visible(session, thread_id, principal.user_id):
                raise Conflict(
                    "Another turn is running on this thread; send again when it has finished.",
                    code=ErrorCode.THREAD_BUSY,
                    headers={"retry-after": "1"},
                )
        raise ThreadNotFound(thread_id)

    async def _prepare(
        self,
        principal: Principal,
        thread_id: uuid.UUID,
        body: MessageCreate,
        request_id: str,
        opened: repository.OpenedTurn,
        turn_profile: Profile | None,
        sent_context: dict[str, Any],
        rate: Decision,
        slot: StreamSlot | None,
    ) -> Turn:
        stream = body.stream
        """The prompt (with the app's context) and the call, its tokens and budget reserved."""
        profile = turn_profile or self.profiles.get(opened.profile)
        spec = self.resolve_model(principal, profile)
        values = PromptValues(principal.user_id, profile.name, body.chat_type, body.goal_id)
        user_message = ThreadMessage(
            thread_id=thread_id,
            role="user",
            content=body.content,
            prompt=expand_shortcut(profile, body.content, values),
            chat_type=body.chat_type,
            goal_id=body.goal_id,
        )
        context = await self.context.for_turn(
            principal.user_id, profile, opened.context, opened.context_age, sent_context
        )
        messages = build_messages(
            profile,
            PromptValues(principal.user_id, profile.name, body.chat_type, body.goal_id, context),
            [HistoryItem(role, text) for role, text in opened.history],
            user_message.prompt or user_message.content,
            max_prompt_chars=self.limiter.limit(principal, "max_prompt_chars"),
            max_messages=self.limiter.limit(principal, "max_messages"),
        )
        payload: dict[str, Any] = {"model": spec.id, "messages": messages}
        if profile.temperature is not None:
            payload["temperature"] = profile.temperature
        # The worst case is reserved: the prompt as sent and the most the reply may be, a cap the upstream is told.
        cap = payload["max_completion_tokens"] = self.limiter.completion_cap(principal, spec, profile.max_tokens)
        estimate = estimate_input_tokens(payload)
        cost = spec.token_cost(estimate, cap)
        call = await self.calls.open(
            principal,
            route=ROUTE,
            spec=spec,
            request_id=request_id,
            buckets=self.limiter.token_buckets(principal, estimate + cap, cost),
            reserved=Spent(estimate, cap, cost_usd=cost, estimated=True),
            prior=rate,
            fallback=profile.fallback,
            stream=stream,
            thread_id=thread_id,
            slot=slot,
        )
        return Turn(
            thread_id=thread_id,
            profile=profile,
            lock=opened.lock,
            user_message=user_message,
            call=call,
            payload=payload,
        )

    @staticmethod
    async def _within(deadline: float, call: Awaitable[T]) -> T:
        try:
            with anyio.fail_after(max(deadline - time.monotonic(), 0.0)):
                return await call
        except TimeoutError as timeout:
            raise turn_timeout() from timeout

    async def _stream(self, turn: Turn, deadline: float) -> Response:
        turn.payload["stream"] = True
        turn.payload["stream_options"] = {"include_usage": True}
        stream = await self.calls.invoke(
            turn.call, lambda provider: self._within(deadline, provider.chat_stream(turn.payload)), stream=True
        )
        turn.call.attach(stream)
        relay = TurnRelay(turn, stream, self.replies, deadline=deadline, overtime=turn_timeout, stopping=self.stopping)
        return EventSource(
            relay.events(),
            heartbeat=self.settings.stream_heartbeat_seconds,
            headers=turn.call.headers(stream.request_id),
            on_close=relay.settle,
            slot=turn.call.take_slot(),
        )


def _reply(body: bytes) -> tuple[str, dict[str, Any] | None]:
    """A completion's reply text and usage; 502 when the upstream's answer cannot be read."""
    try:
        payload = orjson.loads(body)
        choice = (payload.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        return str(message.get("content") or message.get("refusal") or ""), payload.get("usage")
    except (orjson.JSONDecodeError, AttributeError, IndexError) as error:
        raise UpstreamError("The upstream's answer could not be read.", billed=True) from error
