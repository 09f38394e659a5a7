"""The indexer's queue: `vector_store_file` rows `in_progress`, each held under a lease while worked on.

A process claims a file with `FOR UPDATE SKIP LOCKED` (replicas never take the same one), writing
a token of this one claim as `lease_owner` until `lease_until`, and renews the lease while it
works. A file whose lease ran out (its process died, or hung) is claimable again by any process;
a clean shutdown lets go of its files at once, and a fault (the database, the storage) lets go
of one until a back-off has passed. Every write that ends the work (`lock_own`, then complete or
fail) checks the claim is still the one holding the lease and the file still `in_progress`: a
file cancelled, detached, attached again or taken over meanwhile is never flipped back, and its
chunks are not written. Each claim counts (`claims`; a clean release gives it back): a file that
keeps killing its process fails once it has been taken up MAX_CLAIMS times.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from app.knowledge.db import Connection

CLAIM = """
WITH next AS (
    SELECT vector_store_id, file_id FROM vector_store_file
    WHERE status = 'in_progress' AND (lease_until IS NULL OR lease_until < now())
    ORDER BY created_at, file_id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
UPDATE vector_store_file f
SET lease_owner = $1, lease_until = now() + make_interval(secs => $2), claims = f.claims + 1
FROM next, file
WHERE f.vector_store_id = next.vector_store_id AND f.file_id = next.file_id AND file.id = f.file_id
RETURNING f.vector_store_id, f.file_id, f.user_id, f.batch_id, f.chunking_strategy::text AS chunking_strategy,
          f.claims, file.filename, file.content_type, file.storage_key
"""
RENEW = """
UPDATE vector_store_file SET lease_until = now() + make_interval(secs => $4)
WHERE vector_store_id = $1 AND file_id = $2 AND lease_owner = $3 AND status = 'in_progress'
"""
RELEASE = """
UPDATE vector_store_file SET lease_owner = NULL, lease_until = NULL, claims = greatest(claims - 1, 0)
WHERE vector_store_id = $1 AND file_id = $2 AND lease_owner = $3 AND status = 'in_progress'
"""
BACK_OFF = """
UPDATE vector_store_file SET lease_owner = NULL, lease_until = now() + make_interval(secs => $4)
WHERE vector_store_id = $1 AND file_id = $2 AND lease_owner = $3 AND status = 'in_progress'
"""
LOCK_OWN = """
SELECT 1 FROM vector_store_file
WHERE vector_store_id = $1 AND file_id = $2 AND lease_owner = $3 AND status = 'in_progress'
FOR UPDATE
"""
COMPLETE = """
UPDATE vector_store_file
SET status = 'completed', usage_bytes = $3, last_error = NULL, lease_owner = NULL, lease_until = NULL
WHERE vector_store_id = $1 AND file_id = $2
"""
FAIL = """
UPDATE vector_store_file
SET status = 'failed', last_error = $4::jsonb, usage_bytes = 0, lease_owner = NULL, lease_until = NULL
WHERE vector_store_id = $1 AND file_id = $2 AND lease_owner = $3 AND status = 'in_progress'
"""
DROP_CHUNKS = "DELETE FROM knowledge_chunk WHERE vector_store_id = $1 AND file_id = $2"
SETTLE_BATCH = """
UPDATE vector_store_file_batch SET status = 'completed'
WHERE id = $1 AND status = 'in_progress'
  AND NOT EXISTS (SELECT 1 FROM vector_store_file WHERE batch_id = $1 AND status = 'in_progress')
"""


@dataclass(frozen=True, slots=True)
class Claimed:
    vector_store_id: uuid.UUID
    file_id: uuid.UUID
    user_id: str
    batch_id: uuid.UUID | None
    chunking_strategy: dict[str, Any]
    filename: str
    content_type: str
    storage_key: str
    claims: int  # this one included
    lease: uuid.UUID  # this claim's token (`lease_owner`)

    @property
    def key(self) -> tuple[uuid.UUID, uuid.UUID]:
        return self.vector_store_id, self.file_id


async def claim(pool: asyncpg.Pool, lease: float) -> Claimed | None:
    token = uuid.uuid4()
    row = await pool.fetchrow(CLAIM, token, float(lease))
    if row is None:
        return None
    return Claimed(
        vector_store_id=row["vector_store_id"],
        file_id=row["file_id"],
        user_id=row["user_id"],
        batch_id=row["batch_id"],
        chunking_strategy=orjson.loads(row["chunking_strategy"]),
        filename=row["filename"],
        content_type=row["content_type"],
        storage_key=row["storage_key"],
        claims=row["claims"],
        lease=token,
    )


async def renew(pool: asyncpg.Pool, job: Claimed, lease: float) -> bool:
    """Extend the lease; False when the file is no longer this claim's to finish."""
    return str(await pool.execute(RENEW, *job.key, job.lease, float(lease))) != "UPDATE 0"


async def release(pool: asyncpg.Pool, job: Claimed) -> None:
    """Let go of the file, still `in_progress`: any process (this one after a restart) takes it up now."""
    await pool.execute(RELEASE, *job.key, job.lease)


async def back_off(pool: asyncpg.Pool, job: Claimed, seconds: float) -> None:
    """Let go of the file after a fault, to be taken up again once `seconds` have passed."""
    await pool.execute(BACK_OFF, *job.key, job.lease, float(seconds))


async def lock_own(conn: Connection, job: Claimed) -> bool:
    """In the caller's transaction: lock the file if this claim still holds it and it is in progress."""
    return await conn.fetchval(LOCK_OWN, *job.key, job.lease) is not None


async def complete(conn: Connection, job: Claimed, usage_bytes: int) -> None:
    await conn.execute(COMPLETE, *job.key, usage_bytes)
    if job.batch_id is not None:
        await conn.execute(SETTLE_BATCH, job.batch_id)


async def fail(conn: Connection, job: Claimed, last_error: dict[str, str]) -> bool:
    """Mark the file failed with `last_error` and drop its chunks (an earlier indexing's), if this claim
    still holds it; whether it did."""
    failed = str(await conn.execute(FAIL, *job.key, job.lease, orjson.dumps(last_error).decode())) != "UPDATE 0"
    if failed:
        await conn.execute(DROP_CHUNKS, *job.key)
    if failed and job.batch_id is not None:
        await conn.execute(SETTLE_BATCH, job.batch_id)
    return failed
