"""Chat completions: resolve the model, check caps and limits, call the upstream, record usage.

The upstream's bytes are forwarded as they came: the only parsing on the way back is
reading `usage` (and, for streams, each chunk's delta, to count what an abandoned
stream used).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
from starlette.responses import Response, StreamingResponse

from app.auth.principal import Principal
from app.chat.schemas import ChatCompletionRequest
from app.config import Settings
from app.errors import GatewayError, InvalidRequest, UpstreamError
from app.ratelimit.limiter import Limiter
from app.registry import Catalog
from app.upstream.provider import ChatBackend, EventStream, Upstream
from app.upstream.simulated import chars_to_tokens, prompt_chars
from app.usage.call import UpstreamCall
from app.usage.record import Status
from app.usage.writer import UsageWriter

ROUTE = "chat.completions"
# Reserved against the token limit when a request sets no completion cap; settled after.
DEFAULT_RESERVED_COMPLETION = 512
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
HEARTBEAT = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"


@dataclass(slots=True, kw_only=True)
class Call(UpstreamCall):
    """One chat completion's state from the limit check to its usage row."""

    route: ClassVar[str] = ROUTE

    payload: dict[str, Any]


def _reply_chars(answer: dict[str, Any]) -> int:
    """The characters of a completion's replies, to estimate its tokens when the upstream sent no usage."""
    return sum(len((choice.get("message") or {}).get("content") or "") for choice in answer.get("choices") or ())


class ChatService:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        limiter: Limiter,
        upstream: Upstream,
        usage: UsageWriter,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.limiter = limiter
        self.upstream = upstream
        self.usage = usage

    async def create(self, principal: Principal, body: ChatCompletionRequest, raw: bytes, request_id: str) -> Response:
        """`body` is the validated request, `raw` its bytes: the upstream gets what the client sent."""
        spec = self.catalog.resolve(body.model, principal.tier, "chat")
        payload = orjson.loads(raw)
        payload["model"] = spec.id
        prompt_estimate = self._check_caps(principal, body, payload)
        completion_cap = body.max_completion_tokens or body.max_tokens or DEFAULT_RESERVED_COMPLETION
        decision = await self.limiter.take(
            self.limiter.chat_buckets(
                principal,
                prompt_estimate + completion_cap,
                spec.token_cost(prompt_estimate, completion_cap),
            )
        )
        call = Call(
            principal=principal,
            request_id=request_id,
            spec=spec,
            decision=decision,
            payload=payload,
            prompt_estimate=prompt_estimate,
        )
        backend = self.upstream.chat_for(principal)
        if body.stream:
            return await self._stream(call, backend, body)
        return await self._complete(call, backend)

    def _check_caps(self, principal: Principal, body: ChatCompletionRequest, payload: dict[str, Any]) -> int:
        """Refuse what the tier does not allow, naming the field; returns the prompt's token estimate."""
        limit = self.limiter.limit
        for name in ("max_completion_tokens", "max_tokens"):
            value = getattr(body, name)
            cap = limit(principal, "max_completion_tokens")
            if value is not None and cap is not None and value > cap:
                raise InvalidRequest(f"'{name}' is {value}; your tier allows at most {cap:g}.", param=name)
        cap = limit(principal, "max_messages")
        if cap is not None and len(body.messages) > cap:
            raise InvalidRequest(
                f"{len(body.messages)} messages sent; your tier allows at most {cap:g}.",
                param="messages",
            )
        chars = prompt_chars(payload["messages"])
        cap = limit(principal, "max_prompt_chars")
        if cap is not None and chars > cap:
            raise InvalidRequest(
                f"The prompt has {chars} characters; your tier allows at most {cap:g}.",
                param="messages",
            )
        return chars_to_tokens(chars)

    async def _complete(self, call: Call, backend: ChatBackend) -> Response:
        reply = await call.answer(
            backend.simulated,
            lambda: backend.complete(call.payload),
            lambda: self.upstream.simulated_chat.complete(call.payload),
            may_fall_back=self.settings.fallback_to_simulated,
            record=self.usage.record,
            stream=False,
        )
        answer = orjson.loads(reply.body)
        usage = answer.get("usage")
        self.usage.record(
            call.finished(
                usage,
                0 if usage else _reply_chars(answer),
                status=call.status,
                http_status=200,
                upstream_request_id=reply.request_id,
            )
        )
        return Response(reply.body, media_type="application/json", headers=call.headers(reply.request_id))

    async def _stream(self, call: Call, backend: ChatBackend, body: ChatCompletionRequest) -> Response:
        client_wants_usage = bool(body.stream_options and body.stream_options.include_usage)
        # Always ask for the usage chunk: it is how a stream's tokens get recorded.
        call.payload["stream_options"] = {
            **(call.payload.get("stream_options") or {}),
            "include_usage": True,
        }
        stream = await call.answer(
            backend.simulated,
            lambda: backend.open_stream(call.payload),
            lambda: self.upstream.simulated_chat.open_stream(call.payload),
            may_fall_back=self.settings.fallback_to_simulated,
            record=self.usage.record,
            stream=True,
        )
        return StreamingResponse(
            self._relay(call, stream, client_wants_usage),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **call.headers(stream.request_id)},
        )

    async def _relay(self, call: Call, stream: EventStream, client_wants_usage: bool) -> AsyncIterator[bytes]:
        """Forward each event as it arrives, with heartbeats while the upstream is silent."""
        usage: dict[str, Any] | None = None
        completion_chars = 0
        first_token_at: float | None = None
        outcome: Status | None = None
        error: GatewayError | None = None
        deadline = call.started + self.settings.stream_max_seconds
        events = stream.events()
        pending: asyncio.Task[bytes] | None = None
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(events))
                done, _ = await asyncio.wait((pending,), timeout=self.settings.stream_heartbeat_seconds)
                if not done:
                    if time.perf_counter() > deadline:
                        raise UpstreamError("The stream exceeded its maximum duration.", code="stream_timeout")
                    yield HEARTBEAT
                    continue
                task, pending = pending, None
                try:
                    data = task.result()
                except StopAsyncIteration:
                    break
                chunk = orjson.loads(data)
                choices = chunk.get("choices")
                if chunk.get("usage") and not choices:
                    usage = chunk["usage"]
                    if not client_wants_usage:
                        continue
                elif choices:
                    delta = choices[0].get("delta") or {}
                    content = delta.get("content")
                    if content:
                        completion_chars += len(content)
                        if first_token_at is None:
                            first_token_at = time.perf_counter()
                yield b"data: " + data + b"\n\n"
            yield DONE
            outcome = call.status
        except GatewayError as failure:
            error, outcome = failure, "error"
            yield b"data: " + orjson.dumps(failure.body()) + b"\n\n"
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            stream.close()
            self._record_stream(call, outcome, error, usage, completion_chars, first_token_at, stream)

    def _record_stream(
        self,
        call: Call,
        outcome: Status | None,
        error: GatewayError | None,
        usage: dict[str, Any] | None,
        completion_chars: int,
        first_token_at: float | None,
        stream: EventStream,
    ) -> None:
        """One row however the stream ended; an abandoned one counts what it had sent."""
        self.usage.record(
            call.finished(
                usage,
                completion_chars,
                status=outcome or "cancelled",
                http_status=200,
                stream=True,
                ttft_ms=(first_token_at - call.started) * 1000 if first_token_at else None,
                upstream_request_id=stream.request_id,
                error_code=error.code if error else None,
            )
        )
