"""Every query threads, messages, runs and steps make. Functions flush, never commit: the caller's session decides.

A thread has at most one active run: the partial unique index `uq_thread_run_active`
refuses a second (the insert fails, and the caller answers 409), so no lock is held
while a run waits for its upstream. A run names the process running it (`owner`); one
whose process died, or that waited for tool outputs past `expires_at`, is ended by
`sweep_runs`, which any replica runs every few seconds: no run stays stuck.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

from sqlalchemy import ColumnElement, Select, delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.instances import owner_alive
from app.models import RunStep, Thread, ThreadMessage, ThreadRun, UserContextCache
from app.models.threads import ACTIVE_RUN_STATUSES

Order = Literal["asc", "desc"]
Row = TypeVar("Row", Thread, ThreadMessage, ThreadRun, RunStep)


async def page(
    session: AsyncSession,
    query: Select[Row],
    entity: type[Row],
    *,
    limit: int,
    order: Order,
    after: uuid.UUID | None,
    before: uuid.UUID | None,
) -> tuple[list[Row], bool]:
    """One page of `query` by creation (`seq`) in `order`, after and/or before the rows with those ids
    (an id not in the list gives an empty page), and whether more follow."""
    seq = entity.seq
    forward = order == "asc"

    def seq_of(row_id: uuid.UUID) -> Any:
        return select(entity.seq).where(entity.id == row_id).scalar_subquery()

    if after is not None:
        query = query.where(seq > seq_of(after) if forward else seq < seq_of(after))
    if before is not None:
        query = query.where(seq < seq_of(before) if forward else seq > seq_of(before))
    # Paging back from `before` reads the list backwards, then turns the page around.
    backwards = before is not None and after is None
    ascending = forward != backwards
    rows = list(await session.scalars(query.order_by(seq.asc() if ascending else seq.desc()).limit(limit + 1)))
    has_more = len(rows) > limit
    rows = rows[:limit]
    if backwards:
        rows.reverse()
    return rows, has_more


# --- threads ------------------------------------------------------------------------------


async def add_thread(session: AsyncSession, thread: Thread, messages: Sequence[ThreadMessage]) -> Thread:
    session.add(thread)
    await session.flush()
    for message in messages:
        message.thread_id = thread.id
    await add_messages(session, messages)
    return thread


async def get_thread(session: AsyncSession, thread_id: uuid.UUID, user_id: str) -> Thread | None:
    """The thread when it is the user's; another user's thread is the same as none."""
    return await session.scalar(select(Thread).where(Thread.id == thread_id, Thread.user_id == user_id))


async def latest_thread(session: AsyncSession, user_id: str, assistant_id: str, chat_type: str | None) -> Thread | None:
    """The user's most recently active thread of an assistant and chat type, serialized per that key.

    The transaction-scoped advisory lock makes two concurrent get-or-create calls take
    turns, so they cannot both find nothing and both create a thread.
    """
    key = f"thread:{user_id}:{assistant_id}:{chat_type or ''}"
    await session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(key, 0))))
    chat = Thread.chat_type.is_(None) if chat_type is None else Thread.chat_type == chat_type
    return await session.scalar(
        select(Thread)
        .where(Thread.user_id == user_id, Thread.assistant_id == assistant_id, chat)
        .order_by(Thread.updated_at.desc())
        .limit(1)
    )


def threads_of(user_id: str, *, assistant_id: str | None, metadata: tuple[str, str] | None) -> Select[Thread]:
    query = select(Thread).where(Thread.user_id == user_id)
    if assistant_id is not None:
        query = query.where(Thread.assistant_id == assistant_id)
    if metadata is not None:
        query = query.where(Thread.meta.contains({metadata[0]: metadata[1]}))
    return query


async def delete_thread(session: AsyncSession, thread_id: uuid.UUID) -> None:
    """Its messages, runs and steps go with it (ON DELETE CASCADE)."""
    await session.execute(delete(Thread).where(Thread.id == thread_id))


async def touch_thread(session: AsyncSession, thread_id: uuid.UUID, assistant_id: str | None = None) -> None:
    values: dict[str, Any] = {"updated_at": func.now()}
    if assistant_id is not None:
        values["assistant_id"] = assistant_id
    await session.execute(update(Thread).where(Thread.id == thread_id).values(values))


async def file_search_details(session: AsyncSession, run_id: uuid.UUID) -> dict[str, Any] | None:
    """The details of the run's file_search step (a `tool_calls` step whose call is a file_search)."""
    query = (
        select(RunStep.step_details)
        .where(RunStep.run_id == run_id, RunStep.type == "tool_calls")
        .where(RunStep.step_details["tool_calls"][0]["type"].astext == "file_search")
        .limit(1)
    )
    return await session.scalar(query)


async def set_tool_resources(session: AsyncSession, thread_id: uuid.UUID, resources: dict[str, Any]) -> None:
    await session.execute(update(Thread).where(Thread.id == thread_id).values(tool_resources=resources))


# --- messages -----------------------------------------------------------------------------


async def add_messages(session: AsyncSession, messages: Sequence[ThreadMessage]) -> None:
    """In order: each gets the next `seq`, so their order is the order they were given."""
    for message in messages:
        session.add(message)
        await session.flush()


async def get_message(session: AsyncSession, thread_id: uuid.UUID, message_id: uuid.UUID) -> ThreadMessage | None:
    return await session.scalar(
        select(ThreadMessage).where(ThreadMessage.id == message_id, ThreadMessage.thread_id == thread_id)
    )


def messages_of(thread_id: uuid.UUID, run_id: uuid.UUID | None) -> Select[ThreadMessage]:
    query = select(ThreadMessage).where(ThreadMessage.thread_id == thread_id)
    return query if run_id is None else query.where(ThreadMessage.run_id == run_id)


async def history(session: AsyncSession, thread_id: uuid.UUID, *, limit: int, run_id: uuid.UUID) -> list[ThreadMessage]:
    """The thread's newest messages with something to say, newest first, leaving out the run's own replies
    (a later round sends them as the conversation's tail)."""
    query = (
        select(ThreadMessage)
        .where(
            ThreadMessage.thread_id == thread_id,
            (ThreadMessage.content != "") | ThreadMessage.parts.is_not(None),
            ThreadMessage.run_id.is_distinct_from(run_id),
        )
        .order_by(ThreadMessage.seq.desc())
        .limit(limit)
    )
    return list(await session.scalars(query))


async def latest_user_message(session: AsyncSession, thread_id: uuid.UUID) -> ThreadMessage | None:
    query = (
        select(ThreadMessage)
        .where(ThreadMessage.thread_id == thread_id, ThreadMessage.role == "user")
        .order_by(ThreadMessage.seq.desc())
        .limit(1)
    )
    return await session.scalar(query)


async def save_prompts(session: AsyncSession, prompts: dict[uuid.UUID, str]) -> None:
    """Keep the expansions of `/shortcut` messages beside what the user typed."""
    for message_id, prompt in prompts.items():
        await session.execute(update(ThreadMessage).where(ThreadMessage.id == message_id).values(prompt=prompt))


async def latest_chat_type(session: AsyncSession, thread_id: uuid.UUID) -> str | None:
    """The `chat_type` in the metadata of the thread's newest user message."""
    return await session.scalar(
        select(ThreadMessage.meta["chat_type"].astext)
        .where(ThreadMessage.thread_id == thread_id, ThreadMessage.role == "user")
        .order_by(ThreadMessage.seq.desc())
        .limit(1)
    )


# --- runs ---------------------------------------------------------------------------------


def _active() -> ColumnElement[bool]:
    return ThreadRun.status.in_(ACTIVE_RUN_STATUSES)


def runs_of(thread_id: uuid.UUID) -> Select[ThreadRun]:
    return select(ThreadRun).where(ThreadRun.thread_id == thread_id)


async def active_run(session: AsyncSession, thread_id: uuid.UUID) -> uuid.UUID | None:
    return await session.scalar(select(ThreadRun.id).where(ThreadRun.thread_id == thread_id, _active()))


async def get_run(
    session: AsyncSession, thread_id: uuid.UUID, run_id: uuid.UUID, *, for_update: bool = False
) -> ThreadRun | None:
    query = select(ThreadRun).where(ThreadRun.id == run_id, ThreadRun.thread_id == thread_id)
    return await session.scalar(query.with_for_update() if for_update else query)


async def set_run(session: AsyncSession, run_id: uuid.UUID, where: ColumnElement[bool] | None, **values: Any) -> bool:
    """Change a run; False when it is gone (its thread was deleted) or `where` no longer holds."""
    statement = update(ThreadRun).where(ThreadRun.id == run_id)
    if where is not None:
        statement = statement.where(where)
    result = await session.execute(statement.values(values).returning(ThreadRun.id))
    return result.first() is not None


async def end_run(
    session: AsyncSession, run_id: uuid.UUID, spend: tuple[int, int, float], **values: Any
) -> tuple[ThreadRun | None, bool]:
    """Store a round's end on its run with the round's tokens and cost, in one statement while the run is
    still going; when it was ended elsewhere (swept, cancelled while waiting) only the spend is added.
    The run as stored (None when its thread was deleted), and whether this ended it."""
    prompt, completion, cost = spend
    added = {
        "prompt_tokens": ThreadRun.prompt_tokens + prompt,
        "completion_tokens": ThreadRun.completion_tokens + completion,
        "cost_usd": ThreadRun.cost_usd + round(cost, 8),
    }
    going = ThreadRun.status.in_(("queued", "in_progress", "cancelling"))
    ended = update(ThreadRun).where(ThreadRun.id == run_id, going).values(**values, **added).returning(ThreadRun)
    run = (await session.scalars(ended, execution_options={"populate_existing": True})).first()
    if run is not None:
        return run, True
    spent = update(ThreadRun).where(ThreadRun.id == run_id).values(**added).returning(ThreadRun)
    return (await session.scalars(spent, execution_options={"populate_existing": True})).first(), False


async def cancelling(session: AsyncSession, run_ids: list[uuid.UUID]) -> list[uuid.UUID]:
    return list(
        await session.scalars(select(ThreadRun.id).where(ThreadRun.id.in_(run_ids), ThreadRun.status == "cancelling"))
    )


async def record_outputs(session: AsyncSession, run: ThreadRun, outputs: dict[str, str]) -> None:
    """The submitted outputs onto the run's waiting tool-calls step, which completes."""
    step = await session.scalar(
        select(RunStep).where(RunStep.run_id == run.id, RunStep.type == "tool_calls", RunStep.status == "in_progress")
    )
    if step is None:
        return
    calls = step.step_details.get("tool_calls", [])
    details = {
        **step.step_details,
        "tool_calls": [{**call, "function": {**call["function"], "output": outputs.get(call["id"])}} for call in calls],
    }
    await session.execute(
        update(RunStep)
        .where(RunStep.id == step.id, RunStep.status == "in_progress")
        .values(step_details=details, status="completed", ended_at=func.now())
    )


# The runs no process will finish: their process died (its lease ran out), or they waited for
# tool outputs past their expiry. A run being cancelled ends cancelled, one waiting expired, any
# other failed; their unfinished messages and steps end with them. `:thread_id` NULL: every thread.
SWEEP_RUNS = text(
    f"""
    WITH ended AS (
        UPDATE thread_run SET
            status = CASE status WHEN 'cancelling' THEN 'cancelled' WHEN 'requires_action' THEN 'expired'
                     ELSE 'failed' END,
            last_error = CASE WHEN status IN ('queued', 'in_progress') THEN jsonb_build_object(
                'code', 'server_error', 'message', 'The gateway process running this run stopped; run it again.')
                ELSE last_error END,
            failed_at = CASE WHEN status IN ('queued', 'in_progress') THEN now() ELSE failed_at END,
            cancelled_at = CASE WHEN status = 'cancelling' THEN now() ELSE cancelled_at END,
            required_action = NULL,
            owner = NULL
        WHERE status IN ('queued', 'in_progress', 'requires_action', 'cancelling')
          AND (CAST(:thread_id AS uuid) IS NULL OR thread_id = CAST(:thread_id AS uuid))
          AND CASE WHEN status = 'requires_action' THEN expires_at < now()
                   ELSE NOT {owner_alive("thread_run.owner", ":lease")} END
        RETURNING id, status
    ), messages AS (
        UPDATE thread_message SET status = 'incomplete', incomplete_reason = 'run_' || ended.status
        FROM ended WHERE thread_message.run_id = ended.id AND thread_message.status = 'in_progress'
    ), steps AS (
        UPDATE run_step SET status = ended.status, ended_at = now()
        FROM ended WHERE run_step.run_id = ended.id AND run_step.status = 'in_progress'
    )
    SELECT count(*) FROM ended
    """
)


async def sweep_runs(session: AsyncSession, *, lease: float, thread_id: uuid.UUID | None = None) -> int:
    return int(await session.scalar(SWEEP_RUNS, {"lease": lease, "thread_id": thread_id}) or 0)


# --- steps --------------------------------------------------------------------------------


def steps_of(run_id: uuid.UUID) -> Select[RunStep]:
    return select(RunStep).where(RunStep.run_id == run_id)


async def get_step(session: AsyncSession, run_id: uuid.UUID, step_id: uuid.UUID) -> RunStep | None:
    return await session.scalar(select(RunStep).where(RunStep.id == step_id, RunStep.run_id == run_id))


async def end_steps(session: AsyncSession, run_id: uuid.UUID, status: str) -> None:
    """End the run's unfinished steps (a tool-calls step when its outputs arrive or the run is cancelled)."""
    await session.execute(
        update(RunStep)
        .where(RunStep.run_id == run_id, RunStep.status == "in_progress")
        .values(status=status, ended_at=func.now())
    )


# --- context ------------------------------------------------------------------------------


async def cached_context(
    session: AsyncSession, user_id: str, profile: str
) -> tuple[dict[str, Any] | None, float | None]:
    """The context last fetched for the user and profile, and its age in seconds."""
    row = (
        await session.execute(
            select(
                UserContextCache.context,
                func.extract("epoch", func.now() - UserContextCache.fetched_at),
            ).where(UserContextCache.user_id == user_id, UserContextCache.profile == profile)
        )
    ).first()
    return (row[0], float(row[1])) if row is not None else (None, None)


async def save_context(session: AsyncSession, *, user_id: str, profile: str, context: dict[str, Any]) -> None:
    statement = insert(UserContextCache).values(user_id=user_id, profile=profile, context=context)
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[UserContextCache.user_id, UserContextCache.profile],
            set_={"context": statement.excluded.context, "fetched_at": func.now()},
        )
    )
