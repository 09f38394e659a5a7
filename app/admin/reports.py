"""Admin reports: usage aggregates, top users by cost and limit refusals, as JSON or CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, TypeGuard, get_args

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel
from starlette.responses import Response

from app.admin import reports_repository as repository
from app.admin.reports_repository import (
    COLUMNS,
    DEFAULT_USERS,
    MAX_GROUPS,
    MAX_USERS,
    METRICS,
    Period,
    TooManyGroups,
    UserPage,
)
from app.admin.reports_schemas import Dimension, RefusalReport, TopUsersReport, UsageEventPage, UsageReport
from app.deps import AdminGuard, SessionDep
from app.errors import InvalidRequest, error_responses
from app.validation import UserId

MAX_DAYS = 366
DEFAULT_DAYS = 30
NO_STORE = {"cache-control": "no-store", "vary": "accept"}

router = APIRouter(
    prefix="/reports", tags=["admin"], dependencies=[AdminGuard], responses=error_responses(400, 401, 403)
)


def csv_response(description: str) -> dict[int | str, dict[str, Any]]:
    """The 200 entry: JSON by default, CSV with a header row when the request sends `Accept: text/csv`."""
    return {
        200: {
            "description": f"JSON, or with `Accept: text/csv` a CSV file: {description}",
            "content": {"text/csv": {"schema": {"type": "string"}}},
        }
    }


def wants_csv(request: Request) -> bool:
    """True when `text/csv` is acceptable and preferred to JSON (ties go to JSON)."""
    quality: dict[str, float] = {}
    for item in request.headers.get("accept", "").split(","):
        media_type, *params = (part.strip() for part in item.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        quality[media_type.lower()] = max(q, quality.get(media_type.lower(), 0.0))
    return quality.get("text/csv", 0.0) > quality.get("application/json", 0.0)


def _cell(value: object) -> object:
    if isinstance(value, float):
        return format(Decimal(repr(value)), "f")  # 1e-05 -> 0.00001: what spreadsheets expect
    return "" if value is None else value


def to_csv(name: str, period: Period, header: Sequence[str], rows: Iterable[BaseModel]) -> Response:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for row in rows:
        writer.writerow([_cell(getattr(row, column)) for column in header])
    filename = f"{name}_{period.start.isoformat()}_{period.end.isoformat()}.csv"
    headers = {**NO_STORE, "content-disposition": f'attachment; filename="{filename}"'}
    return Response(out.getvalue(), media_type="text/csv", headers=headers)


# A range's bounds are days and the next midnight after `end`, as UTC instants: the first and the
# last day of Python's calendar cannot take that arithmetic (OverflowError, a 500), so a range lies
# between the two days inside them. MAX_DAYS bounds its length.
EARLIEST, LATEST = date.min + timedelta(days=1), date.max - timedelta(days=1)
DEFAULT_SPAN = timedelta(days=DEFAULT_DAYS - 1)


def _within_calendar(day: date, param: str) -> date:
    if not EARLIEST <= day <= LATEST:
        raise InvalidRequest(f"'{param}' ({day}) must lie between {EARLIEST} and {LATEST}.", param=param)
    return day


async def report_period(
    start: Annotated[
        date | None,
        Query(description=f"First UTC day, included (YYYY-MM-DD); default {DEFAULT_DAYS - 1} days before `end`."),
    ] = None,
    end: Annotated[date | None, Query(description="Last UTC day, included (YYYY-MM-DD); default today.")] = None,
) -> Period:
    end = _within_calendar(end, "end") if end else datetime.now(UTC).date()
    if start:
        start = _within_calendar(start, "start")
    else:  # never before the first day a range may start on
        start = end - DEFAULT_SPAN if end - EARLIEST >= DEFAULT_SPAN else EARLIEST
    if end < start:
        raise InvalidRequest(f"'end' ({end}) is before 'start' ({start}).", param="end")
    period = Period(start, end)
    if period.days > MAX_DAYS:
        raise InvalidRequest(
            f"A report covers at most {MAX_DAYS} days from 'start' to 'end'; this range has {period.days}.", param="end"
        )
    return period


PeriodDep = Annotated[Period, Depends(report_period)]


def _is_dimension(name: str) -> TypeGuard[Dimension]:
    return name in get_args(Dimension)


def parse_group_by(value: str) -> list[Dimension]:
    names = [part.strip() for part in value.split(",") if part.strip()]
    dimensions = [name for name in names if _is_dimension(name)]
    if len(dimensions) < len(names) or not names:
        raise InvalidRequest(
            f"Invalid 'group_by' {value!r}: a comma-separated list of {', '.join(get_args(Dimension))}.",
            param="group_by",
        )
    return list(dict.fromkeys(dimensions))


@router.get(
    "/usage",
    response_model=UsageReport,
    responses=csv_response(
        'one row per group, then the metrics; grouped by user, a `Link: <...>; rel="next"` header while users follow.'
    ),
)
async def usage_report(
    request: Request,
    session: SessionDep,
    period: PeriodDep,
    group_by: Annotated[
        str, Query(max_length=100, description="Comma-separated dimensions: day, model, user, route.")
    ] = "day",
    user_id: Annotated[UserId | None, Query(description="Only this user's calls.")] = None,
    after: Annotated[
        UserId | None, Query(description="Grouped by user: the users after this one (a `last_id`).")
    ] = None,
    limit: Annotated[
        int | None, Query(ge=1, le=MAX_USERS, description=f"Grouped by user: how many users (default {DEFAULT_USERS}).")
    ] = None,
) -> Response:
    """Requests, tokens, images and cost over a range of UTC days, grouped by day, model, user and/or route."""
    dimensions = parse_group_by(group_by)
    paged = "user" in dimensions and user_id is None
    if not paged and (after is not None or limit is not None):
        name = "after" if after is not None else "limit"
        raise InvalidRequest(
            f"'{name}' pages the users of a report grouped by user (and not for one user_id).", param=name
        )
    page = UserPage(after, limit or DEFAULT_USERS) if paged else None
    try:
        report = await repository.usage(session, period, dimensions, user_id, page)
    except TooManyGroups:
        raise InvalidRequest(
            f"More than {MAX_GROUPS} groups: narrow the range or group by fewer dimensions.", param="group_by"
        ) from None
    if wants_csv(request):
        header = [COLUMNS[name] for name in dimensions] + list(METRICS)
        response = to_csv("usage", period, header, report.data)
        if report.has_more and report.last_id is not None:
            response.headers["link"] = f'<{request.url.include_query_params(after=report.last_id)}>; rel="next"'
        return response
    return _json(report)


@router.get(
    "/top-users", response_model=TopUsersReport, responses=csv_response("one row per user, most expensive first.")
)
async def top_users_report(
    request: Request,
    session: SessionDep,
    period: PeriodDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="How many users.")] = 10,
) -> Response:
    """The users with the highest cost over a range of UTC days."""
    report = await repository.top_users(session, period, limit)
    if wants_csv(request):
        header = ["user_id", "requests", "prompt_tokens", "completion_tokens", "images", "cost_usd"]
        return to_csv("top_users", period, header, report.data)
    return _json(report)


@router.get("/users/{user_id}/events")
async def user_events(
    user_id: UserId,
    session: SessionDep,
    before: Annotated[datetime | None, Query(description="The page after: a page's `next_before`.")] = None,
    before_id: Annotated[int | None, Query(ge=1, description="With `before`: the page's `next_before_id`.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="How many calls.")] = 100,
) -> UsageEventPage:
    """One user's calls as the ledger holds them, newest first: the drill-down behind the reports (which
    read the rollups), bounded by the (user, time) index however large the ledger grows."""
    if (before is None) != (before_id is None):
        raise InvalidRequest("Send 'before' and 'before_id' together, as a page gave them.", param="before_id")
    cursor = (before, before_id) if before is not None and before_id is not None else None
    return await repository.user_events(session, user_id, cursor, limit)


@router.get("/refusals", response_model=RefusalReport, responses=csv_response("columns day, code, refusals."))
async def refusals_report(request: Request, session: SessionDep, period: PeriodDep) -> Response:
    """Requests refused by the callers' own rate limits, quotas and budgets, by limit and by day."""
    report = await repository.refusals(session, period)
    if wants_csv(request):
        return to_csv("refusals", period, ["day", "code", "refusals"], report.by_day)
    return _json(report)


def _json(report: BaseModel) -> Response:
    return Response(report.model_dump_json(), media_type="application/json", headers=NO_STORE)
