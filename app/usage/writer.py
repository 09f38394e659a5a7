"""Usage rows written in batches by a background task, never on the response path.

Each flush is one transaction: a COPY of the rows and one statement settling the
batch's rate-limit reservations (app/usage/batching.py does the queueing and retries).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import asyncpg

from app.ratelimit.limiter import Limiter
from app.usage.batching import BatchWriter
from app.usage.record import COLUMNS, UsageRecord

log = logging.getLogger("app.usage")

POISON_AFTER = 3  # consecutive refusals by the server (not the network) before rows are written singly


class UsageWriter(BatchWriter[UsageRecord]):
    what = "usage rows"

    def __init__(self, pool: asyncpg.Pool, limiter: Limiter, *, interval: float, batch_size: int) -> None:
        super().__init__(interval=interval, batch_size=batch_size)
        self.pool = pool
        self.limiter = limiter

    # Told of each record as it is queued (metrics, the access line's model); must not block or raise.
    observer: Callable[[UsageRecord], None] | None = None

    def record(self, record: UsageRecord) -> None:
        """Queue a row; returns at once."""
        self.queue(record)
        if self.observer is not None:
            self.observer(record)

    async def write(self, batch: list[UsageRecord]) -> None:
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.copy_records_to_table("usage_event", records=[r.row() for r in batch], columns=COLUMNS)
            await self.limiter.charge((c for r in batch for c in r.corrections()), connection=connection)

    async def refused(self, batch: list[UsageRecord], error: Exception, failures: int) -> bool:
        """The server keeps refusing this batch: write rows one by one and drop the ones it rejects.

        Without this, one malformed row would hold every row behind it in memory forever.
        """
        if not (isinstance(error, asyncpg.PostgresError) and failures >= POISON_AFTER):
            return False
        for record in batch:
            try:
                await self.write([record])
            except asyncpg.PostgresError as rejected:
                log.error("usage row rejected by the database, dropped: %s %r", rejected, record.row())
        return True
