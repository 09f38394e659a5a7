"""The batch runner: a task in every process that takes due items with `FOR UPDATE SKIP LOCKED`.

Replicas share the work and a restart resumes it: an item is `running` as one process's
while it works on it; a clean shutdown puts it back to `pending` at once, and the item of a
process that died is taken over once that process's lease runs out (app/instances.py). A
process that lost its item (it was presumed dead) does not add the images it made. Each
batch is paced by its own interval (fixed at creation). A refusal by the user's limits
pauses the batch until the limit allows and is not a failure; transient upstream failures
are retried with backoff, up to IMAGE_BATCH_MAX_ATTEMPTS; one item's failure never fails
the others.
"""

from __future__ import annotations

import asyncio
import logging

from app.auth.principal import Principal
from app.config import Settings
from app.db import Database
from app.errors import ErrorCode, GatewayError, RateLimited, Unavailable, UpstreamError
from app.events import EventHub
from app.images import repository
from app.images.generation import ImageGenerator
from app.images.options import resolve_options
from app.images.repository import ClaimedItem
from app.instances import Instance
from app.jobs import ClaimingWorker
from app.registry import Catalog

log = logging.getLogger("app.images.runner")

MAX_BACKOFF = 300.0


def _transient(error: GatewayError) -> bool:
    return isinstance(error, UpstreamError | Unavailable) or error.code == ErrorCode.UPSTREAM_RATE_LIMITED


def _retry_after(error: GatewayError, default: float) -> float:
    try:
        return max(float(error.headers.get("retry-after", default)), 0.0)
    except ValueError:
        return default


class BatchRunner(ClaimingWorker[ClaimedItem]):
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        generator: ImageGenerator,
        database: Database,
        events: EventHub,
        instance: Instance,
    ) -> None:
        super().__init__("image-batch-runner", settings.image_batch_concurrency, settings.image_batch_poll_seconds)
        self.settings = settings
        self.instance = instance
        self.owner = instance.id
        self.history = generator.history
        self.catalog = catalog
        self.generator = generator
        self.pool = database.pool
        self.sessionmaker = database.sessionmaker
        self.events = events

    async def claim(self) -> ClaimedItem | None:
        return await repository.claim_item(self.pool, self.owner, self.instance.lease_seconds)

    async def run(self, item: ClaimedItem) -> None:
        try:
            await self._attempt(item)
        except asyncio.CancelledError:
            await asyncio.shield(self._hand_back(item))
            raise
        except Exception as error:
            log.exception("batch item %s failed unexpectedly", item.id)
            try:
                await self._retry_or_fail(
                    item, ErrorCode.INTERNAL_ERROR, f"The item failed unexpectedly: {error}", transient=True
                )
            except Exception as failure:  # the database too: the item's lease frees it later
                log.warning("could not record batch item %s's failure: %s", item.id, failure)
        finally:  # committed by now: this process's streams wake at once (other processes by NOTIFY)
            self.events.batches.publish(item.batch_id)
            self.wake()

    async def _attempt(self, item: ClaimedItem) -> None:
        principal = await self._principal(item)
        if principal is None:
            await self._fail(item, ErrorCode.API_KEY_REVOKED, "The batch's API key was revoked.")
            return
        try:
            options = resolve_options(self.catalog, principal.tier, {**item.options, "model": item.model})
            request_id = f"{item.request_id[:50]}:{item.index}"
            produced = await self.generator.produce(principal, request_id, item.prompt, options, batch_id=item.batch_id)
        except RateLimited as error:
            if error.code == ErrorCode.UPSTREAM_RATE_LIMITED:
                await self._retry_or_fail(item, error.code, error.message, transient=True, delay=_retry_after(error, 5))
                return
            # The user's own limits: the batch waits until they allow the next image. Not a failure.
            async with self.sessionmaker() as session, session.begin():
                await repository.pause_batch(session, item.batch_id, _retry_after(error, 1))
                await repository.requeue_item(
                    session,
                    item.id,
                    self.owner,
                    delay=0,
                    failed_attempt=False,
                    error_code=error.code,
                    error_message=error.message,
                )
            return
        except GatewayError as error:
            await self._retry_or_fail(
                item, error.code or ErrorCode.SERVER_ERROR, error.message, transient=_transient(error)
            )
            return
        cost = float(sum(image.cost_usd for image in produced.images))
        async with self.sessionmaker() as session, session.begin():
            image_ids = [str(image.id) for image in produced.images]
            if not await repository.end_item(
                session, item.id, self.owner, status="completed", image_ids=image_ids, cost=cost
            ):
                # Cancelled, or taken over by a replica that thought this process dead: the item is not
                # completed twice. The generation was made (and recorded); its images are not kept.
                log.warning("batch item %s is no longer this process's; its images are discarded", item.id)
                await self.history.discard(produced.images)
                return
            session.add_all(produced.images)
            await repository.finish_batch_if_done(session, item.batch_id)
            await repository.announce_progress(session, item.batch_id, self.owner)

    async def _principal(self, item: ClaimedItem) -> Principal | None:
        """The batch owner as they are now (tier, switches, overrides); None if its key was revoked."""
        async with self.sessionmaker() as session:
            user, revoked, own_key = await repository.user_of(session, item.user_id, item.api_key_id)
        if revoked:
            return None
        return Principal(
            user_id=item.user_id,
            tier=user.tier if user else self.settings.jwt_default_tier,
            use_upstream=user.use_upstream if user else True,
            limit_overrides=dict(user.limit_overrides or {}) if user else {},
            api_key_id=item.api_key_id,
            via="key" if item.api_key_id else "jwt",
            has_own_key=own_key,
        )

    async def _retry_or_fail(
        self, item: ClaimedItem, code: str, message: str, *, transient: bool, delay: float | None = None
    ) -> None:
        if transient and item.attempts + 1 < self.settings.image_batch_max_attempts:
            backoff = delay if delay is not None else min(5.0 * 2**item.attempts, MAX_BACKOFF)
            async with self.sessionmaker() as session, session.begin():
                await repository.requeue_item(
                    session,
                    item.id,
                    self.owner,
                    delay=backoff,
                    failed_attempt=True,
                    error_code=code,
                    error_message=message,
                )
            return
        await self._fail(item, code, message, failed_attempt=True)

    async def _fail(self, item: ClaimedItem, code: str, message: str, *, failed_attempt: bool = False) -> None:
        async with self.sessionmaker() as session, session.begin():
            await repository.end_item(
                session,
                item.id,
                self.owner,
                status="failed",
                error_code=code,
                error_message=message,
                failed_attempt=failed_attempt,
            )
            await repository.finish_batch_if_done(session, item.batch_id)
            await repository.announce_progress(session, item.batch_id, self.owner)

    async def _hand_back(self, item: ClaimedItem) -> None:
        try:
            async with self.sessionmaker() as session, session.begin():
                await repository.requeue_item(session, item.id, self.owner, delay=0, failed_attempt=False)
        except Exception as error:  # its lease frees it later
            log.warning("could not hand back batch item %s: %s", item.id, error)
