"""`/v1/assistants` (the Assistants API v2, as the SDK's `client.beta.assistants` calls it) and
`/admin/assistants` (shared assistants, made and edited at run time)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from sqlalchemy.ext.asyncio import AsyncSession

from app.assistants import repository
from app.assistants.repository import Order
from app.assistants.schemas import (
    AdminAssistantList,
    AdminAssistantPublic,
    AssistantCreate,
    AssistantDeleted,
    AssistantList,
    AssistantPublic,
    AssistantUpdate,
    SharedAssistantCreate,
    SharedAssistantUpdate,
)
from app.assistants.service import admin_public, public
from app.auth.principal import Principal
from app.deps import AdminGuard, AssistantServiceDep, PrincipalDep, SessionDep
from app.errors import AssistantNotFound, error_responses
from app.models import Assistant
from app.validation import Text

router = APIRouter(tags=["assistants"], responses=error_responses(401, 403))
admin_router = APIRouter(tags=["admin"], dependencies=[AdminGuard], responses=error_responses(401, 403))

AssistantId = Annotated[Text, Path(max_length=120, description="`asst_...`")]
Limit = Annotated[int, Query(ge=1, le=100, description="Page size, 1 to 100.")]
OrderQuery = Annotated[Order, Query(description="By creation; the caller's own come before shared ones either way.")]
After = Annotated[Text | None, Query(max_length=120, description="An id of the list: the page after it.")]
Before = Annotated[Text | None, Query(max_length=120, description="An id of the list: the page before it.")]


async def _visible(assistant_id: str, principal: Principal, session: AsyncSession, *, for_update: bool) -> Assistant:
    assistant = await repository.get_visible(session, assistant_id, principal.user_id, for_update=for_update)
    if assistant is None:
        raise AssistantNotFound(assistant_id)
    return assistant


async def valid_assistant(assistant_id: AssistantId, principal: PrincipalDep, session: SessionDep) -> Assistant:
    """The caller's own assistant or a shared one; another user's is a 404, like one that does not exist."""
    return await _visible(assistant_id, principal, session, for_update=False)


async def assistant_to_change(assistant_id: AssistantId, principal: PrincipalDep, session: SessionDep) -> Assistant:
    """`valid_assistant`, locked for the request's transaction (a concurrent delete waits, then finds none)."""
    return await _visible(assistant_id, principal, session, for_update=True)


async def valid_shared_assistant(assistant_id: AssistantId, session: SessionDep) -> Assistant:
    assistant = await repository.get_shared(session, assistant_id)
    if assistant is None:
        raise AssistantNotFound(assistant_id)
    return assistant


ValidAssistant = Annotated[Assistant, Depends(valid_assistant)]
AssistantToChange = Annotated[Assistant, Depends(assistant_to_change)]
ValidSharedAssistant = Annotated[Assistant, Depends(valid_shared_assistant)]


@router.post("/assistants", responses=error_responses(400, 409))
async def create_assistant(
    body: AssistantCreate, principal: PrincipalDep, session: SessionDep, service: AssistantServiceDep
) -> AssistantPublic:
    """Create an assistant of your own (only you see it)."""
    return public(await service.create(session, principal, body))


@router.get("/assistants", responses=error_responses(400))
async def list_assistants(
    principal: PrincipalDep,
    session: SessionDep,
    service: AssistantServiceDep,
    limit: Limit = 20,
    order: OrderQuery = "desc",
    after: After = None,
    before: Before = None,
) -> AssistantList:
    """Your assistants, then the shared ones."""
    rows, has_more = await service.page(
        session, principal.user_id, limit=limit, order=order, after=after, before=before
    )
    return AssistantList.of([public(row) for row in rows], has_more)


@router.get("/assistants/{assistant_id}", responses=error_responses(400, 404))
async def get_assistant(assistant: ValidAssistant) -> AssistantPublic:
    """One of your assistants, or a shared one."""
    return public(assistant)


@router.post("/assistants/{assistant_id}", responses=error_responses(400, 404))
async def modify_assistant(
    assistant: AssistantToChange,
    body: AssistantUpdate,
    principal: PrincipalDep,
    session: SessionDep,
    service: AssistantServiceDep,
) -> AssistantPublic:
    """Change what the request sets; `metadata` and `tools` are replaced whole. Shared ones are read-only (403)."""
    return public(await service.update(session, principal, assistant, body))


@router.delete("/assistants/{assistant_id}", responses=error_responses(400, 404))
async def delete_assistant(
    assistant: AssistantToChange, session: SessionDep, service: AssistantServiceDep
) -> AssistantDeleted:
    """Delete one of your assistants. Shared ones are read-only (403)."""
    await service.delete(session, assistant)
    return AssistantDeleted(id=assistant.id)


@admin_router.post("/assistants", status_code=201, responses=error_responses(400, 409))
async def create_shared_assistant(
    body: SharedAssistantCreate, session: SessionDep, service: AssistantServiceDep
) -> AdminAssistantPublic:
    """Create a shared assistant every user sees (id `asst_<slug>` when a slug is given); no restart needed."""
    return admin_public(await service.create_shared(session, body))


@admin_router.get("/assistants", responses=error_responses(400))
async def list_shared_assistants(
    session: SessionDep,
    service: AssistantServiceDep,
    limit: Limit = 20,
    order: OrderQuery = "desc",
    after: After = None,
    before: Before = None,
) -> AdminAssistantList:
    """The shared assistants: ASSISTANTS_FILE's and those made here."""
    rows, has_more = await service.page(session, None, limit=limit, order=order, after=after, before=before)
    return AdminAssistantList.of([admin_public(row) for row in rows], has_more)


@admin_router.get("/assistants/{assistant_id}", responses=error_responses(400, 404))
async def get_shared_assistant(assistant: ValidSharedAssistant) -> AdminAssistantPublic:
    return admin_public(assistant)


@admin_router.patch("/assistants/{assistant_id}", responses=error_responses(400, 404, 409))
async def update_shared_assistant(
    assistant: ValidSharedAssistant, body: SharedAssistantUpdate, session: SessionDep, service: AssistantServiceDep
) -> AdminAssistantPublic:
    """Change a shared assistant made here; every process reads the change on its next use.
    ASSISTANTS_FILE's are read-only (403): edit the file."""
    return admin_public(await service.update_shared(session, assistant, body))


@admin_router.delete("/assistants/{assistant_id}", responses=error_responses(400, 404))
async def delete_shared_assistant(
    assistant: ValidSharedAssistant, session: SessionDep, service: AssistantServiceDep
) -> AssistantDeleted:
    await service.delete_shared(session, assistant)
    return AssistantDeleted(id=assistant.id)
