"""Rate-limit state shared by every process and replica."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Float, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base


class RateLimitBucket(Base):
    """One limit of one user: a GCRA theoretical arrival time, or a window's spend.

    Rows past `expires_at` carry no information (a fresh row would behave the same),
    which is what lets the pruner delete them without a race.
    """

    __tablename__ = "rate_limit_bucket"
    # Rows are updated on every call: room on each page and no index on a changing column
    # keep those updates HOT (no index writes); pruning scans this small table instead.
    __table_args__ = {"postgresql_with": {"fillfactor": "50"}}

    key: Mapped[str] = mapped_column(String(300), primary_key=True)
    value: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
