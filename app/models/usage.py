"""One row per upstream call: who, what, how much, how it ended."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, Boolean, Date, DateTime, Index, Integer, Numeric, String, Text, func, text
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base


class UsageEvent(Base):
    """The ledger, partitioned by month of `created_at` (app/usage/partitions.py); triggers keep
    `usage_hourly` and `usage_daily` in step with it (migration 0015)."""

    __tablename__ = "usage_event"
    __table_args__ = (
        Index("ix_usage_event_user_id_created_at", "user_id", "created_at"),
        Index("ix_usage_event_created_at", "created_at"),
        Index("uq_usage_event_call_id", "call_id", "created_at", unique=True),
        {"postgresql_partition_by": "RANGE (created_at)"},
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    # One call, one row (app/usage/ledger.py): its `created_at` is the call's start, carried along.
    call_id: Mapped[uuid.UUID] = mapped_column(UUID, server_default=text("gen_random_uuid()"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str] = mapped_column(String(200))
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(UUID)
    route: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(100))
    # ok, error, cancelled, simulated, fallback, or interrupted (its process died: settled at what it
    # had reserved).
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
    # The upstream that answered (the catalog's name; "default" is OPENAI_BASE_URL); None: simulated.
    upstream: Mapped[str | None] = mapped_column(String(40))


class _Sums:
    """What a rollup sums of the ledger's rows in its bucket and key; exact, as the triggers that keep
    the rollups run in the transaction of the rows they sum (migration 0015)."""

    calls: Mapped[int] = mapped_column(BigInteger)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    cached_tokens: Mapped[int] = mapped_column(BigInteger)
    images: Mapped[int] = mapped_column(BigInteger)
    cost_usd: Mapped[Decimal] = mapped_column(Numeric(20, 8))


class _Detail(_Sums):
    user_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    model: Mapped[str] = mapped_column(String(100), primary_key=True)
    route: Mapped[str] = mapped_column(String(100), primary_key=True)
    status: Mapped[str] = mapped_column(String(20), primary_key=True)
    upstream: Mapped[str] = mapped_column(String(40), primary_key=True, server_default="")  # "": simulated


class UsageHourly(_Detail, Base):
    __tablename__ = "usage_hourly"

    hour: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)


class UsageDaily(_Detail, Base):
    """Per UTC day and (user, model, route, status, upstream): a user's own reports."""

    __tablename__ = "usage_daily"
    __table_args__ = (Index("ix_usage_daily_user_id_day", "user_id", "day"),)

    day: Mapped[date] = mapped_column(Date, primary_key=True)


class UsageDailyTotals(_Sums, Base):
    """Per UTC day and (model, route, status, upstream), every user together: the reports over all."""

    __tablename__ = "usage_daily_totals"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    model: Mapped[str] = mapped_column(String(100), primary_key=True)
    route: Mapped[str] = mapped_column(String(100), primary_key=True)
    status: Mapped[str] = mapped_column(String(20), primary_key=True)
    upstream: Mapped[str] = mapped_column(String(40), primary_key=True, server_default="")


class UsageUserDaily(_Sums, Base):
    """Per UTC day, user and status: the reports by user (top users) over a range."""

    __tablename__ = "usage_user_daily"
    __table_args__ = (Index("ix_usage_user_daily_user_id_day", "user_id", "day"),)

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    user_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    status: Mapped[str] = mapped_column(String(20), primary_key=True)


class UsageUserMonthly(_Sums, Base):
    """Per UTC month (its first day) and user: what bounds a user's cost over any range inside it."""

    __tablename__ = "usage_user_monthly"
    __table_args__ = (Index("ix_usage_user_monthly_month_cost_usd", "month", text("cost_usd DESC"), "user_id"),)

    month: Mapped[date] = mapped_column(Date, primary_key=True)
    user_id: Mapped[str] = mapped_column(String(200), primary_key=True)


class UsagePending(Base):
    """A call under way: written with its limit check, gone once its usage row is (app/usage/ledger.py)."""

    __tablename__ = "usage_pending"

    call_id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The gateway process the call runs in (app/instances.py).
    owner: Mapped[uuid.UUID] = mapped_column(UUID)
    request_id: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str] = mapped_column(String(200))
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(UUID)
    route: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(100))
    stream: Mapped[bool] = mapped_column(Boolean)
    # What the call reserved: its charge if its process dies before it ends.
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    images: Mapped[int] = mapped_column(Integer)
    cost_usd: Mapped[Decimal] = mapped_column(Numeric(14, 8))
    thread_id: Mapped[uuid.UUID | None] = mapped_column(UUID)


class UsageQuarantine(Base):
    """Usage entries the database refused even one by one: kept for an operator, never retried."""

    __tablename__ = "usage_quarantine"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    call_id: Mapped[uuid.UUID] = mapped_column(UUID, server_default=text("gen_random_uuid()"))
    error: Mapped[str] = mapped_column(Text)
    entry: Mapped[dict[str, Any]] = mapped_column(JSONB)
