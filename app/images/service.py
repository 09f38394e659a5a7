"""Image generation: validate against the registry, moderate, take limits, generate, store, record usage.

One generation call is one usage row (route `images.generations`, or `images.batches` for
batch items), with the images it made and their cost; the row carries the limiter's
reservation so the writer settles it against the real cost.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response

from app.auth.principal import Principal
from app.config import Settings
from app.errors import GatewayError, InvalidRequest, NotFound
from app.images import repository
from app.images.history import ImageHistory
from app.images.idempotency import IdempotencyStore, Stored, request_hash
from app.images.options import ImageOptions, resolve_options
from app.images.schemas import (
    ImageEstimate,
    ImageEstimateRequest,
    ImageGenerateRequest,
    ImageRegenerateRequest,
)
from app.images.signing import Links, UrlSigner
from app.models import Image
from app.ratelimit.limiter import Decision, Limiter
from app.registry import Catalog
from app.upstream.errors import upstream_failed
from app.upstream.images import Generation, ImageBackend
from app.upstream.provider import Upstream
from app.usage.record import Status, UsageRecord
from app.usage.writer import UsageWriter

log = logging.getLogger("app.images")

ROUTE = "images.generations"
MODERATION_ROUTE = "images.moderation"
MAX_PAGE = 100


@dataclass(frozen=True, slots=True)
class CallContext:
    request_id: str
    method: str
    path: str
    links: Links
    idempotency_key: str | None = None


@dataclass(slots=True)
class Produced:
    images: list[Image]
    contents: list[bytes]
    generation: Generation
    status: Status
    decision: Decision


def content_moderation_error(categories: list[str], param: str) -> InvalidRequest:
    return InvalidRequest(
        f"The prompt was refused by the content policy ({', '.join(categories)}).",
        param=param,
        code="content_policy_violation",
    )


class ImageService:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        limiter: Limiter,
        upstream: Upstream,
        usage: UsageWriter,
        history: ImageHistory,
        signer: UrlSigner,
        idempotency: IdempotencyStore,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.limiter = limiter
        self.upstream = upstream
        self.usage = usage
        self.history = history
        self.storage = history.storage
        self.signer = signer
        self.idempotency = idempotency

    def links(self, request_base_url: str) -> Links:
        base = self.settings.image_public_base_url or request_base_url
        return Links(self.signer, base.rstrip("/") + "/v1")

    # Generation.

    async def generate(
        self, session: AsyncSession, principal: Principal, body: ImageGenerateRequest, ctx: CallContext
    ) -> Response:
        options = resolve_options(
            self.catalog, principal.tier, {**body.model_dump(exclude_unset=True), "model": body.model}
        )
        fingerprint = body.model_dump(exclude_unset=True, mode="json")
        return await self._generate_once(
            session, principal, ctx, fingerprint, body.prompt, options, body.response_format
        )

    async def regenerate(
        self,
        session: AsyncSession,
        principal: Principal,
        image_id: uuid.UUID,
        body: ImageRegenerateRequest,
        ctx: CallContext,
    ) -> Response:
        original = await repository.get_image(session, image_id, principal.user_id)
        if original is None:
            raise NotFound(f"No image {image_id}.")
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
            session, principal, ctx, fingerprint, prompt, options, body.response_format, regenerated_from=image_id
        )

    async def _generate_once(
        self,
        session: AsyncSession,
        principal: Principal,
        ctx: CallContext,
        fingerprint: dict[str, Any],
        prompt: str,
        options: ImageOptions,
        response_format: str | None,
        regenerated_from: uuid.UUID | None = None,
    ) -> Response:
        async def produce() -> tuple[int, dict[str, Any], Response]:
            produced = await self.produce(principal, ctx.request_id, prompt, options, regenerated_from=regenerated_from)
            session.add_all(produced.images)
            await session.flush()
            result = _generation_result(produced)
            response = await self._images_response(
                produced.images, result, response_format, ctx.links, produced.contents
            )
            response.headers.update(_call_headers(produced))
            return 200, result, response

        async def replay(stored: Stored) -> Response:
            ids = [uuid.UUID(value) for value in stored.result["image_ids"]]
            images = await repository.images_by_ids(session, principal.user_id, ids)
            response = await self._images_response(images, stored.result, response_format, ctx.links)
            if stored.result.get("simulated"):
                response.headers["x-gateway-simulated"] = "true"
            return response

        fingerprint_hash = request_hash(ctx.method, ctx.path, fingerprint)
        return await self.idempotency.once(
            session, principal.user_id, ctx.idempotency_key, fingerprint_hash, produce, replay
        )

    async def produce(
        self,
        principal: Principal,
        request_id: str,
        prompt: str,
        options: ImageOptions,
        *,
        batch_id: uuid.UUID | None = None,
        regenerated_from: uuid.UUID | None = None,
    ) -> Produced:
        """Limits, moderation, the upstream call, storage and the usage row; the caller adds the rows."""
        batch = batch_id is not None
        route = "images.batches" if batch else ROUTE
        decision = await self.limiter.take(
            self.limiter.image_buckets(principal, options.n, options.estimate(), batch=batch)
        )
        backend = self.upstream.images_for(principal)
        if self.settings.image_moderation and not batch:  # batches are moderated when created
            await self.moderate(principal, request_id, [prompt], backend, decision=decision)
        started = time.perf_counter()
        status: Status = "simulated" if backend.simulated else "ok"
        params = options.upstream_params(prompt)
        try:
            generation = await backend.generate(params)
        except GatewayError as error:
            if not (self.settings.fallback_to_simulated and upstream_failed(error)):
                self._record(
                    principal,
                    request_id,
                    route,
                    options.spec.id,
                    started,
                    decision,
                    "error",
                    error.status_code,
                    error_code=error.code,
                )
                raise
            log.warning("upstream image generation failed, answering simulated: %s", error.message)
            status = "fallback"
            generation = await self.upstream.simulated_images.generate(params)
        cost = self._cost(options, generation, status)
        self._record(
            principal,
            request_id,
            route,
            options.spec.id,
            started,
            decision,
            status,
            200,
            images=len(generation.images),
            prompt_tokens=generation.input_tokens or 0,
            completion_tokens=generation.output_tokens or 0,
            cost_usd=cost,
            upstream_request_id=generation.request_id,
        )
        images = await self.history.save(
            principal, request_id, prompt, options, generation, status, cost, batch_id, regenerated_from
        )
        return Produced(images, [image.data for image in generation.images], generation, status, decision)

    async def moderate(
        self,
        principal: Principal,
        request_id: str,
        prompts: list[str],
        backend: ImageBackend,
        *,
        decision: Decision | None = None,
        param: Callable[[int], str] = lambda index: "prompt",
    ) -> None:
        """Refuse (400 `content_policy_violation`) when any prompt is flagged. A refusal's usage row
        carries the call's reservation, so the images it would have made are given back."""
        started = time.perf_counter()
        try:
            verdict = await backend.moderate(prompts)
        except GatewayError as error:  # no fallback: an unchecked prompt is not let through
            model = self.settings.image_moderation_model
            self._record(
                principal,
                request_id,
                MODERATION_ROUTE,
                model,
                started,
                decision,
                "error",
                error.status_code,
                error_code=error.code,
            )
            raise
        flagged = next(((i, hit) for i, hit in enumerate(verdict.flagged) if hit), None)
        status: Status = "simulated" if verdict.simulated else "ok"
        self._record(
            principal,
            request_id,
            MODERATION_ROUTE,
            verdict.model,
            started,
            decision if flagged else None,
            status,
            400 if flagged else 200,
            upstream_request_id=verdict.request_id,
            error_code="content_policy_violation" if flagged else None,
        )
        if flagged is not None:
            raise content_moderation_error(flagged[1], param(flagged[0]))

    def _record(
        self,
        principal: Principal,
        request_id: str,
        route: str,
        model: str,
        started: float,
        decision: Decision | None,
        status: Status,
        http_status: int,
        **values: Any,
    ) -> None:
        self.usage.record(
            UsageRecord.of(
                principal,
                request_id=request_id,
                route=route,
                model=model,
                status=status,
                http_status=http_status,
                latency_ms=(time.perf_counter() - started) * 1000,
                decision=decision,
                **values,
            )
        )

    @staticmethod
    def _cost(options: ImageOptions, generation: Generation, status: Status) -> float:
        """What the upstream bills: its reported tokens at the registry's prices, else the per-image price.
        Simulated images cost nothing: no upstream was paid for them."""
        if status in ("simulated", "fallback"):
            return 0.0
        spec = options.spec
        if (
            generation.input_tokens is not None
            and generation.output_tokens is not None
            and (spec.input_per_1m or spec.output_per_1m)
        ):
            return spec.token_cost(generation.input_tokens, generation.output_tokens)
        return options.unit_price(generation.size, generation.quality) * len(generation.images)

    async def _images_response(
        self,
        images: list[Image],
        result: dict[str, Any],
        response_format: str | None,
        links: Links,
        contents: list[bytes] | None = None,
    ) -> Response:
        if response_format == "b64_json":
            if contents is None:
                contents = list(await asyncio.gather(*(self.storage.get(image.storage_key) for image in images)))
            encoded = await asyncio.to_thread(lambda: [base64.b64encode(content).decode() for content in contents])
        data = []
        for position, image in enumerate(images):
            url, expires = links.sign(image.id)
            item: dict[str, Any] = {"id": str(image.id), "url": url, "url_expires_at": expires}
            if response_format == "b64_json":
                item["b64_json"] = encoded[position]
            item["revised_prompt"] = image.revised_prompt
            data.append(item)
        body = {
            name: result.get(name) for name in ("created", "background", "output_format", "quality", "size", "usage")
        }
        body["data"] = data
        return Response(orjson.dumps(body), media_type="application/json")

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


def _generation_result(produced: Produced) -> dict[str, Any]:
    generation = produced.generation
    first = produced.images[0]
    usage = None
    if generation.input_tokens is not None and generation.output_tokens is not None:
        usage = {
            "input_tokens": generation.input_tokens,
            "output_tokens": generation.output_tokens,
            "total_tokens": generation.input_tokens + generation.output_tokens,
        }
    return {
        "created": int(first.created_at.timestamp()),
        "image_ids": [str(image.id) for image in produced.images],
        "background": first.background,
        "output_format": first.output_format,
        "quality": first.quality,
        "size": first.size,
        "usage": usage,
        "simulated": produced.status in ("simulated", "fallback"),
    }


def _call_headers(produced: Produced) -> dict[str, str]:
    headers = dict(produced.decision.headers)
    if produced.status in ("simulated", "fallback"):
        headers["x-gateway-simulated"] = "true"
    if produced.status == "fallback":
        headers["x-gateway-fallback"] = "true"
    if produced.generation.request_id:
        headers["x-upstream-request-id"] = produced.generation.request_id
    return headers
