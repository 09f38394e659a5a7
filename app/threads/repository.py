"""Every query threads make. Functions flush, never commit: the caller's session decides.

The per-thread turn lock is `thread.running_since`, taken with a conditional UPDATE
and cleared when the turn ends. A transaction held open with `SELECT ... FOR UPDATE`
would also serialize turns, but it would pin a pooled connection for the whole upstream
call (minutes, for a stream) and could not span the short statements a turn is made of.
The column costs nothing extra: taking it is the same statement that checks ownership and
reads the history, and clearing it is the same statement that stores the reply. The lock
names its process (`running_owner`): one that dies mid-turn leaves the lock behind, and it
may be taken over as soon as that process's lease runs out (app/instances.py), or once it
is older than the turn time limit.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import column, delete, func, select, text, tuple_
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.instances import owner_alive
from app.models import Thread, ThreadMessage, UserContextCache

# Lock a caller's idle thread, and read what the prompt needs, in one round trip: the
# thread's profile, its newest messages (newest first, empty replies left out) and the
# user's cached context for the turn's profile. No row: not the caller's thread, or busy.
OWNER_ALIVE = owner_alive("thread.running_owner", ":lease")
OPEN_TURN = text(
    f"""
    WITH locked AS (
        UPDATE thread
        SET running_since = clock_timestamp(), running_owner = :owner, updated_at = now()
        WHERE id = :thread_id AND user_id = :user_id
          AND (running_since IS NULL
               OR running_since < now() - make_interval(secs => :stale_after)
               OR NOT {OWNER_ALIVE})
        RETURNING id, profile, running_since
    )
    SELECT locked.profile,
           locked.running_since AS lock,
           coalesce((
               SELECT jsonb_agg(jsonb_build_array(recent.role, recent.text) ORDER BY recent.seq DESC)
               FROM (SELECT seq, role, coalesce(prompt, content) AS text
                     FROM thread_message
                     WHERE thread_id = locked.id AND content <> ''
                     ORDER BY seq DESC
                     LIMIT :history_limit) AS recent
           ), '[]'::jsonb) AS history,
           cache.context,
           extract(epoch FROM now() - cache.fetched_at)::float8 AS context_age
    FROM locked
    LEFT JOIN user_context_cache AS cache
           ON cache.user_id = :user_id AND cache.profile = coalesce(:context_profile, locked.profile)
    """
).columns(column("profile"), column("lock"), column("history", JSONB), column("context", JSONB), column("context_age"))

# Store the reply and release the lock (only our own: a stale lock may have been taken over)
# in one statement. Nothing is inserted when the thread was deleted meanwhile.
FINISH_TURN = text(
    """
    WITH touched AS (
        UPDATE thread
        SET updated_at = now(),
            running_owner = CASE WHEN running_since = :lock THEN NULL ELSE running_owner END,
            running_since = CASE WHEN running_since = :lock THEN NULL ELSE running_since END
        WHERE id = :thread_id
        RETURNING id
    )
    INSERT INTO thread_message (id, thread_id, role, content, status, incomplete_reason, chat_type, goal_id,
                                model, simulated, prompt_tokens, completion_tokens, cost_usd)
    SELECT CAST(:id AS uuid), touched.id, 'assistant', CAST(:content AS text), CAST(:status AS varchar),
           CAST(:incomplete_reason AS varchar), CAST(:chat_type AS varchar), CAST(:goal_id AS varchar),
           CAST(:model AS varchar), CAST(:simulated AS boolean), CAST(:prompt_tokens AS integer),
           CAST(:completion_tokens AS integer), CAST(:cost_usd AS numeric)
    FROM touched
    RETURNING seq, created_at
    """
)

# A turn that failed before any reply leaves no trace: its user message goes, the lock is released.
ABANDON_TURN = text(
    """
    WITH released AS (
        UPDATE thread SET running_since = NULL, running_owner = NULL WHERE id = :thread_id AND running_since = :lock
    )
    DELETE FROM thread_message WHERE id = :user_message_id
    """
)


@dataclass(slots=True)
class OpenedTurn:
    profile: str
    lock: datetime
    history: list[tuple[str, str]]  # (role, text), newest first
    context: dict[str, Any] | None
    context_age: float | None


async def create_thread(
    session: AsyncSession, *, user_id: str, profile: str, title: str | None, meta: dict[str, str]
) -> Thread:
    thread = Thread(user_id=user_id, profile=profile, title=title, meta=meta)
    session.add(thread)
    await session.flush()
    return thread


async def get_thread(session: AsyncSession, thread_id: uuid.UUID, user_id: str) -> Thread | None:
    """The thread when it is the user's; another user's thread is the same as none."""
    return await session.scalar(select(Thread).where(Thread.id == thread_id, Thread.user_id == user_id))


async def latest_thread(session: AsyncSession, user_id: str, profile: str) -> Thread | None:
    """The user's most recently active thread of a profile, serialized per (user, profile).

    The transaction-scoped advisory lock makes two concurrent get-or-create calls take
    turns, so they cannot both find nothing and both create a thread.
    """
    await session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(f"thread:{user_id}:{profile}", 0))))
    return await session.scalar(
        select(Thread)
        .where(Thread.user_id == user_id, Thread.profile == profile)
        .order_by(Thread.updated_at.desc())
        .limit(1)
    )


async def list_threads(
    session: AsyncSession,
    user_id: str,
    *,
    limit: int,
    before: tuple[datetime, uuid.UUID] | None,
    profile: str | None,
) -> list[Thread]:
    """Newest first; one row more than `limit`, so the caller can tell whether more follow."""
    query = select(Thread).where(Thread.user_id == user_id)
    if profile is not None:
        query = query.where(Thread.profile == profile)
    if before is not None:
        query = query.where(tuple_(Thread.created_at, Thread.id) < tuple_(*before))
    query = query.order_by(Thread.created_at.desc(), Thread.id.desc()).limit(limit + 1)
    return list(await session.scalars(query))


async def update_thread(session: AsyncSession, thread: Thread, changes: dict[str, Any]) -> Thread:
    for name, value in changes.items():
        setattr(thread, name, value)
    thread.updated_at = func.now()
    await session.flush()
    return thread


async def delete_thread(session: AsyncSession, thread: Thread) -> None:
    """Its messages go with it (ON DELETE CASCADE)."""
    await session.execute(delete(Thread).where(Thread.id == thread.id))


async def list_messages(
    session: AsyncSession,
    thread_id: uuid.UUID,
    *,
    limit: int,
    after: int | None,
    order: Literal["asc", "desc"],
) -> list[ThreadMessage]:
    query = select(ThreadMessage).where(ThreadMessage.thread_id == thread_id)
    if after is not None:
        query = query.where(ThreadMessage.seq > after if order == "asc" else ThreadMessage.seq < after)
    sort = ThreadMessage.seq.asc() if order == "asc" else ThreadMessage.seq.desc()
    return list(await session.scalars(query.order_by(sort).limit(limit + 1)))


async def open_turn(
    session: AsyncSession,
    *,
    thread_id: uuid.UUID,
    user_id: str,
    context_profile: str | None,
    history_limit: int,
    stale_after: float,
    owner: uuid.UUID,
    lease: float,
) -> OpenedTurn | None:
    """Take the thread's turn lock and read the prompt's inputs; None when not taken."""
    row = (
        await session.execute(
            OPEN_TURN,
            {
                "thread_id": thread_id,
                "user_id": user_id,
                "context_profile": context_profile,
                "history_limit": history_limit,
                "stale_after": stale_after,
                "owner": owner,
                "lease": lease,
            },
        )
    ).one_or_none()
    if row is None:
        return None
    return OpenedTurn(
        profile=row.profile,
        lock=row.lock,
        history=[(role, content) for role, content in row.history],
        context=row.context,
        context_age=row.context_age,
    )


async def thread_is_visible(session: AsyncSession, thread_id: uuid.UUID, user_id: str) -> bool:
    """Whether a turn that could not lock the thread found it busy (True) or not the user's (False)."""
    found = await session.scalar(select(Thread.id).where(Thread.id == thread_id, Thread.user_id == user_id))
    return found is not None


async def add_message(session: AsyncSession, message: ThreadMessage) -> ThreadMessage:
    session.add(message)
    await session.flush()
    return message


async def finish_turn(session: AsyncSession, *, lock: datetime, message: ThreadMessage) -> ThreadMessage | None:
    """Store the reply and release the lock; None when the thread is gone."""
    row = (
        await session.execute(
            FINISH_TURN,
            {
                "lock": lock,
                "thread_id": message.thread_id,
                "id": message.id,
                "content": message.content,
                "status": message.status,
                "incomplete_reason": message.incomplete_reason,
                "chat_type": message.chat_type,
                "goal_id": message.goal_id,
                "model": message.model,
                "simulated": message.simulated,
                "prompt_tokens": message.prompt_tokens,
                "completion_tokens": message.completion_tokens,
                "cost_usd": Decimal(str(round(message.cost_usd or 0, 8))),
            },
        )
    ).one_or_none()
    if row is None:
        return None
    message.seq, message.created_at = row.seq, row.created_at
    return message


async def abandon_turn(
    session: AsyncSession, *, thread_id: uuid.UUID, lock: datetime, user_message_id: uuid.UUID
) -> None:
    await session.execute(ABANDON_TURN, {"thread_id": thread_id, "lock": lock, "user_message_id": user_message_id})


async def save_context(session: AsyncSession, *, user_id: str, profile: str, context: dict[str, Any]) -> None:
    statement = insert(UserContextCache).values(user_id=user_id, profile=profile, context=context)
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[UserContextCache.user_id, UserContextCache.profile],
            set_={"context": statement.excluded.context, "fetched_at": func.now()},
        )
    )
