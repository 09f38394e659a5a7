"""Report queries: usage from the daily rollups, refusals from theirs (`refusal_daily`), for a range of
UTC days.

The rollup holds one row per day and (user, model, route, status, upstream), kept exact by
the ledger's triggers, so a report reads as many rows as there were such groups, however
many calls they sum. Every statement filters on its day (or `created_at`) first; the
statements are built apart from running them so `bench/admin_queries.py` can EXPLAIN exactly
these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    CompoundSelect,
    Row,
    Select,
    SQLColumnExpression,
    cast,
    func,
    or_,
    select,
    union_all,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from app.admin.reports_schemas import (
    Dimension,
    RefusalCount,
    RefusalDay,
    RefusalReport,
    TopUsersReport,
    UsageEventPage,
    UsageEventRow,
    UsageReport,
)
from app.models import RefusalDaily, UsageDaily, UsageDailyTotals, UsageEvent, UsageUserDaily, UsageUserMonthly

# More groups than this is a question the range or the grouping should narrow.
MAX_GROUPS = 100_000
# A report grouped by user covers this many users unless asked for another page size.
DEFAULT_USERS = 100
MAX_USERS = 1000
# Top users: past this many candidates, summing every user's days is as quick.
CANDIDATES_MAX = 20_000


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


Rollup = type[UsageDaily] | type[UsageDailyTotals] | type[UsageUserDaily]
# Per dimension: its column's name in the report (and in the rollups).
COLUMNS: dict[Dimension, str] = {"day": "day", "model": "model", "user": "user_id", "route": "route"}


def rollup_for(group_by: Sequence[Dimension], user_id: str | None) -> Rollup:
    """The narrowest rollup that has every column asked for: every user's days, models and routes
    (`usage_daily_totals`), users by day (`usage_user_daily`), or the whole detail (`usage_daily`)."""
    if user_id is None and "user" not in group_by:
        return UsageDailyTotals
    if set(group_by) <= {"day", "user"}:
        return UsageUserDaily
    return UsageDaily


METRICS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens", "images", "cost_usd")


Number = TypeVar("Number", int, Decimal)


def _total(column: SQLColumnExpression[Number]) -> ColumnElement[Number]:
    """The column's sum over the group; 0, not NULL, for a group with no values."""
    return func.coalesce(func.sum(column), 0)


def _count(column: SQLColumnExpression[int], where: ColumnElement[bool] | None = None) -> ColumnElement[int]:
    """A sum of counts, as an integer (Postgres sums bigints as numeric)."""
    total = func.sum(column)
    return cast(func.coalesce(total.filter(where) if where is not None else total, 0), BigInteger)


def _metrics(d: Rollup) -> list[ColumnElement[Any]]:
    return [
        _count(d.calls).label("requests"),
        _count(d.calls, d.status == "error").label("errors"),
        _count(d.prompt_tokens).label("prompt_tokens"),
        _count(d.completion_tokens).label("completion_tokens"),
        _count(d.cached_tokens).label("cached_tokens"),
        _count(d.images).label("images"),
        _total(d.cost_usd).label("cost_usd"),
    ]


def usage_statement(
    period: Period, group_by: Sequence[Dimension], user_id: str | None = None, users: Sequence[str] | None = None
) -> Select[*tuple[Any, ...]]:
    """The chosen dimensions, then METRICS: how many columns depends on `group_by`. Of `users` only,
    when given (a page of them, read down the rollup's (user_id, day) index)."""
    d = rollup_for(group_by, user_id)
    columns: list[InstrumentedAttribute[Any]] = [getattr(d, COLUMNS[name]) for name in group_by]
    query = (
        select(
            *(column.label(COLUMNS[name]) for name, column in zip(group_by, columns, strict=True)),
            *_metrics(d),
        )
        .where(d.day >= period.start, d.day <= period.end)
        .group_by(*columns)
        .order_by(*columns)
        .limit(MAX_GROUPS + 1)
    )
    if user_id is not None:
        query = query.where(getattr(d, "user_id") == user_id)  # noqa: B009  # not on every rollup's type
    if users is not None:
        query = query.where(getattr(d, "user_id").in_(users))  # noqa: B009
    return query


def users_page_statement(period: Period, after: str | None, limit: int) -> Select[str]:
    """The next `limit` users (by id) with calls in the period: the index on (user_id, day) is read in
    order and the scan stops once the page is full, however many users there are."""
    d = UsageUserDaily
    query = select(d.user_id).where(d.day >= period.start, d.day <= period.end)
    if after is not None:
        query = query.where(d.user_id > after)
    return query.group_by(d.user_id).order_by(d.user_id).limit(limit)


def totals_statement(period: Period, user_id: str | None = None) -> Select[*tuple[Any, ...]]:
    """The period's METRICS over every group: from the rollup without users, or the one user's days."""
    d: Rollup = UsageDailyTotals if user_id is None else UsageUserDaily
    query = select(*_metrics(d)).where(d.day >= period.start, d.day <= period.end)
    return query if user_id is None else query.where(UsageUserDaily.user_id == user_id)


def top_users_statement(
    period: Period, limit: int, users: Sequence[str] | None = None
) -> Select[str, int, int, int, int, Decimal]:
    """Exact sums per user from the daily rollup; of `users` only, when given (down the user index)."""
    d = UsageUserDaily
    cost = _total(d.cost_usd)
    query = (
        select(
            d.user_id,
            _count(d.calls).label("requests"),
            _count(d.prompt_tokens).label("prompt_tokens"),
            _count(d.completion_tokens).label("completion_tokens"),
            _count(d.images).label("images"),
            cost.label("cost_usd"),
        )
        .where(d.day >= period.start, d.day <= period.end)
        .group_by(d.user_id)
        .order_by(cost.desc(), d.user_id)
        .limit(limit)
    )
    return query.where(d.user_id.in_(users)) if users is not None else query


def months_of(period: Period) -> list[date]:
    """The first day of each month the period touches."""
    first, last = period.start.year * 12 + period.start.month - 1, period.end.year * 12 + period.end.month - 1
    return [date(n // 12, n % 12 + 1, 1) for n in range(first, last + 1)]


def month_leaders_statement(period: Period, n: int) -> CompoundSelect[date, str, Decimal]:
    """Each month the period touches: its `n` costliest users, read down the (month, cost_usd DESC)
    index, n rows a month however many users there are."""
    m = UsageUserMonthly
    return union_all(
        *(
            select(m.month, m.user_id, m.cost_usd).where(m.month == month).order_by(m.cost_usd.desc()).limit(n)
            for month in months_of(period)
        )
    )


r = RefusalDaily


def refusals_by_day_statement(period: Period) -> Select[date, str, int]:
    return (
        select(r.day, r.code, cast(r.refusals, BigInteger).label("refusals"))
        .where(r.day >= period.start, r.day <= period.end)
        .order_by(r.day, r.code)
    )


@dataclass(frozen=True, slots=True)
class UserPage:
    """Which users a report grouped by user covers: those after `after` (by id), `limit` of them."""

    after: str | None = None
    limit: int = DEFAULT_USERS


async def usage(
    session: AsyncSession,
    period: Period,
    group_by: Sequence[Dimension],
    user_id: str | None = None,
    page: UserPage | None = None,
) -> UsageReport:
    """The groups, and the period's totals over all of them. Grouped by user (and not for one user), a
    page of users: every user may have been active, and one page is all a report needs to read."""
    listed: list[str] | None = None  # the page's users, when the report pages them
    more = False
    if "user" in group_by and user_id is None:
        page = page or UserPage()
        listed = list(await session.scalars(users_page_statement(period, page.after, page.limit + 1)))
        more, listed = len(listed) > page.limit, listed[: page.limit]
    totals = (await session.execute(totals_statement(period, user_id))).mappings().one()
    # Plain dicts: pydantic reads them at C speed, a RowMapping one `get` at a time.
    result = await session.execute(usage_statement(period, group_by, user_id, listed))
    keys = tuple(result.keys())
    rows = [dict(zip(keys, row, strict=True)) for row in result]
    if len(rows) > MAX_GROUPS:
        raise TooManyGroups
    return UsageReport.model_validate(
        {
            "start": period.start,
            "end": period.end,
            "group_by": group_by,
            "data": rows,
            "totals": totals,
            "first_id": listed[0] if listed else None,
            "last_id": listed[-1] if listed else None,
            "has_more": more,
        }
    )


def user_events_statement(user_id: str, before: tuple[datetime, int] | None, limit: int) -> Select[UsageEvent]:
    """A user's newest raw rows, those before `(created_at, id)` when given: read down the (user_id,
    created_at) index, `limit` + 1 at most."""
    e = UsageEvent
    query = select(e).where(e.user_id == user_id)
    if before is not None:
        at, row_id = before
        query = query.where(e.created_at <= at, or_(e.created_at < at, e.id < row_id))
    return query.order_by(e.created_at.desc(), e.id.desc()).limit(limit + 1)


async def user_events(
    session: AsyncSession, user_id: str, before: tuple[datetime, int] | None, limit: int
) -> UsageEventPage:
    """The only report that reads the ledger itself: one user's calls, a page at a time."""
    rows = list(await session.scalars(user_events_statement(user_id, before, limit)))
    more = len(rows) > limit
    rows = rows[:limit]
    data = [UsageEventRow.model_validate(row, from_attributes=True) for row in rows]
    last = rows[-1] if more else None
    return UsageEventPage(
        user_id=user_id,
        data=data,
        next_before=last.created_at if last else None,
        next_before_id=last.id if last else None,
    )


async def top_users(session: AsyncSession, period: Period, limit: int) -> TopUsersReport:
    """The `limit` costliest users of the period, exactly, without summing every user's days.

    Candidates are each month's `n` costliest users (a month's cost bounds the period's part of
    it). A user who is not one costs at most the n-th cost of each month, so at most their sum,
    `ceiling`: once the last of the candidates' exact top costs more, no one else can be in it.
    Otherwise more candidates, and past CANDIDATES_MAX the plain sum over everyone."""
    n = limit * 4
    while n <= CANDIDATES_MAX:
        leaders = (await session.execute(month_leaders_statement(period, n))).all()
        by_month: dict[date, list[Decimal]] = {}
        for month, _, cost in leaders:
            by_month.setdefault(month, []).append(cost)
        # A month with fewer than n users has all of them among the candidates: it adds nothing.
        ceiling = sum((costs[-1] for costs in by_month.values() if len(costs) == n), Decimal(0))
        everyone = all(len(costs) < n for costs in by_month.values())
        users = sorted({user for _, user, _ in leaders})
        exact = (await session.execute(top_users_statement(period, limit, users))).all()
        if everyone or (len(exact) == limit and exact[-1].cost_usd > ceiling):
            return _top_users_report(period, exact)
        n *= 4
    return _top_users_report(period, (await session.execute(top_users_statement(period, limit))).all())


def _top_users_report(period: Period, rows: Sequence[Row[str, int, int, int, int, Decimal]]) -> TopUsersReport:
    data = [row._asdict() for row in rows]
    return TopUsersReport.model_validate({"start": period.start, "end": period.end, "data": data})


async def refusals(session: AsyncSession, period: Period) -> RefusalReport:
    """By code and by day from one scan of the range: the by-code counts are sums of the daily ones."""
    rows = (await session.execute(refusals_by_day_statement(period))).mappings().all()
    by_day = [RefusalDay.model_validate(row) for row in rows]
    counts: dict[str, int] = {}
    for row in by_day:
        counts[row.code] = counts.get(row.code, 0) + row.refusals
    by_code = [RefusalCount(code=code, refusals=n) for code, n in sorted(counts.items(), key=lambda c: (-c[1], c[0]))]
    return RefusalReport(start=period.start, end=period.end, total=sum(counts.values()), by_code=by_code, by_day=by_day)
