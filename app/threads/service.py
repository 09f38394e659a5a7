"""Threads: their lifecycle in the process, and the operations on them (turns are in turns.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Literal

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.auth.principal import Principal
from app.config import Settings
from app.db import Database
from app.models import Thread
from app.ratelimit.limiter import Limiter
from app.registry import Catalog
from app.threads import cursors, repository
from app.threads.context import ContextSource
from app.threads.profiles import load_profiles
from app.threads.retention import prune_periodically
from app.threads.schemas import (
    MessageList,
    MessagePublic,
    ThreadCreate,
    ThreadList,
    ThreadPublic,
    ThreadUpdate,
)
from app.threads.turns import TurnRunner
from app.upstream.provider import Upstream
from app.usage.writer import UsageWriter

log = logging.getLogger("app.threads")


class ThreadService:
    """Built in lifespan; `start()` opens the context client and the retention loop."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        limiter: Limiter,
        upstream: Upstream,
        usage: UsageWriter,
        db: Database,
    ) -> None:
        self.settings = settings
        self.db = db
        self.profiles = load_profiles(settings.assistants_file, catalog)
        # Sessions whose statements commit one by one, for writes that are a single statement.
        writes = async_sessionmaker(db.engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False)
        self.context = ContextSource(settings, writes)
        self.turns = TurnRunner(
            settings, catalog, self.profiles, limiter, upstream, usage, db.sessionmaker, writes, self.context
        )
        self._retention: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.context.start()
        self._retention = asyncio.create_task(
            prune_periodically(
                self.db.sessionmaker,
                days=self.settings.thread_retention_days,
                interval=self.settings.thread_retention_interval,
            ),
            name="thread-retention",
        )

    async def stop(self) -> None:
        if self._retention is not None:
            self._retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention
        await self.context.close()

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
