"""Threads and their messages, runs and steps as the caller reads and edits them (runs start in runs.py)."""

from __future__ import annotations

import uuid

from sqlalchemy import Select
from sqlalchemy.ext.asyncio import AsyncSession

from app.assistants import repository as assistant_rows
from app.assistants.service import refuse_unsupported_tools
from app.auth.principal import Principal
from app.errors import AssistantNotFound, InvalidRequest, MessageNotFound, RunNotFound, StepNotFound
from app.models import RunStep, Thread, ThreadMessage, ThreadRun
from app.threads import file_search, repository
from app.threads.ids import MESSAGE, RUN, STEP, THREAD, parse_id, public_id
from app.threads.objects import message_object, run_object, step_object, thread_object
from app.threads.repository import Order, Row
from app.threads.runs import RunEngine, new_message
from app.threads.schemas import (
    MessageCreate,
    MessageList,
    RunList,
    StepList,
    ThreadCreate,
    ThreadList,
    ThreadLookup,
    ThreadUpdate,
)


def cursor(prefix: str, value: str | None, param: str) -> uuid.UUID | None:
    """A page's `after`/`before`: an id of the list; one that is not ours is a 400."""
    if value is None:
        return None
    parsed = parse_id(prefix, value)
    if parsed is None:
        raise InvalidRequest(f"Invalid '{param}': pass an id from the list ('{prefix}...').", param=param)
    return parsed


async def _page(
    session: AsyncSession,
    query: Select[Row],
    row_type: type[Row],
    prefix: str,
    *,
    limit: int,
    order: Order,
    after: str | None,
    before: str | None,
) -> tuple[list[Row], bool]:
    """A page of `query` after and/or before ids of the list (`prefix...`)."""
    first, last = cursor(prefix, after, "after"), cursor(prefix, before, "before")
    return await repository.page(session, query, row_type, limit=limit, order=order, after=first, before=last)


class ThreadService:
    def __init__(self, runs: RunEngine) -> None:
        self.runs = runs

    # --- threads --------------------------------------------------------------------------

    async def create(self, session: AsyncSession, principal: Principal, body: ThreadCreate) -> Thread:
        if body.tool_resources is not None:
            refuse_unsupported_tools([], body.tool_resources)
        resources = await file_search.checked_resources(session, body.tool_resources, principal.user_id)
        thread = Thread(
            id=uuid.uuid4(), user_id=principal.user_id, meta=body.metadata or {}, tool_resources=resources or {}
        )
        messages = [new_message(thread.id, message) for message in body.messages]
        await self.runs.attach(principal, thread, body.messages)
        return await repository.add_thread(session, thread, messages)

    async def lookup(
        self, session: AsyncSession, principal: Principal, assistant_id: str, body: ThreadLookup
    ) -> tuple[Thread, bool]:
        """The caller's most recently active thread of the assistant and chat type, or a new one; True when new."""
        assistant = await assistant_rows.get_visible(session, assistant_id, principal.user_id)
        if assistant is None:
            raise AssistantNotFound(assistant_id)
        if body.chat_type is not None:
            owner = (await assistant_rows.chat_type_owners(session)).get(body.chat_type)
            if owner is not None and owner != assistant.id:
                raise InvalidRequest(
                    f"chat_type '{body.chat_type}' belongs to assistant '{owner}', not '{assistant.id}'.",
                    param="chat_type",
                )
        existing = await repository.latest_thread(session, principal.user_id, assistant.id, body.chat_type)
        if existing is not None:
            return existing, False
        thread = Thread(
            id=uuid.uuid4(),
            user_id=principal.user_id,
            assistant_id=assistant.id,
            chat_type=body.chat_type,
            meta=body.metadata or {},
            tool_resources={},
        )
        return await repository.add_thread(session, thread, []), True

    async def list_threads(
        self,
        session: AsyncSession,
        principal: Principal,
        *,
        limit: int,
        order: Order,
        after: str | None,
        before: str | None,
        assistant_id: str | None,
        metadata: tuple[str, str] | None,
    ) -> ThreadList:
        query = repository.threads_of(principal.user_id, assistant_id=assistant_id, metadata=metadata)
        rows, has_more = await _page(
            session, query, Thread, THREAD, limit=limit, order=order, after=after, before=before
        )
        return ThreadList.of([thread_object(thread) for thread in rows], has_more)

    async def update(self, session: AsyncSession, thread: Thread, body: ThreadUpdate) -> Thread:
        if body.metadata is not None:
            thread.meta = body.metadata
        if body.tool_resources is not None:
            refuse_unsupported_tools([], body.tool_resources)
            thread.tool_resources = (
                await file_search.checked_resources(session, body.tool_resources, thread.user_id) or {}
            )
        await repository.touch_thread(session, thread.id)
        await session.flush()
        await session.refresh(thread)
        return thread

    # --- messages -------------------------------------------------------------------------

    async def add_message(
        self, session: AsyncSession, principal: Principal, thread: Thread, body: MessageCreate
    ) -> ThreadMessage:
        """OpenAI's rule: no messages while a run is active (its prompt is being read). `file_search`
        attachments go into the thread's vector store."""
        active = await repository.active_run(session, thread.id)
        if active is not None:
            raise InvalidRequest(
                f"Can't add messages to {public_id(THREAD, thread.id)} while a run {public_id(RUN, active)} is active.",
                param="thread_id",
            )
        message = new_message(thread.id, body)
        if body.attachments:  # two messages at once must not each make the thread a store
            await session.refresh(thread, ["tool_resources"], with_for_update=True)
        if await self.runs.attach(principal, thread, [body]):
            await repository.set_tool_resources(session, thread.id, thread.tool_resources)
        await repository.add_messages(session, [message])
        await repository.touch_thread(session, thread.id)
        return message

    async def message(self, session: AsyncSession, thread: Thread, message_id: str) -> ThreadMessage:
        parsed = parse_id(MESSAGE, message_id)
        message = await repository.get_message(session, thread.id, parsed) if parsed else None
        if message is None:
            raise MessageNotFound(message_id)
        return message

    async def messages(
        self,
        session: AsyncSession,
        thread: Thread,
        *,
        limit: int,
        order: Order,
        after: str | None,
        before: str | None,
        run_id: str | None,
    ) -> MessageList:
        run = cursor(RUN, run_id, "run_id")
        rows, has_more = await _page(
            session,
            repository.messages_of(thread.id, run),
            ThreadMessage,
            MESSAGE,
            limit=limit,
            order=order,
            after=after,
            before=before,
        )
        return MessageList.of([message_object(message) for message in rows], has_more)

    # --- runs and steps -------------------------------------------------------------------

    async def run(self, session: AsyncSession, thread: Thread, run_id: str) -> ThreadRun:
        parsed = parse_id(RUN, run_id)
        run = await repository.get_run(session, thread.id, parsed) if parsed else None
        if run is None:
            raise RunNotFound(run_id)
        return run

    async def list_runs(
        self, session: AsyncSession, thread: Thread, *, limit: int, order: Order, after: str | None, before: str | None
    ) -> RunList:
        rows, has_more = await _page(
            session, repository.runs_of(thread.id), ThreadRun, RUN, limit=limit, order=order, after=after, before=before
        )
        return RunList.of([run_object(run) for run in rows], has_more)

    async def step(self, session: AsyncSession, run: ThreadRun, step_id: str) -> RunStep:
        parsed = parse_id(STEP, step_id)
        step = await repository.get_step(session, run.id, parsed) if parsed else None
        if step is None:
            raise StepNotFound(step_id)
        return step

    async def steps(
        self,
        session: AsyncSession,
        run: ThreadRun,
        *,
        limit: int,
        order: Order,
        after: str | None,
        before: str | None,
        include_content: bool = False,
    ) -> StepList:
        rows, has_more = await _page(
            session, repository.steps_of(run.id), RunStep, STEP, limit=limit, order=order, after=after, before=before
        )
        return StepList.of([step_object(step, include_content=include_content) for step in rows], has_more)
