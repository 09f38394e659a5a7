"""Usage report shapes."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class ModelUsage(BaseModel):
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    images: int
    cost_usd: float


class PeriodUsage(BaseModel):
    since: datetime
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    by_model: list[ModelUsage]


class UsageSummary(BaseModel):
    """Totals from the usage records; the newest calls can take a moment to appear."""

    user_id: str
    today: PeriodUsage
    month: PeriodUsage
