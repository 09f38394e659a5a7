"""The user's context for a run: what the app sent with it, over what a profile's context URL says.

A profile may name a URL that the app backend serves; it is called with the user id
(`GET url?user_id=...&profile=...`, with `Authorization: Bearer THREAD_CONTEXT_TOKEN` when
set) and must answer a JSON object. Answers are cached per user and profile in Postgres
for the profile's TTL. A slow or failing URL never fails a run: after its timeout the
run goes on with the last cached answer, however old, or with none.

Redirects are not followed (a 3xx is a failed fetch): the bearer token and the user id go
to the configured URL only, never to wherever it points. With CONTEXT_ALLOWED_HOSTS set, a
URL on another host is never called (start-up refuses such a profile: app/configcheck.py).
The user id and profile are query parameters that aiohttp encodes, so `&`, `=`, spaces or
any other character in a user id arrive as one intact value.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from app.db import DB_ERRORS
from app.errors import ErrorCode, InvalidRequest
from app.threads import repository
from app.threads.profiles import Profile

log = logging.getLogger("app.threads.context")


def context_size(context: dict[str, Any]) -> int:
    return len(orjson.dumps(context))


def check_sent_context(context: dict[str, Any] | None, max_bytes: int) -> dict[str, Any]:
    """The context a request carries, refused when larger than the configured cap."""
    if not context:
        return {}
    size = context_size(context)
    if size > max_bytes:
        raise InvalidRequest(
            f"'context' is {size} bytes as JSON; at most {max_bytes} are accepted.",
            param="context",
            code=ErrorCode.CONTEXT_TOO_LARGE,
        )
    return context


def host_allowed(url: str, allowed_hosts: list[str]) -> bool:
    """Whether `url`'s host is one of `allowed_hosts` (lower case); an empty list allows any."""
    if not allowed_hosts:
        return True
    host = (urlsplit(url).hostname or "").rstrip(".")
    return host in allowed_hosts


class ContextSource:
    """Fetches and caches context from the profiles' context URLs."""

    def __init__(self, settings: Settings, writes: async_sessionmaker[AsyncSession]) -> None:
        self.settings = settings
        self.writes = writes  # autocommit: the cache write is one statement
        self.http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        headers = {"Accept": "application/json"}
        if self.settings.thread_context_token:
            headers["Authorization"] = f"Bearer {self.settings.thread_context_token}"
        self.http = aiohttp.ClientSession(headers=headers, skip_auto_headers=("User-Agent",))

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()

    async def for_run(
        self,
        user_id: str,
        profile: Profile,
        cached: dict[str, Any] | None,
        cached_age: float | None,
        sent: dict[str, Any],
    ) -> dict[str, Any]:
        """The context a run uses: the fetched (or cached) context, overlaid by what the app sent."""
        if profile.context_url is None:
            return dict(sent)
        ttl = profile.context_ttl_seconds
        ttl = self.settings.thread_context_ttl if ttl is None else ttl
        fetched = cached
        if cached is None or cached_age is None or cached_age >= ttl:
            fresh = await self._fetch(profile, user_id)
            if fresh is not None:
                fetched = fresh
                await self._save(user_id, profile.name, fresh)
            elif cached is not None:
                log.info("using cached context of %s for %s (%.0fs old)", user_id, profile.name, cached_age or 0)
        return {**(fetched or {}), **sent}

    async def _fetch(self, profile: Profile, user_id: str) -> dict[str, Any] | None:
        assert self.http is not None and profile.context_url is not None
        timeout = profile.context_timeout_seconds or self.settings.thread_context_timeout
        limit = self.settings.thread_context_max_bytes
        if not host_allowed(profile.context_url, self.settings.context_allowed_hosts):
            log.warning("context URL of profile %s is outside CONTEXT_ALLOWED_HOSTS: not called", profile.name)
            return None
        try:
            async with self.http.get(
                profile.context_url,
                params={"user_id": user_id, "profile": profile.name},
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False,
            ) as response:
                if response.status != 200:
                    raise ValueError(f"status {response.status}")
                body = await response.content.read(limit + 1)
            if len(body) > limit:
                raise ValueError(f"larger than {limit} bytes")
            context = orjson.loads(body)
            if not isinstance(context, dict):
                raise ValueError("not a JSON object")
            return context
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            # orjson.JSONDecodeError is a ValueError.
            log.warning("context URL of profile %s failed for %s, going on without: %r", profile.name, user_id, error)
            return None

    async def _save(self, user_id: str, profile: str, context: dict[str, Any]) -> None:
        try:
            async with self.writes.begin() as session:
                await repository.save_context(session, user_id=user_id, profile=profile, context=context)
        except (SQLAlchemyError, *DB_ERRORS) as error:
            log.warning("could not cache context of %s for %s: %s", user_id, profile, error)
