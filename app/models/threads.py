"""Conversation threads, their messages, and the user context fetched for them."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base

# What a stored message's `role` and `status` hold (the columns are plain strings).
MessageRole = Literal["user", "assistant"]
MessageStatus = Literal["completed", "incomplete"]


class Thread(Base):
    """One user's conversation with one assistant profile.

    `user_id` is the app's own id (a JWT `sub` or a key's user), with no foreign key:
    JWT users need no `app_user` row. `updated_at` is the last activity (a turn or an
    edit); retention deletes threads idle longer than the configured age.
    """

    __tablename__ = "thread"
    __table_args__ = (
        Index("ix_thread_user_id_created_at_id", "user_id", "created_at", "id"),
        Index("ix_thread_user_id_profile_updated_at", "user_id", "profile", "updated_at"),
        Index("ix_thread_updated_at", "updated_at"),
    )
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[str] = mapped_column(String(200))
    profile: Mapped[str] = mapped_column(String(100))
    title: Mapped[str | None] = mapped_column(String(200))
    # "metadata" is reserved on declarative classes, hence the attribute name.
    meta: Mapped[dict[str, str]] = mapped_column("metadata", JSONB, server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # Set while a turn runs (the per-thread turn lock, see app/threads/repository.py); NULL when idle.
    running_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The process running the turn (app/instances.py): its death releases the lock within a lease.
    running_owner: Mapped[uuid.UUID | None] = mapped_column(UUID)


class ThreadMessage(Base):
    """A user message or an assistant reply; `seq` orders a thread's history."""

    __tablename__ = "thread_message"
    __table_args__ = (Index("ix_thread_message_thread_id_seq", "thread_id", "seq", unique=True),)
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, default=uuid.uuid4)
    seq: Mapped[int] = mapped_column(BigInteger, Identity(always=True))
    thread_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("thread.id", ondelete="CASCADE"))
    role: Mapped[MessageRole] = mapped_column(String(20))
    # What the user typed (a shortcut stays `/progress`), or the reply's text.
    content: Mapped[str] = mapped_column(Text)
    # The text sent upstream when it differs from `content` (an expanded shortcut).
    prompt: Mapped[str | None] = mapped_column(Text)
    # incomplete: a stream cut short (`incomplete_reason` says why).
    status: Mapped[MessageStatus] = mapped_column(String(20), server_default="completed")
    incomplete_reason: Mapped[str | None] = mapped_column(String(50))
    chat_type: Mapped[str | None] = mapped_column(String(100))
    goal_id: Mapped[str | None] = mapped_column(String(200))
    # Assistant replies: who answered and what it cost.
    model: Mapped[str | None] = mapped_column(String(100))
    simulated: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    cost_usd: Mapped[Decimal | None] = mapped_column(Numeric(14, 8))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class UserContextCache(Base):
    """The context a profile's context URL returned for a user, kept for the profile's TTL.

    A stale row is still used when a refresh fails: old context beats none.
    """

    __tablename__ = "user_context_cache"

    user_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    profile: Mapped[str] = mapped_column(String(100), primary_key=True)
    context: Mapped[dict[str, Any]] = mapped_column(JSONB)
    fetched_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
