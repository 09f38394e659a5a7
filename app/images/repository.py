"""Queries for images, batches and their items."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import orjson
from sqlalchemy import case, delete, exists, func, select, tuple_, union_all, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import affected_rows
from app.instances import owner_alive
from app.models import ApiKey, AppUser, Image, ImageBatch, ImageBatchItem, StoredFile, UserOpenAIKey

ACTIVE_BATCH = ("queued", "running")
OPEN_ITEM = ("pending", "running")
# NOTIFY payload `<batch id>` or `<batch id> <origin instance>`: a batch's event streams look again.
BATCH_CHANNEL = "gateway_batches"


async def get_image(session: AsyncSession, image_id: uuid.UUID, user_id: str | None = None) -> Image | None:
    """An image by id; with `user_id`, only if it is that user's (others' images do not exist for them)."""
    query = select(Image).where(Image.id == image_id)
    if user_id is not None:
        query = query.where(Image.user_id == user_id)
    return await session.scalar(query)


async def images_by_ids(session: AsyncSession, user_id: str, ids: Sequence[uuid.UUID]) -> list[Image]:
    rows = await session.scalars(select(Image).where(Image.user_id == user_id, Image.id.in_(ids)))
    order = {image_id: position for position, image_id in enumerate(ids)}
    return sorted(rows, key=lambda image: order[image.id])


async def list_images(
    session: AsyncSession,
    user_id: str,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
    batch_id: uuid.UUID | None,
) -> list[Image]:
    """Newest first; one more than `limit` tells whether there is a next page."""
    query = select(Image).where(Image.user_id == user_id)
    if after is not None:
        query = query.where(tuple_(Image.created_at, Image.id) < tuple_(*after))
    if batch_id is not None:
        query = query.where(Image.batch_id == batch_id)
    query = query.order_by(Image.created_at.desc(), Image.id.desc()).limit(limit + 1)
    return list(await session.scalars(query))


async def stored_keys(session: AsyncSession, keys: Sequence[str]) -> set[str]:
    """Which of these storage keys image or file rows name (files share the image storage)."""
    images = select(Image.storage_key).where(Image.storage_key.in_(keys))
    files = select(StoredFile.storage_key).where(StoredFile.storage_key.in_(keys))
    return set(await session.scalars(union_all(images, files)))


async def delete_images(session: AsyncSession, ids: Sequence[uuid.UUID]) -> None:
    await session.execute(delete(Image).where(Image.id.in_(ids)))


async def expired_images(session: AsyncSession, cutoff: datetime, limit: int) -> list[tuple[uuid.UUID, str]]:
    """A slice of images older than `cutoff`, locked so that two pruners never take the same rows."""
    query = (
        select(Image.id, Image.storage_key)
        .where(Image.created_at < cutoff)
        .order_by(Image.created_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [(row.id, row.storage_key) for row in await session.execute(query)]


async def delete_finished_batches(session: AsyncSession, cutoff: datetime) -> int:
    result = await session.execute(
        delete(ImageBatch).where(ImageBatch.finished_at < cutoff, ImageBatch.status.not_in(ACTIVE_BATCH))
    )
    return affected_rows(result)


# Batches.


async def get_batch(session: AsyncSession, batch_id: uuid.UUID, user_id: str) -> ImageBatch | None:
    return await session.scalar(select(ImageBatch).where(ImageBatch.id == batch_id, ImageBatch.user_id == user_id))


async def batch_items(session: AsyncSession, batch_id: uuid.UUID) -> list[ImageBatchItem]:
    query = select(ImageBatchItem).where(ImageBatchItem.batch_id == batch_id).order_by(ImageBatchItem.index)
    return list(await session.scalars(query))


async def batch_state(session: AsyncSession, batch_id: uuid.UUID) -> tuple[str, datetime | None] | None:
    row = (
        await session.execute(select(ImageBatch.status, ImageBatch.finished_at).where(ImageBatch.id == batch_id))
    ).first()
    return (row.status, row.finished_at) if row else None


async def announce_progress(session: AsyncSession, batch_id: uuid.UUID, origin: uuid.UUID | None = None) -> None:
    """Wake the batch's event streams in every process, at commit. `origin`: the process that wakes its
    own streams itself (after its commit) and ignores its own notification."""
    payload = str(batch_id) if origin is None else f"{batch_id} {origin}"
    await session.execute(select(func.pg_notify(BATCH_CHANNEL, payload)))


async def cancel_batch(session: AsyncSession, batch_id: uuid.UUID) -> None:
    """Pending items are cancelled; a running one finishes, and the batch is finished once it has."""
    await session.execute(
        update(ImageBatchItem)
        .where(ImageBatchItem.batch_id == batch_id, ImageBatchItem.status == "pending")
        .values(status="cancelled", finished_at=func.now(), updated_at=func.now())
    )
    await session.execute(
        update(ImageBatch)
        .where(ImageBatch.id == batch_id, ImageBatch.status.in_(ACTIVE_BATCH))
        .values(status="cancelled")
    )
    await finish_batch_if_done(session, batch_id)


async def finish_batch_if_done(session: AsyncSession, batch_id: uuid.UUID) -> bool:
    """Mark the batch finished when no item is left to run; True when this call did it."""
    open_items = select(ImageBatchItem.id).where(
        ImageBatchItem.batch_id == batch_id, ImageBatchItem.status.in_(OPEN_ITEM)
    )
    result = await session.execute(
        update(ImageBatch)
        .where(ImageBatch.id == batch_id, ImageBatch.finished_at.is_(None), ~open_items.exists())
        .values(
            status=case((ImageBatch.status == "cancelled", "cancelled"), else_="completed"),
            finished_at=func.now(),
        )
        .returning(ImageBatch.id)
    )
    return result.first() is not None


@dataclass(slots=True)
class ClaimedItem:
    """A batch item taken by this process, with what it needs to run it."""

    id: uuid.UUID
    batch_id: uuid.UUID
    index: int
    prompt: str
    attempts: int
    user_id: str
    api_key_id: uuid.UUID | None
    request_id: str
    model: str
    options: dict[str, Any]


# One statement, so an idle poll costs one round trip: pick the next due item of a batch whose
# pace allows one now (SKIP LOCKED: replicas share the work), or one whose process died (its
# lease is that process's heartbeat, app/instances.py), mark it running as this process's, and
# move the batch's next slot on by its interval. A process that is alive keeps its item however
# long the generation takes.
CLAIM_ITEM = f"""
WITH next AS (
    SELECT i.id AS item_id, b.id AS batch_id
    FROM image_batch_item i JOIN image_batch b ON b.id = i.batch_id
    WHERE ((i.status = 'pending' AND i.not_before <= now())
           OR (i.status = 'running' AND NOT {owner_alive("i.claimed_by", "$2")}))
      AND b.status IN ('queued', 'running') AND b.next_run_at <= now()
    ORDER BY b.next_run_at, i.index
    LIMIT 1
    FOR UPDATE OF i, b SKIP LOCKED
), batch AS (
    UPDATE image_batch b SET status = 'running', next_run_at = now() + make_interval(secs => b.interval_seconds)
    FROM next WHERE b.id = next.batch_id
    RETURNING b.id, b.user_id, b.api_key_id, b.request_id, b.model, b.options
)
UPDATE image_batch_item i
SET status = 'running', claimed_by = $1, locked_until = NULL, updated_at = now()
FROM next, batch WHERE i.id = next.item_id
RETURNING i.id, i.batch_id, i.index, i.prompt, i.attempts,
          batch.user_id, batch.api_key_id, batch.request_id, batch.model, batch.options
"""


async def claim_item(pool: asyncpg.Pool, owner: uuid.UUID, lease: float) -> ClaimedItem | None:
    row = await pool.fetchrow(CLAIM_ITEM, owner, float(lease))
    if row is None:
        return None
    options = row["options"]
    return ClaimedItem(
        id=row["id"],
        batch_id=row["batch_id"],
        index=row["index"],
        prompt=row["prompt"],
        attempts=row["attempts"],
        user_id=row["user_id"],
        api_key_id=row["api_key_id"],
        request_id=row["request_id"],
        model=row["model"],
        options=orjson.loads(options) if isinstance(options, str) else dict(options),
    )


async def requeue_item(
    session: AsyncSession,
    item_id: uuid.UUID,
    owner: uuid.UUID,
    *,
    delay: float,
    failed_attempt: bool,
    error_code: str | None = None,
    error_message: str | None = None,
) -> None:
    """Back to pending, due again after `delay` seconds (a limit or a transient failure)."""
    values: dict[str, Any] = {
        "status": "pending",
        "claimed_by": None,
        "not_before": func.now() + timedelta(seconds=delay),
        "updated_at": func.now(),
        "error_code": error_code,
        "error_message": error_message,
    }
    if failed_attempt:
        values["attempts"] = ImageBatchItem.attempts + 1
    await session.execute(
        update(ImageBatchItem)
        .where(ImageBatchItem.id == item_id, ImageBatchItem.status == "running", ImageBatchItem.claimed_by == owner)
        .values(**values)
    )


async def pause_batch(session: AsyncSession, batch_id: uuid.UUID, seconds: float) -> None:
    await session.execute(
        update(ImageBatch)
        .where(ImageBatch.id == batch_id)
        .values(next_run_at=func.greatest(ImageBatch.next_run_at, func.now() + timedelta(seconds=seconds)))
    )


async def end_item(
    session: AsyncSession,
    item_id: uuid.UUID,
    owner: uuid.UUID,
    *,
    status: str,
    image_ids: list[str] | None = None,
    cost: float | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
    failed_attempt: bool = False,
) -> bool:
    """Record an item's outcome; False when it was no longer ours to end (cancelled, or taken over)."""
    values: dict[str, Any] = {
        "status": status,
        "claimed_by": None,
        "updated_at": func.now(),
        "finished_at": func.now(),
        "image_ids": image_ids or [],
        "cost_usd": cost,
        "error_code": error_code,
        "error_message": error_message,
    }
    if failed_attempt:
        values["attempts"] = ImageBatchItem.attempts + 1
    result = await session.execute(
        update(ImageBatchItem)
        .where(ImageBatchItem.id == item_id, ImageBatchItem.status == "running", ImageBatchItem.claimed_by == owner)
        .values(**values)
        .returning(ImageBatchItem.id)
    )
    return result.first() is not None


async def user_of(
    session: AsyncSession, user_id: str, api_key_id: uuid.UUID | None
) -> tuple[AppUser | None, bool, bool]:
    """The user's tier row (None if never stored), whether their batch's key is still valid,
    and whether they brought their own OpenAI key (their batch items use it)."""
    user = await session.scalar(select(AppUser).where(AppUser.id == user_id))
    revoked = False
    if api_key_id is not None:
        revoked_at = await session.scalar(select(ApiKey.revoked_at).where(ApiKey.id == api_key_id))
        revoked = revoked_at is not None
    own_key = bool(await session.scalar(select(exists().where(UserOpenAIKey.user_id == user_id))))
    return user, revoked, own_key
