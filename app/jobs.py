"""Background jobs of a process: periodic chores, supervised, stopped together.

A job that raises is logged and runs again at its next interval: a chore that fails
while the database is away must not die for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger("app.jobs")


class Jobs:
    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []

    def every(
        self, name: str, interval: float, work: Callable[[], Awaitable[object]], *, first: float | None = None
    ) -> None:
        """Run `work()` every `interval` seconds, the first time after `first` (default: one interval)."""
        delay = interval if first is None else first
        self._tasks.append(asyncio.create_task(self._repeat(name, interval, delay, work), name=name))

    @staticmethod
    async def _repeat(name: str, interval: float, delay: float, work: Callable[[], Awaitable[object]]) -> None:
        await asyncio.sleep(delay)
        while True:
            try:
                done = await work()
            except Exception as error:
                log.warning("%s failed, will retry: %s", name, error)
            else:
                if done:
                    log.info("%s: %s", name, done)
            await asyncio.sleep(interval)

    def run(self, name: str, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run `work()` once, for as long as it takes (a watcher); stopped with the others."""
        self._tasks.append(asyncio.create_task(work(), name=name))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
