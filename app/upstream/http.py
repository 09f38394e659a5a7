"""A lean aiohttp client for the pass-through routes.

The request body goes up as the client's JSON (with the model resolved); the answer
comes back as bytes we forward without re-serialising. Measured on this machine, the
`openai` SDK costs 4-6x the throughput of a bare aiohttp pass-through (it parses and
validates every response), so the hot path uses aiohttp and the SDK serves the colder
routes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import aiohttp

from app.config import Settings
from app.errors import UpstreamError, UpstreamTimeout
from app.sse import Event, StreamRule, read_events
from app.upstream.provider import UpstreamReply
from app.upstream.retry import RetryPolicy, StatusFailure
from app.upstream.targets import Target

log = logging.getLogger("app.upstream")

# A request body: JSON bytes, or a multipart form made anew for each attempt (a form is sent once).
Body = bytes | Callable[[], aiohttp.FormData] | None


async def read_body(response: aiohttp.ClientResponse) -> bytes:
    """The body of an answer whose status line has come: a break now is not retried."""
    try:
        return await response.read()
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as error:
        log.warning("upstream answer broke off: %r", error)
        raise UpstreamError("The upstream's answer broke off.", billed=True) from error
    except TimeoutError as error:
        raise UpstreamTimeout("The upstream stopped sending its answer.", billed=True) from error


class UpstreamStream:
    """An open 2xx event stream, read by its API's rule."""

    def __init__(self, response: aiohttp.ClientResponse, rule: StreamRule, attempts: int, upstream: str) -> None:
        self.response = response
        self.rule = rule
        self.request_id = response.headers.get("x-request-id")
        self.attempts = attempts
        self.upstream = upstream

    def events(self) -> AsyncIterator[Event]:
        return read_events(self._lines(), self.rule)

    async def _lines(self) -> AsyncIterator[bytes]:
        try:
            async for line in self.response.content:
                yield line
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as error:
            log.warning("upstream stream broke: %r", error)
            raise UpstreamError("The upstream connection broke mid-stream.") from error
        except TimeoutError as error:
            raise UpstreamTimeout("The upstream stopped sending mid-stream.") from error

    def close(self) -> None:
        self.response.close()


class UpstreamHTTP:
    """One aiohttp session per upstream and key; failed attempts are retried by the shared policy
    (`retries`: its own count, e.g. 0 when failover tries the next upstream instead)."""

    def __init__(self, settings: Settings, target: Target, retries: int | None = None) -> None:
        self.retry = RetryPolicy(settings, retries)
        self.total_timeout = settings.upstream_total_timeout
        self.upstream = target.name
        self.target = target
        self.form_headers = target.auth_headers  # aiohttp sets the multipart type
        self.headers = {**self.form_headers, "Content-Type": "application/json"}
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=settings.upstream_max_connections, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(
                # `connect` covers waiting for a free pooled connection too: every open stream holds one.
                connect=settings.upstream_pool_timeout + target.connect_timeout,
                sock_connect=target.connect_timeout,
                sock_read=target.read_timeout,
            ),
            skip_auto_headers=("User-Agent",),
        )

    @property
    def closed(self) -> bool:
        return self.session.closed

    async def close(self) -> None:
        await self.session.close()

    async def post(self, path: str, body: bytes) -> UpstreamReply:
        return await self.request("POST", path, body)

    def _body(self, body: Body) -> tuple[bytes | aiohttp.FormData | None, dict[str, str]]:
        if callable(body):
            return body(), self.form_headers
        return body, self.headers

    def _url(self, path: str, params: dict[str, str] | None, model: str | None) -> tuple[str, dict[str, str] | None]:
        """An API path as this upstream takes it (Azure: the deployment in the path, `api-version`)."""
        path, extra = self.target.endpoint(path, model)
        return self.target.base_url + path, ({**extra, **params} if params else extra) or None

    async def request(
        self,
        method: str,
        path: str,
        body: Body = None,
        params: dict[str, str] | None = None,
        *,
        model: str | None = None,
    ) -> UpstreamReply:
        """The whole answer, within UPSTREAM_TOTAL_TIMEOUT. Attempts are retried only until the upstream
        answers: once its status line has come, a body that breaks off is a failure, never a retry (the
        upstream took the request and may bill it)."""
        url, params = self._url(path, params, model)

        async def attempt(number: int) -> UpstreamReply:
            data, headers = self._body(body)
            async with self.session.request(method, url, data=data, params=params, headers=headers) as response:
                payload = await read_body(response)
                if response.status >= 300:
                    raise StatusFailure(response.status, payload, response.headers)
                return UpstreamReply(payload, response.headers.get("x-request-id"), number, self.upstream)

        try:
            async with asyncio.timeout(self.total_timeout):
                return await self.retry.run(attempt)
        except TimeoutError as error:
            raise UpstreamTimeout("The upstream did not answer in time.", billed=True) from error

    async def open_stream(
        self,
        path: str,
        body: Body,
        rule: StreamRule,
        *,
        method: str = "POST",
        params: dict[str, str] | None = None,
        model: str | None = None,
    ) -> UpstreamStream:
        url, params = self._url(path, params, model)

        async def attempt(number: int) -> UpstreamStream:
            data, headers = self._body(body)
            response = await self.session.request(method, url, data=data, params=params, headers=headers)
            if response.status >= 300:
                payload = await read_body(response)
                response.release()
                raise StatusFailure(response.status, payload, response.headers)
            return UpstreamStream(response, rule, number, self.upstream)

        return await self.retry.run(attempt)
