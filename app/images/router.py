"""Routes for image generation, history, signed content, estimates and batches."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from starlette.responses import Response

from app.deps import BatchServiceDep, ImageHistoryDep, ImageServiceDep, PrincipalDep, SessionDep
from app.errors import BatchNotFound, ImageNotFound, error_responses, request_id_of
from app.images import repository
from app.images.history import public
from app.images.idempotency import checked_key
from app.images.schemas import (
    ImageBatchCreate,
    ImageBatchPublic,
    ImageDeleted,
    ImageEditForm,
    ImageEstimate,
    ImageEstimateRequest,
    ImageGenerateRequest,
    ImageList,
    ImagePublic,
    ImageRegenerateRequest,
    ImagesResponse,
)
from app.images.service import CallContext
from app.images.signing import Links
from app.models import Image, ImageBatch

router = APIRouter(tags=["images"])

IMAGE_CONTENT = {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}, "description": "The image."}
IMAGES_OR_EVENTS = {
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/ImagesResponse"}},
        "text/event-stream": {"schema": {"type": "string"}},
    },
    "description": "The images; with `stream: true`, server-sent events: `image_generation.partial_image` "
    "(`image_edit.partial_image` for edits) as the upstream sends them, then `image_generation.completed` "
    "(`image_edit.completed`) with the image stored (its `id`, `url` and `url_expires_at` added), or `error`.",
}
EDIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": ImageEditForm.model_json_schema(ref_template="{model}")}},
    }
}
EVENT_STREAM = {
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
    "description": "`item.completed` / `item.failed` / `item.cancelled` events, then `batch.completed`.",
}


async def image_links(request: Request, service: ImageServiceDep) -> Links:
    return service.links(str(request.base_url))


async def valid_image(image_id: uuid.UUID, principal: PrincipalDep, session: SessionDep) -> Image:
    """The caller's image; another user's is a 404, exactly like one that does not exist."""
    image = await repository.get_image(session, image_id, principal.user_id)
    if image is None:
        raise ImageNotFound(image_id)
    return image


async def valid_batch(batch_id: uuid.UUID, principal: PrincipalDep, session: SessionDep) -> ImageBatch:
    """The caller's batch; another user's is a 404."""
    batch = await repository.get_batch(session, batch_id, principal.user_id)
    if batch is None:
        raise BatchNotFound(batch_id)
    return batch


ValidImage = Annotated[Image, Depends(valid_image)]
ValidBatch = Annotated[ImageBatch, Depends(valid_batch)]


async def call_context(
    request: Request,
    links: Annotated[Links, Depends(image_links)],
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", description="Repeat a request safely: the first result is returned."),
    ] = None,
) -> CallContext:
    return CallContext(
        request_id=request_id_of(request),
        method=request.method,
        path=request.url.path,
        links=links,
        idempotency_key=checked_key(idempotency_key),
    )


LinksDep = Annotated[Links, Depends(image_links)]
ContextDep = Annotated[CallContext, Depends(call_context)]


@router.post(
    "/images/generations",
    response_model=ImagesResponse,
    responses={200: IMAGES_OR_EVENTS, **error_responses(400, 401, 403, 409, 413, 429, 502, 503, 504)},
)
async def create_image(
    body: ImageGenerateRequest, principal: PrincipalDep, service: ImageServiceDep, ctx: ContextDep
) -> Response:
    """Generate images (OpenAI-compatible); each is stored and returned as a signed URL (and `b64_json` on request)."""
    return await service.generate(principal, body, ctx)


@router.post(
    "/images/edits",
    response_model=ImagesResponse,
    responses={200: IMAGES_OR_EVENTS, **error_responses(400, 401, 403, 409, 413, 429, 502, 503, 504)},
    openapi_extra=EDIT_BODY,
)
async def edit_image(request: Request, principal: PrincipalDep, service: ImageServiceDep, ctx: ContextDep) -> Response:
    """Edit uploaded images (OpenAI-compatible, multipart); the results are stored like generations."""
    form = await service.edit_form(request)
    try:
        return await service.edit(principal, form, ctx)
    finally:  # a stream's upstream request has been sent by now: the files are no longer read
        await form.close()


@router.post("/images/estimate", responses=error_responses(400, 401, 403))
async def estimate_image_cost(
    body: ImageEstimateRequest, principal: PrincipalDep, service: ImageServiceDep
) -> ImageEstimate:
    """The registry's price for a generation request before making it: what the budget check reserves."""
    return service.estimate(principal, body)


@router.post(
    "/images/batches",
    status_code=202,
    response_model=ImageBatchPublic,
    responses=error_responses(400, 401, 403, 409, 413, 429, 502, 503),
)
async def create_image_batch(
    body: ImageBatchCreate, principal: PrincipalDep, batches: BatchServiceDep, ctx: ContextDep
) -> Response:
    """Queue prompts to generate in the background, paced and within your limits."""
    return await batches.create(principal, body, ctx)


@router.get("/images/batches/{batch_id}", responses=error_responses(401, 403, 404))
async def get_image_batch(
    batch: ValidBatch, batches: BatchServiceDep, session: SessionDep, links: LinksDep
) -> ImageBatchPublic:
    """A batch's progress and each item's images."""
    return await batches.public(session, batch, links)


@router.post("/images/batches/{batch_id}/cancel", responses=error_responses(401, 403, 404))
async def cancel_image_batch(
    batch: ValidBatch, batches: BatchServiceDep, session: SessionDep, links: LinksDep
) -> ImageBatchPublic:
    """Cancel a batch's pending items; one already running finishes."""
    return await batches.cancel(session, batch, links)


@router.get(
    "/images/batches/{batch_id}/events",
    response_class=Response,
    responses={200: EVENT_STREAM, **error_responses(401, 403, 404, 429)},
)
async def stream_image_batch_events(
    batch: ValidBatch, principal: PrincipalDep, batches: BatchServiceDep, links: LinksDep
) -> Response:
    """Server-sent events, one per finished item, ending with the batch."""
    return batches.stream(principal, batch, links)


@router.get("/images", responses=error_responses(400, 401, 403))
async def list_images(
    principal: PrincipalDep,
    history: ImageHistoryDep,
    session: SessionDep,
    links: LinksDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=200, description="`next_cursor` of the previous page.")] = None,
    batch_id: uuid.UUID | None = None,
) -> ImageList:
    """Your images, newest first."""
    return await history.list(session, principal, links, limit, after, batch_id)


@router.get("/images/{image_id}", responses=error_responses(401, 403, 404))
async def get_image(image: ValidImage, links: LinksDep) -> ImagePublic:
    """One of your images, with a fresh signed URL."""
    return public(image, links)


@router.get(
    "/images/{image_id}/content",
    response_class=Response,
    responses={200: IMAGE_CONTENT, **error_responses(403, 404, 503)},
)
async def get_image_content(
    image_id: uuid.UUID,
    expires: Annotated[int, Query(description="Expiry of the signed URL (epoch seconds).")],
    signature: Annotated[str, Query(max_length=100)],
    history: ImageHistoryDep,
    session: SessionDep,
) -> Response:
    """The image's bytes; no bearer token: the URL's signature is the credential."""
    return await history.content(session, image_id, expires, signature)


@router.post(
    "/images/{image_id}/regenerate",
    response_model=ImagesResponse,
    responses=error_responses(400, 401, 403, 404, 409, 429, 502, 503, 504),
)
async def regenerate_image(
    image_id: uuid.UUID,
    principal: PrincipalDep,
    service: ImageServiceDep,
    ctx: ContextDep,
    body: ImageRegenerateRequest | None = None,
) -> Response:
    """Generate again from an image's prompt and options, with any of them changed."""
    return await service.regenerate(principal, image_id, body or ImageRegenerateRequest(), ctx)


@router.delete("/images/{image_id}", responses=error_responses(401, 403, 404, 503))
async def delete_image(image: ValidImage, history: ImageHistoryDep, session: SessionDep) -> ImageDeleted:
    """Delete one of your images and its stored bytes."""
    return await history.delete(session, image)
