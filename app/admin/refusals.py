"""Limit refusals, kept for the refusals report and written in batches off the response path.

A refusal never reaches the upstream, so it leaves no usage row. The error handler
calls the recorder (a refusal listener) for each one; the recorder only appends to a
list, and a background task copies the list to `limit_refusal` every flush interval
and at shutdown. Every value is bounded by construction (a known code, truncated
strings), so the database has no reason to refuse a row: a failed flush is an outage,
retried with backoff. A flood of refusals while the database is away is capped in
memory; what is over the cap is counted and dropped, never blocking a response.
"""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
from fastapi import Request

from app.errors import GatewayError, RefusalListener
from app.observability.routes import route_of
from app.usage.batching import BatchWriter

COLUMNS = ("created_at", "user_id", "route", "code")

Row = tuple[datetime, str | None, str, str]


class RefusalRecorder(BatchWriter[Row]):
    """A refusal listener: queues one row per refusal of a caller's own limits."""

    what = "limit refusals"
    shutdown_deadline = 5.0

    def __init__(
        self, pool: asyncpg.Pool, *, interval: float, batch_size: int = 1000, max_pending: int = 100_000
    ) -> None:
        super().__init__(interval=interval, batch_size=batch_size, max_pending=max_pending)
        self.pool = pool

    def __call__(self, request: Request, error: GatewayError) -> None:
        principal = getattr(request.state, "principal", None)
        user_id = getattr(principal, "user_id", None)
        route = route_of(request.scope)
        self.queue((datetime.now(UTC), user_id and user_id[:200], route[:200], (error.code or "")[:100]))

    async def write(self, batch: list[Row]) -> None:
        async with self.pool.acquire() as connection:
            await connection.copy_records_to_table("limit_refusal", records=batch, columns=COLUMNS)


async def start_refusal_recorder(
    pool: asyncpg.Pool, listeners: list[RefusalListener], interval: float
) -> RefusalRecorder:
    """A running recorder, registered as a refusal listener; it flushes every `interval` seconds."""
    recorder = RefusalRecorder(pool, interval=interval)
    listeners.append(recorder)
    await recorder.start()
    return recorder
