"""The one place tests reach into a running app's in-process state: its `Runtime`.

Everything a test reads from or pokes at inside the app (its usage writer, limiter,
database handles, caches, image services, background work) goes through a function here,
so a change in the runtime's parts changes only this file.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.auth.principal import Principal
from app.deps import app_runtime
from app.images.retention import Pruned
from app.images.signing import UrlSigner
from app.ratelimit.limiter import Limiter
from app.runtime import Runtime
from app.upstream.user_clients import UserClient, UserClients
from app.usage.writer import UsageWriter

DRAIN_SECONDS = 30.0


def runtime(app: Any) -> Runtime:
    return app_runtime(app)


def usage_writer(app: Any) -> UsageWriter:
    return runtime(app).usage


def usage_writer_running(app: Any) -> bool:
    """Whether the usage writer's background task is alive (started, and neither crashed nor stopped)."""
    task = runtime(app).usage._task
    return task is not None and not task.done()


def instance_id(app: Any) -> uuid.UUID:
    """The id this process registered in `gateway_instance` (what it owns in Postgres names it)."""
    return runtime(app).instance.id


def limiter(app: Any) -> Limiter:
    return runtime(app).limiter


def sessionmaker(app: Any) -> async_sessionmaker[AsyncSession]:
    return runtime(app).db.sessionmaker


def sync_engine(app: Any) -> Engine:
    """The SQLAlchemy engine's sync face, for event listeners."""
    return runtime(app).db.engine.sync_engine


def user_clients(app: Any) -> UserClients:
    """The per-user upstream clients of bring-your-own-key users."""
    return runtime(app).upstream.user_clients


def user_client(app: Any, user_id: str) -> UserClient | None:
    """One user's cached upstream client."""
    return user_clients(app).get(user_id)


def cached_principal(app: Any, token: str) -> Principal | None:
    """What the authenticator's cache holds for a key, without I/O."""
    return runtime(app).auth.cached(token)


async def flush_key_touches(app: Any) -> None:
    """Write the batched `last_used_at` of keys now."""
    await runtime(app).auth.flush_touches()


def open_streams(app: Any, user_id: str) -> int:
    """The streams a user holds open in this process (what their cap counts)."""
    return runtime(app).streams.held_by(user_id)


def batch_streams_waiting(app: Any) -> int:
    """Batch event streams of this process waiting for a batch to change."""
    return runtime(app).batches.events.watched


def batch_reads_in_flight(app: Any) -> int:
    """Batches whose state this process is reading for its event streams (one read per batch)."""
    return runtime(app).batches.reads_in_flight


async def sync_assistants(app: Any) -> None:
    """Write ASSISTANTS_FILE's shared assistants again, as the gateway did when it started."""
    rt = runtime(app)
    await rt.assistants.sync_file(rt.db.sessionmaker)


def url_signer(app: Any) -> UrlSigner:
    return runtime(app).images.signer


async def prune_images(app: Any) -> Pruned:
    """One pass of image retention."""
    return await runtime(app).image_retention.prune()


async def drain(app: Any, seconds: float = DRAIN_SECONDS) -> None:
    """Wait until the app's background work has settled (`Runtime.drain`: no batch item in flight,
    every queued usage row and refusal written), failing if it does not within `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            await runtime(app).drain()
    except TimeoutError:
        raise AssertionError(f"the gateway's background work did not settle within {seconds}s") from None


def idle(app: Any) -> bool:
    """Whether `drain` would have nothing to wait for right now."""
    return runtime(app).idle
