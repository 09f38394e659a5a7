"""Routes for image generation, history, signed content, estimates and batches."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from starlette.responses import Response

from app.auth.dependencies import CurrentPrincipal
from app.db import SessionDep
from app.errors import error_responses, request_id_of
from app.images.batches import BatchService
from app.images.history import ImageHistory
from app.images.idempotency import checked_key
from app.images.schemas import (
    ImageBatchCreate,
    ImageBatchPublic,
    ImageDeleted,
    ImageEstimate,
    ImageEstimateRequest,
    ImageGenerateRequest,
    ImageList,
    ImagePublic,
    ImageRegenerateRequest,
    ImagesResponse,
)
from app.images.service import CallContext, ImageService
from app.images.signing import Links

router = APIRouter(tags=["images"])

IMAGE_CONTENT = {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}, "description": "The image."}
EVENT_STREAM = {
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
    "description": "`item.completed` / `item.failed` / `item.cancelled` events, then `batch.completed`.",
}


def get_image_service(request: Request) -> ImageService:
    return request.app.state.images.service


def get_image_history(request: Request) -> ImageHistory:
    return request.app.state.images.history


def get_batch_service(request: Request) -> BatchService:
    return request.app.state.images.batches


ImageServiceDep = Annotated[ImageService, Depends(get_image_service)]
HistoryDep = Annotated[ImageHistory, Depends(get_image_history)]
BatchServiceDep = Annotated[BatchService, Depends(get_batch_service)]


def image_links(request: Request, service: ImageServiceDep) -> Links:
    return service.links(str(request.base_url))


def call_context(
    request: Request,
    links: Annotated[Links, Depends(image_links)],
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", description="Repeat a request safely: the first result is returned."),
    ] = None,
) -> CallContext:
    return CallContext(
        request_id=request_id_of(request) or "",
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
    responses=error_responses(400, 401, 409, 413, 429, 502, 503, 504),
)
async def create_image(
    body: ImageGenerateRequest,
    principal: CurrentPrincipal,
    service: ImageServiceDep,
    session: SessionDep,
    ctx: ContextDep,
) -> Response:
    """Generate images (OpenAI-compatible); each is stored and returned as a signed URL (and `b64_json` on request)."""
    return await service.generate(session, principal, body, ctx)


@router.post("/images/estimate", responses=error_responses(400, 401))
async def estimate_image_cost(
    body: ImageEstimateRequest, principal: CurrentPrincipal, service: ImageServiceDep
) -> ImageEstimate:
    """The registry's price for a generation request before making it: what the budget check reserves."""
    return service.estimate(principal, body)


@router.post(
    "/images/batches",
    status_code=202,
    response_model=ImageBatchPublic,
    responses=error_responses(400, 401, 409, 413, 429, 502, 503),
)
async def create_image_batch(
    body: ImageBatchCreate, principal: CurrentPrincipal, batches: BatchServiceDep, session: SessionDep, ctx: ContextDep
) -> Response:
    """Queue prompts to generate in the background, paced and within your limits."""
    return await batches.create(session, principal, body, ctx)


@router.get("/images/batches/{batch_id}", responses=error_responses(401, 404))
async def get_image_batch(
    batch_id: uuid.UUID, principal: CurrentPrincipal, batches: BatchServiceDep, session: SessionDep, links: LinksDep
) -> ImageBatchPublic:
    """A batch's progress and each item's images."""
    return await batches.get(session, principal, batch_id, links)


@router.post("/images/batches/{batch_id}/cancel", responses=error_responses(401, 404))
async def cancel_image_batch(
    batch_id: uuid.UUID, principal: CurrentPrincipal, batches: BatchServiceDep, session: SessionDep, links: LinksDep
) -> ImageBatchPublic:
    """Cancel a batch's pending items; one already running finishes."""
    return await batches.cancel(session, principal, batch_id, links)


@router.get(
    "/images/batches/{batch_id}/events",
    response_class=Response,
    responses={200: EVENT_STREAM, **error_responses(401, 404)},
)
async def stream_image_batch_events(
    batch_id: uuid.UUID, principal: CurrentPrincipal, batches: BatchServiceDep, session: SessionDep, links: LinksDep
) -> Response:
    """Server-sent events, one per finished item, ending with the batch."""
    return await batches.stream(session, principal, batch_id, links)


@router.get("/images", responses=error_responses(400, 401))
async def list_images(
    principal: CurrentPrincipal,
    history: HistoryDep,
    session: SessionDep,
    links: LinksDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(description="`next_cursor` of the previous page.")] = None,
    batch_id: uuid.UUID | None = None,
) -> ImageList:
    """Your images, newest first."""
    return await history.list(session, principal, links, limit, after, batch_id)


@router.get("/images/{image_id}", responses=error_responses(401, 404))
async def get_image(
    image_id: uuid.UUID, principal: CurrentPrincipal, history: HistoryDep, session: SessionDep, links: LinksDep
) -> ImagePublic:
    """One of your images, with a fresh signed URL."""
    return await history.get(session, principal, image_id, links)


@router.get(
    "/images/{image_id}/content",
    response_class=Response,
    responses={200: IMAGE_CONTENT, **error_responses(403, 404, 503)},
)
async def get_image_content(
    image_id: uuid.UUID,
    expires: Annotated[int, Query(description="Expiry of the signed URL (epoch seconds).")],
    signature: Annotated[str, Query(max_length=100)],
    history: HistoryDep,
    session: SessionDep,
) -> Response:
    """The image's bytes; no bearer token: the URL's signature is the credential."""
    return await history.content(session, image_id, expires, signature)


@router.post(
    "/images/{image_id}/regenerate",
    response_model=ImagesResponse,
    responses=error_responses(400, 401, 404, 409, 429, 502, 503, 504),
)
async def regenerate_image(
    image_id: uuid.UUID,
    principal: CurrentPrincipal,
    service: ImageServiceDep,
    session: SessionDep,
    ctx: ContextDep,
    body: ImageRegenerateRequest | None = None,
) -> Response:
    """Generate again from an image's prompt and options, with any of them changed."""
    return await service.regenerate(session, principal, image_id, body or ImageRegenerateRequest(), ctx)


@router.delete("/images/{image_id}", responses=error_responses(401, 404, 503))
async def delete_image(
    image_id: uuid.UUID, principal: CurrentPrincipal, history: HistoryDep, session: SessionDep
) -> ImageDeleted:
    """Delete one of your images and its stored bytes."""
    return await history.delete(session, principal, image_id)
