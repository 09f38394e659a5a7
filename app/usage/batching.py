"""Rows queued on the response path and written in batches by one background task.

Queuing is a list append. The task writes a batch every `interval` seconds, or at once
when a batch is full. The task is supervised: whatever a write raises is logged and
handed to `failed`, which may deal with the batch (the usage writer spools or
quarantines it); otherwise the rows are kept and retried with backoff. Shutdown flushes
what is left and hands anything still unwritten to `leftover`. `max_pending` caps what an
outage may hold in memory: rows over it are counted, logged and dropped rather than ever
blocking a response (the usage writer sheds calls before it gets there).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Generic, TypeVar

log = logging.getLogger("app.usage")

Row = TypeVar("Row")
MAX_BACKOFF = 5.0


class BatchWriter(Generic[Row]):
    """Subclasses say how a batch is written (`write`), and may deal with a batch that could
    not be written (`failed`) and with rows left at shutdown (`leftover`)."""

    what = "rows"
    shutdown_deadline = 15.0

    def __init__(self, *, interval: float, batch_size: int, max_pending: int | None = None) -> None:
        self.interval = interval
        self.batch_size = batch_size
        self.max_pending = max_pending
        self._pending: list[Row] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failures = 0
        self._flushing = asyncio.Lock()  # one flush at a time: the loop's, `drain`'s and `stop`'s
        self.dropped = 0
        self._dropped_logged = 0

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def queue(self, row: Row) -> None:
        """Queue a row; returns at once."""
        if self.max_pending is not None and len(self._pending) >= self.max_pending:
            self.dropped += 1
            return
        self._pending.append(row)
        if len(self._pending) >= self.batch_size:
            self._wake.set()

    async def write(self, batch: list[Row]) -> None:
        raise NotImplementedError

    async def failed(self, batch: list[Row], error: Exception, failures: int) -> bool:
        """A write failed `failures` times in a row; True when the batch has been dealt with."""
        return False

    async def leftover(self, rows: list[Row]) -> None:
        """Rows still unwritten when shutdown's deadline passed."""
        log.error("shutdown: %d %s could not be written", len(rows), self.what)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"{self.what}-writer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        deadline = time.monotonic() + self.shutdown_deadline
        while self._pending and time.monotonic() < deadline:
            if not await self.flush():
                await asyncio.sleep(0.5)
        if self._pending:
            rows, self._pending = self._pending, []
            await self.leftover(rows)

    async def drain(self) -> None:
        """Write everything queued so far (retrying while the database refuses)."""
        while self._pending:
            if not await self.flush():
                await asyncio.sleep(0.05)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(self.interval * 2**self._failures, MAX_BACKOFF))
            self._wake.clear()
            await self.flush()

    async def flush(self) -> bool:
        """Write up to one batch; False when the database refused it (rows kept)."""
        async with self._flushing:
            return await self._flush()

    async def _flush(self) -> bool:
        if self.dropped > self._dropped_logged:
            dropped, self._dropped_logged = self.dropped - self._dropped_logged, self.dropped
            log.warning("%d %s dropped: more than %d were waiting", dropped, self.what, self.max_pending)
        if not self._pending:
            return True
        batch = self._pending[: self.batch_size]
        try:
            await self.write(batch)
        except Exception as error:
            self._failures += 1
            log.warning("flush of %d %s failed (attempt %d): %r", len(batch), self.what, self._failures, error)
            try:
                handled = await self.failed(batch, error, self._failures)
            except Exception:
                log.exception("could not deal with %d %s that failed to be written; kept", len(batch), self.what)
                handled = False
            if not handled:
                return False
        del self._pending[: len(batch)]
        self._failures = 0
        if self._pending:
            self._wake.set()
        return True
