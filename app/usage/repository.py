"""A user's usage, from the daily rollup (`usage_daily`, by user and day): a month is at most ~31 rows
per model, route and status, however many calls it had."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import TypeVar

from sqlalchemy import BigInteger, ColumnElement, Select, SQLColumnExpression, cast, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import UsageDaily
from app.usage.schemas import ModelUsage, PeriodUsage, UsageSummary

Number = TypeVar("Number", int, Decimal)


def _total(column: SQLColumnExpression[Number], where: ColumnElement[bool] | None = None) -> ColumnElement[Number]:
    """The column's sum over the group (only the rows matching `where`, when given); 0, not NULL, for none."""
    aggregate = func.sum(column)
    return func.coalesce(aggregate.filter(where) if where is not None else aggregate, 0)


def _count(column: SQLColumnExpression[int], where: ColumnElement[bool] | None = None) -> ColumnElement[int]:
    """A sum of counts, as an integer (Postgres sums bigints as numeric)."""
    return cast(_total(column, where), BigInteger)


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
    """Today's and this month's totals in one read of the month's rollup rows (user_id, day index)."""
    now = datetime.now(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month = day.replace(day=1)
    e = UsageDaily
    in_day = e.day == day.date()
    # select() types at most ten columns; these thirteen are the model, then its month and its day.
    query: Select[str, int, int, int, int, int, Decimal, int, int, int, int, int, Decimal] = (
        select(
            e.model,
            _count(e.calls),
            _count(e.prompt_tokens),
            _count(e.completion_tokens),
            _count(e.cached_tokens),
            _count(e.images),
            _total(e.cost_usd),
            _count(e.calls, in_day),
            _count(e.prompt_tokens, in_day),
            _count(e.completion_tokens, in_day),
            _count(e.cached_tokens, in_day),
            _count(e.images, in_day),
            _total(e.cost_usd, in_day),
        )
        .where(e.user_id == user_id, e.day >= month.date())
        .group_by(e.model)
        .order_by(e.model)
    )
    month_rows: list[ModelUsage] = []
    day_rows: list[ModelUsage] = []
    for row in await session.execute(query):
        model = row[0]
        month_rows.append(_model_usage(model, *row[1:7]))
        if row[7]:
            day_rows.append(_model_usage(model, *row[7:]))
    return UsageSummary(user_id=user_id, today=_period(day, day_rows), month=_period(month, month_rows))


def _model_usage(
    model: str, requests: int, prompt: int, completion: int, cached: int, images: int, cost: Decimal
) -> ModelUsage:
    return ModelUsage(
        model=model,
        requests=requests,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        images=images,
        cost_usd=float(cost),
    )
