"""`Idempotency-Key`: a retried request gets the first one's outcome instead of a second generation.

The key is claimed before any work, in its own committed statement (insert-first with
ON CONFLICT), as this process's (`owner`): of two concurrent duplicates only one calls the
upstream; the other gets 409 with `retry-after` (the OpenAI SDKs retry 409) and, once the
first is done, the stored outcome. A pending key is taken over only once its process has
died (its lease, app/instances.py), however long the work takes.

The outcome is stored in the same transaction as the rows it names. Errors are outcomes
too, once the upstream has answered (a refusal, or a failure it may bill): a retry gets
the same error rather than a second charge. A request that failed before reaching the
upstream (a limit, validation, an upstream that could not be reached) releases its key,
so that a retry can run. Work whose outcome could not be stored (the database went away
after the upstream answered) keeps its key pending while the process stores it later
(`StoredLater`): retries get 409 until it lands, then the stored outcome.

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
from app.errors import Conflict, ErrorCode, GatewayError, InvalidRequest, Unavailable, UpstreamError
from app.instances import Instance, owner_alive
from app.models import IdempotencyKey
from app.upstream.errors import UpstreamRejected

log = logging.getLogger("app.images.idempotency")

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255

CLAIM = f"""
INSERT INTO idempotency_key AS k (user_id, key, request_hash, state, created_at, expires_at, owner)
VALUES ($1, $2, $3, 'pending', now(), now() + make_interval(secs => $4), $6)
ON CONFLICT (user_id, key) DO UPDATE
SET request_hash = EXCLUDED.request_hash, state = 'pending', response_status = NULL, result = NULL,
    created_at = now(), expires_at = EXCLUDED.expires_at, owner = EXCLUDED.owner
WHERE k.expires_at <= now() OR (k.state = 'pending' AND NOT {owner_alive("k.owner", "$5")})
RETURNING 1
"""
SETTLE_ERROR = """
UPDATE idempotency_key SET state = 'done', response_status = $3, result = $4::jsonb, owner = NULL
WHERE user_id = $1 AND key = $2 AND state = 'pending'
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


class StoredLater(Unavailable):
    """The upstream answered but the outcome could not be stored yet: it is being stored in the
    background, and the key stays claimed until it is (a retry then replays it)."""


def settled_by(error: BaseException) -> bool:
    """Whether a failure is the request's outcome (the upstream answered it: a refusal, or a failure it
    may bill), to be replayed to a retry, rather than a reason to let a retry run again."""
    return isinstance(error, UpstreamRejected) or (isinstance(error, UpstreamError) and error.billed)


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
            .values(state="done", response_status=status, result=result, owner=None)
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
    def __init__(self, pool: asyncpg.Pool, ttl: float, instance: Instance) -> None:
        self.pool = pool
        self.ttl = ttl
        self.instance = instance

    async def claim(self, user_id: str, key: str, fingerprint: str) -> Stored | None:
        """None: the key is ours, do the work. Stored: replay it. 409 when it cannot be either;
        503 when the database cannot say."""
        try:
            return await self._claim(user_id, key, fingerprint)
        except DB_ERRORS as error:
            raise Unavailable(
                f"The {HEADER} cannot be checked right now; retry shortly.",
                code=ErrorCode.DATABASE_UNAVAILABLE,
                headers={"retry-after": "2"},
            ) from error

    async def _claim(self, user_id: str, key: str, fingerprint: str) -> Stored | None:
        for _ in range(3):  # a row can expire and be pruned between the two statements
            lease = self.instance.lease_seconds
            if await self.pool.fetchval(CLAIM, user_id, key, fingerprint, float(self.ttl), lease, self.instance.id):
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
            if "error" in stored.result:
                response = Response(orjson.dumps(stored.result), media_type="application/json")
            else:
                response = await replay(stored)
            response.status_code = stored.status
            response.headers["idempotent-replayed"] = "true"
            return response
        try:
            return await run(Claim(user_id, key))
        except StoredLater:
            raise  # the key stays ours until the outcome is stored
        except BaseException as error:
            if isinstance(error, GatewayError) and settled_by(error):
                await asyncio.shield(self.settle_error(user_id, key, error))
            else:
                await asyncio.shield(self.release(user_id, key))
            raise

    async def settle_error(self, user_id: str, key: str, error: GatewayError) -> None:
        try:
            await self.pool.execute(SETTLE_ERROR, user_id, key, error.status_code, orjson.dumps(error.body()).decode())
        except DB_ERRORS as failure:  # the key stays pending until this process's lease ends
            log.warning("could not store an idempotent error outcome: %s", failure)

    async def release(self, user_id: str, key: str) -> None:
        try:
            await self.pool.execute(RELEASE, user_id, key)
        except DB_ERRORS as error:  # the claim is taken over once this process's lease ends
            log.warning("could not release idempotency key: %s", error)

    async def prune(self) -> int:
        result = await self.pool.execute(PRUNE)
        return int(result.split()[-1])
