"""A user as the gateway's background work acts for them: their tier, switches and limits as they are now.

Work that outlives its request (a file being indexed, a WebRTC call being watched, perhaps by
another process) charges the user's limits as they stand when it records, not as they were.
"""

from __future__ import annotations

import uuid

import asyncpg
import orjson

from app.auth.principal import Principal

OWNER = """
SELECT u.tier, u.use_upstream, u.limit_overrides::text AS limit_overrides,
       EXISTS (SELECT 1 FROM user_openai_key k WHERE k.user_id = $1) AS own_key
FROM (SELECT 1) one LEFT JOIN app_user u ON u.id = $1
"""


async def owner_principal(
    pool: asyncpg.Pool, user_id: str, default_tier: str, api_key_id: uuid.UUID | None = None
) -> Principal:
    """The user as their limits and switches are now (no row: a JWT user of the default tier)."""
    row = await pool.fetchrow(OWNER, user_id)
    assert row is not None
    overrides = orjson.loads(row["limit_overrides"]) if row["limit_overrides"] else {}
    return Principal(
        user_id=user_id,
        tier=row["tier"] or default_tier,
        use_upstream=row["use_upstream"] if row["use_upstream"] is not None else True,
        limit_overrides=overrides,
        api_key_id=api_key_id,
        via="key" if api_key_id else "jwt",
        has_own_key=bool(row["own_key"]),
    )
