"""Chat completions: resolve the model, check the tier's caps, and answer through the call pipeline.

The upstream's bytes are forwarded as they came: the only parsing on the way back is
reading `usage` (and, for streams, each chunk's delta, to count what an abandoned
stream used).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.responses import Response

from app.auth.principal import Principal
from app.calls import Call, Calls, Spent
from app.chat.parsing import chat_payload
from app.chat.schemas import ChatCompletionRequest
from app.config import Settings
from app.errors import ErrorCode, GatewayError, InvalidRequest, UpstreamError
from app.ratelimit.limiter import Limiter
from app.registry import Catalog
from app.sse import DONE, HEARTBEAT, ByteStream, Stopping, paced
from app.tokens import billed_input, estimate_input_tokens
from app.upstream.provider import EventStream
from app.usage.record import Status

ROUTE = "chat.completions"
# Sent when the gateway set the completion cap itself (the request named none).
CAP_HEADER = "x-gateway-max-completion-tokens"


def _reply_chars(answer: dict[str, Any]) -> int:
    """The characters of a completion's replies, to estimate its tokens when the upstream sent no usage."""
    choices = answer.get("choices")
    total = 0
    for choice in choices if isinstance(choices, list) else ():
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        total += len(content) if isinstance(content, str) else 0
    return total


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _chunk(data: bytes) -> dict[str, Any]:
    chunk = _json_object(data)
    if chunk is None:
        raise UpstreamError("The upstream sent a stream event that is not a JSON object.")
    return chunk


def stream_timeout() -> UpstreamError:
    return UpstreamError("The stream exceeded its maximum duration.", code=ErrorCode.STREAM_TIMEOUT)


class ChatService:
    def __init__(
        self, settings: Settings, catalog: Catalog, limiter: Limiter, calls: Calls, stopping: Stopping
    ) -> None:
        self.settings = settings
        self.stopping = stopping
        self.catalog = catalog
        self.limiter = limiter
        self.calls = calls

    async def create(self, principal: Principal, body: ChatCompletionRequest, raw: bytes, request_id: str) -> Response:
        """`body` is the validated request, `raw` its bytes: the upstream gets what the client sent.

        The call reserves its worst case: every input the upstream bills (messages of every kind,
        tools, schemas, images at their bound) and the most it may write, `n` times. A request that
        names no completion cap is sent the tier's (or the model's) and says so in a header.
        """
        spec = self.catalog.resolve(body.model, principal.tier, "chat")
        payload = chat_payload(raw)
        payload["model"] = spec.id
        self._check_caps(principal, body, payload)
        requested = body.max_completion_tokens or body.max_tokens
        cap = self.limiter.completion_cap(principal, spec, requested)
        extra: dict[str, str] = {}
        if requested is None:
            payload["max_completion_tokens"] = cap
            extra[CAP_HEADER] = str(cap)
        prompt = estimate_input_tokens(payload)
        completion = cap * (body.n or 1)
        cost = spec.token_cost(prompt, completion)
        call = await self.calls.open(
            principal,
            route=ROUTE,
            spec=spec,
            request_id=request_id,
            buckets=self.limiter.chat_buckets(principal, prompt + completion, cost),
            reserved=Spent(prompt, completion, cost_usd=cost, estimated=True),
            stream=bool(body.stream),
        )
        if body.stream:
            client_wants_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await self._stream(call, payload, client_wants_usage, extra)
        return await self._complete(call, payload, extra)

    def _check_caps(self, principal: Principal, body: ChatCompletionRequest, payload: dict[str, Any]) -> None:
        """Refuse what the tier does not allow, naming the field."""
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
        chars, _ = billed_input(payload)
        cap = limit(principal, "max_prompt_chars")
        if cap is not None and chars > cap:
            raise InvalidRequest(
                f"The prompt (messages, tools and schemas) has {chars} characters; your tier allows at most {cap:g}.",
                param="messages",
            )

    async def _complete(self, call: Call, payload: dict[str, Any], extra: dict[str, str]) -> Response:
        reply = await self.calls.invoke(call, lambda provider: provider.chat(payload))
        answer = _json_object(reply.body)
        if answer is None:
            failure = UpstreamError("The upstream's answer could not be read (not a JSON object).", billed=True)
            call.fail(failure)
            raise failure
        usage = answer.get("usage")
        try:
            spent = call.token_spend(usage, 0 if isinstance(usage, dict) else _reply_chars(answer), strict=True)
        except UpstreamError as failure:
            call.fail(failure)
            raise
        call.finish(spent, upstream_request_id=reply.request_id, upstream=reply.upstream)
        headers = {**call.headers(reply.request_id), **extra}
        return Response(reply.body, media_type="application/json", headers=headers)

    async def _stream(
        self, call: Call, payload: dict[str, Any], client_wants_usage: bool, extra: dict[str, str]
    ) -> Response:
        # Always ask for the usage chunk: it is how a stream's tokens get recorded.
        payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
        stream = await self.calls.invoke(call, lambda provider: provider.chat_stream(payload), stream=True)
        call.attach(stream)

        async def gone() -> None:  # the client left before the relay could record anything
            # The upstream took the request and bills its prompt: that much is charged, as for any stream
            # that ended before its usage chunk.
            spent = call.token_spend(None)
            call.finish(spent, status="cancelled", stream=True, upstream_request_id=stream.request_id)

        headers = {**call.headers(stream.request_id), **extra}
        return ByteStream(
            self._relay(call, stream, client_wants_usage), headers=headers, on_close=gone, slot=call.take_slot()
        )

    async def _relay(self, call: Call, stream: EventStream, client_wants_usage: bool) -> AsyncIterator[bytes]:
        """Forward each event as it arrives, with heartbeats while the upstream is silent."""
        usage: dict[str, Any] | None = None
        completion_chars = 0
        first_token_at: float | None = None
        outcome: Status = "cancelled"
        error: GatewayError | None = None
        deadline = time.monotonic() + self.settings.stream_max_seconds
        try:
            async for event in paced(
                stream.events(),
                heartbeat=self.settings.stream_heartbeat_seconds,
                deadline=deadline,
                overtime=stream_timeout,
                stopping=self.stopping,
            ):
                if event is None:
                    yield HEARTBEAT
                    continue
                data = event.data
                chunk = _chunk(data)
                choices = chunk.get("choices")
                if chunk.get("usage") and not choices:
                    usage = chunk["usage"]
                    if not client_wants_usage:
                        continue
                elif choices:
                    content = (choices[0].get("delta") or {}).get("content")
                    if content:
                        completion_chars += len(content)
                        if first_token_at is None:
                            first_token_at = time.perf_counter()
                yield b"data: " + data + b"\n\n"
            yield DONE
            outcome = call.answered_status
        except GatewayError as failure:
            error, outcome = failure, "error"
            yield b"data: " + orjson.dumps(failure.body()) + b"\n\n"
        finally:
            call.finish(
                call.token_spend(usage, completion_chars),
                status=outcome,
                stream=True,
                ttft_ms=(first_token_at - call.started) * 1000 if first_token_at else None,
                upstream_request_id=stream.request_id,
                error_code=error.code if error else None,
            )
