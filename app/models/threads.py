"""Threads (the Assistants API's), their messages, runs and run steps, and the user context fetched for them."""

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
MessageStatus = Literal["in_progress", "completed", "incomplete"]
RunStatus = Literal[
    "queued",
    "in_progress",
    "requires_action",
    "cancelling",
    "cancelled",
    "failed",
    "completed",
    "incomplete",
    "expired",
]
# A thread has at most one run in these (a partial unique index says so).
ACTIVE_RUN_STATUSES = ("queued", "in_progress", "requires_action", "cancelling")
StepStatus = Literal["in_progress", "cancelled", "failed", "completed", "expired"]


class Thread(Base):
    """One user's conversation. Ids are `thread_` + the uuid's hex on the wire (app/threads/ids.py).

    `user_id` is the app's own id (a JWT `sub` or a key's user), with no foreign key: JWT
    users need no `app_user` row. `assistant_id` is the assistant of its latest run (or the
    one it was made for), `chat_type` the app's chat type it was made for: together the key
    of get-or-create. `updated_at` is the last activity; retention deletes idle threads.
    """

    __tablename__ = "thread"
    __table_args__ = (
        Index("ix_thread_user_id_created_at_id", "user_id", "created_at", "id"),
        Index("ix_thread_user_id_assistant_id_updated_at", "user_id", "assistant_id", "updated_at"),
        Index("ix_thread_updated_at", "updated_at"),
    )
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, default=uuid.uuid4)
    seq: Mapped[int] = mapped_column(BigInteger, Identity(always=True), unique=True)
    user_id: Mapped[str] = mapped_column(String(200))
    assistant_id: Mapped[str | None] = mapped_column(String(120))
    chat_type: Mapped[str | None] = mapped_column(String(100))
    # "metadata" is reserved on declarative classes, hence the attribute name.
    meta: Mapped[dict[str, str]] = mapped_column("metadata", JSONB, server_default=text("'{}'::jsonb"))
    tool_resources: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ThreadMessage(Base):
    """A user message or an assistant reply; `seq` orders a thread's messages, even within one second."""

    __tablename__ = "thread_message"
    __table_args__ = (Index("ix_thread_message_thread_id_seq", "thread_id", "seq", unique=True),)
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, default=uuid.uuid4)
    seq: Mapped[int] = mapped_column(BigInteger, Identity(always=True))
    thread_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("thread.id", ondelete="CASCADE"))
    role: Mapped[MessageRole] = mapped_column(String(20))
    # The text: what the user typed (a shortcut stays `/progress`), or the reply.
    content: Mapped[str] = mapped_column(Text)
    # The content parts as sent, when they are more than one text (an `image_url`, several texts).
    parts: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONB)
    # The text sent upstream when it differs from `content` (an expanded shortcut).
    prompt: Mapped[str | None] = mapped_column(Text)
    status: Mapped[MessageStatus] = mapped_column(String(20), server_default="completed")
    # incomplete: why (max_tokens, run_cancelled, run_failed, run_expired, client_disconnected).
    incomplete_reason: Mapped[str | None] = mapped_column(String(50))
    meta: Mapped[dict[str, str]] = mapped_column("metadata", JSONB, server_default=text("'{}'::jsonb"))
    attachments: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    # The run that wrote it, and its assistant (replies; NULL for messages a client added).
    run_id: Mapped[uuid.UUID | None] = mapped_column(UUID)
    assistant_id: Mapped[str | None] = mapped_column(String(120))
    # Replies: who answered and what it cost.
    model: Mapped[str | None] = mapped_column(String(100))
    simulated: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    cost_usd: Mapped[Decimal | None] = mapped_column(Numeric(14, 8))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ThreadRun(Base):
    """One run of an assistant on a thread (app/threads/runs.py).

    While it is queued or in progress, `owner` names the process running it (app/instances.py):
    a run whose process died is failed by any replica once the lease runs out. `rounds` is the
    conversation's tail the run has added (the model's tool calls and the outputs submitted),
    sent again with the next round; `params` are the run's sampling and tool settings.
    """

    __tablename__ = "thread_run"
    __table_args__ = (
        Index("ix_thread_run_thread_id_seq", "thread_id", "seq"),
        Index(
            "uq_thread_run_active",
            "thread_id",
            unique=True,
            postgresql_where=text("status IN ('queued', 'in_progress', 'requires_action', 'cancelling')"),
        ),
        Index(
            "ix_thread_run_active_status",
            "status",
            postgresql_where=text("status IN ('queued', 'in_progress', 'requires_action', 'cancelling')"),
        ),
    )
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, default=uuid.uuid4)
    seq: Mapped[int] = mapped_column(BigInteger, Identity(always=True))
    thread_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("thread.id", ondelete="CASCADE"))
    user_id: Mapped[str] = mapped_column(String(200))
    assistant_id: Mapped[str] = mapped_column(String(120))
    status: Mapped[RunStatus] = mapped_column(String(20))
    model: Mapped[str] = mapped_column(String(100))
    # The caller's instructions (None: the assistant's, which stay hidden when it is shared).
    instructions: Mapped[str | None] = mapped_column(Text)
    additional_instructions: Mapped[str | None] = mapped_column(Text)
    tools: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    params: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    meta: Mapped[dict[str, str]] = mapped_column("metadata", JSONB, server_default=text("'{}'::jsonb"))
    context: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    rounds: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    required_action: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    last_error: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    incomplete_reason: Mapped[str | None] = mapped_column(String(50))
    prompt_tokens: Mapped[int] = mapped_column(Integer, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(Integer, server_default="0")
    cost_usd: Mapped[Decimal] = mapped_column(Numeric(14, 8), server_default="0")
    simulated: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    owner: Mapped[uuid.UUID | None] = mapped_column(UUID)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class RunStep(Base):
    """What a run did: wrote a message (`message_creation`) or asked for tool calls (`tool_calls`)."""

    __tablename__ = "run_step"
    __table_args__ = (Index("ix_run_step_run_id_seq", "run_id", "seq"),)
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, default=uuid.uuid4)
    seq: Mapped[int] = mapped_column(BigInteger, Identity(always=True))
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("thread_run.id", ondelete="CASCADE"))
    thread_id: Mapped[uuid.UUID] = mapped_column(UUID)
    assistant_id: Mapped[str] = mapped_column(String(120))
    type: Mapped[str] = mapped_column(String(20))
    status: Mapped[StepStatus] = mapped_column(String(20))
    step_details: Mapped[dict[str, Any]] = mapped_column(JSONB)
    last_error: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class UserContextCache(Base):
    """The context a profile's context URL returned for a user, kept for the profile's TTL.

    A stale row is still used when a refresh fails: old context beats none.
    """

    __tablename__ = "user_context_cache"

    user_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    profile: Mapped[str] = mapped_column(String(100), primary_key=True)
    context: Mapped[dict[str, Any]] = mapped_column(JSONB)
    fetched_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
