"""The Responses API through the one call pipeline, each response owned by the user who made it.

Create is reserved like a chat completion: the input the upstream bills (input items,
instructions, tools, and all of a `previous_response_id` chain's tokens, which the upstream
sends again) and the most it may write (`max_output_tokens`, the tier's cap when the request
names none, said in a header). The final response object's `usage` settles it: input tokens
(cached ones at the cached price) and output tokens, reasoning included and priced once.

The upstream keeps responses under the operator's key, so every response id the gateway
hands out is recorded with its user (`response_owner`); any other user's id is a 404 on
every route, `previous_response_id` included. A streamed response is recorded from its
`response.created` event, before the client sees its id.

A background response keeps its call open (reserved) until it has finished: `settle_background`,
a runtime job, reads it and settles it from its final usage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.responses import Response

from app.auth.principal import Principal
from app.calls import Call, Calls, Spent
from app.config import Settings
from app.errors import ErrorCode, GatewayError, InvalidRequest, ResponseNotFound, UpstreamError
from app.ratelimit.limiter import Limiter
from app.registry import Catalog
from app.responses.owners import Owner, ResponseOwners
from app.responses.schemas import InputTokensRequest, ResponseCreate
from app.sse import HEARTBEAT, ByteStream, Stopping, encode, paced
from app.tokens import chars_to_tokens
from app.upstream.provider import EventStream
from app.usage.record import Status

log = logging.getLogger("app.responses")

ROUTE = "responses"
CAP_HEADER = "x-gateway-max-output-tokens"
# The request fields the upstream bills as input (besides a previous response's tokens).
BILLED_FIELDS = ("input", "instructions", "tools", "text", "tool_choice", "prompt")
FINAL_EVENTS = ("response.completed", "response.incomplete", "response.failed")


def chat_usage(usage: object) -> object:
    """The Responses API's `usage` in Chat Completions' names, for the one clamp (app/usage/ledger.py).
    Reasoning tokens are part of `output_tokens`: priced once, as output."""
    if not isinstance(usage, dict):
        return usage
    details = usage.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return {
        "prompt_tokens": usage.get("input_tokens"),
        "completion_tokens": usage.get("output_tokens"),
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _overtime() -> UpstreamError:
    return UpstreamError("The stream exceeded its maximum duration.", code=ErrorCode.STREAM_TIMEOUT)


def _object(body: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


@dataclass(slots=True)
class Running:
    """A background response under way: its call stays open (reserved) until the response has finished."""

    call: Call
    principal: Principal
    model: str
    started: float
    upstream: str | None


class ResponsesService:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        limiter: Limiter,
        calls: Calls,
        owners: ResponseOwners,
        stopping: Stopping,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.limiter = limiter
        self.calls = calls
        self.owners = owners
        self.stopping = stopping
        self.background: dict[str, Running] = {}

    # Ownership.

    async def owned(self, principal: Principal, response_id: str, param: str = "response_id") -> Owner:
        """One of the caller's responses (its tokens, its upstream); another user's (or none) is a 404."""
        owner = await self.owners.of(response_id)
        if owner is None or owner.user_id != principal.user_id:
            missing = ResponseNotFound(response_id)
            missing.param = param
            raise missing
        return owner

    async def _record(
        self, response_id: str, principal: Principal, model: str, tokens: int, upstream: str | None
    ) -> None:
        await self.owners.record(response_id, principal.user_id, model, tokens, upstream)

    # Create.

    async def create(self, principal: Principal, body: ResponseCreate, request_id: str) -> Response:
        spec = self.catalog.resolve(body.model, principal.tier, "chat")
        if body.background and body.stream:
            raise InvalidRequest(
                "Streamed background responses are not supported yet: leave out one of the two.", param="stream"
            )
        if body.conversation is not None:
            raise InvalidRequest("Conversations are not supported by this gateway yet.", param="conversation")
        payload = body.model_dump(exclude_unset=True)
        payload["model"] = spec.id
        prior, home = 0, None  # a continued response goes where the one it continues lives
        if body.previous_response_id is not None:
            prior, home = (await self.owned(principal, body.previous_response_id, "previous_response_id"))[1:]
        tier_cap = self.limiter.limit(principal, "max_completion_tokens")
        if body.max_output_tokens is not None and tier_cap is not None and body.max_output_tokens > tier_cap:
            raise InvalidRequest(
                f"'max_output_tokens' is {body.max_output_tokens}; your tier allows at most {tier_cap:g}.",
                param="max_output_tokens",
            )
        billed_chars = sum(len(orjson.dumps(payload[name])) for name in BILLED_FIELDS if name in payload)
        prompt_cap = self.limiter.limit(principal, "max_prompt_chars")
        if prompt_cap is not None and billed_chars > prompt_cap:
            raise InvalidRequest(
                f"The input (items, instructions and tools) has {billed_chars} characters;"
                f" your tier allows at most {prompt_cap:g}.",
                param="input",
            )
        cap = self.limiter.completion_cap(principal, spec, body.max_output_tokens)
        extra: dict[str, str] = {}
        if body.max_output_tokens is None:
            payload["max_output_tokens"] = cap
            extra[CAP_HEADER] = str(cap)
        prompt = prior + chars_to_tokens(billed_chars)
        cost = spec.token_cost(prompt, cap)
        call = await self.calls.open(
            principal,
            route=ROUTE,
            spec=spec,
            request_id=request_id,
            buckets=self.limiter.chat_buckets(principal, prompt + cap, cost),
            reserved=Spent(prompt, cap, cost_usd=cost, estimated=True),
            stream=bool(body.stream),
            # A simulated stand-in would hand out a response id the upstream never heard of.
            fallback="never",
        )
        if body.stream:
            return await self._stream(call, principal, payload, extra, home)
        reply = await self.calls.invoke(call, lambda provider: provider.on(home).responses(payload))
        answer = _object(reply.body)
        try:
            if answer is None or not isinstance(answer.get("id"), str) or len(answer["id"]) > 100:
                raise UpstreamError("The upstream's answer could not be read (no response object).", billed=True)
            spent = call.token_spend(chat_usage(answer.get("usage")), strict=True)
        except UpstreamError as failure:
            call.fail(failure)
            raise
        headers = {**call.headers(reply.request_id), **extra}
        if answer.get("status") in ("queued", "in_progress"):  # background: settled once it has finished
            await self._record(answer["id"], principal, spec.id, 0, reply.upstream)
            self.background[answer["id"]] = Running(call, principal, spec.id, time.monotonic(), reply.upstream)
            return Response(reply.body, media_type="application/json", headers=headers)
        call.finish(spent, upstream_request_id=reply.request_id, upstream=reply.upstream)
        tokens = spent.prompt_tokens + spent.completion_tokens
        await self._record(answer["id"], principal, spec.id, tokens, reply.upstream)
        return Response(reply.body, media_type="application/json", headers=headers)

    async def _stream(
        self, call: Call, principal: Principal, payload: dict[str, Any], extra: dict[str, str], home: str | None
    ) -> Response:
        stream = await self.calls.invoke(
            call, lambda provider: provider.on(home).responses_stream(payload), stream=True
        )
        call.attach(stream)

        async def gone() -> None:  # the client left before the relay could record anything: its prompt is billed
            call.finish(call.token_spend(None), status="cancelled", stream=True, upstream_request_id=stream.request_id)

        headers = {**call.headers(stream.request_id), **extra}
        relay = self._relay(call, principal, stream, str(payload["model"]))
        return ByteStream(relay, headers=headers, on_close=gone, slot=call.take_slot())

    async def _relay(self, call: Call, principal: Principal, stream: EventStream, model: str) -> AsyncIterator[bytes]:
        """Each event as it arrives (named, as the API sends them), with heartbeats while the upstream is
        silent; the response is recorded as the caller's before its first event is passed on."""
        usage: object = None
        response_id: str | None = None
        text_chars = 0
        first_token_at: float | None = None
        outcome: Status = "cancelled"
        error: GatewayError | None = None
        deadline = time.monotonic() + self.settings.stream_max_seconds
        try:
            async for event in paced(
                stream.events(),
                heartbeat=self.settings.stream_heartbeat_seconds,
                deadline=deadline,
                overtime=lambda: UpstreamError(
                    "The stream exceeded its maximum duration.", code=ErrorCode.STREAM_TIMEOUT
                ),
                stopping=self.stopping,
            ):
                if event is None:
                    yield HEARTBEAT
                    continue
                name = event.name or ""
                data = _object(event.data) or {}
                response = data.get("response") if isinstance(data.get("response"), dict) else None
                if response_id is None and response is not None and isinstance(response.get("id"), str):
                    response_id = response["id"][:100]
                    await self._record(response_id, principal, model, 0, stream.upstream)
                if name == "response.output_text.delta" and isinstance(data.get("delta"), str):
                    text_chars += len(data["delta"])
                    first_token_at = first_token_at or time.perf_counter()
                if name in FINAL_EVENTS and response is not None:
                    usage = response.get("usage")
                if name in ("error", "response.failed"):
                    outcome = "error"
                yield encode(name or "message", event.data)
            if outcome != "error":
                outcome = call.answered_status
        except GatewayError as failure:
            error, outcome = failure, "error"
            yield encode("error", {"type": "error", **failure.body()["error"]})
        finally:
            spent = call.token_spend(chat_usage(usage), text_chars)
            call.finish(
                spent,
                status=outcome,
                stream=True,
                ttft_ms=(first_token_at - call.started) * 1000 if first_token_at else None,
                upstream_request_id=stream.request_id,
                error_code=error.code if error else None,
            )
            if response_id is not None:
                tokens = spent.prompt_tokens + spent.completion_tokens
                await self._record(response_id, principal, model, tokens, stream.upstream)

    async def settle_background(self) -> None:
        """Read each background response this process started; settle those that finished (a runtime job).

        One that outlives RESPONSES_BACKGROUND_MAX_SECONDS is settled at its reservation. One this
        process was running when it died stays pending, and a live replica settles it as interrupted,
        at its reservation, once the process's lease has run out (app/usage/ledger.py).
        """
        for response_id, running in list(self.background.items()):
            call = running.call
            try:
                reply = await call.provider.on(running.upstream).responses_call("GET", f"/responses/{response_id}")
            except GatewayError as error:
                log.warning("background response %s could not be read: %s", response_id, error.message)
                reply = None
            answer = _object(reply.body) if reply is not None else None
            status = answer.get("status") if answer is not None else None
            finished = answer is not None and status not in ("queued", "in_progress")
            if not finished and not self._overdue(running):
                continue
            del self.background[response_id]
            if not finished or answer is None:
                call.finish(call.reserved, status="error", error_code=ErrorCode.UPSTREAM_TIMEOUT)
                continue
            spent = call.token_spend(chat_usage(answer.get("usage")), 0)
            outcome: Status = "cancelled" if status == "cancelled" else "error" if status == "failed" else "ok"
            call.finish(
                spent,
                status=outcome,
                upstream_request_id=reply.request_id if reply else None,
                upstream=running.upstream,
            )
            tokens = spent.prompt_tokens + spent.completion_tokens
            await self._record(response_id, running.principal, running.model, tokens, running.upstream)

    async def prune_owners(self) -> int:
        """Forget who made responses older than RESPONSES_RETENTION_DAYS (a runtime job): by then the
        upstream has dropped them, and any id of theirs is a 404 again."""
        return await self.owners.prune(self.settings.responses_retention_days)

    def _overdue(self, running: Running) -> bool:
        return time.monotonic() - running.started > self.settings.responses_background_max_seconds

    # The calls on a response: not billed, recorded as calls all the same.

    async def on_response(
        self,
        principal: Principal,
        response_id: str,
        request_id: str,
        *,
        route: str,
        method: str,
        suffix: str = "",
        params: dict[str, str] | None = None,
    ) -> Response:
        """`GET /responses/{id}`, `DELETE` it, `POST .../cancel`, `GET .../input_items`, for its owner only."""
        owner = await self.owned(principal, response_id)
        answer = await self._unbilled(
            principal,
            request_id,
            route,
            method,
            f"/responses/{response_id}{suffix}",
            params=params,
            upstream=owner.upstream,
        )
        if method == "DELETE":
            await self.owners.forget(response_id)
        return answer

    async def resume(self, principal: Principal, response_id: str, starting_after: int, request_id: str) -> Response:
        """A response's events again, those after `starting_after`, for its owner: not billed (the response
        was), an open stream of the caller's all the same."""
        owner = await self.owned(principal, response_id)
        call = await self.calls.open(
            principal,
            route=f"{ROUTE}.resume",
            spec=None,
            model=ROUTE,
            request_id=request_id,
            buckets=self.limiter.chat_rate(principal),
            fallback="never",
            stream=True,
        )
        stream = await self.calls.invoke(
            call,
            lambda provider: provider.on(owner.upstream).responses_resume(response_id, starting_after),
            stream=True,
        )
        call.attach(stream)

        async def relay() -> AsyncIterator[bytes]:
            outcome: Status = "cancelled"
            try:
                async for event in paced(
                    stream.events(),
                    heartbeat=self.settings.stream_heartbeat_seconds,
                    deadline=time.monotonic() + self.settings.stream_max_seconds,
                    overtime=_overtime,
                    stopping=self.stopping,
                ):
                    yield HEARTBEAT if event is None else encode(event.name or "message", event.data)
                outcome = call.answered_status
            except GatewayError as failure:
                outcome = "error"
                yield encode("error", {"type": "error", **failure.body()["error"]})
            finally:
                call.finish(status=outcome, stream=True, upstream_request_id=stream.request_id)

        async def gone() -> None:
            call.finish(status="cancelled", stream=True, upstream_request_id=stream.request_id)

        return ByteStream(relay(), headers=call.headers(stream.request_id), on_close=gone, slot=call.take_slot())

    async def input_tokens(self, principal: Principal, body: InputTokensRequest, request_id: str) -> Response:
        spec = self.catalog.resolve(body.model, principal.tier, "chat")
        home = None  # counted where the response it continues lives
        if body.previous_response_id is not None:
            home = (await self.owned(principal, body.previous_response_id, "previous_response_id")).upstream
        payload = {**body.model_dump(exclude_unset=True), "model": spec.id}
        return await self._unbilled(
            principal,
            request_id,
            f"{ROUTE}.input_tokens",
            "POST",
            "/responses/input_tokens",
            payload=payload,
            upstream=home,
        )

    async def _unbilled(
        self,
        principal: Principal,
        request_id: str,
        route: str,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        payload: dict[str, Any] | None = None,
        upstream: str | None = None,
    ) -> Response:
        """A call the upstream does not bill, on `upstream` (where the response lives): counted against
        the request rate, recorded at $0."""
        call = await self.calls.open(
            principal,
            route=route,
            spec=None,
            model=ROUTE,
            request_id=request_id,
            buckets=self.limiter.chat_rate(principal),
            fallback="never",
        )
        reply = await self.calls.invoke(
            call, lambda provider: provider.on(upstream).responses_call(method, path, params=params, payload=payload)
        )
        call.finish(upstream_request_id=reply.request_id, upstream=reply.upstream)
        return Response(reply.body, media_type="application/json", headers=call.headers(reply.request_id))
