"""The one place tests reach into a running app's in-process state.

Everything a test reads from or pokes at inside the app (its usage writer, limiter,
database handles, caches, image services, background tasks) goes through a function
here, so that when the app's wiring moves (from these `app.state` attributes to a typed
`app.state.runtime`), only this file changes. Each function names the state it touches.
"""

from __future__ import annotations

from typing import Any

from app.auth.principal import Principal
from app.images.retention import Pruned
from app.images.signing import UrlSigner
from app.ratelimit.limiter import Limiter
from app.upstream.user_clients import UserClient, UserClients
from app.usage.writer import UsageWriter
from support.waiting import wait_for

DRAIN_SECONDS = 30.0


def usage_writer(app: Any) -> UsageWriter:
    """The usage writer (`app.state.usage`)."""
    return app.state.usage


def limiter(app: Any) -> Limiter:
    """The rate limiter (`app.state.limiter`)."""
    return app.state.limiter


def sessionmaker(app: Any) -> Any:
    """The SQLAlchemy session factory (`app.state.db.sessionmaker`)."""
    return app.state.db.sessionmaker


def sync_engine(app: Any) -> Any:
    """The SQLAlchemy engine's sync face, for event listeners (`app.state.db.engine.sync_engine`)."""
    return app.state.db.engine.sync_engine


def user_clients(app: Any) -> UserClients:
    """The per-user upstream clients of bring-your-own-key users (`app.state.upstream.user_clients`)."""
    return app.state.upstream.user_clients


def user_client(app: Any, user_id: str) -> UserClient:
    """One user's cached upstream client (`app.state.upstream.user_clients._entries[user_id]`)."""
    return user_clients(app)._entries[user_id]


def cached_principal(app: Any, token: str) -> Principal | None:
    """What the authenticator's cache holds for a key, without I/O (`app.state.authenticator.cached`)."""
    return app.state.authenticator.cached(token)


async def flush_key_touches(app: Any) -> None:
    """Write the batched `last_used_at` of keys now (`app.state.authenticator.flush_touches`)."""
    await app.state.authenticator.flush_touches()


def url_signer(app: Any) -> UrlSigner:
    """The signer of image content URLs (`app.state.images.service.signer`)."""
    return app.state.images.service.signer


async def prune_images(app: Any) -> Pruned:
    """One pass of image retention (`app.state.images.retention.prune`)."""
    return await app.state.images.retention.prune()


async def drain(app: Any, seconds: float = DRAIN_SECONDS) -> None:
    """Wait until the app's background work has settled, failing if it does not within `seconds`.

    First the image batch runner has no item in flight (`app.state.images.runner._active`);
    then the usage writer (`app.state.usage`) and the limit-refusal writer (`app.state.refusals`)
    are woken to flush now (`_wake`) and waited on until every queued row is written. Their
    own task does the writing: calling `flush()` from here could write a batch that the task
    is writing at the same moment, twice.
    """
    runner = app.state.images.runner

    async def runner_idle() -> bool:
        return not runner._active

    await wait_for(runner_idle, seconds, what="the image batch runner to finish its items in flight")
    for writer, what in ((app.state.usage, "usage rows"), (app.state.refusals, "limit refusals")):
        if writer.queue_depth:
            writer._wake.set()

        async def written(writer: Any = writer) -> bool:
            return writer.queue_depth == 0

        await wait_for(written, seconds, what=f"the queued {what} to be written")


def idle(app: Any) -> bool:
    """Whether `drain` would have nothing to wait for right now (the same state, read once)."""
    return not app.state.images.runner._active and app.state.usage.queue_depth == 0 == app.state.refusals.queue_depth
