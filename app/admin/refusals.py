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

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime

import asyncpg
from fastapi import Request

from app.db import DB_ERRORS
from app.errors import GatewayError, RefusalListener

log = logging.getLogger("app.admin.refusals")

COLUMNS = ("created_at", "user_id", "route", "code")
MAX_BACKOFF = 5.0
SHUTDOWN_DEADLINE = 5.0

Row = tuple[datetime, str | None, str, str]


def route_template(request: Request) -> str:
    """The matched route with its router's prefix, e.g. `/v1/threads/{thread_id}/messages`.

    `scope["route"]` is the route as its router declared it, without the prefix the router
    was included under; that prefix is what the URL has before the part the route matched.
    """
    path: str = request.scope.get("path", "")
    template = getattr(request.scope.get("route"), "path_format", None)
    if not template:
        return path
    try:
        matched = template.format(**request.path_params)
    except (KeyError, IndexError, ValueError):
        return template
    return path.removesuffix(matched) + template if path.endswith(matched) else template


class RefusalRecorder:
    def __init__(
        self, pool: asyncpg.Pool, *, interval: float, batch_size: int = 1000, max_pending: int = 100_000
    ) -> None:
        self.pool = pool
        self.interval = interval
        self.batch_size = batch_size
        self.max_pending = max_pending
        self._pending: list[Row] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failures = 0
        self.written = 0
        self.dropped = 0
        self._dropped_logged = 0

    def __call__(self, request: Request, error: GatewayError) -> None:
        """The refusal listener: queue one row and return at once."""
        if len(self._pending) >= self.max_pending:
            self.dropped += 1
            return
        principal = getattr(request.state, "principal", None)
        user_id = getattr(principal, "user_id", None)
        route = route_template(request)
        self._pending.append((datetime.now(UTC), user_id and user_id[:200], route[:200], (error.code or "")[:100]))
        if len(self._pending) >= self.batch_size:
            self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="refusal-recorder")

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
            log.error("shutdown: %d limit refusals could not be written", len(self._pending))

    async def _run(self) -> None:
        while True:
            delay = min(self.interval * 2**self._failures, MAX_BACKOFF)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> bool:
        """Write up to one batch; False when the database could not be reached (rows kept)."""
        if self.dropped > self._dropped_logged:
            dropped, self._dropped_logged = self.dropped - self._dropped_logged, self.dropped
            log.warning("%d limit refusals dropped: more than %d were waiting", dropped, self.max_pending)
        if not self._pending:
            return True
        batch = self._pending[: self.batch_size]
        try:
            async with self.pool.acquire() as connection:
                await connection.copy_records_to_table("limit_refusal", records=batch, columns=COLUMNS)
        except DB_ERRORS as error:
            self._failures += 1
            log.warning("limit refusal flush of %d rows failed (attempt %d): %s", len(batch), self._failures, error)
            return False
        del self._pending[: len(batch)]
        self._failures = 0
        self.written += len(batch)
        if self._pending:
            self._wake.set()
        return True


async def start_refusal_recorder(
    pool: asyncpg.Pool, listeners: list[RefusalListener], interval: float
) -> RefusalRecorder:
    """A running recorder, registered as a refusal listener; it flushes every `interval` seconds."""
    recorder = RefusalRecorder(pool, interval=interval)
    listeners.append(recorder)
    await recorder.start()
    return recorder
