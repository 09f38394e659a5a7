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
from collections.abc import AsyncIterator

import aiohttp

from app.config import Settings
from app.errors import UpstreamError, UpstreamTimeout
from app.sse import Event, StreamRule, read_events
from app.upstream.provider import UpstreamReply
from app.upstream.retry import RetryPolicy, StatusFailure

log = logging.getLogger("app.upstream")


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

    def __init__(self, response: aiohttp.ClientResponse, rule: StreamRule, attempts: int) -> None:
        self.response = response
        self.rule = rule
        self.request_id = response.headers.get("x-request-id")
        self.attempts = attempts

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
    """One aiohttp session per key; failed attempts are retried by the shared policy."""

    def __init__(self, settings: Settings, api_key: str) -> None:
        self.retry = RetryPolicy(settings)
        self.total_timeout = settings.upstream_total_timeout
        self.base_url = settings.openai_base_url
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=settings.upstream_max_connections, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(
                # `connect` covers waiting for a free pooled connection too: every open stream holds one.
                connect=settings.upstream_pool_timeout + settings.upstream_connect_timeout,
                sock_connect=settings.upstream_connect_timeout,
                sock_read=settings.upstream_read_timeout,
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

    async def request(
        self, method: str, path: str, body: bytes | None = None, params: dict[str, str] | None = None
    ) -> UpstreamReply:
        """The whole answer, within UPSTREAM_TOTAL_TIMEOUT. Attempts are retried only until the upstream
        answers: once its status line has come, a body that breaks off is a failure, never a retry (the
        upstream took the request and may bill it)."""
        url = self.base_url + path

        async def attempt(number: int) -> UpstreamReply:
            async with self.session.request(method, url, data=body, params=params, headers=self.headers) as response:
                payload = await read_body(response)
                if response.status >= 300:
                    raise StatusFailure(response.status, payload, response.headers)
                return UpstreamReply(payload, response.headers.get("x-request-id"), number)

        try:
            async with asyncio.timeout(self.total_timeout):
                return await self.retry.run(attempt)
        except TimeoutError as error:
            raise UpstreamTimeout("The upstream did not answer in time.", billed=True) from error

    async def open_stream(
        self,
        path: str,
        body: bytes | None,
        rule: StreamRule,
        *,
        method: str = "POST",
        params: dict[str, str] | None = None,
    ) -> UpstreamStream:
        async def attempt(number: int) -> UpstreamStream:
            response = await self.session.request(
                method, self.base_url + path, data=body, params=params, headers=self.headers
            )
            if response.status >= 300:
                payload = await read_body(response)
                response.release()
                raise StatusFailure(response.status, payload, response.headers)
            return UpstreamStream(response, rule, number)

        return await self.retry.run(attempt)
