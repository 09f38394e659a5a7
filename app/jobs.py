"""Background jobs of a process: periodic chores, supervised, stopped together; and the claiming
workers (image batch items, vector store files) that take rows of a shared queue.

A job that raises is logged and runs again at its next interval: a chore that fails
while the database is away must not die for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

log = logging.getLogger("app.jobs")

T = TypeVar("T")


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


class ClaimingWorker(Generic[T]):
    """Up to `concurrency` tasks at once, each working on a row `claim` took from a queue the replicas
    share; the next is claimed as soon as a slot is free or `wake` is called (new work here, a NOTIFY
    from elsewhere), else every `poll_seconds`. A failed claim (the database away) is logged and tried
    at the next look. `stop` cancels the tasks: a `run` hands its row back when cancelled."""

    def __init__(self, name: str, concurrency: int, poll_seconds: float) -> None:
        self.name = name
        self.concurrency = concurrency
        self.poll_seconds = poll_seconds
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._active: set[asyncio.Task[None]] = set()

    async def claim(self) -> T | None:
        raise NotImplementedError

    async def run(self, item: T) -> None:
        raise NotImplementedError

    def wake(self) -> None:
        """Look for work now instead of at the next poll."""
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._active)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=self.name)

    async def idle(self) -> None:
        """Wait until no row is being worked on (tests settle the gateway with it)."""
        while self._active:
            await asyncio.wait(self._active)

    async def stop(self) -> None:
        """Stop claiming; rows under way are cancelled (and handed back by their `run`)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        active = list(self._active)
        for task in active:
            task.cancel()
        await asyncio.gather(*active, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            while len(self._active) >= self.concurrency:
                await asyncio.wait(self._active, return_when=asyncio.FIRST_COMPLETED)
            self._wake.clear()  # before claiming: a wake-up during the claim is not lost
            try:
                item = await self.claim()
            except Exception as error:
                log.warning("%s could not look for work: %s", self.name, error)
                item = None
            if item is not None:
                task = asyncio.create_task(self.run(item), name=f"{self.name} item")
                self._active.add(task)
                task.add_done_callback(self._active.discard)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
