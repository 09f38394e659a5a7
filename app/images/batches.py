"""Image batches: create (validated and moderated up front), read, cancel, and follow as SSE.

The work itself is the runner's (app/images/runner.py); the state is in Postgres, so a
batch survives restarts and any replica can serve its progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from app.auth.principal import Principal
from app.config import Settings
from app.errors import ErrorBody, InvalidRequest, NotFound
from app.images import repository
from app.images.idempotency import Stored, request_hash
from app.images.options import resolve_options
from app.images.schemas import (
    BatchCounts,
    BatchImage,
    BatchItemPublic,
    ImageBatchCreate,
    ImageBatchPublic,
)
from app.images.service import CallContext, ImageService
from app.images.signing import Links
from app.models import ImageBatch, ImageBatchItem

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
FINAL_ITEM = ("completed", "failed", "cancelled")


class BatchEvents:
    """In-process wake-ups for event streams; other replicas' progress is seen by polling."""

    def __init__(self) -> None:
        self._waiters: dict[uuid.UUID, set[asyncio.Event]] = defaultdict(set)

    def notify(self, batch_id: uuid.UUID) -> None:
        for event in self._waiters.get(batch_id, ()):
            event.set()

    async def wait(self, batch_id: uuid.UUID, seconds: float) -> None:
        event = asyncio.Event()
        self._waiters[batch_id].add(event)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), seconds)
        finally:
            waiters = self._waiters[batch_id]
            waiters.discard(event)
            if not waiters:
                del self._waiters[batch_id]


def item_public(item: ImageBatchItem, links: Links) -> BatchItemPublic:
    images = []
    for value in item.image_ids or []:
        image_id = uuid.UUID(value)
        url, expires = links.sign(image_id)
        images.append(BatchImage(id=image_id, url=url, url_expires_at=expires))
    error = None
    if item.error_code:
        error = ErrorBody(message=item.error_message or item.error_code, type="batch_item_error", code=item.error_code)
    return BatchItemPublic(
        index=item.index,
        custom_id=item.custom_id,
        prompt=item.prompt,
        status=item.status,  # type: ignore[arg-type]
        attempts=item.attempts,
        images=images,
        cost_usd=float(item.cost_usd) if item.cost_usd is not None else None,
        error=error,
        next_attempt_at=item.not_before if item.status == "pending" else None,
        finished_at=item.finished_at,
    )


def counts_of(items: list[ImageBatchItem]) -> BatchCounts:
    tally = dict.fromkeys(("pending", "running", "completed", "failed", "cancelled"), 0)
    for item in items:
        tally[item.status] = tally.get(item.status, 0) + 1
    return BatchCounts(total=len(items), **tally)


def batch_public(batch: ImageBatch, items: list[ImageBatchItem], links: Links) -> ImageBatchPublic:
    options = batch.options
    return ImageBatchPublic(
        id=batch.id,
        status=batch.status,  # type: ignore[arg-type]
        model=batch.model,
        size=options.get("size"),
        quality=options.get("quality"),
        output_format=options.get("output_format"),
        background=options.get("background"),
        n=options.get("n", 1),
        created_at=batch.created_at,
        finished_at=batch.finished_at,
        estimated_cost_usd=float(batch.estimated_cost_usd),
        counts=counts_of(items),
        items=[item_public(item, links) for item in items],
    )


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps({"type": event, **data}) + b"\n\n"


class BatchService:
    def __init__(
        self,
        settings: Settings,
        images: ImageService,
        sessionmaker: async_sessionmaker[AsyncSession],
        events: BatchEvents,
        wake_runner: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.images = images
        self.sessionmaker = sessionmaker
        self.events = events
        self.wake_runner = wake_runner

    async def create(
        self, session: AsyncSession, principal: Principal, body: ImageBatchCreate, ctx: CallContext
    ) -> Response:
        values = body.model_dump(exclude_unset=True, exclude={"items"})
        options = resolve_options(self.images.catalog, principal.tier, {**values, "model": body.model})
        limit = self.settings.image_batch_max_items
        if len(body.items) > limit:
            raise InvalidRequest(f"A batch takes at most {limit} items; this one has {len(body.items)}.", param="items")
        prompts = [item.prompt for item in body.items]

        async def run() -> tuple[int, dict[str, Any], Response]:
            if self.settings.image_moderation:
                await self.images.moderate(
                    principal,
                    ctx.request_id,
                    prompts,
                    self.images.upstream.images_for(principal),
                    param=lambda index: f"items.{index}.prompt",
                )
            now = datetime.now(UTC)
            batch = ImageBatch(
                id=uuid.uuid4(),
                user_id=principal.user_id,
                api_key_id=principal.api_key_id,
                request_id=ctx.request_id,
                status="queued",
                model=options.spec.id,
                options=options.stored(),
                interval_seconds=60.0 / self.settings.image_batch_items_per_minute,
                estimated_cost_usd=Decimal(str(options.estimate(len(prompts)))),
                next_run_at=now,
                created_at=now,
            )
            session.add(batch)
            await session.flush()
            session.add_all(
                ImageBatchItem(
                    id=uuid.uuid4(),
                    batch_id=batch.id,
                    index=index,
                    custom_id=item.custom_id,
                    prompt=item.prompt,
                    status="pending",
                    attempts=0,
                    not_before=now,
                    image_ids=[],
                    updated_at=now,
                )
                for index, item in enumerate(body.items)
            )
            await session.flush()
            response = await self._response(session, batch.id, principal, ctx.links)
            return 202, {"batch_id": str(batch.id)}, response

        async def replay(stored: Stored) -> Response:
            return await self._response(session, uuid.UUID(stored.result["batch_id"]), principal, ctx.links)

        fingerprint = request_hash(ctx.method, ctx.path, body.model_dump(exclude_unset=True, mode="json"))
        response = await self.images.idempotency.once(
            session, principal.user_id, ctx.idempotency_key, fingerprint, run, replay
        )
        # After the response: the session has committed by then, so the runner sees the batch.
        response.background = BackgroundTask(self.wake_runner)
        return response

    async def _response(
        self, session: AsyncSession, batch_id: uuid.UUID, principal: Principal, links: Links
    ) -> Response:
        batch = await self.get(session, principal, batch_id, links)
        return Response(batch.model_dump_json().encode(), status_code=202, media_type="application/json")

    async def get(
        self, session: AsyncSession, principal: Principal, batch_id: uuid.UUID, links: Links
    ) -> ImageBatchPublic:
        batch = await repository.get_batch(session, batch_id, principal.user_id)
        if batch is None:
            raise NotFound(f"No image batch {batch_id}.")
        return batch_public(batch, await repository.batch_items(session, batch_id), links)

    async def cancel(
        self, session: AsyncSession, principal: Principal, batch_id: uuid.UUID, links: Links
    ) -> ImageBatchPublic:
        batch = await repository.get_batch(session, batch_id, principal.user_id)
        if batch is None:
            raise NotFound(f"No image batch {batch_id}.")
        await repository.cancel_batch(session, batch_id)
        session.expire_all()
        self.events.notify(batch_id)
        return await self.get(session, principal, batch_id, links)

    async def stream(self, session: AsyncSession, principal: Principal, batch_id: uuid.UUID, links: Links) -> Response:
        """Checks ownership now; the stream then reads with its own short sessions (this one is released)."""
        if await repository.get_batch(session, batch_id, principal.user_id) is None:
            raise NotFound(f"No image batch {batch_id}.")
        return StreamingResponse(self._events(batch_id, links), media_type="text/event-stream", headers=SSE_HEADERS)

    async def _events(self, batch_id: uuid.UUID, links: Links) -> AsyncIterator[bytes]:
        """Each item's end as `item.completed` / `item.failed` / `item.cancelled` (those already ended
        first), then `batch.completed` (or `batch.cancelled`), and the stream ends; it is capped at
        STREAM_MAX_SECONDS, with heartbeats while nothing happens."""
        sent: set[uuid.UUID] = set()
        deadline = time.monotonic() + self.settings.stream_max_seconds
        heartbeat_at = time.monotonic() + self.settings.stream_heartbeat_seconds
        poll = self.settings.image_batch_poll_seconds
        while True:
            async with self.sessionmaker() as session:
                state = await repository.batch_state(session, batch_id)
                items = await repository.batch_items(session, batch_id)
            if state is None:  # deleted under us (retention)
                return
            counts = counts_of(items).model_dump()
            for item in sorted((i for i in items if i.status in FINAL_ITEM and i.id not in sent), key=_finished):
                sent.add(item.id)
                yield _sse(
                    f"item.{item.status}", {"batch_id": str(batch_id), "item": _dump(item, links), "counts": counts}
                )
            status, finished_at = state
            if finished_at is not None:
                kind = "batch.cancelled" if status == "cancelled" else "batch.completed"
                yield _sse(kind, {"batch_id": str(batch_id), "status": status, "counts": counts})
                return
            now = time.monotonic()
            if now >= deadline:
                yield _sse("stream.timeout", {"batch_id": str(batch_id), "counts": counts})
                return
            if now >= heartbeat_at:
                heartbeat_at = now + self.settings.stream_heartbeat_seconds
                yield b": keep-alive\n\n"
            await self.events.wait(batch_id, min(poll, max(heartbeat_at - now, 0.0), max(deadline - now, 0.0)))


def _finished(item: ImageBatchItem) -> tuple[datetime, int]:
    return (item.finished_at or item.updated_at, item.index)


def _dump(item: ImageBatchItem, links: Links) -> dict[str, Any]:
    return item_public(item, links).model_dump(mode="json")
