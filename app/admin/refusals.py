"""Limit refusals, kept for the refusals report and written in batches off the response path.

A refusal never reaches the upstream, so it leaves no usage row. The recorder listens
to the refusals the error handler publishes (app/events.py); it only appends to a
list, and a background task copies the list to `limit_refusal` every flush interval
and at shutdown. Every value is bounded by construction (a known code, truncated
strings), so the database has no reason to refuse a row: a failed flush is an outage,
retried with backoff. A flood of refusals while the database is away is capped in
memory; what is over the cap is counted and dropped, never blocking a response.
"""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from app.events import Refusal
from app.usage.batching import BatchWriter

COLUMNS = ("created_at", "user_id", "route", "code")

Row = tuple[datetime, str | None, str, str]


class RefusalRecorder(BatchWriter[Row]):
    """Queues one row per refusal of a caller's own limits."""

    what = "limit refusals"
    shutdown_deadline = 5.0

    def __init__(
        self, pool: asyncpg.Pool, *, interval: float, batch_size: int = 1000, max_pending: int = 100_000
    ) -> None:
        super().__init__(interval=interval, batch_size=batch_size, max_pending=max_pending)
        self.pool = pool

    def record(self, refusal: Refusal) -> None:
        user_id = refusal.user_id
        self.queue((datetime.now(UTC), user_id and user_id[:200], refusal.route[:200], refusal.code[:100]))

    async def write(self, batch: list[Row]) -> None:
        async with self.pool.acquire() as connection:
            await connection.copy_records_to_table("limit_refusal", records=batch, columns=COLUMNS)
