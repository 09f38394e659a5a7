"""Resolving bearer tokens to principals, with a cache that revocations clear at once.

A cached principal saves a database round trip on every request. Staleness is
bounded twice: entries live `AUTH_CACHE_TTL` seconds, and every revocation or user
change is broadcast with Postgres NOTIFY so each process drops the entry at once.

A credential that checks out is never refused by a guard. What the process can check by
itself, it checks before anything else: a token's size, a key's MAC (app/auth/keys.py), a
JWT's signature. Junk is refused on the spot, costs no database work and needs no guard;
a key we issued is always looked up. Only keys of the unsigned form (made before keys were
signed) need the database to be told from junk: their lookups, and only theirs, go behind
the failed-auth guard of the client's address. Keys found unknown or revoked are
remembered for `AUTH_CACHE_TTL` (the negative cache), so asking again costs nothing.

JWT users live in their own namespace: user `JWT_USER_PREFIX` + `sub` (default `jwt:`),
so a JWT can never act as a key user of the same name (app/auth/principal.py).
"""

from __future__ import annotations

import asyncio
import hmac
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
from app.auth.keys import KeyForm, KeySigner, hash_key, looks_like_key
from app.auth.principal import Principal
from app.config import Settings
from app.db import DB_ERRORS
from app.errors import ErrorCode, PermissionDenied, RateLimited, Unauthenticated, Unavailable
from app.events import EventHub, PrincipalChanged
from app.listener import Listener
from app.validation import USER_ID_MAX, text_problem

log = logging.getLogger("app.auth")

MAX_CACHED = 100_000
TOUCH_INTERVAL = 30.0
# Longer than any key or sane JWT: refused before any MAC, signature or lookup.
MAX_TOKEN_CHARS = 8192
INVALID = "Invalid API key or token."


def _overrides(value: Any) -> dict[str, Any]:
    parsed = orjson.loads(value) if isinstance(value, str) else value
    return dict(parsed or {})


def _refuse_if_blocked(guard: FailedAuthGuard, client: str) -> None:
    if guard.blocked(client):
        raise RateLimited(
            "Too many failed authentication attempts from this address.",
            code=ErrorCode.TOO_MANY_AUTH_FAILURES,
            headers={"retry-after": str(guard.retry_after)},
        )


class _Expiring:
    """A bounded map whose entries expire (the oldest goes first when it is full)."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[str, tuple[float, Any]] = {}

    def get(self, key: str) -> Any:
        entry = self._entries.get(key)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    def put(self, key: str, value: Any, ttl: float | None = None) -> None:
        if len(self._entries) >= MAX_CACHED:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = (time.monotonic() + min(self.ttl, ttl if ttl is not None else self.ttl), value)

    def pop(self, key: str) -> None:
        self._entries.pop(key, None)

    def drop(self, matching: Callable[[Any], bool] | None = None) -> None:
        """Drop every entry, or those whose value matches."""
        if matching is None:
            self._entries.clear()
            return
        for key in [k for k, (_, value) in self._entries.items() if matching(value)]:
            del self._entries[key]


class Authenticator:
    """Owns the principal caches, the failed-auth guard, the NOTIFY handler and the `last_used_at` buffer.

    Every change it hears of (a NOTIFY, or `forget` called in this process) is published as
    `PrincipalChanged`, so caches beside this one (users' upstream clients) drop it too.
    """

    def __init__(
        self, settings: Settings, pool: asyncpg.Pool, listener: Listener, events: EventHub, signer: KeySigner
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.events = events
        self.signer = signer
        self.guard = FailedAuthGuard(settings.auth_failures_per_minute)
        self.admin_guard = FailedAuthGuard(settings.auth_failures_per_minute)
        # Only when JWTs are configured: PyJWT loads `cryptography` when it is installed
        # (~9 MB resident per process), which a gateway without JWTs never needs.
        self._jwt = importlib.import_module("jwt") if settings.jwt_secret else None
        ttl = settings.auth_cache_ttl
        self._by_key = _Expiring(ttl)  # key hash -> Principal
        self._unknown = _Expiring(ttl)  # key hash -> True: unknown or revoked
        self._users = _Expiring(ttl)  # user id -> Principal (JWT users)
        self._tokens = _Expiring(ttl)  # a verified JWT -> its user id, until it expires
        self._touched: dict[uuid.UUID, datetime] = {}
        # On each (re)connect, drop what may have been missed. While the connection is down, cached
        # entries live out their TTL: clearing them then would turn a database outage into an
        # authentication outage for callers already known.
        listener.on(repository.AUTH_CHANNEL, self.forget, resync=lambda: self.forget("all"))

    async def stop(self) -> None:
        await self.flush_touches()

    def cached(self, token: str) -> Principal | None:
        """The principal of a gateway key seen recently, without any I/O."""
        if not looks_like_key(token):
            return None
        principal: Principal | None = self._by_key.get(hash_key(token))
        if principal is not None:
            assert principal.api_key_id is not None
            self._touched[principal.api_key_id] = datetime.now(UTC)
        return principal

    async def principal(self, token: str, client: str) -> Principal:
        """The caller behind a token. Only lookups of unsigned keys go behind `client`'s failed-auth guard."""
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthenticated(f"The token is longer than {MAX_TOKEN_CHARS} characters; it cannot be valid.")
        if not looks_like_key(token):
            if token.count(".") == 2:
                return await self._from_jwt(token)
            raise Unauthenticated(INVALID)
        principal = self.cached(token)
        if principal is not None:
            return principal
        digest = hash_key(token)
        if self._unknown.get(digest):
            raise Unauthenticated(INVALID)
        form = self.signer.form(token)
        if form is KeyForm.FORGED:
            raise Unauthenticated(INVALID)
        if form is KeyForm.SIGNED:
            return await self._from_key(digest)
        _refuse_if_blocked(self.guard, client)
        try:
            return await self._from_key(digest)
        except Unauthenticated:
            self.guard.failed(client)
            raise

    def check_admin(self, token: str, client: str) -> None:
        """The admin key, or 401; an address that keeps guessing is refused (429) without a comparison."""
        expected = self.settings.admin_api_key
        if expected is None:
            raise PermissionDenied("The admin API is disabled: set ADMIN_API_KEY to enable it.")
        _refuse_if_blocked(self.admin_guard, client)
        if not hmac.compare_digest(token.encode(), expected.encode()):
            self.admin_guard.failed(client)
            raise Unauthenticated("Invalid admin key.")

    async def _from_key(self, digest: str) -> Principal:
        row = await self._lookup(repository.find_key, digest)
        if row is None or row["revoked_at"] is not None:
            self._unknown.put(digest, True)
            raise Unauthenticated(INVALID)
        principal = Principal(
            user_id=row["user_id"],
            tier=row["tier"],
            use_upstream=row["use_upstream"],
            limit_overrides=_overrides(row["limit_overrides"]),
            api_key_id=row["id"],
            via="key",
            has_own_key=row["has_own_key"],
        )
        self._by_key.put(digest, principal)
        self._touched[row["id"]] = datetime.now(UTC)
        return principal

    async def _from_jwt(self, token: str) -> Principal:
        user_id: str | None = self._tokens.get(token)
        if user_id is None:
            user_id, expires_in = self._verify_jwt(token)
            self._tokens.put(token, user_id, expires_in)
        principal: Principal | None = self._users.get(user_id)
        if principal is not None:
            return principal
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
        self._users.put(user_id, principal)
        return principal

    def _verify_jwt(self, token: str) -> tuple[str, float]:
        """The user id a JWT names, and the seconds it has left; no database work."""
        secret, jwt = self.settings.jwt_secret, self._jwt
        if secret is None or jwt is None:
            raise Unauthenticated(INVALID)
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
            raise Unauthenticated(INVALID) from error
        subject = claims["sub"]
        user_id = f"{self.settings.jwt_user_prefix}{subject}" if isinstance(subject, str) else ""
        if not subject or len(user_id) > USER_ID_MAX or text_problem(user_id) is not None:
            raise Unauthenticated("The token's subject is not a valid user id.")
        return user_id, float(claims["exp"]) - time.time()

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

    def forget(self, what: str) -> None:
        """Drop cached entries named by a NOTIFY payload: `key:<hash>` or `user:<id>`."""
        kind, _, value = what.partition(":")
        if kind == "key":
            self._by_key.pop(value)
        elif kind == "user":
            self._users.pop(value)
            self._by_key.drop(lambda principal: principal.user_id == value)
        else:
            self._by_key.drop()
            self._users.drop()
        self.events.principals.publish(PrincipalChanged(what))

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
