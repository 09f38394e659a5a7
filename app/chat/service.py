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
from app.calls import Call, Calls
from app.chat.schemas import ChatCompletionRequest
from app.config import Settings
from app.errors import ErrorCode, GatewayError, InvalidRequest, UpstreamError
from app.ratelimit.limiter import Limiter
from app.registry import Catalog
from app.sse import DONE, HEARTBEAT, ByteStream, paced
from app.tokens import chars_to_tokens, prompt_chars
from app.upstream.provider import EventStream
from app.usage.record import Status

ROUTE = "chat.completions"
# Reserved against the token limit when a request sets no completion cap; settled after.
DEFAULT_RESERVED_COMPLETION = 512


def _reply_chars(answer: dict[str, Any]) -> int:
    """The characters of a completion's replies, to estimate its tokens when the upstream sent no usage."""
    return sum(len((choice.get("message") or {}).get("content") or "") for choice in answer.get("choices") or ())


def _chunk(data: bytes) -> dict[str, Any]:
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        chunk = None
    if not isinstance(chunk, dict):
        raise UpstreamError("The upstream sent a stream event that is not a JSON object.")
    return chunk


def stream_timeout() -> UpstreamError:
    return UpstreamError("The stream exceeded its maximum duration.", code=ErrorCode.STREAM_TIMEOUT)


class ChatService:
    def __init__(self, settings: Settings, catalog: Catalog, limiter: Limiter, calls: Calls) -> None:
        self.settings = settings
        self.catalog = catalog
        self.limiter = limiter
        self.calls = calls

    async def create(self, principal: Principal, body: ChatCompletionRequest, raw: bytes, request_id: str) -> Response:
        """`body` is the validated request, `raw` its bytes: the upstream gets what the client sent."""
        spec = self.catalog.resolve(body.model, principal.tier, "chat")
        payload = orjson.loads(raw)
        payload["model"] = spec.id
        prompt_estimate = self._check_caps(principal, body, payload)
        completion_cap = body.max_completion_tokens or body.max_tokens or DEFAULT_RESERVED_COMPLETION
        call = await self.calls.open(
            principal,
            route=ROUTE,
            spec=spec,
            request_id=request_id,
            buckets=self.limiter.chat_buckets(
                principal, prompt_estimate + completion_cap, spec.token_cost(prompt_estimate, completion_cap)
            ),
            prompt_estimate=prompt_estimate,
        )
        if body.stream:
            client_wants_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await self._stream(call, payload, client_wants_usage)
        return await self._complete(call, payload)

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

    async def _complete(self, call: Call, payload: dict[str, Any]) -> Response:
        reply = await self.calls.invoke(call, lambda provider: provider.chat(payload))
        try:
            answer = orjson.loads(reply.body)
            usage = answer.get("usage")
        except (orjson.JSONDecodeError, AttributeError) as error:
            failure = UpstreamError("The upstream's answer could not be read (not a JSON object).")
            call.fail(failure)
            raise failure from error
        call.finish(call.token_spend(usage, 0 if usage else _reply_chars(answer)), upstream_request_id=reply.request_id)
        return Response(reply.body, media_type="application/json", headers=call.headers(reply.request_id))

    async def _stream(self, call: Call, payload: dict[str, Any], client_wants_usage: bool) -> Response:
        # Always ask for the usage chunk: it is how a stream's tokens get recorded.
        payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
        stream = await self.calls.invoke(call, lambda provider: provider.chat_stream(payload), stream=True)
        call.attach(stream)

        async def gone() -> None:  # the client left before the relay could record anything
            call.finish(status="cancelled", stream=True, upstream_request_id=stream.request_id)

        return ByteStream(
            self._relay(call, stream, client_wants_usage), headers=call.headers(stream.request_id), on_close=gone
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
