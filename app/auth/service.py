"""Resolving bearer tokens to principals, with a cache that revocations clear at once.

A cached principal saves a database round trip on every request. Staleness is
bounded twice: entries live `AUTH_CACHE_TTL` seconds, and every revocation or user
change is broadcast with Postgres NOTIFY so each process drops the entry at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from app.auth import repository
from app.auth.guard import FailedAuthGuard
from app.auth.keys import hash_key, looks_like_key
from app.auth.principal import Principal
from app.config import Settings
from app.db import DB_ERRORS
from app.errors import ErrorCode, RateLimited, Unauthenticated, Unavailable
from app.events import EventHub, PrincipalChanged

log = logging.getLogger("app.auth")

MAX_CACHED = 100_000
TOUCH_INTERVAL = 30.0


def _overrides(value: Any) -> dict[str, Any]:
    parsed = orjson.loads(value) if isinstance(value, str) else value
    return dict(parsed or {})


class Authenticator:
    """Owns the principal cache, the failed-auth guard, the NOTIFY listener and the `last_used_at` buffer.

    Every change it hears of (a NOTIFY, or `forget` called in this process) is published as
    `PrincipalChanged`, so caches beside this one (users' upstream clients) drop it too.
    """

    def __init__(self, settings: Settings, pool: asyncpg.Pool, database_url: str, events: EventHub) -> None:
        self.settings = settings
        self.pool = pool
        self.database_url = database_url
        self.events = events
        self.guard = FailedAuthGuard(settings.auth_failures_per_minute)
        # Only when JWTs are configured: PyJWT loads `cryptography` when it is installed
        # (~9 MB resident per process), which a gateway without JWTs never needs.
        self._jwt = importlib.import_module("jwt") if settings.jwt_secret else None
        self._by_key: dict[str, tuple[float, Principal]] = {}
        self._users: dict[str, tuple[float, Principal]] = {}
        self._touched: dict[uuid.UUID, datetime] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(), name="auth-listener"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush_touches()

    def cached(self, token: str) -> Principal | None:
        """The principal of a gateway key seen recently, without any I/O."""
        if not looks_like_key(token):
            return None
        entry = self._by_key.get(hash_key(token))
        if entry is None or entry[0] <= time.monotonic():
            return None
        principal = entry[1]
        assert principal.api_key_id is not None
        self._touched[principal.api_key_id] = datetime.now(UTC)
        return principal

    async def principal(self, token: str, client: str) -> Principal:
        """The caller behind a token: from the cache, or looked up behind the failed-auth guard of `client`."""
        principal = self.cached(token)
        if principal is not None:
            return principal
        if self.guard.blocked(client):
            raise RateLimited(
                "Too many failed authentication attempts from this address.",
                code=ErrorCode.TOO_MANY_AUTH_FAILURES,
                headers={"retry-after": str(self.guard.retry_after)},
            )
        try:
            return await self.authenticate(token)
        except Unauthenticated:
            self.guard.failed(client)
            raise

    async def authenticate(self, token: str) -> Principal:
        if looks_like_key(token):
            return await self._from_key(token)
        if token.count(".") == 2:
            return await self._from_jwt(token)
        raise Unauthenticated("Invalid API key or token.")

    async def _from_key(self, token: str) -> Principal:
        cached = self.cached(token)
        if cached is not None:
            return cached
        digest = hash_key(token)
        row = await self._lookup(repository.find_key, digest)
        if row is None or row["revoked_at"] is not None:
            raise Unauthenticated("Invalid API key or token.")
        principal = Principal(
            user_id=row["user_id"],
            tier=row["tier"],
            use_upstream=row["use_upstream"],
            limit_overrides=_overrides(row["limit_overrides"]),
            api_key_id=row["id"],
            via="key",
            has_own_key=row["has_own_key"],
        )
        self._remember(self._by_key, digest, principal, time.monotonic())
        self._touched[row["id"]] = datetime.now(UTC)
        return principal

    async def _from_jwt(self, token: str) -> Principal:
        secret, jwt = self.settings.jwt_secret, self._jwt
        if secret is None or jwt is None:
            raise Unauthenticated("Invalid API key or token.")
        try:
            claims = jwt.decode(
                token,
                secret,
                algorithms=["HS256"],
                issuer=self.settings.jwt_issuer,
                audience=self.settings.jwt_audience,
                options={
                    "require": ["exp", "sub"],
                    "verify_aud": self.settings.jwt_audience is not None,
                },
            )
        except jwt.ExpiredSignatureError as error:
            raise Unauthenticated("The token has expired.", code=ErrorCode.TOKEN_EXPIRED) from error
        except jwt.PyJWTError as error:
            raise Unauthenticated("Invalid API key or token.") from error
        user_id = claims["sub"]
        if not isinstance(user_id, str) or not user_id or len(user_id) > 200:
            raise Unauthenticated("The token's subject is not a valid user id.")
        now = time.monotonic()
        cached = self._users.get(user_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        found = await self._lookup(repository.find_user, user_id)
        row = found if found is not None and found["tier"] is not None else None  # no app_user row
        principal = Principal(
            user_id=user_id,
            tier=row["tier"] if row else self.settings.jwt_default_tier,
            use_upstream=row["use_upstream"] if row else True,
            limit_overrides=_overrides(row["limit_overrides"]) if row else {},
            via="jwt",
            has_own_key=bool(found and found["has_own_key"]),
        )
        self._remember(self._users, user_id, principal, now)
        return principal

    async def _lookup(
        self, query: Callable[[asyncpg.Pool, str], Awaitable[asyncpg.Record | None]], value: str
    ) -> asyncpg.Record | None:
        """A lookup that becomes 503 when the database is unreachable or slow: the caller is not at fault."""
        try:
            async with asyncio.timeout(self.settings.auth_lookup_timeout):
                return await query(self.pool, value)
        except DB_ERRORS as error:
            log.error("auth lookup failed, database unreachable: %s", error)
            raise Unavailable(
                "Authentication is unavailable right now; try again shortly.",
                code=ErrorCode.AUTH_UNAVAILABLE,
                headers={"retry-after": "5"},
            ) from error

    def _remember(self, cache: dict[str, tuple[float, Principal]], key: str, principal: Principal, now: float) -> None:
        if len(cache) >= MAX_CACHED:
            cache.pop(next(iter(cache)))
        cache[key] = (now + self.settings.auth_cache_ttl, principal)

    def forget(self, what: str) -> None:
        """Drop cached entries named by a NOTIFY payload: `key:<hash>` or `user:<id>`."""
        kind, _, value = what.partition(":")
        if kind == "key":
            self._by_key.pop(value, None)
        elif kind == "user":
            self._users.pop(value, None)
            for digest in [d for d, (_, p) in self._by_key.items() if p.user_id == value]:
                self._by_key.pop(digest, None)
        else:
            self._by_key.clear()
            self._users.clear()
        self.events.principals.publish(PrincipalChanged(what))

    async def _listen(self) -> None:
        """Hold a LISTEN connection; on each (re)connect, drop what may have been missed.

        While it is down, cached entries live out their TTL: clearing them then would turn a
        database outage into an authentication outage for callers already known.
        """
        while True:
            connection: asyncpg.Connection | None = None
            try:
                closed = asyncio.Event()
                connection = await asyncpg.connect(self.database_url)
                connection.add_termination_listener(lambda _connection, done=closed: done.set())
                await connection.add_listener(repository.AUTH_CHANNEL, lambda *args: self.forget(args[3]))
                self.forget("all")  # anything missed while disconnected
                await closed.wait()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("auth listener down, retrying: %s", error)
            finally:
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await connection.close()
            await asyncio.sleep(1)

    async def flush_touches(self) -> None:
        """Write `last_used_at` for keys used since the last flush: one statement, not one per request."""
        if not self._touched:
            return
        touched, self._touched = self._touched, {}
        try:
            await repository.touch_keys(self.pool, touched.items())
        except Exception as error:
            log.warning("could not record key use, keeping it for the next flush: %s", error)
            for key_id, used_at in touched.items():
                self._touched.setdefault(key_id, used_at)
