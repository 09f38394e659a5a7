"""Upstream clients built from users' own keys: checked before storing, cached per user, bounded.

A user who stored their own OpenAI key is answered by a `RemoteProvider` made with that
key, leased from a bounded LRU keyed by user id for as long as their call lasts (an open
stream holds its lease). A miss costs one query and one decryption (the key loader of
app/byok); a hit costs nothing. An entry is dropped when the user's key changes (a
`PrincipalChanged` event for `user:<id>`) or when the LRU is full, and its aiohttp session
is closed once no call holds it any more, so an evicted client never cuts an open stream.

The SDK clients of all users share one httpx client: building one loads the CA bundle
(~20 ms and ~1 MB each), which per user would stall the event loop on every miss; sharing
the transport is safe because the key travels in each request's headers.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

import aiohttp
from openai import DefaultAsyncHttpxClient

from app.config import Settings
from app.events import PrincipalChanged
from app.upstream.remote import RemoteProvider
from app.upstream.retry import RetryPolicy, StatusFailure
from app.upstream.targets import default_target

log = logging.getLogger("app.upstream.user_clients")

# `loader(user_id)`: the user's key in clear, or None when none is stored.
KeyLoader = Callable[[str], Awaitable[str | None]]
KeyCheck = Literal["valid", "rejected", "forbidden"]


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


class UserClient:
    """One user's provider. `leases` counts calls in flight; `retired` ones close when it reaches 0."""

    __slots__ = ("leases", "provider", "retired")

    def __init__(self, settings: Settings, api_key: str, sdk_transport: DefaultAsyncHttpxClient) -> None:
        self.provider = RemoteProvider(settings, default_target(settings, api_key), sdk_transport=sdk_transport)
        self.leases = 0
        self.retired = False

    def __repr__(self) -> str:
        return f"UserClient(leases={self.leases}, retired={self.retired})"

    @property
    def closed(self) -> bool:
        return self.provider.http.closed

    async def close(self) -> None:
        await self.provider.close()  # its aiohttp session; the SDK's transport is shared


class _Load:
    """One key being read for a user, and how many callers wait for it (each gets a lease when it is ready)."""

    __slots__ = ("task", "waiters")

    def __init__(self) -> None:
        self.waiters = 0
        self.task: asyncio.Task[UserClient | None] | None = None


class UserClients:
    """The bounded LRU of per-user clients of one process."""

    def __init__(self, settings: Settings, loader: KeyLoader, max_clients: int | None = None) -> None:
        self.settings = settings
        self.loader = loader
        self.max_clients = max_clients or settings.byok_max_clients
        self._entries: OrderedDict[str, UserClient] = OrderedDict()
        self._loading: dict[str, _Load] = {}
        self._retired: set[UserClient] = set()  # dropped while in use: closed by their last release
        self._closing: set[asyncio.Task[None]] = set()
        self._sdk_transport: DefaultAsyncHttpxClient | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._entries

    def get(self, user_id: str) -> UserClient | None:
        """The user's cached client, without leasing or loading it (for inspection)."""
        return self._entries.get(user_id)

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
            loaded = task.result() if task.done() and not task.cancelled() and task.exception() is None else None
            if loaded is not None:
                self.release(loaded)  # the lease the load took for this caller
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

    def on_principal_changed(self, change: PrincipalChanged) -> None:
        """A user's key changed (`user:<id>`): drop their client; after a missed broadcast (`all`), every one."""
        if change.kind == "user":
            self.forget(change.value)
        elif change.kind != "key":
            self.forget_all()

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
