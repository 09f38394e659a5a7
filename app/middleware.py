"""Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer streamed responses)."""

from __future__ import annotations

import logging
import random
import re
from time import perf_counter
from typing import Any

from fastapi import routing
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.deps import app_runtime
from app.errors import PayloadTooLarge, Renderer, error_response
from app.lean import LeanRoute
from app.observability.logs import access_record, prompt_excerpt, request_state
from app.observability.metrics import Metrics
from app.observability.routes import route_of, templates_of

REQUEST_ID_PATTERN = re.compile(rb"^[A-Za-z0-9._:-]{1,64}$")

ACCESS = "app.access"
access_log = logging.getLogger(ACCESS)


def _is_event_stream(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"content-type":
            return value.startswith(b"text/event-stream")
    return False


class RequestContextMiddleware:
    """Gives every request an id (echoed as `x-request-id`), refuses oversized bodies, and
    accounts for each request: the request metrics, the open-streams gauge, one access line.

    A client-sent `x-request-id` is kept when it is short and plain, so one id can
    follow a call from the app through the gateway to the logs.

    The access line (`app.access`, INFO) names the route by its template, never the raw
    path (no ids or signed query strings in logs); `user_id` is the principal auth put in
    `scope["state"]`, `model` what the usage records of the request named (see
    `app.observability.logs.note_model`). No header or body is logged, except the prompt
    excerpt when LOG_PROMPTS=true.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        log_prompts: bool,
        render_error: Renderer,
        body_limits: dict[tuple[str, str], int] | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        # Routes that take larger bodies (uploads), by (method, path); every other request has MAX_BODY_BYTES.
        self.body_limits = body_limits or {}
        self.log_prompts = log_prompts
        self.render_error = render_error
        self.metrics: Metrics | None = None
        self.templates: dict[int, str] = {}
        self.lean: dict[tuple[str, str], LeanRoute] = {}
        self._bound = False

    def _bind(self, app: Any) -> None:
        """At the first request, after lifespan: the runtime's metrics (when enabled), the route
        templates, and the lean routes with a fixed path (dispatched directly, app/lean.py)."""
        self.metrics = app_runtime(app).metrics
        self.templates = templates_of(app)
        for route in routing.iter_route_contexts(app.routes):
            original = route.original_route
            if isinstance(original, LeanRoute) and route.path_format and "{" not in route.path_format:
                for method in original.methods or ():
                    self.lean[method, route.path_format] = original
        self._bound = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = perf_counter()
        if not self._bound:
            self._bind(scope["app"])
        request_id = b""
        declared_length = -1
        for name, value in scope["headers"]:
            if name == b"x-request-id" and REQUEST_ID_PATTERN.match(value):
                request_id = value
            elif name == b"content-length" and value.isdigit():
                declared_length = int(value)
        if not request_id:  # an identifier, not a secret: no system call for randomness
            request_id = b"req_%024x" % random.getrandbits(96)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id.decode()
        context = request_state.set(state)  # this request's task and its children see it: log lines, usage records

        status = 500  # unless a response starts: an exception escaped to Starlette's error middleware
        stream_gauge: Any = None
        metrics = self.metrics

        async def send_with_id(message: Message) -> None:
            nonlocal status, stream_gauge
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
                if metrics is not None and _is_event_stream(headers):
                    stream_gauge = metrics.stream_gauge(route_of(scope, self.templates))
                    stream_gauge.inc()
            await send(message)

        captured: bytearray | None = None
        if self.log_prompts and scope["method"] == "POST":
            captured = bytearray()
            receive = self._capturing(receive, captured)
        limit = self.body_limits.get((scope["method"], scope["path"]), self.max_body_bytes)
        try:
            if declared_length > limit:
                status = 413
                await self._too_large(state["request_id"], limit)(scope, receive, send)
            else:
                # With a declared length the HTTP parser reads exactly that much: nothing more to count.
                receive = receive if declared_length >= 0 else self._capped(receive, limit)
                lean = self.lean.get((scope["method"], scope["path"]))
                if lean is not None:
                    await self._dispatch(lean, scope, receive, send_with_id)
                else:
                    await self.app(scope, receive, send_with_id)
        finally:
            if stream_gauge is not None:
                stream_gauge.dec()
            self._account(scope, state, status, perf_counter() - started, captured)
            request_state.reset(context)

    async def _dispatch(self, route: LeanRoute, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = route
        request = Request(scope, receive)
        try:
            response = await route.endpoint(request)
        except Exception as error:
            response = await self.render_error(request, error)
        await response(scope, receive, send)

    def _account(
        self, scope: Scope, state: dict[str, Any], status: int, seconds: float, captured: bytearray | None
    ) -> None:
        route = route_of(scope, self.templates)
        if self.metrics is not None:
            self.metrics.observe_request(scope["method"], route, status, seconds)
        if not access_log.isEnabledFor(logging.INFO):
            return
        fields: dict[str, Any] = {
            "request_id": state["request_id"],
            "method": scope["method"],
            "route": route,
            "status": status,
            "latency_ms": round(seconds * 1000, 2),
        }
        principal = state.get("principal")
        if principal is not None:
            fields["user_id"] = principal.user_id
        model = state.get("model")
        if model is not None:
            fields["model"] = model
        if captured:
            prompt = prompt_excerpt(bytes(captured))
            if prompt is not None:
                fields["prompt"] = prompt
        access_log.handle(access_record(ACCESS, "%s %s %s", (scope["method"], route, status), fields))

    def _capped(self, receive: Receive, limit: int) -> Receive:
        received = 0

        async def receive_capped() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise self._error(limit)
            return message

        return receive_capped

    def _capturing(self, receive: Receive, captured: bytearray) -> Receive:
        """LOG_PROMPTS=true only: keep a copy of the body (at most MAX_BODY_BYTES) for the prompt excerpt."""

        async def receive_copy() -> Message:
            message = await receive()
            if message["type"] == "http.request" and len(captured) <= self.max_body_bytes:
                captured.extend(message.get("body", b""))
            return message

        return receive_copy

    def _error(self, limit: int) -> PayloadTooLarge:
        return PayloadTooLarge(f"The request body is larger than {limit} bytes.")

    def _too_large(self, request_id: str, limit: int) -> Response:
        response = error_response(self._error(limit), request_id)
        response.headers["connection"] = "close"
        return response
