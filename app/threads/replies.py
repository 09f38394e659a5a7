"""Storing a turn's outcome: the reply (releasing the thread's lock), or nothing at all.

Whoever ends a turn calls this store: the runner for a plain turn, the stream relay for
a streamed one. Both run shielded from cancellation, so a client that goes away still
leaves its thread unlocked and the reply (or its partial text) stored.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime

import anyio
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import DB_ERRORS
from app.errors import ErrorCode, NotFound
from app.models import ThreadMessage
from app.threads import repository
from app.threads.schemas import MessagePublic, TurnResult
from app.threads.turn import Turn

log = logging.getLogger("app.threads")


class ReplyStore:
    def __init__(self, writes: async_sessionmaker[AsyncSession]) -> None:
        self.writes = writes  # autocommit sessions: each write here is one statement

    async def store(
        self, turn: Turn, *, text: str, status: str, reason: str | None, message_id: uuid.UUID | None = None
    ) -> TurnResult:
        """Store the reply with the call's recorded usage and release the lock; 404 when the thread is gone.

        The call must be finished first: the reply carries its tokens and cost.
        """
        call = turn.call
        row = call.row
        prompt = row.prompt_tokens if row else 0
        completion = row.completion_tokens if row else 0
        cost = row.cost_usd if row else 0.0
        reply = ThreadMessage(
            id=message_id or uuid.uuid4(),
            thread_id=turn.thread_id,
            role="assistant",
            content=text,
            status=status,
            incomplete_reason=reason,
            chat_type=turn.user_message.chat_type,
            goal_id=turn.user_message.goal_id,
            model=call.model,
            simulated=call.simulated,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost_usd=cost,
        )
        async with self.writes.begin() as session:
            stored = await repository.finish_turn(session, lock=turn.lock, message=reply)
        if stored is None:
            raise NotFound(
                "The thread was deleted while the turn ran; the reply was not stored.", code=ErrorCode.THREAD_DELETED
            )
        return TurnResult(
            thread_id=turn.thread_id,
            message=MessagePublic.of(stored),
            user_message=MessagePublic.of(turn.user_message),
            tokens_used=prompt + completion,
            model_used=call.model,
            cost_estimate=cost,
            simulated=call.simulated,
        )

    async def abandon(self, thread_id: uuid.UUID, lock: datetime, user_message_id: uuid.UUID) -> None:
        """Undo a turn that produced no reply: its user message (if stored) goes, the lock is released.

        Shielded: a cancelled request still cleans up."""
        with anyio.CancelScope(shield=True):
            try:
                async with self.writes.begin() as session:
                    await repository.abandon_turn(
                        session, thread_id=thread_id, lock=lock, user_message_id=user_message_id
                    )
            except (SQLAlchemyError, *DB_ERRORS) as error:
                log.error("could not undo turn on thread %s (its lock will go stale): %s", thread_id, error)
