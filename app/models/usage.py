"""One row per upstream call: who, what, how much, how it ended."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, Boolean, DateTime, Index, Integer, Numeric, String, func
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base


class UsageEvent(Base):
    __tablename__ = "usage_event"
    __table_args__ = (
        Index("ix_usage_event_user_id_created_at", "user_id", "created_at"),
        Index("ix_usage_event_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    request_id: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str] = mapped_column(String(200))
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(UUID)
    route: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(100))
    # ok, error, cancelled, simulated, fallback
    status: Mapped[str] = mapped_column(String(20))
    http_status: Mapped[int] = mapped_column(Integer)
    stream: Mapped[bool] = mapped_column(Boolean)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    cached_tokens: Mapped[int] = mapped_column(Integer)
    # True when the tokens were counted by us (abandoned stream), not reported upstream.
    tokens_estimated: Mapped[bool] = mapped_column(Boolean)
    images: Mapped[int] = mapped_column(Integer)
    cost_usd: Mapped[Decimal] = mapped_column(Numeric(14, 8))
    latency_ms: Mapped[float] = mapped_column()
    ttft_ms: Mapped[float | None] = mapped_column()
    upstream_request_id: Mapped[str | None] = mapped_column(String(200))
    error_code: Mapped[str | None] = mapped_column(String(100))
    thread_id: Mapped[uuid.UUID | None] = mapped_column(UUID)
    # Route-specific facts (a realtime secret's role and expiry, ...).
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
