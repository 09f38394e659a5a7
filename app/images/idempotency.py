"""`Idempotency-Key`: a retried request gets the first one's result instead of a second generation.

The key is claimed before any work, in its own committed statement (insert-first with
ON CONFLICT), so of two concurrent duplicates only one calls the upstream; the other
gets 409 with `retry-after` (the OpenAI SDKs retry 409) and, once the first is done,
the stored result. The result is written in the request's own transaction, together
with the rows it names. A failed request releases its key so that a retry can run.

What is stored is what the response is rebuilt from (ids, not signed URLs that expire).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response

from app.db import DB_ERRORS
from app.errors import Conflict, ErrorCode, InvalidRequest
from app.models import IdempotencyKey

log = logging.getLogger("app.images.idempotency")

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255

CLAIM = """
INSERT INTO idempotency_key AS k (user_id, key, request_hash, state, created_at, expires_at)
VALUES ($1, $2, $3, 'pending', now(), now() + make_interval(secs => $4))
ON CONFLICT (user_id, key) DO UPDATE
SET request_hash = EXCLUDED.request_hash, state = 'pending', response_status = NULL, result = NULL,
    created_at = now(), expires_at = EXCLUDED.expires_at
WHERE k.expires_at <= now() OR (k.state = 'pending' AND k.created_at < now() - make_interval(secs => $5))
RETURNING 1
"""
LOOKUP = """
SELECT request_hash, state, response_status, result FROM idempotency_key
WHERE user_id = $1 AND key = $2 AND expires_at > now()
"""
RELEASE = "DELETE FROM idempotency_key WHERE user_id = $1 AND key = $2 AND state = 'pending'"
PRUNE = "DELETE FROM idempotency_key WHERE expires_at <= now()"


@dataclass(frozen=True, slots=True)
class Stored:
    status: int
    result: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Claim:
    """A claimed key (or none: a request without `Idempotency-Key`), completed with the work it guards."""

    user_id: str
    key: str | None

    async def complete(self, session: AsyncSession, status: int, result: dict[str, Any]) -> None:
        """Store the outcome in the work's own transaction: committed with the rows it names, or not at all."""
        if self.key is None:
            return
        await session.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.user_id == self.user_id, IdempotencyKey.key == self.key)
            .values(state="done", response_status=status, result=result)
        )


def request_hash(method: str, path: str, body: dict[str, Any]) -> str:
    """The same request whatever the JSON's key order or spacing."""
    canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(f"{method} {path}\n".encode() + canonical).hexdigest()


def checked_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidRequest(
            f"The {HEADER} header must be 1 to {MAX_KEY_LENGTH} printable characters.",
            param=HEADER,
            code=ErrorCode.INVALID_IDEMPOTENCY_KEY,
        )
    return key


class IdempotencyStore:
    def __init__(self, pool: asyncpg.Pool, ttl: float, lease: float) -> None:
        self.pool = pool
        self.ttl = ttl
        self.lease = lease  # a pending claim older than this belongs to a process that died

    async def claim(self, user_id: str, key: str, fingerprint: str) -> Stored | None:
        """None: the key is ours, do the work. Stored: replay it. 409 when it cannot be either."""
        for _ in range(3):  # a row can expire and be pruned between the two statements
            if await self.pool.fetchval(CLAIM, user_id, key, fingerprint, float(self.ttl), float(self.lease)):
                return None
            row = await self.pool.fetchrow(LOOKUP, user_id, key)
            if row is None:
                continue
            if row["request_hash"] != fingerprint:
                raise Conflict(
                    f"This {HEADER} was already used with a different request; use a new key for a new request.",
                    param=HEADER,
                    code=ErrorCode.IDEMPOTENCY_KEY_REUSED,
                    headers={"x-should-retry": "false"},
                )
            if row["state"] != "done":
                raise Conflict(
                    f"A request with this {HEADER} is still in progress; retry shortly.",
                    param=HEADER,
                    code=ErrorCode.IDEMPOTENCY_KEY_IN_USE,
                    headers={"retry-after": "1", "x-should-retry": "true"},
                )
            result = row["result"]
            return Stored(row["response_status"], orjson.loads(result) if isinstance(result, str) else result)
        raise Conflict(
            f"The {HEADER} could not be claimed; retry.", param=HEADER, code=ErrorCode.IDEMPOTENCY_KEY_IN_USE
        )

    async def once(
        self,
        user_id: str,
        key: str | None,
        fingerprint: str,
        run: Callable[[Claim], Awaitable[Response]],
        replay: Callable[[Stored], Awaitable[Response]],
    ) -> Response:
        """Run `run` at most once per key; a repeat of the same request gets `replay` of what it stored.

        `run` stores its outcome with `claim.complete(session, ...)` in the transaction that writes
        its rows, so the key is done exactly when the work is.
        """
        if key is None:
            return await run(Claim(user_id, None))
        stored = await self.claim(user_id, key, fingerprint)
        if stored is not None:
            response = await replay(stored)
            response.status_code = stored.status
            response.headers["idempotent-replayed"] = "true"
            return response
        try:
            return await run(Claim(user_id, key))
        except BaseException:
            await asyncio.shield(self.release(user_id, key))
            raise

    async def release(self, user_id: str, key: str) -> None:
        try:
            await self.pool.execute(RELEASE, user_id, key)
        except DB_ERRORS as error:  # the claim's lease frees it later
            log.warning("could not release idempotency key: %s", error)

    async def prune(self) -> int:
        result = await self.pool.execute(PRUNE)
        return int(result.split()[-1])
