"""The realtime calls and minted secrets in Postgres: what any replica needs to watch, cap and settle a call.

A call's row goes connecting -> active -> ended. Whoever holds it (`owner`, a live process,
app/instances.py) watches its sideband; `claim` hands a call nobody watches (new, released by a
stopping process, or its process dead) to this process and moves the call's pending usage row
(its reservation) along with it, so the usage sweep never settles a watched call as interrupted.
The usage sweep leaves alone the pending rows of calls not yet ended (app/usage/writer.py).
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
import orjson

from app.errors import ErrorCode, NotFound, RateLimited
from app.instances import owner_alive

CALL_COLUMNS = """id, user_id, api_key_id, request_id, source, status, answerer, upstream, upstream_call_id, model,
    role, language, instructions, voice, created_at, deadline, max_cost_usd, cost_usd, responses, reservation_id,
    reservation, owner, attaches, hangup_requested, ended_at, ended_reason"""

# The user's open calls are counted and the new one written under the user's advisory lock: two racing
# set-ups cannot both take the last place.
INSERT = f"""
WITH locked AS (SELECT pg_advisory_xact_lock(hashtextextended('realtime:' || $2::text, 0))),
open_calls AS (
    SELECT count(*) AS n FROM realtime_call, locked WHERE user_id = $2 AND status <> 'ended'
)
INSERT INTO realtime_call (id, user_id, api_key_id, request_id, source, status, answerer, upstream, upstream_call_id,
                           model, role, language, instructions, voice, deadline, max_cost_usd, reservation_id,
                           reservation, owner)
SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14,
       CASE WHEN $15::float8 IS NULL THEN NULL ELSE now() + make_interval(secs => $15) END, $16, $17, $18::jsonb, $19
FROM open_calls WHERE $20::bigint IS NULL OR n < $20
RETURNING {CALL_COLUMNS}
"""
ACTIVATE = """
UPDATE realtime_call SET status = 'active', upstream = $2, upstream_call_id = $3, owner = NULL
WHERE id = $1 AND status = 'connecting'
"""
GET = f"SELECT {CALL_COLUMNS} FROM realtime_call WHERE id = $1 AND user_id = $2"
# A call nobody watches: active and unowned, or held (connecting too) by a process that stopped beating.
CLAIM = f"""
WITH claimed AS (
    UPDATE realtime_call SET owner = $1, attaches = attaches + 1
    WHERE id = (
        SELECT id FROM realtime_call
        WHERE status <> 'ended' AND ((status = 'active' AND owner IS NULL) OR NOT {owner_alive("owner", "$2")})
        ORDER BY created_at
        FOR UPDATE SKIP LOCKED
        LIMIT 1
    )
    RETURNING {CALL_COLUMNS}
), moved AS (
    UPDATE usage_pending SET owner = $1 WHERE call_id = (SELECT reservation_id FROM claimed)
)
SELECT * FROM claimed
"""
RELEASE = "UPDATE realtime_call SET owner = NULL WHERE id = $1 AND owner = $2 AND status = 'active'"
METERED = """
UPDATE realtime_call SET cost_usd = cost_usd + $3, responses = responses + 1
WHERE id = $1 AND owner = $2 RETURNING cost_usd
"""
HANGUP = """
UPDATE realtime_call SET hangup_requested = coalesce(hangup_requested, $2)
WHERE id = $1 AND status <> 'ended' RETURNING hangup_requested
"""
HANGUPS_ASKED = """
SELECT id, hangup_requested FROM realtime_call
WHERE status <> 'ended' AND owner = $1 AND hangup_requested IS NOT NULL
"""
# Ended once, by its holder: the reason asked for (a hang-up) wins over how the sideband saw it end.
END = f"""
UPDATE realtime_call SET status = 'ended', ended_at = now(), owner = NULL,
       ended_reason = coalesce(hangup_requested, $3)
WHERE id = $1 AND status <> 'ended' AND (owner = $2 OR owner IS NULL)
RETURNING {CALL_COLUMNS}
"""
SAVE_SECRET = """
INSERT INTO realtime_secret (secret_hash, user_id, answerer, upstream, model, role, language, instructions, voice,
                             expires_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (secret_hash) DO NOTHING
"""
SPEND_SECRET = """
DELETE FROM realtime_secret WHERE secret_hash = $1 AND user_id = $2 AND expires_at > now() RETURNING *
"""
FORGET_SECRETS = "DELETE FROM realtime_secret WHERE expires_at < now() - interval '1 day'"
BY_UPSTREAM_ID = "SELECT user_id FROM realtime_call WHERE upstream_call_id = $1"


@dataclass(frozen=True, slots=True)
class NewCall:
    """A call's row as its set-up (or attachment) writes it."""

    id: str
    user_id: str
    api_key_id: uuid.UUID | None
    request_id: str
    source: str
    status: str
    answerer: str
    upstream: str | None
    upstream_call_id: str | None
    model: str
    role: str
    language: str
    instructions: str  # the preset's, in the call's language (what a client appends is not kept)
    voice: str
    max_cost_usd: Decimal
    reservation_id: uuid.UUID
    reservation: dict[str, Any]
    owner: uuid.UUID | None
    max_seconds: float | None = None  # from now: its deadline


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredCall(NewCall):
    """A call's row as it stands."""

    created_at: datetime
    deadline: datetime | None
    cost_usd: Decimal
    responses: int
    attaches: int
    hangup_requested: str | None
    ended_at: datetime | None
    ended_reason: str | None

    @classmethod
    def of(cls, row: asyncpg.Record) -> StoredCall:
        values = dict(row)
        reservation = values["reservation"]
        values["reservation"] = orjson.loads(reservation) if isinstance(reservation, str) else reservation
        return cls(**values)


def secret_hash(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


class CallStore:
    def __init__(self, pool: asyncpg.Pool, owner: uuid.UUID, lease_seconds: float) -> None:
        self.pool = pool
        self.owner = owner  # this process
        self.lease_seconds = lease_seconds

    async def insert(self, call: NewCall, max_open: float | None) -> StoredCall:
        """Write the call if the user holds fewer than `max_open` calls not yet ended; else a 429. An upstream
        call id already registered (a racing attachment) is a 404, as for a call someone else attached."""
        try:
            row = await self._insert(call, max_open)
        except asyncpg.UniqueViolationError:
            raise NotFound(
                f"No call '{call.upstream_call_id}' can be attached.", code=ErrorCode.CALL_NOT_FOUND
            ) from None
        if row is None:
            raise RateLimited(
                f"You have {max_open:g} realtime session(s) open, as many as your tier allows; end one first.",
                code=ErrorCode.TOO_MANY_SESSIONS,
                headers={"retry-after": "5"},
            )
        return StoredCall.of(row)

    async def _insert(self, call: NewCall, max_open: float | None) -> asyncpg.Record | None:
        row: asyncpg.Record | None = await self.pool.fetchrow(
            INSERT,
            call.id,
            call.user_id,
            call.api_key_id,
            call.request_id,
            call.source,
            call.status,
            call.answerer,
            call.upstream,
            call.upstream_call_id,
            call.model,
            call.role,
            call.language,
            call.instructions,
            call.voice,
            call.max_seconds,
            call.max_cost_usd,
            call.reservation_id,
            orjson.dumps(call.reservation).decode(),
            call.owner,
            None if max_open is None else int(max_open),
        )
        return row

    async def activate(self, call_id: str, upstream: str | None, upstream_call_id: str) -> None:
        """The client has its answer: the call is the watchers' to claim."""
        await self.pool.execute(ACTIVATE, call_id, upstream, upstream_call_id)

    async def get(self, call_id: str, user_id: str) -> StoredCall | None:
        row = await self.pool.fetchrow(GET, call_id, user_id)
        return StoredCall.of(row) if row is not None else None

    async def owner_of(self, upstream_call_id: str) -> str | None:
        """The user an upstream call id is already registered to, if any."""
        user: str | None = await self.pool.fetchval(BY_UPSTREAM_ID, upstream_call_id)
        return user

    async def claim(self) -> StoredCall | None:
        row = await self.pool.fetchrow(CLAIM, self.owner, self.lease_seconds)
        return StoredCall.of(row) if row is not None else None

    async def release(self, call_id: str) -> None:
        """Let another process watch the call (this one is stopping): it is not hung up."""
        await self.pool.execute(RELEASE, call_id, self.owner)

    async def metered(self, call_id: str, cost: Decimal) -> Decimal | None:
        """Add a response's cost; the call's total, or None if the call is no longer this process's."""
        total: Decimal | None = await self.pool.fetchval(METERED, call_id, self.owner, cost)
        return total

    async def ask_hangup(self, call_id: str, reason: str) -> str | None:
        """Mark the call to be hung up (the first reason stays); None if it had ended."""
        asked: str | None = await self.pool.fetchval(HANGUP, call_id, reason)
        return asked

    async def hangups_asked(self) -> dict[str, str]:
        """This process's calls someone asked to hang up."""
        rows = await self.pool.fetch(HANGUPS_ASKED, self.owner)
        return {row["id"]: row["hangup_requested"] for row in rows}

    async def end(self, call_id: str, reason: str) -> StoredCall | None:
        """End the call once; None if it had ended or another process holds it."""
        row = await self.pool.fetchrow(END, call_id, self.owner, reason)
        return StoredCall.of(row) if row is not None else None

    async def save_secret(self, value: str, values: dict[str, Any]) -> None:
        await self.pool.execute(
            SAVE_SECRET,
            secret_hash(value),
            values["user_id"],
            values["answerer"],
            values["upstream"],
            values["model"],
            values["role"],
            values["language"],
            values["instructions"],
            values["voice"],
            values["expires_at"],
        )

    async def spend_secret(self, value: str, user_id: str) -> asyncpg.Record | None:
        """The user's unexpired secret, spent (a secret attaches one call); None if there is none."""
        row: asyncpg.Record | None = await self.pool.fetchrow(SPEND_SECRET, secret_hash(value), user_id)
        return row

    async def forget_secrets(self) -> int:
        return int((await self.pool.execute(FORGET_SECRETS)).split()[-1])
