"""`/v1/me/openai-key`: bring your own OpenAI key. It goes in once and never comes back out."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.byok.schemas import OpenAIKeyPublic, OpenAIKeyStore
from app.deps import BYOKServiceDep, PrincipalDep, SessionDep
from app.errors import error_responses

router = APIRouter(tags=["me"])


@router.put("/me/openai-key", responses=error_responses(400, 401, 403, 429, 502, 503, 504))
async def store_openai_key(body: OpenAIKeyStore, principal: PrincipalDep, service: BYOKServiceDep) -> OpenAIKeyPublic:
    """Store your own OpenAI key (checked with the upstream first); your calls then use it instead of the gateway's."""
    return await service.store(principal, body.api_key.get_secret_value())


@router.get("/me/openai-key", responses=error_responses(401, 403, 404))
async def get_openai_key(principal: PrincipalDep, session: SessionDep, service: BYOKServiceDep) -> OpenAIKeyPublic:
    """Whether you have stored an OpenAI key: its last four characters and dates (404 when none)."""
    return await service.show(session, principal)


@router.delete("/me/openai-key", status_code=204, responses=error_responses(401, 403, 404))
async def delete_openai_key(principal: PrincipalDep, session: SessionDep, service: BYOKServiceDep) -> Response:
    """Delete your stored OpenAI key; your calls use the gateway's key again."""
    await service.delete(session, principal)
    return Response(status_code=204)
