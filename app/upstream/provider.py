"""The upstream handles a process holds, and which one serves a given caller."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

import orjson
from openai import AsyncOpenAI

from app.auth.principal import Principal
from app.config import Settings
from app.upstream.http import UpstreamHTTP, UpstreamReply
from app.upstream.images import ImageBackend, OpenAIImages, SimulatedImages
from app.upstream.realtime import OpenAIRealtimeSecrets, RealtimeSecrets, SimulatedRealtimeSecrets
from app.upstream.retry import RetryPolicy
from app.upstream.simulated import SimulatedChat
from app.upstream.user_clients import KeyCheck, UserChat, UserClients, UserImages, UserRealtime, check_key


class EventStream(Protocol):
    request_id: str | None
    attempts: int

    def events(self) -> AsyncIterator[bytes]: ...
    def close(self) -> None: ...


class ChatBackend(Protocol):
    simulated: bool

    async def complete(self, payload: dict[str, Any]) -> UpstreamReply: ...
    async def open_stream(self, payload: dict[str, Any]) -> EventStream: ...


class OpenAIChat:
    """Chat completions forwarded to the upstream over the lean HTTP client."""

    simulated = False

    def __init__(self, http: UpstreamHTTP) -> None:
        self.http = http

    async def complete(self, payload: dict[str, Any]) -> UpstreamReply:
        return await self.http.post("/chat/completions", orjson.dumps(payload))

    async def open_stream(self, payload: dict[str, Any]) -> EventStream:
        return await self.http.open_stream("/chat/completions", orjson.dumps(payload))


class Upstream:
    """Built once in lifespan, closed at shutdown."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.simulated_chat = SimulatedChat()
        self.http: UpstreamHTTP | None = None
        self.sdk: AsyncOpenAI | None = None
        self.chat: ChatBackend = self.simulated_chat
        self.simulated_realtime = SimulatedRealtimeSecrets()
        self.realtime: RealtimeSecrets = self.simulated_realtime
        self.simulated_images = SimulatedImages()
        self.images: ImageBackend = self.simulated_images
        if not settings.simulated:
            self.http = UpstreamHTTP(settings)
            self.chat = OpenAIChat(self.http)
            self.sdk = AsyncOpenAI(
                api_key=settings.openai_api_key,
                base_url=settings.openai_base_url,
                timeout=settings.upstream_read_timeout,
                max_retries=0,  # retried by our policy (app/upstream/retry.py), as the pass-through is
            )
            self.realtime = OpenAIRealtimeSecrets(self.sdk, RetryPolicy(settings))
            self.images = OpenAIImages(self.sdk, settings)
        # Users' own keys (app/byok), even in simulated mode: they are sent to OPENAI_BASE_URL.
        self.user_clients = UserClients(settings)

    def chat_for(self, principal: Principal) -> ChatBackend:
        """The rollout switch first (simulated replies), then the user's own key, else ours."""
        if not principal.use_upstream:
            return self.simulated_chat
        return UserChat(self.user_clients, principal.user_id, self.chat) if principal.has_own_key else self.chat

    def realtime_for(self, principal: Principal) -> RealtimeSecrets:
        if not principal.use_upstream:
            return self.simulated_realtime
        if principal.has_own_key:
            return UserRealtime(self.user_clients, principal.user_id, self.realtime)
        return self.realtime

    def images_for(self, principal: Principal) -> ImageBackend:
        if not principal.use_upstream:
            return self.simulated_images
        return UserImages(self.user_clients, principal.user_id, self.images) if principal.has_own_key else self.images

    async def check_key(self, api_key: str) -> KeyCheck:
        """Whether the upstream accepts a user's key, before it is stored."""
        return await check_key(self.settings, api_key)

    async def close(self) -> None:
        await self.user_clients.close()
        if self.http is not None:
            await self.http.close()
        if self.sdk is not None:
            await self.sdk.close()
