"""Retention: images older than IMAGE_RETENTION_DAYS (bytes and rows), finished batches as old,
and expired idempotency keys. Runs as a job in every process (app/jobs.py) (slices are locked with
SKIP LOCKED, so replicas do not collide) and as `python -m app prune-images`."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.images import repository
from app.images.idempotency import IdempotencyStore
from app.images.storage import ImageStorage

log = logging.getLogger("app.images.retention")

SLICE = 500


# Bytes stored without a row this much later were orphaned (a process died, or a commit failed, between
# storing them and writing the row): the sweep deletes them.
ORPHAN_AFTER = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class Pruned:
    images: int
    batches: int
    idempotency_keys: int
    orphans: int = 0


class ImageRetention:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        storage: ImageStorage,
        idempotency: IdempotencyStore,
        *,
        days: int,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.storage = storage
        self.idempotency = idempotency
        self.days = days

    async def prune(self, days: int | None = None) -> Pruned:
        """Delete what is older than `days` (default: the setting; 0 keeps images, prunes keys only)."""
        days = self.days if days is None else days
        images = batches = 0
        if days > 0:
            cutoff = datetime.now(UTC) - timedelta(days=days)
            while True:
                # Bytes first, then rows, in one transaction holding the slice: a failed delete
                # leaves the rows for the next run rather than rows without bytes.
                async with self.sessionmaker() as session, session.begin():
                    expired = await repository.expired_images(session, cutoff, SLICE)
                    if not expired:
                        break
                    await asyncio.gather(*(self.storage.delete(key) for _, key in expired))
                    await repository.delete_images(session, [image_id for image_id, _ in expired])
                images += len(expired)
            async with self.sessionmaker() as session, session.begin():
                batches = await repository.delete_finished_batches(session, cutoff)
        keys = await self.idempotency.prune()
        return Pruned(images, batches, keys, await self.sweep_orphans())

    async def sweep_orphans(self, older_than: timedelta = ORPHAN_AFTER) -> int:
        """Delete stored bytes that no image row names, written more than `older_than` ago."""
        deleted = 0
        async for keys in self.storage.keys_before(datetime.now(UTC) - older_than):
            async with self.sessionmaker() as session:
                kept = await repository.stored_keys(session, keys)
            orphans = [key for key in keys if key not in kept]
            await asyncio.gather(*(self.storage.delete(key) for key in orphans))
            deleted += len(orphans)
        if deleted:
            log.info("deleted %d stored images that no row names", deleted)
        return deleted
