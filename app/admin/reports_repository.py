"""Report queries: SQL aggregates over `usage_event` and `limit_refusal` for a range of UTC days.

Every statement filters on `created_at` first, so a range reads through the
`created_at` index and never the whole table; the statements are built apart
from running them so `bench/admin_queries.py` can EXPLAIN exactly these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Date, Select, SQLColumnExpression, cast, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from app.admin.reports_schemas import (
    Dimension,
    RefusalCount,
    RefusalDay,
    RefusalReport,
    TopUsersReport,
    UsageReport,
)
from app.models import LimitRefusal, UsageEvent

# More groups than this is a question the range or the grouping should narrow.
MAX_GROUPS = 100_000


class TooManyGroups(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Period:
    """UTC days from `start` to `end`, both included."""

    start: date
    end: date

    @property
    def since(self) -> datetime:
        return datetime.combine(self.start, time(), UTC)

    @property
    def until(self) -> datetime:
        return datetime.combine(self.end + timedelta(days=1), time(), UTC)

    @property
    def days(self) -> int:
        return (self.end - self.start).days + 1


def utc_day(column: SQLColumnExpression[datetime]) -> ColumnElement[date]:
    # A literal zone, not a bind parameter: GROUP BY must repeat the select's expression exactly.
    return cast(func.timezone(literal_column("'UTC'"), column), Date)


e = UsageEvent
# Per dimension: its column's name in the report, and what it groups by (the UTC day is computed).
DIMENSIONS: dict[Dimension, tuple[str, ColumnElement[date] | InstrumentedAttribute[str]]] = {
    "day": ("day", utc_day(e.created_at)),
    "model": ("model", e.model),
    "user": ("user_id", e.user_id),
    "route": ("route", e.route),
}
METRICS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens", "images", "cost_usd")


Number = TypeVar("Number", int, Decimal)


def _total(column: SQLColumnExpression[Number]) -> ColumnElement[Number]:
    """The column's sum over the group; 0, not NULL, for a group with no values."""
    return func.coalesce(func.sum(column), 0)


def usage_statement(
    period: Period, group_by: Sequence[Dimension], user_id: str | None = None
) -> Select[*tuple[Any, ...]]:
    """The chosen dimensions, then METRICS: how many columns depends on `group_by`."""
    columns = [DIMENSIONS[name][1] for name in group_by]
    query = (
        select(
            *(column.label(DIMENSIONS[name][0]) for name, column in zip(group_by, columns, strict=True)),
            func.count().label("requests"),
            func.count().filter(e.status == "error").label("errors"),
            _total(e.prompt_tokens).label("prompt_tokens"),
            _total(e.completion_tokens).label("completion_tokens"),
            _total(e.cached_tokens).label("cached_tokens"),
            _total(e.images).label("images"),
            _total(e.cost_usd).label("cost_usd"),
        )
        .where(e.created_at >= period.since, e.created_at < period.until)
        .group_by(*columns)
        .order_by(*columns)
        .limit(MAX_GROUPS + 1)
    )
    if user_id is not None:
        query = query.where(e.user_id == user_id)
    return query


def top_users_statement(period: Period, limit: int) -> Select[str, int, int, int, int, Decimal]:
    cost = _total(e.cost_usd)
    return (
        select(
            e.user_id,
            func.count().label("requests"),
            _total(e.prompt_tokens).label("prompt_tokens"),
            _total(e.completion_tokens).label("completion_tokens"),
            _total(e.images).label("images"),
            cost.label("cost_usd"),
        )
        .where(e.created_at >= period.since, e.created_at < period.until)
        .group_by(e.user_id)
        .order_by(cost.desc(), e.user_id)
        .limit(limit)
    )


r = LimitRefusal


def refusals_by_day_statement(period: Period) -> Select[date, str, int]:
    day = utc_day(r.created_at)
    return (
        select(day.label("day"), r.code, func.count().label("refusals"))
        .where(r.created_at >= period.since, r.created_at < period.until)
        .group_by(day, r.code)
        .order_by(day, r.code)
    )


async def usage(
    session: AsyncSession, period: Period, group_by: Sequence[Dimension], user_id: str | None = None
) -> UsageReport:
    rows = (await session.execute(usage_statement(period, group_by, user_id))).mappings().all()
    if len(rows) > MAX_GROUPS:
        raise TooManyGroups
    totals: dict[str, int | Decimal] = dict.fromkeys(METRICS, 0)
    for row in rows:
        for name in METRICS:
            totals[name] += row[name]
    return UsageReport.model_validate(
        {"start": period.start, "end": period.end, "group_by": group_by, "data": rows, "totals": totals}
    )


async def top_users(session: AsyncSession, period: Period, limit: int) -> TopUsersReport:
    rows = (await session.execute(top_users_statement(period, limit))).mappings().all()
    return TopUsersReport.model_validate({"start": period.start, "end": period.end, "data": rows})


async def refusals(session: AsyncSession, period: Period) -> RefusalReport:
    """By code and by day from one scan of the range: the by-code counts are sums of the daily ones."""
    rows = (await session.execute(refusals_by_day_statement(period))).mappings().all()
    by_day = [RefusalDay.model_validate(row) for row in rows]
    counts: dict[str, int] = {}
    for row in by_day:
        counts[row.code] = counts.get(row.code, 0) + row.refusals
    by_code = [RefusalCount(code=code, refusals=n) for code, n in sorted(counts.items(), key=lambda c: (-c[1], c[0]))]
    return RefusalReport(start=period.start, end=period.end, total=sum(counts.values()), by_code=by_code, by_day=by_day)
