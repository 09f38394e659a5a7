"""Secrets every process of a deployment shares, kept in Postgres (`gateway_secret`).

The first process to ask for a named secret makes it (32 random bytes); every other
process, and every restart, reads the same one. Nothing to configure, nothing to keep in
sync between replicas.
"""

from __future__ import annotations

import secrets

import asyncpg

LOAD = """
WITH made AS (
    INSERT INTO gateway_secret (name, secret) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING RETURNING secret
)
SELECT secret FROM made UNION ALL SELECT secret FROM gateway_secret WHERE name = $1 LIMIT 1
"""


async def shared_secret(db: asyncpg.Pool | asyncpg.Connection, name: str) -> bytes:
    """The deployment's secret called `name`, made now if no process made it before."""
    for _ in range(3):
        # Two first starts at once: the loser's snapshot may predate the winner's row; a new statement sees it.
        secret = await db.fetchval(LOAD, name, secrets.token_bytes(32))
        if secret is not None:
            return bytes(secret)
    raise RuntimeError(f"could not load or create the shared secret {name!r}")
