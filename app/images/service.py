"""Image generation routes' work: validate against the registry, generate once per idempotency key, answer.

No database session spans the upstream call: each phase opens its own (read the original
of a regeneration; then, after generating, store the images with the idempotency outcome
in one transaction).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response

from app.auth.principal import Principal
from app.db import Database
from app.errors import ImageNotFound
from app.images import repository
from app.images.generation import ImageGenerator
from app.images.history import ImageHistory
from app.images.idempotency import Claim, IdempotencyStore, Stored, request_hash
from app.images.options import ImageOptions, resolve_options
from app.images.responses import images_response, stored_result
from app.images.schemas import ImageEstimate, ImageEstimateRequest, ImageGenerateRequest, ImageRegenerateRequest
from app.images.signing import Links, UrlSigner
from app.registry import Catalog


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

    def links(self, request_base_url: str) -> Links:
        base = self.public_base_url or request_base_url
        return Links(self.signer, base.rstrip("/") + "/v1")

    async def generate(self, principal: Principal, body: ImageGenerateRequest, ctx: CallContext) -> Response:
        options = resolve_options(
            self.catalog, principal.tier, {**body.model_dump(exclude_unset=True), "model": body.model}
        )
        fingerprint = body.model_dump(exclude_unset=True, mode="json")
        return await self._generate_once(principal, ctx, fingerprint, body.prompt, options, body.response_format)

    async def regenerate(
        self, principal: Principal, image_id: uuid.UUID, body: ImageRegenerateRequest, ctx: CallContext
    ) -> Response:
        async with self.database.sessionmaker() as session:
            original = await repository.get_image(session, image_id, principal.user_id)
        if original is None:
            raise ImageNotFound(image_id)
        changes = body.model_dump(exclude_unset=True)
        values: dict[str, Any] = {
            "model": original.model,
            "size": original.size,
            "quality": original.quality,
            "output_format": original.output_format,
            "background": original.background,
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
    ) -> Response:
        async def run(claim: Claim) -> Response:
            produced = await self.generator.produce(
                principal, ctx.request_id, prompt, options, regenerated_from=regenerated_from
            )
            result = stored_result(produced)
            async with self.database.sessionmaker.begin() as session:
                session.add_all(produced.images)
                await claim.complete(session, 200, result)
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

    def estimate(self, principal: Principal, body: ImageEstimateRequest) -> ImageEstimate:
        values = body.model_dump(exclude_unset=True, exclude={"prompt", "count"})
        options = resolve_options(self.catalog, principal.tier, {**values, "model": body.model})
        return ImageEstimate(
            model=options.spec.id,
            n=options.n,
            count=body.count,
            size=options.size or "auto",
            quality=options.quality or "auto",
            unit_price_usd=round(options.unit_price(), 8),
            estimated_cost_usd=options.estimate(body.count),
        )
