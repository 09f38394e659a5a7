"""Upstream clients built from users' own keys: checked before storing, cached per user, bounded.

A user who stored their own OpenAI key gets backends that look like the operator's
(`UserChat`, `UserImages`, `UserRealtime`) but resolve the user's client on each call
from a bounded LRU keyed by user id. A miss costs one query and one decryption (the
`loader` that app/byok installs at start-up); a hit costs nothing. An entry is dropped
when the user's key changes (the auth NOTIFY `user:<id>`) or when the LRU is full, and
its aiohttp session is closed once no call holds it any more, so an evicted client
never cuts an open stream.

Per user: one `UpstreamHTTP` (its own aiohttp session) and one `AsyncOpenAI` with
`max_retries=0`, like the operator's. The SDK clients share one httpx client: building
an httpx client loads the CA bundle (~20 ms and ~1 MB each), which per user would stall
the event loop on every miss; sharing the transport is safe because the key travels in
each request's headers.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
import orjson
from openai import AsyncOpenAI, DefaultAsyncHttpxClient

from app.config import Settings
from app.errors import GatewayError, InvalidRequest, Unavailable
from app.upstream.http import UpstreamHTTP, UpstreamReply, UpstreamStream
from app.upstream.images import Generation, ImageBackend, Moderation, OpenAIImages
from app.upstream.realtime import OpenAIRealtimeSecrets, RealtimeSecrets
from app.upstream.retry import RetryPolicy, StatusFailure

if TYPE_CHECKING:
    from app.upstream.provider import ChatBackend, EventStream

log = logging.getLogger("app.upstream.user_clients")

# `loader(user_id)`: the user's key in clear, or None when none is stored.
KeyLoader = Callable[[str], Awaitable[str | None]]
KeyCheck = Literal["valid", "rejected", "forbidden"]

OWN_KEY_REJECTED = (
    "The upstream rejected your stored OpenAI key. Store a new one with PUT /v1/me/openai-key, "
    "or delete it (DELETE /v1/me/openai-key) to use the gateway's key."
)


async def check_key(settings: Settings, api_key: str) -> KeyCheck:
    """Ask the upstream whether a key works (`GET /models`): valid, rejected (401) or forbidden (403).

    Connection failures and 5xx are retried like every upstream call, then raised as our
    502/504; a 429 is raised as the upstream's rate limit. The upstream's own error text
    is never passed on: it may quote part of the key.
    """
    timeout = aiohttp.ClientTimeout(total=settings.byok_check_timeout)
    headers = {"Authorization": f"Bearer {api_key}"}
    async with aiohttp.ClientSession(timeout=timeout, skip_auto_headers=("User-Agent",)) as session:

        async def attempt(_: int) -> KeyCheck:
            async with session.get(settings.openai_base_url + "/models", headers=headers) as response:
                payload = await response.read()
                if response.status == 401:
                    return "rejected"
                if response.status == 403:
                    return "forbidden"
                if response.status >= 300:
                    raise StatusFailure(response.status, payload, response.headers)
                return "valid"

        return await RetryPolicy(settings).run(attempt)


@contextmanager
def own_key_errors() -> Iterator[None]:
    """The upstream refusing a user's key is the user's to fix, not a gateway failure (502)."""
    try:
        yield
    except GatewayError as error:
        if error.code == "upstream_auth_error":
            raise InvalidRequest(OWN_KEY_REJECTED, code="openai_key_rejected") from error
        raise


class UserClient:
    """One user's clients. `leases` counts calls in flight; `retired` ones close when it reaches 0."""

    __slots__ = ("http", "images", "leases", "realtime", "retired", "sdk")

    def __init__(self, settings: Settings, api_key: str, sdk_transport: Any) -> None:
        self.http = UpstreamHTTP(settings, api_key=api_key)
        self.sdk = AsyncOpenAI(
            api_key=api_key,
            base_url=settings.openai_base_url,
            timeout=settings.upstream_read_timeout,
            max_retries=0,  # retried by our policy, as the operator's client is
            http_client=sdk_transport,
        )
        # The SDK reads OPENAI_ORG_ID / OPENAI_PROJECT_ID from the environment: the operator's, not the user's.
        self.sdk.organization = None
        self.sdk.project = None
        self.images = OpenAIImages(self.sdk, settings)
        self.realtime = OpenAIRealtimeSecrets(self.sdk, RetryPolicy(settings))
        self.leases = 0
        self.retired = False

    def __repr__(self) -> str:
        return f"UserClient(leases={self.leases}, retired={self.retired})"

    @property
    def closed(self) -> bool:
        return self.http.session.closed

    async def close(self) -> None:
        # Only the aiohttp session is this client's own: the SDK's transport is shared.
        await self.http.close()


class _Load:
    """One key being read for a user, and how many callers wait for it (each gets a lease when it is ready)."""

    __slots__ = ("task", "waiters")

    def __init__(self) -> None:
        self.waiters = 0
        self.task: asyncio.Task[UserClient | None] | None = None


class UserClients:
    """The bounded LRU of per-user clients of one process."""

    def __init__(self, settings: Settings, max_clients: int | None = None) -> None:
        self.settings = settings
        self.max_clients = max_clients or settings.byok_max_clients
        self.loader: KeyLoader | None = None  # installed by app.byok at start-up
        self._entries: OrderedDict[str, UserClient] = OrderedDict()
        self._loading: dict[str, _Load] = {}
        self._retired: set[UserClient] = set()  # dropped while in use: closed by their last release
        self._closing: set[asyncio.Task[None]] = set()
        self._sdk_transport: Any = None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._entries

    async def acquire(self, user_id: str) -> UserClient | None:
        """The user's client, leased: call `release` when done. None: no key is stored for them."""
        client = self._entries.get(user_id)
        if client is not None:
            self._entries.move_to_end(user_id)
            client.leases += 1
            return client
        load = self._loading.get(user_id)
        if load is None:
            load = self._loading[user_id] = _Load()
            load.task = asyncio.create_task(self._build(user_id, load), name="byok-load")
            load.task.add_done_callback(_retrieve)
        load.waiters += 1
        task = load.task
        assert task is not None
        try:
            # Shielded: a caller that goes away does not cancel the load others wait for.
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done() and not task.cancelled() and task.exception() is None and task.result() is not None:
                self.release(task.result())  # the lease the load took for this caller
            else:
                load.waiters -= 1
            raise

    def release(self, client: UserClient) -> None:
        client.leases -= 1
        if client.retired and client.leases <= 0:
            self._close_soon(client)

    @asynccontextmanager
    async def lease(self, user_id: str) -> AsyncIterator[UserClient | None]:
        client = await self.acquire(user_id)
        try:
            yield client
        finally:
            if client is not None:
                self.release(client)

    async def _build(self, user_id: str, load: _Load) -> UserClient | None:
        try:
            if self.loader is None:
                raise Unavailable("Users' own OpenAI keys are not available in this process.", code="byok_disabled")
            api_key = await self.loader(user_id)
            if api_key is None:
                return None
            if self._sdk_transport is None:
                self._sdk_transport = DefaultAsyncHttpxClient(timeout=self.settings.upstream_read_timeout)
            client = UserClient(self.settings, api_key, self._sdk_transport)
            # Leased for every waiting caller before anything can evict it.
            client.leases = load.waiters
            if self._loading.get(user_id) is not load:
                # The key changed while it was read: serve the callers already waiting, keep nothing.
                self._retire(client)
                return client
            self._entries[user_id] = client
            while len(self._entries) > self.max_clients:
                _, evicted = self._entries.popitem(last=False)
                self._retire(evicted)
            return client
        finally:
            if self._loading.get(user_id) is load:
                del self._loading[user_id]

    def forget(self, user_id: str) -> None:
        """The user's key changed: drop their client (closed once idle) and any load in flight."""
        self._loading.pop(user_id, None)
        client = self._entries.pop(user_id, None)
        if client is not None:
            self._retire(client)

    def forget_all(self) -> None:
        self._loading.clear()
        while self._entries:
            self._retire(self._entries.popitem(last=False)[1])

    def _retire(self, client: UserClient) -> None:
        client.retired = True
        if client.leases <= 0:
            self._close_soon(client)
        else:
            self._retired.add(client)

    def _close_soon(self, client: UserClient) -> None:
        self._retired.discard(client)
        task = asyncio.get_running_loop().create_task(client.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """At shutdown: every client, in use or not."""
        clients = [*self._entries.values(), *self._retired]
        self._entries.clear()
        self._retired.clear()
        await asyncio.gather(*(client.close() for client in clients), *self._closing, return_exceptions=True)
        if self._sdk_transport is not None:
            await self._sdk_transport.aclose()
            self._sdk_transport = None


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a load's failure as seen: its waiters may all have gone away."""
    if not task.cancelled():
        task.exception()


class LeasedStream:
    """A user's open stream; closing it gives the client back."""

    def __init__(self, stream: UpstreamStream, release: Callable[[], None]) -> None:
        self.stream = stream
        self.request_id = stream.request_id
        self.attempts = stream.attempts
        self._release: Callable[[], None] | None = release

    def events(self) -> AsyncIterator[bytes]:
        return self.stream.events()

    def close(self) -> None:
        self.stream.close()
        release, self._release = self._release, None
        if release is not None:
            release()


class UserChat:
    """Chat completions with the user's key; the operator's backend if their key vanished meanwhile."""

    simulated = False

    def __init__(self, clients: UserClients, user_id: str, fallback: ChatBackend) -> None:
        self.clients = clients
        self.user_id = user_id
        self.fallback = fallback

    async def complete(self, payload: dict[str, Any]) -> UpstreamReply:
        async with self.clients.lease(self.user_id) as client:
            if client is None:
                return await self.fallback.complete(payload)
            with own_key_errors():
                return await client.http.post("/chat/completions", orjson.dumps(payload))

    async def open_stream(self, payload: dict[str, Any]) -> EventStream:
        client = await self.clients.acquire(self.user_id)
        if client is None:
            return await self.fallback.open_stream(payload)
        try:
            with own_key_errors():
                stream = await client.http.open_stream("/chat/completions", orjson.dumps(payload))
        except BaseException:
            self.clients.release(client)
            raise
        return LeasedStream(stream, lambda: self.clients.release(client))


class UserImages:
    """Image generation and moderation with the user's key."""

    simulated = False

    def __init__(self, clients: UserClients, user_id: str, fallback: ImageBackend) -> None:
        self.clients = clients
        self.user_id = user_id
        self.fallback = fallback

    async def generate(self, params: dict[str, Any]) -> Generation:
        async with self.clients.lease(self.user_id) as client:
            if client is None:
                return await self.fallback.generate(params)
            with own_key_errors():
                return await client.images.generate(params)

    async def moderate(self, texts: list[str]) -> Moderation:
        async with self.clients.lease(self.user_id) as client:
            if client is None:
                return await self.fallback.moderate(texts)
            with own_key_errors():
                return await client.images.moderate(texts)


class UserRealtime:
    """Realtime client secrets minted with the user's key."""

    simulated = False

    def __init__(self, clients: UserClients, user_id: str, fallback: RealtimeSecrets) -> None:
        self.clients = clients
        self.user_id = user_id
        self.fallback = fallback

    async def create(self, body: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        async with self.clients.lease(self.user_id) as client:
            if client is None:
                return await self.fallback.create(body)
            with own_key_errors():
                return await client.realtime.create(body)
