"""Threads, messages, runs and run steps: the Assistants API (v2) as the SDK's `client.beta.threads` calls it.

Everything is the caller's own: another user's thread (and so its messages, runs and steps)
answers 404, exactly like one that does not exist. Routes that start a run take no request
session: the run engine opens short ones, so no transaction is held across an upstream call.
Our additions: `GET /threads` (the caller's threads, filtered by assistant or a metadata pair)
and `POST /assistants/{assistant_id}/thread` (get-or-create; a path `/threads/{id}` cannot take).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Depends, Path, Query, Request
from starlette.responses import Response

from app.assistants.repository import Order
from app.assistants.router import AssistantId
from app.deps import PrincipalDep, SessionDep, ThreadServiceDep
from app.errors import InvalidRequest, RunNotFound, ThreadNotFound, error_responses, request_id_of
from app.models import Thread, ThreadRun
from app.threads import repository
from app.threads.file_search import INCLUDE_CONTENT
from app.threads.ids import MAX_ID_LENGTH, RUN, THREAD, parse_id
from app.threads.objects import message_object, run_object, step_object, thread_object
from app.threads.schemas import (
    MessageCreate,
    MessageDeleted,
    MessageList,
    MessageObject,
    MessageUpdate,
    RunCreate,
    RunList,
    RunObject,
    RunUpdate,
    StepList,
    StepObject,
    ThreadAndRunCreate,
    ThreadCreate,
    ThreadDeleted,
    ThreadList,
    ThreadLookup,
    ThreadLookupResult,
    ThreadObject,
    ThreadUpdate,
    ToolOutputsSubmit,
)
from app.validation import Text

router = APIRouter(tags=["threads"], responses=error_responses(401, 403))

ObjectId = Annotated[Text, Path(max_length=MAX_ID_LENGTH)]
Limit = Annotated[int, Query(ge=1, le=100, description="Page size, 1 to 100.")]
OrderQuery = Annotated[Order, Query(description="By creation: `desc` newest first.")]
After = Annotated[Text | None, Query(max_length=MAX_ID_LENGTH, description="An id of the list: the page after it.")]
Before = Annotated[Text | None, Query(max_length=MAX_ID_LENGTH, description="An id of the list: the page before it.")]

RUN_EVENTS = {
    200: {
        "description": (
            "The run (`queued`), or with `stream: true` the Assistants API's server-sent events:"
            " `thread.run.created` ... `thread.message.delta` ... `thread.run.completed` (or `.incomplete`,"
            " `.requires_action`, `.failed`, `.cancelled`), then `done` with data `[DONE]`."
        ),
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    **error_responses(400, 404, 409, 413, 429, 503),
}


def thread_uuid(thread_id: str) -> uuid.UUID:
    parsed = parse_id(THREAD, thread_id)
    if parsed is None:
        raise ThreadNotFound(thread_id)
    return parsed


def run_uuid(run_id: str) -> uuid.UUID:
    parsed = parse_id(RUN, run_id)
    if parsed is None:
        raise RunNotFound(run_id)
    return parsed


async def valid_thread(thread_id: ObjectId, principal: PrincipalDep, session: SessionDep) -> Thread:
    """The caller's thread; another user's is a 404, exactly like a thread that does not exist."""
    thread = await repository.get_thread(session, thread_uuid(thread_id), principal.user_id)
    if thread is None:
        raise ThreadNotFound(thread_id)
    return thread


ValidThread = Annotated[Thread, Depends(valid_thread)]


async def valid_run(run_id: ObjectId, thread: ValidThread, session: SessionDep, service: ThreadServiceDep) -> ThreadRun:
    return await service.run(session, thread, run_id)


ValidRun = Annotated[ThreadRun, Depends(valid_run)]


def metadata_filter(key: str | None, value: str | None) -> tuple[str, str] | None:
    if (key is None) != (value is None):
        raise InvalidRequest("Send 'metadata_key' and 'metadata_value' together.", param="metadata_key")
    return (key, value) if key is not None and value is not None else None


# --- threads ------------------------------------------------------------------------------


@router.post("/threads", responses=error_responses(400, 413))
async def create_thread(
    principal: PrincipalDep,
    session: SessionDep,
    service: ThreadServiceDep,
    body: Annotated[ThreadCreate | None, Body()] = None,
) -> ThreadObject:
    """Create a thread, with its first messages."""
    return thread_object(await service.create(session, principal, body or ThreadCreate()))


@router.get("/threads", responses=error_responses(400))
async def list_threads(
    principal: PrincipalDep,
    session: SessionDep,
    service: ThreadServiceDep,
    limit: Limit = 20,
    order: OrderQuery = "desc",
    after: After = None,
    before: Before = None,
    assistant_id: Annotated[Text | None, Query(max_length=120, description="Only threads of this assistant.")] = None,
    metadata_key: Annotated[Text | None, Query(max_length=64)] = None,
    metadata_value: Annotated[Text | None, Query(max_length=512)] = None,
) -> ThreadList:
    """The gateway's: your threads (OpenAI's API never listed them)."""
    return await service.list_threads(
        session,
        principal,
        limit=limit,
        order=order,
        after=after,
        before=before,
        assistant_id=assistant_id,
        metadata=metadata_filter(metadata_key, metadata_value),
    )


@router.post(
    "/assistants/{assistant_id}/thread",
    responses={
        201: {"model": ThreadLookupResult, "description": "A new thread was made."},
        **error_responses(400, 404),
    },
)
async def get_or_create_thread(
    assistant_id: AssistantId,
    principal: PrincipalDep,
    session: SessionDep,
    service: ThreadServiceDep,
    response: Response,
    body: Annotated[ThreadLookup | None, Body()] = None,
) -> ThreadLookupResult:
    """The gateway's: your most recently active thread of this assistant and chat type (200), or a new one (201)."""
    thread, created = await service.lookup(session, principal, assistant_id, body or ThreadLookup())
    if created:
        response.status_code = 201
    return ThreadLookupResult(**thread_object(thread).model_dump(), created=created)


# Before `/threads/{thread_id}`: a POST there is "modify thread".
@router.post("/threads/runs", response_model=RunObject, responses=RUN_EVENTS)
async def create_thread_and_run(
    body: ThreadAndRunCreate, principal: PrincipalDep, service: ThreadServiceDep, request: Request
) -> Response:
    """Create a thread and run it; `stream: true` answers the run's events (the first is `thread.created`)."""
    return await service.runs.create_with_thread(principal, body, request_id_of(request))


@router.get("/threads/{thread_id}", responses=error_responses(400, 404))
async def get_thread(thread: ValidThread) -> ThreadObject:
    return thread_object(thread)


@router.post("/threads/{thread_id}", responses=error_responses(400, 404))
async def modify_thread(
    thread: ValidThread, body: ThreadUpdate, session: SessionDep, service: ThreadServiceDep
) -> ThreadObject:
    """Replace a thread's metadata."""
    return thread_object(await service.update(session, thread, body))


@router.delete("/threads/{thread_id}", responses=error_responses(400, 404))
async def delete_thread(thread: ValidThread, session: SessionDep) -> ThreadDeleted:
    """Delete a thread with its messages, runs and steps."""
    await repository.delete_thread(session, thread.id)
    return ThreadDeleted(id=thread_object(thread).id)


# --- messages -----------------------------------------------------------------------------


@router.post("/threads/{thread_id}/messages", responses=error_responses(400, 404, 413))
async def create_message(
    thread: ValidThread, body: MessageCreate, principal: PrincipalDep, session: SessionDep, service: ThreadServiceDep
) -> MessageObject:
    """Add a message; a `file_search` attachment puts its file into the thread's vector store."""
    return message_object(await service.add_message(session, principal, thread, body))


@router.get("/threads/{thread_id}/messages", responses=error_responses(400, 404))
async def list_messages(
    thread: ValidThread,
    session: SessionDep,
    service: ThreadServiceDep,
    limit: Limit = 20,
    order: OrderQuery = "desc",
    after: After = None,
    before: Before = None,
    run_id: Annotated[Text | None, Query(max_length=MAX_ID_LENGTH, description="Only the replies of this run.")] = None,
) -> MessageList:
    return await service.messages(session, thread, limit=limit, order=order, after=after, before=before, run_id=run_id)


@router.get("/threads/{thread_id}/messages/{message_id}", responses=error_responses(400, 404))
async def get_message(
    thread: ValidThread, message_id: ObjectId, session: SessionDep, service: ThreadServiceDep
) -> MessageObject:
    return message_object(await service.message(session, thread, message_id))


@router.post("/threads/{thread_id}/messages/{message_id}", responses=error_responses(400, 404))
async def modify_message(
    thread: ValidThread, message_id: ObjectId, body: MessageUpdate, session: SessionDep, service: ThreadServiceDep
) -> MessageObject:
    """Replace a message's metadata."""
    message = await service.message(session, thread, message_id)
    if body.metadata is not None:
        message.meta = body.metadata
        await session.flush()
    return message_object(message)


@router.delete("/threads/{thread_id}/messages/{message_id}", responses=error_responses(400, 404))
async def delete_message(
    thread: ValidThread, message_id: ObjectId, session: SessionDep, service: ThreadServiceDep
) -> MessageDeleted:
    message = await service.message(session, thread, message_id)
    await session.delete(message)
    return MessageDeleted(id=message_id)


# --- runs ---------------------------------------------------------------------------------


@router.post("/threads/{thread_id}/runs", response_model=RunObject, responses=RUN_EVENTS)
async def create_run(
    thread_id: ObjectId, body: RunCreate, principal: PrincipalDep, service: ThreadServiceDep, request: Request
) -> Response:
    """Run an assistant on the thread: `queued` at once (poll it), or its events with `stream: true`."""
    return await service.runs.create(principal, thread_uuid(thread_id), body, request_id_of(request))


@router.get("/threads/{thread_id}/runs", responses=error_responses(400, 404))
async def list_runs(
    thread: ValidThread,
    session: SessionDep,
    service: ThreadServiceDep,
    limit: Limit = 20,
    order: OrderQuery = "desc",
    after: After = None,
    before: Before = None,
) -> RunList:
    return await service.list_runs(session, thread, limit=limit, order=order, after=after, before=before)


@router.get("/threads/{thread_id}/runs/{run_id}", responses=error_responses(400, 404))
async def get_run(run: ValidRun) -> RunObject:
    return run_object(run)


@router.post("/threads/{thread_id}/runs/{run_id}", responses=error_responses(400, 404))
async def modify_run(run: ValidRun, body: RunUpdate, session: SessionDep) -> RunObject:
    """Replace a run's metadata."""
    if body.metadata is not None:
        run.meta = body.metadata
        await session.flush()
    return run_object(run)


@router.post("/threads/{thread_id}/runs/{run_id}/cancel", responses=error_responses(400, 404))
async def cancel_run(
    thread_id: ObjectId, run_id: ObjectId, principal: PrincipalDep, service: ThreadServiceDep
) -> RunObject:
    """Cancel a run: `cancelling` until the process running it has stopped (a waiting run: `cancelled`)."""
    return run_object(await service.runs.cancel(principal, thread_uuid(thread_id), run_uuid(run_id)))


@router.post("/threads/{thread_id}/runs/{run_id}/submit_tool_outputs", response_model=RunObject, responses=RUN_EVENTS)
async def submit_tool_outputs(
    thread_id: ObjectId,
    run_id: ObjectId,
    body: ToolOutputsSubmit,
    principal: PrincipalDep,
    service: ThreadServiceDep,
    request: Request,
) -> Response:
    """The outputs of the tool calls a run asked for: the run goes on (plain or streamed)."""
    thread, run = thread_uuid(thread_id), run_uuid(run_id)
    return await service.runs.submit(principal, thread, run, body, request_id_of(request))


# --- steps --------------------------------------------------------------------------------
Include = Annotated[
    list[Literal["step_details.tool_calls[*].file_search.results[*].content"]] | None,
    Query(
        alias="include[]", description="`step_details.tool_calls[*].file_search.results[*].content`: the results' text."
    ),
]


def _with_content(include: Sequence[str] | None) -> bool:
    return INCLUDE_CONTENT in (include or ())


@router.get("/threads/{thread_id}/runs/{run_id}/steps", responses=error_responses(400, 404))
async def list_steps(
    run: ValidRun,
    session: SessionDep,
    service: ThreadServiceDep,
    limit: Limit = 20,
    order: OrderQuery = "desc",
    after: After = None,
    before: Before = None,
    include: Include = None,
) -> StepList:
    """The run's steps; a file_search step's results carry their text with `include[]=` INCLUDE_CONTENT."""
    return await service.steps(
        session, run, limit=limit, order=order, after=after, before=before, include_content=_with_content(include)
    )


@router.get("/threads/{thread_id}/runs/{run_id}/steps/{step_id}", responses=error_responses(400, 404))
async def get_step(
    run: ValidRun, step_id: ObjectId, session: SessionDep, service: ThreadServiceDep, include: Include = None
) -> StepObject:
    return step_object(await service.step(session, run, step_id), include_content=_with_content(include))
