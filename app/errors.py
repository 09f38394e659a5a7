"""One error hierarchy, rendered everywhere in OpenAI's shape.

`{"error": {"message": str, "type": str, "param": str | null, "code": str | null}}`
is what the official SDKs decode, so every client gets the same body whatever failed.
`code` is always one of `ErrorCode`, which the OpenAPI document publishes as an enum a
generated SDK can switch on.
"""

from __future__ import annotations

import json
import logging
import re
import weakref
from collections.abc import Awaitable, Callable, Sequence
from enum import StrEnum
from typing import Any

import asyncpg
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from app.routing import RouteTable

log = logging.getLogger("app.errors")


class ErrorCode(StrEnum):
    """Every `code` an error body of this API can carry."""

    # The request.
    INVALID_REQUEST = "invalid_request"
    UNSUPPORTED_VALUE = "unsupported_value"
    UNSUPPORTED_FILE = "unsupported_file"
    MODEL_NOT_FOUND = "model_not_found"
    CONTENT_POLICY_VIOLATION = "content_policy_violation"
    CONTEXT_TOO_LARGE = "context_too_large"
    UNKNOWN_PROFILE = "unknown_profile"
    UNKNOWN_CHAT_TYPE = "unknown_chat_type"
    UNSUPPORTED_TOOL = "unsupported_tool"
    INVALID_IDEMPOTENCY_KEY = "invalid_idempotency_key"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    IDEMPOTENCY_KEY_IN_USE = "idempotency_key_in_use"
    INVALID_OPENAI_KEY = "invalid_openai_key"
    OPENAI_KEY_REJECTED = "openai_key_rejected"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    STORAGE_QUOTA_EXCEEDED = "storage_quota_exceeded"
    HEADERS_TOO_LARGE = "headers_too_large"
    REQUEST_TIMEOUT = "request_timeout"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    UNKNOWN_STYLE = "unknown_style"
    INVALID_IMAGE = "invalid_image"
    IMAGE_TOO_LARGE = "image_too_large"
    # Who is calling.
    MISSING_API_KEY = "missing_api_key"
    INVALID_API_KEY = "invalid_api_key"
    TOKEN_EXPIRED = "token_expired"
    PERMISSION_DENIED = "permission_denied"
    UNKNOWN_TIER = "unknown_tier"
    PRESET_NOT_ALLOWED = "preset_not_allowed"
    PROFILE_NOT_ALLOWED = "profile_not_allowed"
    ASSISTANT_READ_ONLY = "assistant_read_only"
    BYOK_DISABLED = "byok_disabled"
    INVALID_SIGNATURE = "invalid_signature"
    URL_EXPIRED = "url_expired"
    INVALID_METRICS_TOKEN = "invalid_metrics_token"
    # What was not found.
    NOT_FOUND = "not_found"
    ASSISTANT_NOT_FOUND = "assistant_not_found"
    RESPONSE_NOT_FOUND = "response_not_found"
    THREAD_NOT_FOUND = "thread_not_found"
    MESSAGE_NOT_FOUND = "message_not_found"
    RUN_NOT_FOUND = "run_not_found"
    STEP_NOT_FOUND = "step_not_found"
    IMAGE_NOT_FOUND = "image_not_found"
    IMAGE_CONTENT_MISSING = "image_content_missing"
    BATCH_NOT_FOUND = "batch_not_found"
    CALL_NOT_FOUND = "call_not_found"
    KEY_NOT_FOUND = "key_not_found"
    OPENAI_KEY_NOT_FOUND = "openai_key_not_found"
    # State.
    CONFLICT = "conflict"
    THREAD_BUSY = "thread_busy"
    RUN_NOT_ACTIVE = "run_not_active"
    THREAD_DELETED = "thread_deleted"
    # Limits.
    RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"
    DAILY_QUOTA_EXCEEDED = "daily_quota_exceeded"
    BUDGET_EXCEEDED = "budget_exceeded"
    TOO_MANY_AUTH_FAILURES = "too_many_auth_failures"
    TOO_MANY_KEY_CHECKS = "too_many_key_checks"
    TOO_MANY_STREAMS = "too_many_streams"
    TOO_MANY_SESSIONS = "too_many_sessions"
    # The upstream.
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_RATE_LIMITED = "upstream_rate_limited"
    UPSTREAM_AUTH_ERROR = "upstream_auth_error"
    UPSTREAM_REJECTED = "upstream_rejected"
    STREAM_TIMEOUT = "stream_timeout"
    RUN_TIMEOUT = "run_timeout"
    # Batch items.
    API_KEY_REVOKED = "api_key_revoked"
    INTERNAL_ERROR = "internal_error"
    # The gateway.
    SERVER_ERROR = "server_error"
    SERVICE_UNAVAILABLE = "service_unavailable"
    DATABASE_UNAVAILABLE = "database_unavailable"
    DATABASE_BUSY = "database_busy"
    AUTH_UNAVAILABLE = "auth_unavailable"
    LIMITS_UNAVAILABLE = "limits_unavailable"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    MIGRATIONS_PENDING = "migrations_pending"
    OPENAI_KEY_UNAVAILABLE = "openai_key_unavailable"
    OPENAI_KEY_UNREADABLE = "openai_key_unreadable"
    REPLY_NOT_STORED = "reply_not_stored"


def stored_code(value: str) -> ErrorCode:
    """A code read back from a row (a batch item's error): ours as it was, else `server_error`."""
    try:
        return ErrorCode(value)
    except ValueError:
        return ErrorCode.SERVER_ERROR


class ErrorBody(BaseModel):
    """What went wrong, in OpenAI's fields."""

    message: str
    type: str
    param: str | None = None
    code: ErrorCode | None = None


class ErrorResponse(BaseModel):
    """The one error body every route returns."""

    error: ErrorBody


class GatewayError(Exception):
    """Base of every expected failure; subclasses fix the status, type and default code."""

    status_code = 500
    type = "server_error"
    code: ErrorCode | None = ErrorCode.SERVER_ERROR

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: ErrorCode | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        code = str(self.code) if self.code is not None else None
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": code}}


class InvalidRequest(GatewayError):
    status_code = 400
    type = "invalid_request_error"
    code = ErrorCode.INVALID_REQUEST


class Unauthenticated(GatewayError):
    status_code = 401
    type = "invalid_request_error"
    code = ErrorCode.INVALID_API_KEY


class PermissionDenied(GatewayError):
    status_code = 403
    type = "invalid_request_error"
    code = ErrorCode.PERMISSION_DENIED


class NotFound(GatewayError):
    status_code = 404
    type = "invalid_request_error"
    code = ErrorCode.NOT_FOUND


class ResourceNotFound(NotFound):
    """A resource of the caller's that does not exist, or is another user's (never told apart)."""

    resource = "resource"
    param_name = "id"

    def __init__(self, identifier: object) -> None:
        super().__init__(f"No {self.resource} found with id '{identifier}'.", param=self.param_name)


class ModelNotFound(ResourceNotFound):
    """OpenAI's answer for a model that does not exist or the caller may not use (never told apart)."""

    resource, param_name, code = "model", "model", ErrorCode.MODEL_NOT_FOUND

    def __init__(self, identifier: object) -> None:
        NotFound.__init__(
            self, f"The model '{identifier}' does not exist or you do not have access to it.", param="model"
        )


class ResponseNotFound(ResourceNotFound):
    resource, param_name, code = "response", "response_id", ErrorCode.RESPONSE_NOT_FOUND


class AssistantNotFound(ResourceNotFound):
    resource, param_name, code = "assistant", "assistant_id", ErrorCode.ASSISTANT_NOT_FOUND


class ThreadNotFound(ResourceNotFound):
    resource, param_name, code = "thread", "thread_id", ErrorCode.THREAD_NOT_FOUND


class MessageNotFound(ResourceNotFound):
    resource, param_name, code = "message", "message_id", ErrorCode.MESSAGE_NOT_FOUND


class RunNotFound(ResourceNotFound):
    resource, param_name, code = "run", "run_id", ErrorCode.RUN_NOT_FOUND


class StepNotFound(ResourceNotFound):
    resource, param_name, code = "run step", "step_id", ErrorCode.STEP_NOT_FOUND


class ImageNotFound(ResourceNotFound):
    resource, param_name, code = "image", "image_id", ErrorCode.IMAGE_NOT_FOUND


class BatchNotFound(ResourceNotFound):
    resource, param_name, code = "image batch", "batch_id", ErrorCode.BATCH_NOT_FOUND


class KeyNotFound(ResourceNotFound):
    resource, param_name, code = "active key", "key_id", ErrorCode.KEY_NOT_FOUND


class Conflict(GatewayError):
    status_code = 409
    type = "invalid_request_error"
    code = ErrorCode.CONFLICT


class PayloadTooLarge(GatewayError):
    status_code = 413
    type = "invalid_request_error"
    code = ErrorCode.PAYLOAD_TOO_LARGE


class HeadersTooLarge(GatewayError):
    """The request line and headers passed MAX_HEADER_BYTES (answered by app/server.py, not a route)."""

    status_code = 431
    type = "invalid_request_error"
    code = ErrorCode.HEADERS_TOO_LARGE


class RequestTimeout(GatewayError):
    """The headers or the body did not arrive in time (answered by app/server.py, not a route)."""

    status_code = 408
    type = "invalid_request_error"
    code = ErrorCode.REQUEST_TIMEOUT


class RateLimited(GatewayError):
    status_code = 429
    type = "requests"
    code = ErrorCode.RATE_LIMIT_EXCEEDED


class UpstreamError(GatewayError):
    """The upstream failed or could not be reached; the client is not at fault.

    `billed`: it failed after the upstream took the request (a body cut off, an answer that
    cannot be read), so the upstream may bill it: the call is charged what it reserved.
    """

    status_code = 502
    type = "upstream_error"
    code = ErrorCode.UPSTREAM_ERROR

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        headers: dict[str, str] | None = None,
        billed: bool = False,
    ) -> None:
        super().__init__(message, code=code, headers=headers)
        self.billed = billed


class UpstreamTimeout(UpstreamError):
    status_code = 504
    code = ErrorCode.UPSTREAM_TIMEOUT


class Unavailable(GatewayError):
    status_code = 503
    type = "server_error"
    code = ErrorCode.SERVICE_UNAVAILABLE


# The status nginx made the convention for a request its client abandoned.
CLIENT_CLOSED_REQUEST = 499

# What a lost or refused connection to Postgres raises when it reaches the error renderer unwrapped.
CONNECTION_LOST = (
    ConnectionError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
)

# The refusals of a caller's own limits (not the upstream's), which operators count.
LIMIT_CODES = frozenset(
    {
        ErrorCode.RATE_LIMIT_EXCEEDED,
        ErrorCode.DAILY_QUOTA_EXCEEDED,
        ErrorCode.BUDGET_EXCEEDED,
        ErrorCode.TOO_MANY_STREAMS,
    }
)

STATUS_ERRORS: dict[int, type[GatewayError]] = {
    400: InvalidRequest,
    401: Unauthenticated,
    403: PermissionDenied,
    404: NotFound,
    405: InvalidRequest,
    409: Conflict,
    413: PayloadTooLarge,
}


def _dumps(body: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(body)
    except TypeError:
        # A message quoting a client's lone surrogate ("\ud800"), which orjson cannot encode: the
        # standard library escapes it. Rendering an error must never fail into a 500.
        return json.dumps(body).encode()


def error_response(error: GatewayError, request_id: str | None = None) -> Response:
    headers = dict(error.headers)
    if request_id:
        headers["x-request-id"] = request_id
    return Response(
        _dumps(error.body()),
        status_code=error.status_code,
        media_type="application/json",
        headers=headers,
    )


def request_id_of(request: Request) -> str:
    state: dict[str, Any] = request.scope.get("state", {})
    return str(state.get("request_id", ""))


def _printable(part: str) -> str:
    """A location part as plain text: a dict key may hold NUL or a lone surrogate, escaped here."""
    return part if part.isprintable() else "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in part)


# The parts pydantic adds to a location to say which member of a union it tried (`str`,
# `list[...]`, `function-before[...]`): not fields the client sent.
UNION_MEMBER = re.compile(r"(str|int|float|bool|none|constrained-\w+|[\w-]+\[.+\])")  # not a name sent as `include[]`
SOURCES = ("body", "query", "path", "header")


def _fields(location: Sequence[Any]) -> list[Any]:
    """The field's path: without FastAPI's leading source (a field may itself be named `query`) and
    without pydantic's union member names."""
    if location and location[0] in SOURCES:
        location = location[1:]
    return [part for part in location if not (isinstance(part, str) and UNION_MEMBER.fullmatch(part))]


def param_of(location: Sequence[Any]) -> str | None:
    """`("body", "messages", 0, "role")` -> `"messages.0.role"`: the field as the client sent it."""
    return ".".join(_printable(str(part)) for part in _fields(location)) or None


def _most_specific(errors: Sequence[Any]) -> Any:
    """The first error, or a deeper one within the same field: a union reports each member's failure,
    and the member that got furthest (a part's bad text, not "not a string") says what is wrong."""
    first = errors[0]
    field = _fields(first.get("loc", ()))
    within = [error for error in errors if _fields(error.get("loc", ()))[: len(field)] == field]
    return max(within, key=lambda error: len(_fields(error.get("loc", ()))))


def invalid_request(errors: Sequence[Any]) -> InvalidRequest:
    """A validation failure (FastAPI's or pydantic's) as our 400, naming the first bad field."""
    first = _most_specific(errors) if errors else {"loc": (), "msg": "invalid request"}
    param = param_of(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        context = first.get("ctx")
        reason = context.get("error") if isinstance(context, dict) else None  # where the parser stopped
        return InvalidRequest(
            f"The request body is not valid JSON: {reason}." if reason else "The request body is not valid JSON."
        )
    if param is None:
        return InvalidRequest("The request body is missing or not a JSON object.")
    return InvalidRequest(f"Invalid value for '{param}': {first.get('msg', 'invalid')}.", param=param)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries so generated SDKs know the error body."""
    return {status: {"model": ErrorResponse, "description": "Error"} for status in statuses}


RefusalHook = Callable[[Request, GatewayError], None]
Renderer = Callable[[Request, Exception], Awaitable[Response]]


def error_renderer(on_refusal: RefusalHook) -> Renderer:
    """The one way a failure becomes a response: our body for every kind of error, a 500 for the
    unexpected. `on_refusal` is told of each refusal by the caller's own limits."""

    async def render(request: Request, error: Exception) -> Response:
        if isinstance(error, GatewayError):
            if error.code in LIMIT_CODES:
                on_refusal(request, error)
            return error_response(error)
        if isinstance(error, RequestValidationError):
            allowed = _owned_elsewhere(request, error)
            if allowed is not None:
                return error_response(_method_not_allowed(request, allowed))
            return error_response(invalid_request(error.errors()))
        if isinstance(error, StarletteHTTPException):
            return error_response(_http_error(request, error))
        if (isinstance(error, DBAPIError) and error.connection_invalidated) or isinstance(error, CONNECTION_LOST):
            cause = error.orig if isinstance(error, DBAPIError) else error
            log.warning("database connection lost: %s", type(cause).__name__)
            return error_response(
                Unavailable(
                    "The database is unavailable; try again shortly.",
                    code=ErrorCode.DATABASE_UNAVAILABLE,
                    headers={"retry-after": "2"},
                )
            )
        if isinstance(error, ClientDisconnect):  # left before its body was in (or cut for being too slow)
            log.info("client left before sending its whole body", extra={"request_id": request_id_of(request)})
            return Response(status_code=CLIENT_CLOSED_REQUEST)  # no one reads it: the access log and metrics do
        if isinstance(error, PoolTimeout):  # every pooled connection stayed busy for DB_ACQUIRE_TIMEOUT
            log.warning("database pool exhausted")
            return error_response(
                Unavailable(
                    "The gateway is too busy to reach its database; try again shortly.",
                    code=ErrorCode.DATABASE_BUSY,
                    headers={"retry-after": "1"},
                )
            )
        request_id = request_id_of(request)
        log.exception("unhandled error", extra={"request_id": request_id}, exc_info=error)
        message = f"The server had an error processing your request (request id {request_id})."
        # Starlette's outermost middleware (outside ours) answers the unexpected: it needs the request id.
        return error_response(GatewayError(message), request_id)

    return render


def _http_error(request: Request, error: StarletteHTTPException) -> GatewayError:
    if isinstance(error.__cause__, GatewayError):  # e.g. FastAPI wrapping our 413 while reading the body
        return error.__cause__
    kind = STATUS_ERRORS.get(error.status_code, GatewayError)
    if error.status_code == 405:  # every route's methods at this path, not the first route's only
        return _method_not_allowed(request, route_table(request.app).allowed(request.url.path))
    message = f"No route {request.method} {request.url.path}." if error.status_code == 404 else str(error.detail)
    gateway_error = kind(message, headers=dict(error.headers or {}))
    gateway_error.status_code = error.status_code
    return gateway_error


def _method_not_allowed(request: Request, allowed: list[str]) -> GatewayError:
    error = GatewayError(
        f"Method {request.method} is not allowed on {request.url.path}.", headers={"allow": ", ".join(allowed)}
    )
    error.status_code = 405
    error.code = ErrorCode.METHOD_NOT_ALLOWED
    return error


def _owned_elsewhere(request: Request, error: RequestValidationError) -> list[str] | None:
    """A path parameter that failed on a path another route owns: that route's methods (the answer is 405)."""
    if not any(item.get("loc", ("",))[0] == "path" for item in error.errors()):
        return None
    return route_table(request.app).owned_elsewhere(request.url.path, request.method)


_route_tables: weakref.WeakKeyDictionary[FastAPI, RouteTable] = weakref.WeakKeyDictionary()


def route_table(app: FastAPI) -> RouteTable:
    """The app's paths and methods, read once from its OpenAPI document."""
    table = _route_tables.get(app)
    if table is None:
        table = _route_tables[app] = RouteTable(app.openapi()["paths"])
    return table


def install_error_handlers(app: FastAPI, render: Renderer) -> None:
    """Every failure, whatever raised it, through `render`."""
    kinds = (GatewayError, RequestValidationError, StarletteHTTPException, DBAPIError, PoolTimeout, ClientDisconnect)
    for kind in (*kinds, Exception):
        app.add_exception_handler(kind, render)
