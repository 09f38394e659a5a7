"""Usage queries."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import UsageEvent
from app.usage.schemas import ModelUsage, PeriodUsage, UsageSummary


def _period(since: datetime, rows: list[ModelUsage]) -> PeriodUsage:
    return PeriodUsage(
        since=since,
        requests=sum(r.requests for r in rows),
        prompt_tokens=sum(r.prompt_tokens for r in rows),
        completion_tokens=sum(r.completion_tokens for r in rows),
        cost_usd=round(sum(r.cost_usd for r in rows), 8),
        by_model=rows,
    )


async def summary(session: AsyncSession, user_id: str) -> UsageSummary:
    """Today's and this month's totals in one scan of the month (user_id, created_at index)."""
    now = datetime.now(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month = day.replace(day=1)
    e = UsageEvent
    in_day = e.created_at >= day

    def total(column, where=None):  # type: ignore[no-untyped-def]
        aggregate = func.sum(column)
        return func.coalesce(aggregate.filter(where) if where is not None else aggregate, 0)

    query = (
        select(
            e.model,
            func.count(),
            total(e.prompt_tokens),
            total(e.completion_tokens),
            total(e.cached_tokens),
            total(e.images),
            total(e.cost_usd),
            func.count().filter(in_day),
            total(e.prompt_tokens, in_day),
            total(e.completion_tokens, in_day),
            total(e.cached_tokens, in_day),
            total(e.images, in_day),
            total(e.cost_usd, in_day),
        )
        .where(e.user_id == user_id, e.created_at >= month)
        .group_by(e.model)
        .order_by(e.model)
    )
    month_rows, day_rows = [], []
    for model, *values in (await session.execute(query)).all():
        month_rows.append(ModelUsage(model=model, **_fields(values[:6])))
        if values[6]:
            day_rows.append(ModelUsage(model=model, **_fields(values[6:])))
    return UsageSummary(user_id=user_id, today=_period(day, day_rows), month=_period(month, month_rows))


def _fields(values: list[object]) -> dict[str, object]:
    requests, prompt, completion, cached, images, cost = values
    return {
        "requests": requests,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_tokens": cached,
        "images": images,
        "cost_usd": float(cost),  # type: ignore[arg-type]
    }
