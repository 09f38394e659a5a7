"""Routes for threads and their messages; a thread is visible to its owner only."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from app.deps import PrincipalDep, SessionDep, ThreadServiceDep
from app.errors import ThreadNotFound, error_responses, request_id_of
from app.models import Thread
from app.threads import repository
from app.threads.cursors import MAX_CURSOR_LENGTH
from app.threads.schemas import (
    MessageCreate,
    MessageList,
    ThreadCreate,
    ThreadDeleted,
    ThreadList,
    ThreadPublic,
    ThreadUpdate,
    TurnResult,
)
from app.validation import ProfileName

router = APIRouter(tags=["threads"], responses=error_responses(401, 403))

Limit = Annotated[int, Query(ge=1, le=100, description="Page size, 1 to 100.")]
Cursor = Annotated[
    str | None, Query(max_length=MAX_CURSOR_LENGTH, description="The `next_cursor` of the previous page.")
]


async def valid_thread(thread_id: uuid.UUID, principal: PrincipalDep, session: SessionDep) -> Thread:
    """The caller's thread; another user's is a 404, exactly like a thread that does not exist."""
    thread = await repository.get_thread(session, thread_id, principal.user_id)
    if thread is None:
        raise ThreadNotFound(thread_id)
    return thread


ValidThread = Annotated[Thread, Depends(valid_thread)]


@router.post("/threads", status_code=201, responses=error_responses(400))
async def create_thread(
    body: ThreadCreate, principal: PrincipalDep, session: SessionDep, service: ThreadServiceDep
) -> ThreadPublic:
    """Create a thread for an assistant profile (named directly or through a `chat_type`)."""
    return ThreadPublic.of(await service.create(session, principal, body))


@router.post(
    "/threads/get-or-create",
    responses={201: {"model": ThreadPublic, "description": "A new thread was created."}, **error_responses(400)},
)
async def get_or_create_thread(
    body: ThreadCreate,
    principal: PrincipalDep,
    session: SessionDep,
    service: ThreadServiceDep,
    response: Response,
) -> ThreadPublic:
    """Your most recently active thread of the profile (200), or a new one (201)."""
    thread, created = await service.get_or_create(session, principal, body)
    if created:
        response.status_code = 201
    return ThreadPublic.of(thread)


@router.get("/threads", responses=error_responses(400))
async def list_threads(
    principal: PrincipalDep,
    session: SessionDep,
    service: ThreadServiceDep,
    limit: Limit = 20,
    cursor: Cursor = None,
    profile: Annotated[ProfileName | None, Query(description="Only threads of this profile.")] = None,
) -> ThreadList:
    """Your threads, newest first."""
    return await service.list_threads(session, principal, limit=limit, cursor=cursor, profile=profile)


@router.get("/threads/{thread_id}", responses=error_responses(400, 404))
async def get_thread(thread: ValidThread) -> ThreadPublic:
    """One of your threads."""
    return ThreadPublic.of(thread)


@router.patch("/threads/{thread_id}", responses=error_responses(400, 404))
async def update_thread(
    thread: ValidThread, body: ThreadUpdate, session: SessionDep, service: ThreadServiceDep
) -> ThreadPublic:
    """Change a thread's title or metadata."""
    return ThreadPublic.of(await service.update(session, thread, body))


@router.delete("/threads/{thread_id}", responses=error_responses(400, 404))
async def delete_thread(thread: ValidThread, session: SessionDep, service: ThreadServiceDep) -> ThreadDeleted:
    """Delete a thread and its messages."""
    await service.delete(session, thread)
    return ThreadDeleted(id=thread.id)


@router.get("/threads/{thread_id}/messages", responses=error_responses(400, 404))
async def list_messages(
    thread: ValidThread,
    session: SessionDep,
    service: ThreadServiceDep,
    limit: Limit = 20,
    cursor: Cursor = None,
    order: Annotated[Literal["asc", "desc"], Query(description="`desc`: newest first.")] = "desc",
) -> MessageList:
    """A thread's messages, newest first or oldest first."""
    return await service.messages(session, thread, limit=limit, cursor=cursor, order=order)


@router.post(
    "/threads/{thread_id}/messages",
    response_model=TurnResult,
    responses={
        200: {
            "description": (
                "The stored reply, or with `stream: true` server-sent events: `message.created`,"
                " `message.delta`, `message.completed` or `error`, then `done`."
            ),
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **error_responses(400, 404, 409, 413, 429, 502, 503, 504),
    },
)
async def create_message(
    thread_id: uuid.UUID,
    body: MessageCreate,
    principal: PrincipalDep,
    service: ThreadServiceDep,
    request: Request,
) -> Response:
    """Send a message and get the assistant's reply; `stream: true` answers server-sent events."""
    return await service.turns.run(principal, thread_id, body, request_id_of(request))
