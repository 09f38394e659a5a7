"""Realtime calls the gateway set up or was asked to watch (app/realtime/calls.py, sideband.py)."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import DateTime, Index, Integer, LargeBinary, Numeric, String, Text, func, text
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base


class RealtimeCall(Base):
    """One WebRTC call: who, which preset, where upstream, its caps, and who watches its sideband.

    `status` is connecting (its setup is under way), active (the client has its answer) or ended.
    `owner` is the process watching the call's sideband (app/instances.py); an active call whose
    owner stopped beating is taken up by another. `reservation` is what settles the call's pending
    usage row (`reservation_id`) wherever the call ends."""

    __tablename__ = "realtime_call"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(200))
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(UUID)
    request_id: Mapped[str] = mapped_column(String(100))
    source: Mapped[str] = mapped_column(String(20))  # gateway (set up through us) or attached
    status: Mapped[str] = mapped_column(String(20), server_default="connecting")
    answerer: Mapped[str] = mapped_column(String(20))  # operator, own_key or simulated
    upstream: Mapped[str | None] = mapped_column(String(100))
    upstream_call_id: Mapped[str | None] = mapped_column(String(200), unique=True)
    model: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(100))
    language: Mapped[str] = mapped_column(String(35))
    instructions: Mapped[str] = mapped_column(Text)
    voice: Mapped[str] = mapped_column(String(50))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    max_cost_usd: Mapped[Decimal] = mapped_column(Numeric(20, 10))
    cost_usd: Mapped[Decimal] = mapped_column(Numeric(20, 10), server_default="0")
    responses: Mapped[int] = mapped_column(Integer, server_default="0")
    reservation_id: Mapped[uuid.UUID] = mapped_column(UUID, unique=True)
    reservation: Mapped[dict[str, Any]] = mapped_column(JSONB)
    owner: Mapped[uuid.UUID | None] = mapped_column(UUID)
    attaches: Mapped[int] = mapped_column(Integer, server_default="0")
    hangup_requested: Mapped[str | None] = mapped_column(String(50))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ended_reason: Mapped[str | None] = mapped_column(String(50))

    __table_args__ = (
        Index("ix_realtime_call_user", "user_id", "created_at"),
        Index("ix_realtime_call_open", "created_at", postgresql_where=text("status <> 'ended'")),
    )


class RealtimeSecret(Base):
    """A client secret the gateway minted: a call set up with it may be attached by its user."""

    __tablename__ = "realtime_secret"

    secret_hash: Mapped[bytes] = mapped_column(LargeBinary, primary_key=True)  # sha-256 of the value
    user_id: Mapped[str] = mapped_column(String(200))
    answerer: Mapped[str] = mapped_column(String(20))
    upstream: Mapped[str | None] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(100))
    language: Mapped[str] = mapped_column(String(35))
    instructions: Mapped[str] = mapped_column(Text)
    voice: Mapped[str] = mapped_column(String(50))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
