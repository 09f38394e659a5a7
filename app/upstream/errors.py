"""Upstream failures mapped to our errors: the client learns whose fault it was."""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from app.errors import ErrorCode, GatewayError, RateLimited, UpstreamError

RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


class UpstreamRejected(GatewayError):
    """The upstream refused the request itself (a 4xx other than auth): passed on with its status.

    The upstream's code is kept when it is one of ours (`model_not_found`, ...); any other is
    `upstream_rejected`, with the upstream's own code quoted in the message.
    """

    def __init__(self, status: int, message: str, type_: str, param: str | None, code: str | None) -> None:
        try:
            ours = ErrorCode(code) if code else ErrorCode.UPSTREAM_REJECTED
        except ValueError:
            ours, message = ErrorCode.UPSTREAM_REJECTED, f"{message} (upstream code: {code})"
        super().__init__(message, param=param, code=ours)
        self.status_code = status
        self.type = type_


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """OpenAI's `retry-after-ms` or `retry-after` in seconds, when present and numeric."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return max(float(value) * scale, 0.0)
            except ValueError:
                continue
    return None


def _upstream_error_fields(body: bytes) -> dict[str, object]:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    error = parsed.get("error") if isinstance(parsed, dict) else None
    return error if isinstance(error, dict) else {}


def error_from_status(status: int, body: bytes, headers: Mapping[str, str]) -> GatewayError:
    """Our error for an upstream answer with a non-2xx status."""
    fields = _upstream_error_fields(body)
    message = str(fields.get("message") or f"The upstream answered {status}.")
    if status == 429:
        retry = retry_after_seconds(headers)
        return RateLimited(
            f"The upstream is rate limiting this gateway: {message}",
            code=ErrorCode.UPSTREAM_RATE_LIMITED,
            headers={"retry-after": str(max(1, round(retry)))} if retry is not None else {},
        )
    if status in (401, 403):
        return UpstreamError("The upstream rejected the gateway's credentials.", code=ErrorCode.UPSTREAM_AUTH_ERROR)
    if status >= 500 or status in (408, 409):
        return UpstreamError(f"The upstream failed ({status}): {message}")
    param = fields.get("param")
    code = fields.get("code")
    return UpstreamRejected(
        status,
        message,
        str(fields.get("type") or "invalid_request_error"),
        param if isinstance(param, str) else None,
        code if isinstance(code, str) else None,
    )


def upstream_failed(error: GatewayError) -> bool:
    """The upstream's own failure, which a simulated answer may stand in for; not a request it rejected."""
    return isinstance(error, UpstreamError) or (
        isinstance(error, RateLimited) and error.code == ErrorCode.UPSTREAM_RATE_LIMITED
    )
