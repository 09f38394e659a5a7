"""Image batches: create (validated and moderated up front), read, cancel, and follow as SSE.

The work itself is the runner's (app/images/runner.py); the state is in Postgres, so a
batch survives restarts and any replica can serve its progress.

Progress is pushed, not polled: whoever changes a batch's state sends NOTIFY in the same
transaction (`repository.announce_progress`), which the process's one LISTEN connection
(app/listener.py) turns into a wake-up of that batch's streams (`BatchEvents`). A stream
reads the database when woken, and otherwise only every IMAGE_BATCH_EVENTS_RECHECK_SECONDS,
in case a notification was lost; an idle stream costs no queries in between. The streams of
one batch woken by one change share one read (`BatchService._snapshot`), however many they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from sse_starlette import ServerSentEvent
from starlette.background import BackgroundTask
from starlette.responses import Response

from app.auth.principal import Principal
from app.config import Settings
from app.db import Database
from app.errors import ErrorBody, InvalidRequest, stored_code
from app.images import repository
from app.images.generation import ImageGenerator
from app.images.idempotency import Claim, IdempotencyStore, Stored, request_hash
from app.images.options import resolve_options
from app.images.schemas import (
    BatchCounts,
    BatchImage,
    BatchItemPublic,
    ImageBatchCreate,
    ImageBatchPublic,
)
from app.images.service import CallContext
from app.images.signing import Links
from app.models import ImageBatch, ImageBatchItem
from app.registry import Catalog
from app.sse import EventSource, server_event
from app.streams import StreamSlots

FINAL_ITEM = ("completed", "failed", "cancelled")

# A batch's (status, finished_at), None once it is gone, and its items.
Snapshot = tuple[tuple[str, datetime | None] | None, list[ImageBatchItem]]


class BatchEvents:
    """Wake-ups for the event streams this process serves, one `asyncio.Event` per stream, by batch id.

    Fed by this process's batch runner (the event hub, after its commit) and by NOTIFY from every
    process (`heard`), its own excepted: the runner woke its streams already.
    """

    def __init__(self, origin: uuid.UUID) -> None:
        self.origin = str(origin)
        self._waiters: dict[uuid.UUID, set[asyncio.Event]] = defaultdict(set)
        # Counts wake-ups: a read begun at tick T sees every change whose wake-up came at or before T.
        self.tick = 0

    def notify(self, batch_id: uuid.UUID) -> None:
        self.tick += 1
        for event in self._waiters.get(batch_id, ()):
            event.set()

    def notify_all(self) -> None:
        """Wake every stream (the LISTEN connection came back: a notification may have been missed)."""
        self.tick += 1
        for waiters in self._waiters.values():
            for event in waiters:
                event.set()

    def heard(self, payload: str) -> None:
        """A NOTIFY on `repository.BATCH_CHANNEL`."""
        batch, _, origin = payload.partition(" ")
        if origin != self.origin:
            with contextlib.suppress(ValueError):
                self.notify(uuid.UUID(batch))

    @property
    def watched(self) -> int:
        """Streams waiting for a batch's progress in this process."""
        return sum(len(waiters) for waiters in self._waiters.values())

    @contextlib.contextmanager
    def watch(self, batch_id: uuid.UUID) -> Iterator[asyncio.Event]:
        """An event set by each change of the batch while the block runs: clear it before reading the
        state, and a change during the read still wakes the next wait."""
        event = asyncio.Event()
        self._waiters[batch_id].add(event)
        try:
            yield event
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
        error = ErrorBody(
            message=item.error_message or item.error_code, type="batch_item_error", code=stored_code(item.error_code)
        )
    return BatchItemPublic(
        index=item.index,
        custom_id=item.custom_id,
        prompt=item.prompt,
        status=item.status,
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
        status=batch.status,
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


class BatchService:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        database: Database,
        generator: ImageGenerator,
        idempotency: IdempotencyStore,
        events: BatchEvents,
        streams: StreamSlots,
        wake_runner: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.database = database
        self.generator = generator
        self.idempotency = idempotency
        self.events = events
        self.streams = streams
        self.wake_runner = wake_runner
        self._reads: dict[uuid.UUID, tuple[int, asyncio.Task[Snapshot]]] = {}

    async def create(self, principal: Principal, body: ImageBatchCreate, ctx: CallContext) -> Response:
        """Moderated (an upstream call, no session open), then stored with its items in one transaction."""
        values = body.model_dump(exclude_unset=True, exclude={"items"})
        options = resolve_options(self.catalog, principal.tier, {**values, "model": body.model})
        limit = self.settings.image_batch_max_items
        if len(body.items) > limit:
            raise InvalidRequest(f"A batch takes at most {limit} items; this one has {len(body.items)}.", param="items")
        prompts = [item.prompt for item in body.items]

        async def run(claim: Claim) -> Response:
            if self.settings.image_moderation:
                await self.generator.moderate(
                    principal, ctx.request_id, prompts, param=lambda index: f"items.{index}.prompt"
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
            async with self.database.sessionmaker.begin() as session:
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
                await claim.complete(session, 202, {"batch_id": str(batch.id)})
            return await self._response(batch.id, ctx.links)

        async def replay(stored: Stored) -> Response:
            return await self._response(uuid.UUID(stored.result["batch_id"]), ctx.links)

        fingerprint = request_hash(ctx.method, ctx.path, body.model_dump(exclude_unset=True, mode="json"))
        response = await self.idempotency.once(principal.user_id, ctx.idempotency_key, fingerprint, run, replay)
        # After the response: the batch is committed by then, so the runner sees it.
        response.background = BackgroundTask(self.wake_runner)
        return response

    async def _response(self, batch_id: uuid.UUID, links: Links) -> Response:
        async with self.database.sessionmaker() as session:
            batch = await session.get(ImageBatch, batch_id)
            assert batch is not None
            public = await self.public(session, batch, links)
        return Response(public.model_dump_json().encode(), status_code=202, media_type="application/json")

    async def public(self, session: AsyncSession, batch: ImageBatch, links: Links) -> ImageBatchPublic:
        return batch_public(batch, await repository.batch_items(session, batch.id), links)

    async def cancel(self, session: AsyncSession, batch: ImageBatch, links: Links) -> ImageBatchPublic:
        batch_id = batch.id
        await repository.cancel_batch(session, batch_id)
        # Every process's streams, this one's too, wake when the request's transaction commits.
        await repository.announce_progress(session, batch_id)
        session.expire_all()
        refreshed = await session.get(ImageBatch, batch_id)
        assert refreshed is not None
        return await self.public(session, refreshed, links)

    def stream(self, principal: Principal, batch: ImageBatch, links: Links) -> Response:
        """The caller's batch, already checked; one of the caller's open streams (429 past their cap).
        The stream reads with its own short sessions."""
        slot = self.streams.admit(principal)
        return EventSource(self._events(batch.id, links), heartbeat=self.settings.stream_heartbeat_seconds, slot=slot)

    async def _events(self, batch_id: uuid.UUID, links: Links) -> AsyncIterator[ServerSentEvent]:
        """Each item's end as `item.completed` / `item.failed` / `item.cancelled` (those already ended
        first), then `batch.completed` (or `batch.cancelled`), and the stream ends; it is capped at
        STREAM_MAX_SECONDS (`stream.timeout`). The event source pings while nothing happens; the
        database is read when the batch changed, and otherwise every recheck interval."""
        sent: set[uuid.UUID] = set()
        deadline = time.monotonic() + self.settings.stream_max_seconds
        recheck = self.settings.image_batch_events_recheck_seconds
        with self.events.watch(batch_id) as changed:
            while True:
                changed.clear()
                state, items = await self._snapshot(batch_id, self.events.tick)
                if state is None:  # deleted under us (retention)
                    return
                counts = counts_of(items).model_dump()
                for item in sorted((i for i in items if i.status in FINAL_ITEM and i.id not in sent), key=_finished):
                    sent.add(item.id)
                    yield _event(
                        f"item.{item.status}",
                        {"batch_id": str(batch_id), "item": _dump(item, links), "counts": counts},
                    )
                status, finished_at = state
                if finished_at is not None:
                    kind = "batch.cancelled" if status == "cancelled" else "batch.completed"
                    yield _event(kind, {"batch_id": str(batch_id), "status": status, "counts": counts})
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    yield _event("stream.timeout", {"batch_id": str(batch_id), "counts": counts})
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), min(recheck, left))

    @property
    def reads_in_flight(self) -> int:
        """Batches whose state is being read for their streams right now."""
        return len(self._reads)

    async def _snapshot(self, batch_id: uuid.UUID, since: int) -> Snapshot:
        """The batch's state and items as of wake-up `since` or later. Joins a read of the batch that
        began at or after `since`, or begins one: a thousand streams woken by one change cost one read.
        The read is its own task, so a stream that goes away does not cancel it for the others."""
        current = self._reads.get(batch_id)
        if current is None or current[0] < since:
            current = (self.events.tick, asyncio.create_task(self._read(batch_id)))
            self._reads[batch_id] = current
            current[1].add_done_callback(functools.partial(self._read_done, batch_id, current))
        return await asyncio.shield(current[1])

    async def _read(self, batch_id: uuid.UUID) -> Snapshot:
        async with self.database.sessionmaker() as session:
            return await repository.batch_state(session, batch_id), await repository.batch_items(session, batch_id)

    def _read_done(
        self, batch_id: uuid.UUID, read: tuple[int, asyncio.Task[Snapshot]], task: asyncio.Task[Snapshot]
    ) -> None:
        if self._reads.get(batch_id) is read:
            del self._reads[batch_id]
        if not task.cancelled():
            task.exception()  # retrieved: a failure its streams did not stay to hear is not logged as unretrieved


def _event(name: str, data: dict[str, Any]) -> ServerSentEvent:
    return server_event(name, {"type": name, **data})


def _finished(item: ImageBatchItem) -> tuple[datetime, int]:
    return (item.finished_at or item.updated_at, item.index)


def _dump(item: ImageBatchItem, links: Links) -> dict[str, Any]:
    return item_public(item, links).model_dump(mode="json")
