"""Making images: limits, moderation, the upstream call, storage and the usage row, through the call pipeline.

One generation call is one usage row (route `images.generations`, `images.edits` for edits,
or `images.batches` for batch items) with the images it made and their cost. An edit is
reserved for its images and for every uploaded image at the most it may bill as input. Moderation is a call of its own
(route `images.moderation`), which never falls back: an unchecked prompt is not let
through. A generation refused by moderation gives its reservation back and leaves no row.
No database session is held here: the caller stores the rows this returns.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from app.auth.principal import Principal
from app.calls import Call, Calls, Spent
from app.config import Settings
from app.errors import ErrorCode, InvalidRequest
from app.images.history import ImageHistory
from app.images.options import ImageOptions
from app.models import Image
from app.ratelimit.limiter import Limiter
from app.upstream.provider import EventStream, Generation, ImageUpload
from app.usage.ledger import MalformedUsage, clamp_usage

log = logging.getLogger("app.images")

ROUTE = "images.generations"
EDIT_ROUTE = "images.edits"
BATCH_ROUTE = "images.batches"
MODERATION_ROUTE = "images.moderation"


@dataclass(slots=True)
class Produced:
    """A generation's stored images (rows not yet added to a session) and how it was answered."""

    images: list[Image]
    contents: list[bytes]
    generation: Generation
    call: Call
    spent: Spent  # what the upstream reported, clamped (`image_spend`)


def content_moderation_error(categories: list[str], param: str) -> InvalidRequest:
    return InvalidRequest(
        f"The prompt was refused by the content policy ({', '.join(categories)}).",
        param=param,
        code=ErrorCode.CONTENT_POLICY_VIOLATION,
    )


def image_spend(options: ImageOptions, generation: Generation) -> Spent:
    """What the upstream bills: its reported tokens (clamped and flagged like any usage,
    app/usage/ledger.py) at the registry's prices, else the per-image price."""
    spec = options.spec
    reported = {"prompt_tokens": generation.input_tokens, "completion_tokens": generation.output_tokens}
    try:
        prompt, completion, _, flags = clamp_usage(reported)
    except MalformedUsage:
        prompt, completion, flags = 0, 0, ["malformed"]
    by_tokens = (
        generation.input_tokens is not None
        and generation.output_tokens is not None
        and "malformed" not in flags
        and (spec.input_per_1m or spec.output_per_1m)
    )
    cost = (
        spec.token_cost(prompt, completion)
        if by_tokens
        else options.unit_price(generation.size, generation.quality) * len(generation.images)
    )
    return Spent(
        prompt_tokens=prompt, completion_tokens=completion, images=len(generation.images), cost_usd=cost, flags=flags
    )


class ImageGenerator:
    def __init__(self, settings: Settings, limiter: Limiter, calls: Calls, history: ImageHistory) -> None:
        self.settings = settings
        self.limiter = limiter
        self.calls = calls
        self.history = history

    async def produce(
        self,
        principal: Principal,
        request_id: str,
        prompt: str,
        options: ImageOptions,
        *,
        batch_id: uuid.UUID | None = None,
        regenerated_from: uuid.UUID | None = None,
        uploads: list[ImageUpload] | None = None,
    ) -> Produced:
        batch = batch_id is not None
        call = await self.open(principal, request_id, prompt, options, batch=batch, uploads=uploads)
        params = options.upstream_params(prompt)
        if uploads:
            edit = uploads
            generation = await self.calls.invoke(call, lambda provider: provider.image_edit(params, edit))
        else:
            generation = await self.calls.invoke(call, lambda provider: provider.images(params))
        spent = image_spend(options, generation)
        try:
            images = await self.history.save(
                principal,
                request_id,
                prompt,
                options,
                generation,
                simulated=call.simulated,
                cost=0.0 if call.simulated else spent.cost_usd,
                batch_id=batch_id,
                regenerated_from=regenerated_from,
                edited=bool(uploads),
            )
        finally:  # generated and paid for, whether or not the bytes could be stored
            call.finish(spent, upstream_request_id=generation.request_id, upstream=generation.upstream)
        return Produced(images, [image.data for image in generation.images], generation, call, spent)

    async def open(
        self,
        principal: Principal,
        request_id: str,
        prompt: str,
        options: ImageOptions,
        *,
        batch: bool = False,
        uploads: list[ImageUpload] | None = None,
    ) -> Call:
        """Reserve the call's worst case (its images; an edit's uploads as input too), then moderate the
        prompt: a refused prompt gives the reservation back."""
        inputs = sum(1 for upload in uploads or () if upload.field == "image")
        cost = options.edit_estimate(inputs) if uploads else options.estimate()
        call = await self.calls.open(
            principal,
            route=BATCH_ROUTE if batch else EDIT_ROUTE if uploads else ROUTE,
            spec=options.spec,
            request_id=request_id,
            buckets=self.limiter.image_buckets(principal, options.n, cost, batch=batch),
            reserved=Spent(images=options.n, cost_usd=cost, estimated=True),
            stream=options.stream,
            detail={"style": options.style} if options.style else None,
        )
        if self.settings.image_moderation and not batch:  # batches are moderated when created
            try:
                await self.moderate(principal, request_id, [prompt])
            except BaseException:
                call.give_back()
                raise
        return call

    async def open_stream(
        self,
        principal: Principal,
        request_id: str,
        prompt: str,
        options: ImageOptions,
        uploads: list[ImageUpload] | None = None,
    ) -> tuple[Call, EventStream]:
        """A streamed generation or edit: reserved and moderated like any, its upstream stream open
        and held by the call (which the relay records)."""
        call = await self.open(principal, request_id, prompt, options, uploads=uploads)
        params = options.upstream_params(prompt)
        if uploads:
            edit = uploads
            stream = await self.calls.invoke(
                call, lambda provider: provider.image_edit_stream(params, edit), stream=True
            )
        else:
            stream = await self.calls.invoke(call, lambda provider: provider.images_stream(params), stream=True)
        call.attach(stream)
        return call, stream

    async def moderate(
        self,
        principal: Principal,
        request_id: str,
        prompts: list[str],
        *,
        param: Callable[[int], str] = lambda index: "prompt",
    ) -> None:
        """Refuse (400 `content_policy_violation`) when any prompt is flagged."""
        model = self.settings.image_moderation_model
        call = await self.calls.open(
            principal,
            route=MODERATION_ROUTE,
            spec=None,
            model=model,
            request_id=request_id,
            buckets=(),
            fallback="never",
        )
        verdict = await self.calls.invoke(call, lambda provider: provider.moderate(prompts, model))
        flagged = next(((i, hit) for i, hit in enumerate(verdict.flagged) if hit), None)
        call.model = verdict.model
        if flagged is None:
            call.finish(upstream_request_id=verdict.request_id, upstream=verdict.upstream)
            return
        error = content_moderation_error(flagged[1], param(flagged[0]))
        call.finish(
            http_status=400, upstream_request_id=verdict.request_id, error_code=error.code, upstream=verdict.upstream
        )
        raise error
