"""Image generation routes' work: validate against the registry, generate once per idempotency key, answer.

No database session spans the upstream call: each phase opens its own (read the original
of a regeneration; then, after generating, store the images with the idempotency outcome
in one transaction).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import Response

from app.auth.principal import Principal
from app.config import Settings
from app.db import DB_ERRORS, Database
from app.errors import ErrorCode, ImageNotFound, InvalidRequest
from app.images import repository
from app.images.generation import ImageGenerator, Produced
from app.images.history import ImageHistory
from app.images.idempotency import HEADER, Claim, IdempotencyStore, Stored, StoredLater, request_hash
from app.images.options import ImageOptions, resolve_options
from app.images.responses import images_response, stored_result
from app.images.schemas import ImageEstimate, ImageEstimateRequest, ImageGenerateRequest, ImageRegenerateRequest
from app.images.signing import Links, UrlSigner
from app.images.streaming import ImageStreamer
from app.images.uploads import EditForm, read_edit_form
from app.registry import Catalog
from app.sse import Stopping
from app.upstream.provider import ImageUpload

log = logging.getLogger("app.images")

# How long an outcome the database could not take right away is retried in the background.
STORE_LATER_SECONDS = 600.0


@dataclass(frozen=True, slots=True)
class CallContext:
    """What a generation route knows of its request besides the body."""

    request_id: str
    method: str
    path: str
    links: Links
    idempotency_key: str | None = None


class ImageService:
    def __init__(
        self,
        *,
        settings: Settings,
        stopping: Stopping | None,
        catalog: Catalog,
        database: Database,
        generator: ImageGenerator,
        history: ImageHistory,
        signer: UrlSigner,
        idempotency: IdempotencyStore,
        public_base_url: str | None,
    ) -> None:
        self.catalog = catalog
        self.database = database
        self.generator = generator
        self.history = history
        self.storage = history.storage
        self.signer = signer
        self.idempotency = idempotency
        self.public_base_url = public_base_url
        self.settings = settings
        self.streamer = ImageStreamer(settings, database, generator, history, stopping)
        self._storing: set[asyncio.Task[None]] = set()

    def links(self, request_base_url: str) -> Links:
        base = self.public_base_url or request_base_url
        return Links(self.signer, base.rstrip("/") + "/v1")

    async def generate(self, principal: Principal, body: ImageGenerateRequest, ctx: CallContext) -> Response:
        options = resolve_options(
            self.catalog, principal.tier, {**body.model_dump(exclude_unset=True), "model": body.model}
        )
        if options.stream:
            _no_key_with_stream(ctx)
            return await self.streamer.stream(principal, ctx.request_id, body.prompt, options, ctx.links)
        fingerprint = body.model_dump(exclude_unset=True, mode="json")
        return await self._generate_once(principal, ctx, fingerprint, body.prompt, options, body.response_format)

    async def edit_form(self, request: Request) -> EditForm:
        """An edit's multipart body, checked, its files on disk (the caller closes it)."""
        return await read_edit_form(
            request,
            max_images=self.settings.image_edit_max_images,
            max_image_bytes=self.settings.image_upload_max_bytes,
        )

    async def edit(self, principal: Principal, form: EditForm, ctx: CallContext) -> Response:
        """An edit of uploaded images: reserved, made, stored and answered like a generation (or streamed)."""
        body = form.fields
        options = resolve_options(
            self.catalog, principal.tier, {**body.model_dump(exclude_unset=True), "model": body.model}
        )
        if options.stream:
            _no_key_with_stream(ctx)
            return await self.streamer.stream(principal, ctx.request_id, body.prompt, options, ctx.links, form.uploads)
        return await self._generate_once(
            principal, ctx, form.fingerprint(), body.prompt, options, body.response_format, uploads=form.uploads
        )

    async def regenerate(
        self, principal: Principal, image_id: uuid.UUID, body: ImageRegenerateRequest, ctx: CallContext
    ) -> Response:
        async with self.database.sessionmaker() as session:
            original = await repository.get_image(session, image_id, principal.user_id)
        if original is None:
            raise ImageNotFound(image_id)
        if original.edited:
            raise InvalidRequest(
                "An edited image cannot be regenerated: its source images are not kept. Send the edit again.",
                param="image_id",
            )
        changes = body.model_dump(exclude_unset=True)
        values: dict[str, Any] = {
            "model": original.model,
            "size": original.size,
            "quality": original.quality,
            "output_format": original.output_format,
            "background": original.background,
            "style": original.style,
            **{name: value for name, value in changes.items() if value is not None},
        }
        options = resolve_options(self.catalog, principal.tier, values)
        prompt = body.prompt or original.prompt
        fingerprint = {"regenerate": str(image_id), **body.model_dump(exclude_unset=True, mode="json")}
        return await self._generate_once(
            principal, ctx, fingerprint, prompt, options, body.response_format, regenerated_from=image_id
        )

    async def _generate_once(
        self,
        principal: Principal,
        ctx: CallContext,
        fingerprint: dict[str, Any],
        prompt: str,
        options: ImageOptions,
        response_format: str | None,
        regenerated_from: uuid.UUID | None = None,
        uploads: list[ImageUpload] | None = None,
    ) -> Response:
        async def run(claim: Claim) -> Response:
            produced = await self.generator.produce(
                principal, ctx.request_id, prompt, options, regenerated_from=regenerated_from, uploads=uploads
            )
            result = stored_result(produced)
            await self._store(produced, claim, result)
            return await images_response(
                produced.images,
                result,
                response_format,
                ctx.links,
                self.storage,
                produced.contents,
                headers=produced.call.headers(produced.generation.request_id),
            )

        async def replay(stored: Stored) -> Response:
            ids = [uuid.UUID(value) for value in stored.result["image_ids"]]
            async with self.database.sessionmaker() as session:
                images = await repository.images_by_ids(session, principal.user_id, ids)
            headers = {"x-gateway-simulated": "true"} if stored.result.get("simulated") else None
            return await images_response(
                images, stored.result, response_format, ctx.links, self.storage, headers=headers
            )

        fingerprint_hash = request_hash(ctx.method, ctx.path, fingerprint)
        return await self.idempotency.once(principal.user_id, ctx.idempotency_key, fingerprint_hash, run, replay)

    async def _store(self, produced: Produced, claim: Claim, result: dict[str, Any]) -> None:
        """The images' rows and the request's outcome, in one transaction. If the database went away
        after the upstream answered, they are stored later, in the background: the generation is
        paid for and is not made twice (a retry with the key gets 409 until it lands, then the outcome)."""
        try:
            await self._write(produced, claim, result)
        except (SQLAlchemyError, *DB_ERRORS) as error:
            task = asyncio.create_task(self._store_later(produced, claim, result), name="image-store-later")
            self._storing.add(task)
            task.add_done_callback(self._storing.discard)
            raise StoredLater(
                "The images were made but cannot be saved right now; they are saved as soon as the database "
                "is back. Retry with the same Idempotency-Key to get them.",
                code=ErrorCode.SERVICE_UNAVAILABLE,
                headers={"retry-after": "2"},
            ) from error

    async def _write(self, produced: Produced, claim: Claim, result: dict[str, Any]) -> None:
        async with self.database.sessionmaker.begin() as session:
            session.add_all(produced.images)
            await claim.complete(session, 200, result)

    async def _store_later(self, produced: Produced, claim: Claim, result: dict[str, Any]) -> None:
        deadline = time.monotonic() + STORE_LATER_SECONDS
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            try:
                await self._write(produced, claim, result)
            except (SQLAlchemyError, *DB_ERRORS):
                continue
            log.info("stored images of request %s once the database was back", produced.call.request_id)
            return
        log.error("could not store images of request %s; their bytes are left to the orphan sweep", result)

    async def close(self) -> None:
        """At shutdown: outcomes still waiting to be stored are given up (their keys' leases end)."""
        for task in list(self._storing):
            task.cancel()
        await asyncio.gather(*self._storing, return_exceptions=True)

    def estimate(self, principal: Principal, body: ImageEstimateRequest) -> ImageEstimate:
        values = body.model_dump(exclude_unset=True, exclude={"prompt", "count"})
        options = resolve_options(self.catalog, principal.tier, {**values, "model": body.model})
        return ImageEstimate(
            model=options.spec.id,
            n=options.n,
            count=body.count,
            size=options.size or "auto",
            quality=options.quality or "auto",
            style=options.style,
            unit_price_usd=round(options.unit_price(), 8),
            estimated_cost_usd=options.estimate(body.count),
        )


def _no_key_with_stream(ctx: CallContext) -> None:
    if ctx.idempotency_key is not None:
        raise InvalidRequest(
            f"The {HEADER} header is not supported with stream: true (a stream cannot be replayed); "
            "leave out one of the two.",
            param=HEADER,
        )
