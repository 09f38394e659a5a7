"""Concurrent limit checks of one process share a round trip (natural batching, no added wait)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg

from app.ratelimit import sql
from app.ratelimit.buckets import Bucket

MAX_CHECKS_PER_BATCH = 256


class TakeBatcher:
    """Sends the checks queued while a batch is in flight as the next batch.

    A lone check goes out at once, so nothing waits at low load; under load a batch
    carries every check that arrived during the previous round trip.
    """

    def __init__(self, pool: asyncpg.Pool, timeout: float) -> None:
        self.pool = pool
        self.timeout = timeout
        self._queue: list[tuple[Sequence[Bucket], asyncio.Future[asyncpg.Record]]] = []
        self._draining = False

    async def take(self, buckets: Sequence[Bucket]) -> asyncpg.Record:
        """The check's row: allowed, refused (1-based), remaining[], reset_after[], retry_after."""
        future: asyncio.Future[asyncpg.Record] = asyncio.get_running_loop().create_future()
        self._queue.append((buckets, future))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._queue[:MAX_CHECKS_PER_BATCH]
                del self._queue[:MAX_CHECKS_PER_BATCH]
                await self._send(batch)
        finally:
            self._draining = False

    async def _send(self, batch: list[tuple[Sequence[Bucket], asyncio.Future[asyncpg.Record]]]) -> None:
        checks: list[int] = []
        keys: list[str] = []
        kinds: list[str] = []
        costs: list[float] = []
        limits: list[float] = []
        periods: list[float] = []
        for number, (buckets, _) in enumerate(batch, 1):
            for bucket in buckets:
                checks.append(number)
                keys.append(bucket.key)
                kinds.append(bucket.kind)
                costs.append(float(bucket.cost))
                limits.append(bucket.limit)
                periods.append(bucket.period)
        try:
            async with asyncio.timeout(self.timeout):
                rows = await self.pool.fetch(sql.TAKE, checks, keys, kinds, costs, limits, periods)
        except Exception as error:
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for row in rows:
            future = batch[row["check_no"] - 1][1]
            if not future.done():  # its caller may have gone away meanwhile
                future.set_result(row)
