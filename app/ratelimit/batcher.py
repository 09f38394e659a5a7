"""Concurrent limit checks of one process share a round trip (natural batching, no added wait)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from app.ratelimit import sql
from app.ratelimit.buckets import Bucket
from app.usage.ledger import PendingRow, pending_arrays

MAX_CHECKS_PER_BATCH = 256


@dataclass(slots=True)
class Check:
    buckets: Sequence[Bucket]
    pending: PendingRow | None
    future: asyncio.Future[asyncpg.Record | None]


class TakeBatcher:
    """Sends the checks queued while a batch is in flight as the next batch.

    A lone check goes out at once, so nothing waits at low load; under load a batch
    carries every check that arrived during the previous round trip. Each caller waits at
    most `timeout` from the moment it asked, however long a stuck batch ahead of it takes.
    """

    def __init__(self, pool: asyncpg.Pool, timeout: float, owner: uuid.UUID) -> None:
        self.pool = pool
        self.timeout = timeout
        self.owner = owner
        self._queue: list[Check] = []
        self._draining = False

    async def take(self, buckets: Sequence[Bucket], pending: PendingRow | None) -> asyncpg.Record | None:
        """The check's row (allowed, refused (1-based), remaining[], reset_after[], retry_after); None for a
        check without buckets, which is allowed. Raises TimeoutError after `timeout`."""
        future: asyncio.Future[asyncpg.Record | None] = asyncio.get_running_loop().create_future()
        self._queue.append(Check(buckets, pending, future))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        async with asyncio.timeout(self.timeout):
            return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._queue[:MAX_CHECKS_PER_BATCH]
                del self._queue[:MAX_CHECKS_PER_BATCH]
                await self._send(batch)
        finally:
            self._draining = False

    async def _send(self, batch: list[Check]) -> None:
        checks: list[int] = []
        keys: list[str] = []
        kinds: list[str] = []
        costs: list[float] = []
        limits: list[float] = []
        periods: list[float] = []
        pending: list[tuple[int, PendingRow]] = []
        for number, check in enumerate(batch, 1):
            for bucket in check.buckets:
                checks.append(number)
                keys.append(bucket.key)
                kinds.append(bucket.kind)
                costs.append(float(bucket.cost))
                limits.append(bucket.limit)
                periods.append(bucket.period)
            if check.pending is not None:
                pending.append((number, check.pending))
        try:
            async with asyncio.timeout(self.timeout):
                rows = await self.pool.fetch(
                    sql.TAKE, checks, keys, kinds, costs, limits, periods, self.owner, *pending_arrays(pending)
                )
        except Exception as error:
            for check in batch:
                if not check.future.done():
                    check.future.set_exception(error)
            return
        for row in rows:
            future = batch[row["check_no"] - 1].future
            if not future.done():  # its caller may have gone away meanwhile
                future.set_result(row)
        for check in batch:  # no buckets, no row: allowed
            if not check.future.done():
                check.future.set_result(None)
