"""Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer streamed responses)."""

from __future__ import annotations

import re
import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import PayloadTooLarge, error_response

REQUEST_ID_PATTERN = re.compile(rb"^[A-Za-z0-9._:-]{1,64}$")


class RequestContextMiddleware:
    """Gives every request an id (echoed as `x-request-id`) and refuses oversized bodies.

    A client-sent `x-request-id` is kept when it is short and plain, so one id can
    follow a call from the app through the gateway to the logs.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = b""
        declared_length = -1
        for name, value in scope["headers"]:
            if name == b"x-request-id" and REQUEST_ID_PATTERN.match(value):
                request_id = value
            elif name == b"content-length" and value.isdigit():
                declared_length = int(value)
        if not request_id:
            request_id = b"req_" + secrets.token_hex(12).encode()
        scope.setdefault("state", {})["request_id"] = request_id.decode()

        if declared_length > self.max_body_bytes:
            await self._too_large(request_id.decode())(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
            await send(message)

        if declared_length >= 0:
            # The HTTP parser reads exactly the declared length: nothing more to count.
            await self.app(scope, receive, send_with_id)
            return

        received = 0

        async def receive_capped() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise self._error()
            return message

        await self.app(scope, receive_capped, send_with_id)

    def _error(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"The request body is larger than {self.max_body_bytes} bytes.")

    def _too_large(self, request_id: str):  # type: ignore[no-untyped-def]
        response = error_response(self._error(), request_id)
        response.headers["connection"] = "close"
        return response
