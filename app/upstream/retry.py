"""One retry policy for every upstream call, whichever client makes it.

Connection failures, 408/409/429/5xx are retried with exponential backoff and jitter,
before any byte reaches the client, and only until the upstream answers: a body that breaks
off after its status line is a failure of its own, never retried (app/upstream/http.py). A `retry-after` longer than
`UPSTREAM_MAX_RETRY_AFTER` is not slept through: it is passed on to the client, whose
SDK backs off by itself. A read timeout is not retried: the upstream took the request,
and trying again would double the wait (and, for images, the bill).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import aiohttp
import openai

from app.config import Settings
from app.errors import GatewayError, UpstreamError, UpstreamTimeout
from app.upstream.errors import RETRYABLE_STATUSES, error_from_status, retry_after_seconds

log = logging.getLogger("app.upstream")

T = TypeVar("T")


class StatusFailure(Exception):
    """A non-2xx answer read by the aiohttp client, before it is mapped."""

    def __init__(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        self.status = status
        self.body = body
        self.headers = headers


@dataclass(slots=True)
class Verdict:
    error: GatewayError
    retryable: bool
    delay: float | None = None


def _status_verdict(status: int, body: bytes, headers: Mapping[str, str], max_retry_after: float) -> Verdict:
    delay = retry_after_seconds(headers)
    retryable = status in RETRYABLE_STATUSES and (delay is None or delay <= max_retry_after)
    return Verdict(error_from_status(status, body, headers), retryable, delay)


def classify(failure: Exception, max_retry_after: float) -> Verdict | None:
    """Our error for a failed attempt of either client, and whether to try again; None: not ours."""
    if isinstance(failure, StatusFailure):
        return _status_verdict(failure.status, failure.body, failure.headers, max_retry_after)
    if isinstance(failure, openai.APIStatusError):
        response = failure.response
        return _status_verdict(failure.status_code, response.content, response.headers, max_retry_after)
    if isinstance(failure, aiohttp.ConnectionTimeoutError):
        return Verdict(UpstreamTimeout("Could not connect to the upstream in time."), retryable=True)
    if isinstance(failure, TimeoutError | openai.APITimeoutError):  # it took the request: it may bill it
        return Verdict(UpstreamTimeout("The upstream did not answer in time.", billed=True), retryable=False)
    if isinstance(failure, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError | openai.APIConnectionError):
        log.warning("upstream unreachable: %r", failure)
        return Verdict(UpstreamError("Could not reach the upstream."), retryable=True)
    return None


class RetryPolicy:
    def __init__(self, settings: Settings, retries: int | None = None) -> None:
        self.retries = settings.upstream_max_retries if retries is None else retries
        self.base_delay = settings.upstream_retry_base_delay
        self.max_retry_after = settings.upstream_max_retry_after

    async def run(self, attempt: Callable[[int], Awaitable[T]]) -> T:
        """`attempt(number)` until it succeeds, fails for good, or the retries run out."""
        for number in range(1, self.retries + 2):
            try:
                return await attempt(number)
            except Exception as failure:
                verdict = classify(failure, self.max_retry_after)
                if verdict is None:
                    raise
                if not verdict.retryable or number > self.retries:
                    raise verdict.error from failure
            pause = verdict.delay if verdict.delay is not None else self.backoff(number)
            log.info("upstream attempt %d failed (%s), retrying in %.2fs", number, verdict.error.message, pause)
            await asyncio.sleep(pause)
        raise AssertionError("unreachable")

    def backoff(self, number: int) -> float:
        base: float = self.base_delay * 2 ** (number - 1)
        return base / 2 + random.uniform(0, base / 2)
