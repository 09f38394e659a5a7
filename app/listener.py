"""The process's one LISTEN connection: every part that hears Postgres NOTIFY shares it.

A part names its channel and a handler (`on`) when it is built, before `start`. NOTIFY is
sent inside the writer's transaction, so a handler hears of a change only once it is
committed, in every process (this one too). While the connection is down, notifications
are lost: on each (re)connect every part's `resync` runs, so it can act on what it missed.
A link that dies without a word (a NAT or firewall dropping it) is found by a query every
`check_seconds`, which must answer within `check_timeout`; the connection is then replaced.

Handlers run on the connection's callback: they must not block, and one that raises is
logged and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from app.db import asyncpg_url

log = logging.getLogger("app.listener")


@dataclass(frozen=True, slots=True)
class _Channel:
    name: str
    handler: Callable[[str], None]
    resync: Callable[[], None] | None


class Listener:
    def __init__(
        self,
        database_url: str,
        *,
        retry_seconds: float = 1.0,
        check_seconds: float = 15.0,
        check_timeout: float = 5.0,
    ) -> None:
        self.database_url = database_url
        self.retry_seconds = retry_seconds
        self.check_seconds = check_seconds
        self.check_timeout = check_timeout
        self._channels: list[_Channel] = []
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()

    def on(self, channel: str, handler: Callable[[str], None], *, resync: Callable[[], None] | None = None) -> None:
        """Call `handler(payload)` for each NOTIFY on `channel`; `resync()` on each (re)connect."""
        if self._task is not None:
            raise RuntimeError("channels are named before the listener starts")
        self._channels.append(_Channel(channel, handler, resync))

    async def start(self) -> None:
        """Listen from now on; returns once the first connection is up and every part has resynced
        (or after `check_timeout`, the connection then still being tried): a part's resync (auth's
        forgets every cached principal) must not race the first requests the process serves."""
        self._task = asyncio.create_task(self._listen(), name="notify-listener")
        try:
            await asyncio.wait_for(self._connected.wait(), self.check_timeout)
        except TimeoutError:
            log.warning("NOTIFY listener not connected yet; serving meanwhile, still trying")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _listen(self) -> None:
        while True:
            connection: asyncpg.Connection | None = None
            try:
                closed = asyncio.Event()
                connection = await asyncpg.connect(asyncpg_url(self.database_url), timeout=self.check_timeout)
                connection.add_termination_listener(lambda _connection, done=closed: done.set())
                for channel in self._channels:
                    await connection.add_listener(channel.name, self._callback(channel))
                for channel in self._channels:
                    if channel.resync is not None:
                        self._run(channel.name, channel.resync)
                self._connected.set()
                while not closed.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(closed.wait(), self.check_seconds)
                        break
                    await connection.execute("SELECT 1", timeout=self.check_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("NOTIFY listener down, retrying: %s", error)
            finally:
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await connection.close(timeout=self.check_timeout)  # a dead link: given up after that
            await asyncio.sleep(self.retry_seconds)

    def _callback(self, channel: _Channel) -> Callable[..., None]:
        def heard(_connection: object, _pid: int, _channel: str, payload: str) -> None:
            self._run(channel.name, lambda: channel.handler(payload))

        return heard

    @staticmethod
    def _run(name: str, call: Callable[[], None]) -> None:
        try:
            call()
        except Exception:
            log.exception("listener of %s failed", name)
