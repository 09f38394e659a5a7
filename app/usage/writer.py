"""Usage rows written in batches by a background task, never on the response path.

Each flush is one transaction: a COPY of the rows and one statement settling the
batch's rate-limit reservations. A failed flush keeps its rows and tries again with
backoff; shutdown flushes what is left, so a clean stop loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import asyncpg

from app.db import DB_ERRORS
from app.ratelimit.limiter import Limiter
from app.usage.record import COLUMNS, UsageRecord

log = logging.getLogger("app.usage")

SHUTDOWN_DEADLINE = 15.0
MAX_BACKOFF = 5.0
POISON_AFTER = 3  # consecutive refusals by the server (not the network) before rows are written singly


class UsageWriter:
    def __init__(self, pool: asyncpg.Pool, limiter: Limiter, *, interval: float, batch_size: int) -> None:
        self.pool = pool
        self.limiter = limiter
        self.interval = interval
        self.batch_size = batch_size
        self._pending: list[UsageRecord] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failures = 0
        self.written = 0

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    # Told of each record as it is queued (metrics, the access line's model); must not block or raise.
    observer: Callable[[UsageRecord], None] | None = None

    def record(self, record: UsageRecord) -> None:
        """Queue a row; returns at once."""
        self._pending.append(record)
        if self.observer is not None:
            self.observer(record)
        if len(self._pending) >= self.batch_size:
            self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-writer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        deadline = time.monotonic() + SHUTDOWN_DEADLINE
        while self._pending and time.monotonic() < deadline:
            if not await self.flush():
                await asyncio.sleep(0.5)
        if self._pending:
            log.error("shutdown: %d usage rows could not be written", len(self._pending))

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._delay())
            self._wake.clear()
            await self.flush()

    async def _write(self, batch: list[UsageRecord]) -> None:
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.copy_records_to_table("usage_event", records=[r.row() for r in batch], columns=COLUMNS)
            await self.limiter.charge((c for r in batch for c in r.corrections()), connection=connection)

    async def _isolate(self, batch: list[UsageRecord]) -> None:
        """The server keeps refusing this batch: write rows one by one and drop the ones it rejects.

        Without this, one malformed row would hold every row behind it in memory forever.
        """
        for record in batch:
            try:
                await self._write([record])
            except asyncpg.PostgresError as error:
                log.error("usage row rejected by the database, dropped: %s %r", error, record.row())

    def _delay(self) -> float:
        return min(self.interval * 2**self._failures, MAX_BACKOFF)

    async def flush(self) -> bool:
        """Write up to one batch; False when the database refused it (rows kept)."""
        if not self._pending:
            return True
        batch = self._pending[: self.batch_size]
        try:
            await self._write(batch)
        except DB_ERRORS as error:
            self._failures += 1
            log.warning("usage flush of %d rows failed (attempt %d): %s", len(batch), self._failures, error)
            if not (isinstance(error, asyncpg.PostgresError) and self._failures >= POISON_AFTER):
                return False
            await self._isolate(batch)
        del self._pending[: len(batch)]
        self._failures = 0
        self.written += len(batch)
        if self._pending:
            self._wake.set()
        return True
