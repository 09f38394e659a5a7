"""Admin report bodies: usage aggregates, top users by cost, limit refusals."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

Dimension = Literal["day", "model", "user", "route"]


class UsageMetrics(BaseModel):
    requests: int
    errors: int = Field(description="Calls whose status is `error`.")
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    images: int
    cost_usd: float


class UsageReportRow(UsageMetrics):
    """One group; the dimensions not grouped by are null."""

    day: date | None = Field(None, description="UTC day.")
    model: str | None = None
    user_id: str | None = None
    route: str | None = None


class UsageReport(BaseModel):
    """Usage over a range of UTC days, grouped by the chosen dimensions. Grouped by user, one page of
    users (by id): the next page is `after` = `last_id`, while `has_more`."""

    start: date
    end: date
    group_by: list[Dimension]
    data: list[UsageReportRow]
    totals: UsageMetrics = Field(description="The whole period's, every page's groups together.")
    first_id: str | None = Field(None, description="Grouped by user: the page's first user.")
    last_id: str | None = Field(None, description="Grouped by user: the page's last user.")
    has_more: bool = Field(False, description="Grouped by user: whether users follow `last_id`.")


class TopUser(BaseModel):
    user_id: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    images: int
    cost_usd: float


class TopUsersReport(BaseModel):
    """The users who cost the most over a range of UTC days, most expensive first."""

    start: date
    end: date
    data: list[TopUser]


class UsageEventRow(BaseModel):
    """One call as the ledger holds it."""

    call_id: uuid.UUID
    created_at: datetime
    request_id: str
    route: str
    model: str
    status: str
    http_status: int
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    tokens_estimated: bool
    images: int
    cost_usd: float
    latency_ms: float
    upstream: str | None = Field(description="The upstream that answered; null: simulated.")
    error_code: str | None
    thread_id: uuid.UUID | None
    detail: dict[str, Any] | None


class UsageEventPage(BaseModel):
    """A user's calls, newest first; `next_before` with `next_before_id` page on (null: the last page)."""

    user_id: str
    data: list[UsageEventRow]
    next_before: datetime | None
    next_before_id: int | None


class RefusalCount(BaseModel):
    code: str = Field(
        description="The limit that refused: rate_limit_exceeded, daily_quota_exceeded, budget_exceeded,"
        " too_many_streams."
    )
    refusals: int


class RefusalDay(RefusalCount):
    day: date = Field(description="UTC day.")


class RefusalReport(BaseModel):
    """Requests refused by the callers' own limits, by limit and by day."""

    start: date
    end: date
    total: int
    by_code: list[RefusalCount]
    by_day: list[RefusalDay]
