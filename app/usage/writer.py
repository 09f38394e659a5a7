"""Usage rows written in batches by a background task, never on the response path.

Each flush is one transaction: a COPY of the rows and one statement settling the
batch's rate-limit reservations (app/usage/batching.py does the queueing and retries).
A reservation whose call never reached the upstream is given back the same way, as a
`Settlement` without a row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg

from app.events import EventHub
from app.ratelimit.buckets import Bucket, Decision
from app.ratelimit.limiter import Limiter
from app.usage.batching import BatchWriter
from app.usage.record import COLUMNS, UsageRecord

log = logging.getLogger("app.usage")

POISON_AFTER = 3  # consecutive refusals by the server (not the network) before rows are written singly


@dataclass(frozen=True, slots=True)
class Settlement:
    """A reservation given back whole: its call never reached the upstream."""

    decision: Decision

    def corrections(self) -> list[tuple[Bucket, float]]:
        return [(b, -r) for b, r in zip(self.decision.buckets, self.decision.reserved, strict=True)]


Entry = UsageRecord | Settlement


class UsageWriter(BatchWriter[Entry]):
    what = "usage rows"

    def __init__(
        self, pool: asyncpg.Pool, limiter: Limiter, events: EventHub, *, interval: float, batch_size: int
    ) -> None:
        super().__init__(interval=interval, batch_size=batch_size)
        self.pool = pool
        self.limiter = limiter
        self.events = events

    def record(self, record: UsageRecord) -> None:
        """Queue a row (and tell the usage listeners); returns at once."""
        self.queue(record)
        self.events.usage.publish(record)

    def give_back(self, decision: Decision) -> None:
        """Queue the return of a reservation that was not used."""
        if decision.buckets:
            self.queue(Settlement(decision))

    async def write(self, batch: list[Entry]) -> None:
        rows = [entry.row() for entry in batch if isinstance(entry, UsageRecord)]
        async with self.pool.acquire() as connection, connection.transaction():
            if rows:
                await connection.copy_records_to_table("usage_event", records=rows, columns=COLUMNS)
            await self.limiter.charge((c for entry in batch for c in entry.corrections()), connection=connection)

    async def refused(self, batch: list[Entry], error: Exception, failures: int) -> bool:
        """The server keeps refusing this batch: write entries one by one and drop the ones it rejects.

        Without this, one malformed row would hold every row behind it in memory forever.
        """
        if not (isinstance(error, asyncpg.PostgresError) and failures >= POISON_AFTER):
            return False
        for entry in batch:
            try:
                await self.write([entry])
            except asyncpg.PostgresError as rejected:
                log.error("usage entry rejected by the database, dropped: %s %r", rejected, entry)
        return True
