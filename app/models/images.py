"""Generated images, image batches and their items, idempotency keys, the URL-signing secret."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    SmallInteger,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base

ItemStatus = Literal["pending", "running", "completed", "failed", "cancelled"]
BatchStatus = Literal["queued", "running", "completed", "cancelled"]


class Image(Base):
    """One stored image: who asked, for what, where its bytes are, what it cost."""

    __tablename__ = "image"
    __table_args__ = (
        # History pages, newest first, per user; retention scans by age.
        Index("ix_image_user_id_created_at_id", "user_id", "created_at", "id"),
        Index("ix_image_created_at", "created_at"),
        Index("ix_image_storage_key", "storage_key"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[str] = mapped_column(String(200))
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(UUID)
    request_id: Mapped[str] = mapped_column(String(64))
    # The images of one generation call share it (n > 1).
    generation_id: Mapped[uuid.UUID] = mapped_column(UUID)
    batch_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("image_batch.id", ondelete="SET NULL"), index=True)
    regenerated_from: Mapped[uuid.UUID | None] = mapped_column(UUID)
    prompt: Mapped[str] = mapped_column(Text)
    revised_prompt: Mapped[str | None] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(100))
    size: Mapped[str] = mapped_column(String(20))
    quality: Mapped[str] = mapped_column(String(20))
    output_format: Mapped[str] = mapped_column(String(10))
    background: Mapped[str | None] = mapped_column(String(20))
    style: Mapped[str | None] = mapped_column(String(50))  # the style preset it was made with
    edited: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))  # by POST /v1/images/edits
    content_type: Mapped[str] = mapped_column(String(50))
    storage_key: Mapped[str] = mapped_column(String(300))
    bytes: Mapped[int] = mapped_column(Integer)
    cost_usd: Mapped[Decimal] = mapped_column(Numeric(14, 8))
    simulated: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ImageBatch(Base):
    """Prompts generated in the background, paced; the options are shared by every item."""

    __tablename__ = "image_batch"
    __table_args__ = (Index("ix_image_batch_user_id_created_at", "user_id", "created_at"),)

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[str] = mapped_column(String(200))
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(UUID)
    request_id: Mapped[str] = mapped_column(String(64))
    # queued, running, completed, cancelled
    status: Mapped[BatchStatus] = mapped_column(String(20), server_default="queued")
    model: Mapped[str] = mapped_column(String(100))
    options: Mapped[dict[str, Any]] = mapped_column(JSONB)  # size, quality, output_format, background, n
    # Pacing is the batch's own, fixed at creation: every replica paces it alike.
    interval_seconds: Mapped[float] = mapped_column(Float)
    next_run_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    estimated_cost_usd: Mapped[Decimal] = mapped_column(Numeric(14, 8))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ImageBatchItem(Base):
    """One prompt of a batch; `pending` items whose `not_before` has passed are due."""

    __tablename__ = "image_batch_item"
    __table_args__ = (
        Index("ix_image_batch_item_batch_id_index", "batch_id", "index", unique=True),
        # The runner's scan: due work only, a small partial index whatever the history.
        Index(
            "ix_image_batch_item_due",
            "not_before",
            postgresql_where=text("status IN ('pending', 'running')"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, default=uuid.uuid4)
    batch_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("image_batch.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    custom_id: Mapped[str | None] = mapped_column(String(200))
    prompt: Mapped[str] = mapped_column(Text)
    # pending, running, completed, failed, cancelled
    status: Mapped[ItemStatus] = mapped_column(String(20), server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    not_before: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # A running item whose lease passed belongs to a process that died: it is due again.
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The process running the item (app/instances.py); its lease is that process's heartbeat.
    claimed_by: Mapped[uuid.UUID | None] = mapped_column(UUID)
    image_ids: Mapped[list[str]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    cost_usd: Mapped[Decimal | None] = mapped_column(Numeric(14, 8))
    error_code: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class IdempotencyKey(Base):
    """A client's `Idempotency-Key`: claimed before the work, then holding its result for a day."""

    __tablename__ = "idempotency_key"
    __table_args__ = (Index("ix_idempotency_key_expires_at", "expires_at"),)

    user_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    # pending (claimed, work under way) or done
    state: Mapped[str] = mapped_column(String(10))
    response_status: Mapped[int | None] = mapped_column(SmallInteger)
    # What the response is rebuilt from (ids, not bytes nor signed URLs, which expire).
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The process doing the work of a pending key (app/instances.py): it may be taken over once that dies.
    owner: Mapped[uuid.UUID | None] = mapped_column(UUID)
