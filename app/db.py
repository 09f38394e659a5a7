"""Postgres: the embedded server, the SQLAlchemy engine, the raw pool and the session dependency.

Two handles on one database, each for what it is good at: SQLAlchemy sessions for
the ORM work of routes (keys, threads, admin), and a raw asyncpg pool for the few
statements on every request's hot path (limits, usage batches), where an ORM
session would cost more than the query itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import CursorResult, Result
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

log = logging.getLogger("app.db")

# What an unreachable or failing database raises through asyncpg.
DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or join) a Postgres server kept in `data_dir`; returns its URL.

    pgserver ships the server binaries in its wheel, so a fresh machine needs
    nothing but pip. The server is shared by every process of this data folder
    and stopped when the last one exits (`stop_embedded_postgres`, or at exit).
    """
    import pgserver  # imported here: only needed when no DATABASE_URL is set

    pgdata = data_dir.resolve() / "pg"
    pgdata.mkdir(parents=True, exist_ok=True)
    _forget_dead_handles(pgdata)
    server = pgserver.get_server(str(pgdata), cleanup_mode="stop")
    log.info("embedded postgres running in %s", data_dir)
    return str(server.get_uri())


def stop_embedded_postgres() -> None:
    """Give up this process's handles now; a server nobody else holds stops.

    For exits that skip `atexit` (a signal re-raised with its default action); a
    second call, or the `atexit` one after it, finds nothing left to do.
    """
    from pgserver.postgres_server import PostgresServer

    for server in list(PostgresServer._instances.values()):
        server.cleanup()  # with cleanup_mode "stop": stops the server if this was its last handle


def _forget_dead_handles(pgdata: Path) -> None:
    """Drop the pids of processes that died without letting go (SIGKILL, OOM) from pgserver's handle list.

    pgserver stops the server when the last process in that list exits; a dead pid left
    in it would keep every later run from stopping the server.
    """
    from pgserver.postgres_server import PostgresServer
    from pgserver.utils import DiskList

    handles = DiskList(pgdata / ".handle_pids.json")
    with PostgresServer._lock:
        pids = handles.get()
        alive = [pid for pid in pids if _running(pid)]
        if alive != pids:
            log.info("embedded postgres: forgot handles of exited processes %s", sorted(set(pids) - set(alive)))
            handles.put(alive)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def sqlalchemy_url(url: str) -> str:
    _, _, rest = url.partition("://")
    return f"postgresql+asyncpg://{rest}"


def asyncpg_url(url: str) -> str:
    _, _, rest = url.partition("://")
    return f"postgresql://{rest}"


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Skip asyncpg's per-release reset (a round trip): the pool's statements leave no session state."""


@dataclass(frozen=True, slots=True)
class Waits:
    """How long anything may wait on Postgres: a statement (enforced by the server, and by the client
    a little later, for a server that stopped answering), a connection from the pool, a new connection."""

    statement: float = 10.0
    acquire: float = 5.0
    connect: float = 5.0


@dataclass
class Database:
    """The handles a process holds for its lifetime."""

    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    pool: asyncpg.Pool
    # Where limit checks run (app/ratelimit/batcher.py: one batch in flight, one more while a timed-out
    # batch is cancelled), apart from the pool's other work, and committed without waiting for the WAL
    # flush: a check commits before every upstream call, and the flush was most of its latency. What a
    # database crash loses of such commits is settled exactly all the same (app/usage/ledger.py).
    checks: asyncpg.Pool
    # Small writes on a request's path whose loss in a database crash costs nothing but a 404 later
    # (who made a Responses API response): committed without waiting for the WAL flush either.
    relaxed: asyncpg.Pool
    waits: Waits

    @classmethod
    async def connect(cls, url: str, pool_size: int, waits: Waits | None = None) -> Database:
        waits = waits or Waits()
        server_settings = {"statement_timeout": str(int(waits.statement * 1000))}
        client_timeout = waits.statement + 2
        # No pool_pre_ping: under asyncpg it costs three round trips per checkout. A connection
        # that died with the server fails its request once (503) and is dropped from the pool.
        engine = create_async_engine(
            sqlalchemy_url(url),
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_timeout=waits.acquire,
            hide_parameters=True,  # errors never carry the values (prompts, user ids) into logs
            connect_args={
                "command_timeout": client_timeout,
                "timeout": waits.connect,
                "server_settings": server_settings,
            },
        )

        def asyncpg_pool(min_size: int, max_size: int, **settings: str) -> Awaitable[asyncpg.Pool]:
            return asyncpg.create_pool(
                asyncpg_url(url),
                min_size=min_size,
                max_size=max_size,
                command_timeout=client_timeout,
                timeout=waits.connect,
                server_settings=server_settings | settings,
                reset=_keep_session,
            )

        pool = await asyncpg_pool(1, pool_size)
        checks = await asyncpg_pool(0, 2, synchronous_commit="off")
        relaxed = await asyncpg_pool(0, pool_size, synchronous_commit="off")
        return cls(engine, async_sessionmaker(engine, expire_on_commit=False), pool, checks, relaxed, waits)

    async def close(self) -> None:
        await self.relaxed.close()
        await self.checks.close()
        await self.pool.close()
        await self.engine.dispose()


def affected_rows(result: Result[*tuple[Any, ...]]) -> int:
    """How many rows an UPDATE or DELETE without RETURNING touched.

    Such a statement always comes back as a CursorResult, which has the count, but
    Session.execute() is typed to return a plain Result: this narrows it, checked.
    """
    assert isinstance(result, CursorResult), f"{type(result).__name__} has no row count"
    return result.rowcount
