"""Threads: create, list, read, change and delete them, and page their messages (turns are in turns.py)."""

from __future__ import annotations

from typing import Literal

from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.principal import Principal
from app.models import Thread
from app.threads import cursors, repository
from app.threads.profiles import Profiles
from app.threads.schemas import (
    MessageList,
    MessagePublic,
    ThreadCreate,
    ThreadList,
    ThreadPublic,
    ThreadUpdate,
)
from app.threads.turns import TurnRunner


class ThreadService:
    def __init__(self, profiles: Profiles, turns: TurnRunner) -> None:
        self.profiles = profiles
        self.turns = turns

    async def create(self, session: AsyncSession, principal: Principal, body: ThreadCreate) -> Thread:
        profile = self.profiles.choose(body.profile, body.chat_type)
        self.turns.resolve_model(principal, profile)
        return await repository.create_thread(
            session, user_id=principal.user_id, profile=profile.name, title=body.title, meta=body.metadata
        )

    async def get_or_create(
        self, session: AsyncSession, principal: Principal, body: ThreadCreate
    ) -> tuple[Thread, bool]:
        """The user's most recently active thread of the profile, or a new one; True when created."""
        profile = self.profiles.choose(body.profile, body.chat_type)
        self.turns.resolve_model(principal, profile)
        existing = await repository.latest_thread(session, principal.user_id, profile.name)
        if existing is not None:
            return existing, False
        thread = await repository.create_thread(
            session, user_id=principal.user_id, profile=profile.name, title=body.title, meta=body.metadata
        )
        return thread, True

    async def list_threads(
        self, session: AsyncSession, principal: Principal, *, limit: int, cursor: str | None, profile: str | None
    ) -> ThreadList:
        before = cursors.parse_thread_cursor(cursor) if cursor else None
        threads = await repository.list_threads(session, principal.user_id, limit=limit, before=before, profile=profile)
        page, has_more = threads[:limit], len(threads) > limit
        return ThreadList(
            data=[ThreadPublic.of(thread) for thread in page],
            has_more=has_more,
            next_cursor=cursors.thread_cursor(page[-1]) if has_more else None,
        )

    async def update(self, session: AsyncSession, thread: Thread, body: ThreadUpdate) -> Thread:
        changes = body.model_dump(exclude_unset=True)
        if "metadata" in changes:
            changes["meta"] = changes.pop("metadata") or {}
        return await repository.update_thread(session, thread, changes)

    async def delete(self, session: AsyncSession, thread: Thread) -> None:
        await repository.delete_thread(session, thread)

    async def messages(
        self,
        session: AsyncSession,
        thread: Thread,
        *,
        limit: int,
        cursor: str | None,
        order: Literal["asc", "desc"],
    ) -> MessageList:
        after = cursors.parse_message_cursor(cursor) if cursor else None
        messages = await repository.list_messages(session, thread.id, limit=limit, after=after, order=order)
        page, has_more = messages[:limit], len(messages) > limit
        return MessageList(
            data=[MessagePublic.of(message) for message in page],
            has_more=has_more,
            next_cursor=cursors.message_cursor(page[-1]) if has_more else None,
        )
