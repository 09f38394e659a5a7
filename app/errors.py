"""One error hierarchy, rendered everywhere in OpenAI's shape.

`{"error": {"message": str, "type": str, "param": str | null, "code": str | null}}`
is what the official SDKs decode, so every client gets the same body whatever failed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

log = logging.getLogger("app.errors")


class ErrorBody(BaseModel):
    """What went wrong, in OpenAI's fields."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The one error body every route returns."""

    error: ErrorBody


class GatewayError(Exception):
    """Base of every expected failure; subclasses fix the status and type."""

    status_code = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(GatewayError):
    status_code = 400
    type = "invalid_request_error"


class Unauthenticated(GatewayError):
    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status_code = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFound(GatewayError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class Conflict(GatewayError):
    status_code = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(GatewayError):
    status_code = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class RateLimited(GatewayError):
    status_code = 429
    type = "requests"
    code = "rate_limit_exceeded"


class UpstreamError(GatewayError):
    """The upstream failed or could not be reached; the client is not at fault."""

    status_code = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status_code = 504
    code = "upstream_timeout"


class Unavailable(GatewayError):
    status_code = 503
    type = "server_error"
    code = "service_unavailable"


# The refusals of a caller's own limits (not the upstream's), which operators count.
LIMIT_CODES = frozenset({"rate_limit_exceeded", "daily_quota_exceeded", "budget_exceeded"})
# Called as listener(request, error) for each such refusal; lifespan registers them
# (app.state.refusal_listeners). They must not block: they run on the response path.
RefusalListener = Callable[[Request, "GatewayError"], None]

STATUS_ERRORS: dict[int, type[GatewayError]] = {
    400: InvalidRequest,
    401: Unauthenticated,
    403: PermissionDenied,
    404: NotFound,
    405: InvalidRequest,
    409: Conflict,
    413: PayloadTooLarge,
}


def error_response(error: GatewayError, request_id: str | None = None) -> Response:
    headers = dict(error.headers)
    if request_id:
        headers["x-request-id"] = request_id
    return Response(
        orjson.dumps(error.body()),
        status_code=error.status_code,
        media_type="application/json",
        headers=headers,
    )


def request_id_of(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def param_of(location: tuple[Any, ...] | list[Any]) -> str | None:
    """`("body", "messages", 0, "role")` -> `"messages.0.role"`: the field as the client sent it."""
    parts = [str(part) for part in location if part not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def invalid_request(errors: Sequence[Any]) -> InvalidRequest:
    """A validation failure (FastAPI's or pydantic's) as our 400, naming the first bad field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = param_of(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        return InvalidRequest("The request body is not valid JSON.")
    if param is None:
        return InvalidRequest("The request body is missing or not a JSON object.")
    return InvalidRequest(f"Invalid value for '{param}': {first.get('msg', 'invalid')}.", param=param)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries so generated SDKs know the error body."""
    return {status: {"model": ErrorResponse, "description": "Error"} for status in statuses}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, error: GatewayError) -> Response:
        if error.code in LIMIT_CODES:
            for listener in getattr(request.app.state, "refusal_listeners", ()):
                listener(request, error)
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> Response:
        return error_response(invalid_request(error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> Response:
        if isinstance(error.__cause__, GatewayError):  # e.g. FastAPI wrapping our 413 while reading the body
            return error_response(error.__cause__)
        kind = STATUS_ERRORS.get(error.status_code, GatewayError)
        message = {
            404: f"No route {request.method} {request.url.path}.",
            405: f"Method {request.method} is not allowed on {request.url.path}.",
        }.get(error.status_code, str(error.detail))
        gateway_error = kind(message, headers=dict(error.headers or {}))
        gateway_error.status_code = error.status_code
        if error.status_code == 405:
            gateway_error.code = "method_not_allowed"
        return error_response(gateway_error)

    @app.exception_handler(DBAPIError)
    async def _database_error(request: Request, error: DBAPIError) -> Response:
        if not error.connection_invalidated:
            return await _unexpected(request, error)
        log.warning("database connection lost: %s", error.orig)
        return error_response(
            Unavailable(
                "The database is unavailable; try again shortly.",
                code="database_unavailable",
                headers={"retry-after": "2"},
            )
        )

    # Runs in Starlette's outermost middleware, outside ours: it adds the request id itself.
    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> Response:
        request_id = request_id_of(request)
        log.exception("unhandled error", extra={"request_id": request_id})
        message = f"The server had an error processing your request (request id {request_id})."
        return error_response(GatewayError(message), request_id)
