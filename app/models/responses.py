"""Who created each Responses API response: the upstream holds them under the operator's key."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Index, Integer, String, func
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base


class ResponseOwner(Base):
    """A response id the gateway handed out, and the user it belongs to (404 to everyone else).

    `tokens` is what the response used in all (input and output): a later response that
    continues it (`previous_response_id`) is sent all of that as input again, so its
    reservation starts there.
    """

    __tablename__ = "response_owner"
    __table_args__ = (Index("ix_response_owner_created_at", "created_at"),)

    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(200))
    model: Mapped[str] = mapped_column(String(100))
    tokens: Mapped[int] = mapped_column(Integer, server_default="0")
    # The upstream it lives on, where every later call on it goes (None: the simulated provider's).
    upstream: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
