"""One row per request refused by a caller's own limits (429s that never reached the upstream)."""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import BigInteger, Date, DateTime, Index, String, func
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base


class RefusalDaily(Base):
    """Refusals per UTC day and code, kept by a trigger on `limit_refusal` (migration 0016)."""

    __tablename__ = "refusal_daily"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    code: Mapped[str] = mapped_column(String(100), primary_key=True)
    refusals: Mapped[int] = mapped_column(BigInteger)


class LimitRefusal(Base):
    __tablename__ = "limit_refusal"
    __table_args__ = (Index("ix_limit_refusal_created_at", "created_at"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # None when the caller was not identified (the refusal came before authentication).
    user_id: Mapped[str | None] = mapped_column(String(200))
    route: Mapped[str] = mapped_column(String(200))
    # One of app.errors.LIMIT_CODES.
    code: Mapped[str] = mapped_column(String(100))
