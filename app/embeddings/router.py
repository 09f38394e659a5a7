"""`POST /v1/embeddings`, as the SDK's `client.embeddings.create` calls it."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.deps import EmbeddingServiceDep, PrincipalDep
from app.embeddings.schemas import EmbeddingRequest
from app.errors import error_responses, request_id_of

router = APIRouter(tags=["embeddings"], responses=error_responses(401, 403))

EMBEDDINGS = {
    "description": "OpenAI's `{object: list, data: [{object: embedding, index, embedding}], model, usage}`.",
    "content": {"application/json": {"schema": {"type": "object"}}},
}


@router.post(
    "/embeddings",
    response_class=Response,
    responses={200: EMBEDDINGS, **error_responses(400, 429, 502, 503, 504)},
)
async def create_embeddings(
    body: EmbeddingRequest, request: Request, principal: PrincipalDep, service: EmbeddingServiceDep
) -> Response:
    """Embed texts or token ids with an embedding model of your tier; usage and cost are recorded."""
    return await service.create(principal, body, request_id_of(request))
