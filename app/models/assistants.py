"""Assistants: what answers a thread's runs (the Assistants API's `assistant` object)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from sqlalchemy import BigInteger, DateTime, Float, Identity, Index, String, Text, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base

# api: a user's own, made through /v1/assistants; admin: shared, made through /admin/assistants;
# file: shared, one per `[profile.NAME]` of ASSISTANTS_FILE (read-only: edit the file).
AssistantSource = Literal["api", "admin", "file"]


class Assistant(Base):
    """One assistant. `user_id` is its owner's id, NULL for a shared one (every user sees it).

    The Assistants API's fields are columns; the gateway's own (shortcuts, history window,
    chat types, fallback, context URL, tiers, reply cap) are the `gateway` object, validated
    by `app.assistants.schemas.Extensions`. `seq` orders lists (and their cursors) by creation.
    """

    __tablename__ = "assistant"
    __table_args__ = (Index("ix_assistant_user_id_seq", "user_id", "seq"),)
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[str] = mapped_column(String(120), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, Identity(always=True), unique=True)
    user_id: Mapped[str | None] = mapped_column(String(200))
    source: Mapped[AssistantSource] = mapped_column(String(10))
    model: Mapped[str] = mapped_column(String(100))
    name: Mapped[str | None] = mapped_column(String(256))
    description: Mapped[str | None] = mapped_column(String(512))
    instructions: Mapped[str | None] = mapped_column(Text)
    tools: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    tool_resources: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    # "metadata" is reserved on declarative classes, hence the attribute name.
    meta: Mapped[dict[str, str]] = mapped_column("metadata", JSONB, server_default=text("'{}'::jsonb"))
    temperature: Mapped[float | None] = mapped_column(Float)
    top_p: Mapped[float | None] = mapped_column(Float)
    # "auto" or a {"type": ...} object, as the API takes it.
    response_format: Mapped[Any] = mapped_column(JSONB, server_default=text("'\"auto\"'::jsonb"))
    reasoning_effort: Mapped[str | None] = mapped_column(String(20))
    gateway: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
