"""Deleting threads idle longer than the retention age, with their messages and cached context.

Runs as a job in every replica (app/jobs.py) and as `python -m app prune-threads`; a
Postgres advisory lock lets one of them work at a time. Deletes go in batches, each its
own short transaction, so a large backlog never holds long locks.
"""

from __future__ import annotations

import logging

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import affected_rows

log = logging.getLogger("app.threads.retention")

RETENTION_LOCK = 727_010  # arbitrary, fixed: not the migration lock (727001)
BATCH_SIZE = 500

TRY_LOCK = text("SELECT pg_try_advisory_xact_lock(:lock)")
DELETE_IDLE_THREADS = text(
    """
    DELETE FROM thread WHERE id IN (
        SELECT id FROM thread
        WHERE updated_at < now() - make_interval(days => :days)
        ORDER BY updated_at
        LIMIT :batch
        FOR UPDATE SKIP LOCKED
    )
    """
)
DELETE_OLD_CONTEXT = text("DELETE FROM user_context_cache WHERE fetched_at < now() - make_interval(days => :days)")


async def prune_idle_threads(
    sessionmaker: async_sessionmaker[AsyncSession], *, days: int, batch_size: int = BATCH_SIZE
) -> int | None:
    """Delete threads idle for more than `days`; the count, or None when another process holds the lock."""
    total = 0
    first = True
    while True:
        async with sessionmaker.begin() as session:
            if not await session.scalar(TRY_LOCK, {"lock": RETENTION_LOCK}):
                return total if not first else None
            if first:
                await session.execute(DELETE_OLD_CONTEXT, {"days": days})
            result = await session.execute(DELETE_IDLE_THREADS, {"days": days, "batch": batch_size})
        first = False
        deleted = affected_rows(result)
        total += deleted
        if deleted < batch_size:
            return total
