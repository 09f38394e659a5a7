"""What the images domain holds for a process's lifetime, built and stopped in lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from app.config import Settings
from app.db import Database
from app.images.batches import BatchEvents, BatchService
from app.images.history import ImageHistory
from app.images.idempotency import IdempotencyStore
from app.images.retention import ImageRetention, Pruned
from app.images.runner import BatchRunner
from app.images.service import ImageService
from app.images.signing import UrlSigner, load_secret
from app.images.storage import ImageStorage, open_storage
from app.ratelimit.limiter import Limiter
from app.registry import Catalog
from app.upstream.provider import Upstream
from app.usage.writer import UsageWriter


@dataclass
class ImagesRuntime:
    service: ImageService
    history: ImageHistory
    batches: BatchService
    runner: BatchRunner
    retention: ImageRetention
    storage: ImageStorage

    async def stop(self) -> None:
        """Before the usage writer stops: items handed back here still record their usage."""
        await self.runner.stop()
        await self.retention.stop()
        await self.storage.close()


def idempotency_store(settings: Settings, database: Database) -> IdempotencyStore:
    # A claim still pending after the longest a generation can take belongs to a dead process.
    lease = settings.upstream_read_timeout * (settings.upstream_max_retries + 1) + 60
    return IdempotencyStore(database.pool, settings.idempotency_ttl_seconds, lease)


async def start_images(
    settings: Settings,
    database: Database,
    catalog: Catalog,
    limiter: Limiter,
    upstream: Upstream,
    usage: UsageWriter,
) -> ImagesRuntime:
    storage = await open_storage(settings)
    signer = UrlSigner(await load_secret(database.pool, settings.image_url_secret), settings.image_url_ttl_seconds)
    idempotency = idempotency_store(settings, database)
    history = ImageHistory(storage, signer)
    service = ImageService(settings, catalog, limiter, upstream, usage, history, signer, idempotency)
    events = BatchEvents()
    runner = BatchRunner(settings, service, database, events)
    batches = BatchService(settings, service, database.sessionmaker, events, runner.wake)
    retention = ImageRetention(
        database.sessionmaker,
        storage,
        idempotency,
        days=settings.image_retention_days,
        interval=settings.image_retention_interval,
    )
    await runner.start()
    retention.start()
    return ImagesRuntime(service, history, batches, runner, retention, storage)


async def prune_once(settings: Settings, url: str, days: int | None = None) -> Pruned:
    """One retention pass outside the server (`python -m app prune-images`)."""
    database = await Database.connect(url, 2)
    storage = await open_storage(settings)
    try:
        retention = ImageRetention(
            database.sessionmaker,
            storage,
            idempotency_store(settings, database),
            days=settings.image_retention_days,
            interval=settings.image_retention_interval,
        )
        return await retention.prune(days)
    finally:
        await storage.close()
        await database.close()
