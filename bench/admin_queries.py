"""Times every admin report, and the per-user summary, on the rollups as the code reads them and as a raw
scan of the ledger, at one or several ledger sizes.

    .venv/bin/python bench/admin_queries.py [--rows 3000000 | --sizes 1M,3M,10M] [--days 90] [--users 20000]
                                            [--repeat 20] [--raw-repeat N] [--jobs 2] [--keep]

Postgres is `BENCH_DATABASE_URL` or `TEST_DATABASE_URL` when set, else
postgresql://postgres@127.0.0.1:5432/test. Each size gets a scratch database
(`gateway_bench_admin_<pid>`; with several sizes `gateway_bench_admin_<pid>_<rows>`), migrated
with Alembic (so the partitions, rollups, triggers and indexes are the migrations'), dropped when
its size is measured unless `--keep`, which prints `kept database NAME`.

Seeding makes sure the months of the `--days` days up to yesterday have partitions
(`app.usage.partitions.ensure`), then INSERTs ... SELECT generate_series `--rows` usage rows in
chunks, in time order (as the usage writer appends them; users skewed so a few are heavy), over
`--jobs` connections each writing its own stretch of time. Every chunk goes through the ledger's
triggers, so the rollups are what production would have; the seeding rate printed (rows/s)
includes them. Then one refusal per 20 rows, and VACUUM ANALYZE.

Each report runs as the routes run it, on an AsyncSession; the SQL it sends is captured and timed
alone (the `rollup` columns: p50 and p99 of `--repeat` runs after a warm-up, over asyncpg), and
beside it the same groups and sums read straight from `usage_event` with `created_at` filters
(the `raw` columns). `route p50` is the repository function itself (statement, rows to pydantic).
`same` says whether the two gave the same rows, `rows read` what the scans of each plan read
(EXPLAIN ANALYZE), and a `!` marks a report whose statement or function takes 100 ms p50 or more
(its plan is printed in full, EXPLAIN ANALYZE BUFFERS). With several sizes, a last table puts
each report's p50s side by side, with the seeding rate of each size.
The per-user summary runs twice: today (its month is the days of this month so far) and frozen at
the last day of the previous month (a whole month of rows). Refusals and a user's event page read
their own tables whatever the rollups, so they have no raw twin.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from functools import partial
from pathlib import Path
from typing import Any, Self
from unittest import mock
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app import migrations
from app.admin import reports_repository as reports
from app.admin.reports_repository import COLUMNS, MAX_GROUPS, Period
from app.admin.reports_schemas import Dimension
from app.db import sqlalchemy_url
from app.usage import partitions
from app.usage import repository as usage_repository

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/test"
CHUNK = 250_000
SLOW_MS = 100.0
HEAVY_USER = "user-0"  # floor(users * random()^3): about 4% of all rows

# Rows land in time order, a few users are heavy (random()^3), models and routes are weighted, a
# few calls failed over to a second upstream. $1 start, $2 first g, $3 rows in all, $4 days, $5
# users, $6 rows in this chunk.
SEED_USAGE = """
INSERT INTO usage_event (created_at, request_id, user_id, route, model, status, http_status, stream,
                         prompt_tokens, completion_tokens, cached_tokens, tokens_estimated, images, cost_usd,
                         latency_ms, upstream)
SELECT $1::timestamptz + (s.g / $3::float8) * ($4::text || ' days')::interval,
       'req_' || s.g,
       'user-' || floor($5::int * power(s.who, 3))::int,
       m.route, m.model,
       CASE WHEN s.fail < 0.02 THEN 'error' ELSE 'ok' END,
       200, s.fail > 0.5,
       t.prompt, t.completion, t.prompt / 4, false, m.images,
       round(((t.prompt * m.input + t.completion * m.output) / 1e6 + m.images * 0.04)::numeric, 8),
       50 + s.fail * 900,
       CASE WHEN s.fail > 0.95 THEN 'backup' ELSE 'default' END
FROM (
    SELECT g, (random() * 100)::int AS pick, random() AS who, random() AS fail, random() AS a, random() AS b
    FROM generate_series($2::bigint, $2::bigint + $6::int - 1) AS g
) AS s
JOIN (VALUES
    (0, 55, 'chat.completions', 'gpt-5-mini', 0.25, 2.0, 0),
    (55, 70, 'chat.completions', 'gpt-5', 1.25, 10.0, 0),
    (70, 80, 'chat.completions', 'gpt-5-nano', 0.05, 0.4, 0),
    (80, 92, 'threads.runs', 'gpt-5-mini', 0.25, 2.0, 0),
    (92, 98, 'images.generations', 'gpt-image-1', 0.0, 0.0, 1),
    (98, 101, 'realtime.client_secrets', 'gpt-realtime', 0.0, 0.0, 0)
) AS m(lo, hi, route, model, input, output, images) ON s.pick >= m.lo AND s.pick < m.hi
CROSS JOIN LATERAL (
    SELECT CASE WHEN m.images = 0 THEN (50 + s.a * 2000)::int ELSE 0 END AS prompt,
           CASE WHEN m.images = 0 THEN (10 + s.b * 600)::int ELSE 0 END AS completion
) AS t
ORDER BY s.g
"""

SEED_REFUSALS = """
INSERT INTO limit_refusal (created_at, user_id, route, code)
SELECT $1::timestamptz + (g::float8 / $2::int) * ($3::text || ' days')::interval,
       'user-' || floor($4::int * power(random(), 3))::int,
       (ARRAY['/v1/chat/completions', '/v1/images/generations', '/v1/threads/{thread_id}/runs'])[1 + (g % 3)],
       (ARRAY['rate_limit_exceeded', 'rate_limit_exceeded', 'rate_limit_exceeded', 'daily_quota_exceeded',
              'budget_exceeded'])[1 + (g % 5)]
FROM generate_series(1, $2::int) AS g
"""

SIZES = """
SELECT 'usage_event (' || count(*) || ' partitions)' AS name, sum(c.reltuples)::bigint AS rows,
       sum(pg_total_relation_size(c.oid))::bigint AS bytes
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'usage_event'::regclass
UNION ALL
SELECT c.relname, c.reltuples::bigint, pg_total_relation_size(c.oid)
FROM pg_class c
WHERE c.relname IN ('usage_hourly', 'usage_daily', 'usage_daily_totals', 'usage_user_daily', 'limit_refusal',
                    'refusal_daily')
"""


def server_url() -> str:
    return os.environ.get("BENCH_DATABASE_URL") or os.environ.get("TEST_DATABASE_URL") or DEFAULT_SERVER


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def count(text: str) -> int:
    """1000000, 1_000_000, 1e6, 1M, 500k."""
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("km")) * scale)


def human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


# ---------------------------------------------------------------------------------------------- seeding


@dataclass
class Seeding:
    rows: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


async def seed(url: str, rows: int, days: int, users: int, first_day: date, jobs: int) -> Seeding:
    start = datetime.combine(first_day, datetime.min.time(), UTC)
    connection = await asyncpg.connect(url)
    try:
        made = await partitions.ensure(connection, 3, since=first_day)
        if made:
            print(f"  partitions made: {', '.join(partitions.partition_name(m) for m in made)}")
        chunks = [(g, min(CHUNK, rows - g + 1)) for g in range(1, rows + 1, CHUNK)]
        shares = [chunks[len(chunks) * j // jobs : len(chunks) * (j + 1) // jobs] for j in range(jobs)]
        done = 0
        report_every = max(rows // 10, CHUNK)
        next_report = report_every
        began = time.perf_counter()

        async def writer(share: list[tuple[int, int]]) -> None:
            nonlocal done, next_report
            own = await asyncpg.connect(url)
            try:
                await own.execute("SET work_mem = '256MB'")  # the triggers' sorts of a chunk, in memory
                for offset, size in share:
                    await own.execute(SEED_USAGE, start, offset, float(rows), str(days), users, size)
                    done += size
                    if done >= next_report or done == rows:
                        seconds = time.perf_counter() - began
                        print(f"  {done:>12,} usage rows  {seconds:7.1f} s  {done / seconds:>9,.0f} rows/s", flush=True)
                        next_report += report_every
            finally:
                await own.close()

        await asyncio.gather(*(writer(share) for share in shares if share))
        seeding = Seeding(rows, time.perf_counter() - began)
        print(
            f"  seeded {rows:,} usage rows (rollups by the triggers) in {seeding.seconds:.1f} s over {jobs} "
            f"connection(s): {seeding.rate:,.0f} rows/s",
            flush=True,
        )
        began = time.perf_counter()
        await connection.execute(SEED_REFUSALS, start, rows // 20, str(days), users)
        print(f"  seeded {rows // 20:,} refusals ({time.perf_counter() - began:.1f} s); VACUUM ANALYZE ...", flush=True)
        began = time.perf_counter()
        await connection.execute("VACUUM ANALYZE")
        print(f"  VACUUM ANALYZE {time.perf_counter() - began:.1f} s")
        for row in await connection.fetch(SIZES):
            print(f"    {row['name']:<28} {human(row['rows']):>7} rows {human(row['bytes']):>7}B")
        return seeding
    finally:
        await connection.close()


# ---------------------------------------------------------------------------------------------- plans


def scans(plan: dict[str, Any]) -> list[str]:
    """The scans and aggregates of a JSON plan, e.g. `Index Scan ix_usage_event_created_at`, `HashAggregate`."""
    found = []
    node_type = plan.get("Node Type", "")
    if "Scan" in node_type:
        workers = " (parallel)" if plan.get("Parallel Aware") else ""
        found.append(f"{node_type} {plan.get('Index Name') or plan.get('Relation Name', '')}{workers}".strip())
    elif node_type == "Aggregate":
        found.append({"Hashed": "HashAggregate", "Sorted": "GroupAggregate"}.get(plan.get("Strategy", ""), "Aggregate"))
    elif node_type == "Sort" and "Disk" in (
        plan.get("Sort Space Type"),
        *(w.get("Sort Space Type") for w in plan.get("Workers", [])),
    ):
        found.append("Sort on disk")
    for child in plan.get("Plans", []):
        found.extend(scans(child))
    return found


def rows_read(plan: dict[str, Any]) -> float:
    """Rows the plan's scans read from their tables: returned plus filtered out, over all loops and workers."""
    node_type = plan.get("Node Type", "")
    total = 0.0
    if "Scan" in node_type and node_type != "Bitmap Index Scan":
        per_loop = (
            plan.get("Actual Rows", 0)
            + plan.get("Rows Removed by Filter", 0)
            + plan.get("Rows Removed by Index Recheck", 0)
        )
        total += per_loop * plan.get("Actual Loops", 1)
    return total + sum(rows_read(child) for child in plan.get("Plans", []))


@dataclass
class Plan:
    scans: list[str]
    rows_read: float


async def explain(connection: asyncpg.Connection, sql: str, params: Sequence[Any]) -> Plan:
    raw = await connection.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *params)
    [result] = json.loads(raw)
    return Plan(list(dict.fromkeys(scans(result["Plan"]))), rows_read(result["Plan"]))


async def explain_text(connection: asyncpg.Connection, sql: str, params: Sequence[Any]) -> str:
    rows = await connection.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *params)
    return "\n".join(row[0] for row in rows)


# ---------------------------------------------------------------------------------------------- raw twins

UTC_DAY = "(created_at AT TIME ZONE 'UTC')::date"
RAW_COLUMNS: dict[Dimension, str] = {"day": UTC_DAY, "model": "model", "user": "user_id", "route": "route"}


def _sums(where: str = "") -> list[str]:
    """calls, prompt, completion, cached, images, cost of the ledger's rows (matching `where`)."""
    only = f" FILTER (WHERE {where})" if where else ""
    return [
        f"count(*){only}",
        *(f"coalesce(sum({c}){only}, 0)::bigint" for c in ("prompt_tokens", "completion_tokens", "cached_tokens")),
        f"coalesce(sum(images){only}, 0)::bigint",
        f"coalesce(sum(cost_usd){only}, 0)",
    ]


Raw = tuple[str, tuple[Any, ...]]


def raw_usage(
    period: Period, group_by: Sequence[Dimension], user_id: str | None = None, after: str | None = None
) -> Raw:
    """`reports.usage`'s groups and METRICS, from the ledger: grouped by user, its first page of users
    (those after `after`)."""
    calls, prompt, completion, cached, images, cost = _sums()
    keys = [f"{RAW_COLUMNS[name]} AS {COLUMNS[name]}" for name in group_by]
    metrics = [calls, "count(*) FILTER (WHERE status = 'error')", prompt, completion, cached, images, cost]
    groups = ", ".join(str(n) for n in range(1, len(keys) + 1))
    params: tuple[Any, ...] = (period.since, period.until)
    where = "created_at >= $1 AND created_at < $2"
    if user_id is not None:
        where += " AND user_id = $3"
        params += (user_id,)
    if "user" in group_by and user_id is None:
        params += (after or "",)
        where += (
            f" AND user_id IN (SELECT user_id FROM usage_event WHERE created_at >= $1 AND created_at < $2"
            f" AND user_id > $3 GROUP BY user_id ORDER BY user_id LIMIT {reports.DEFAULT_USERS})"
        )
    sql = f"SELECT {', '.join(keys + metrics)} FROM usage_event WHERE {where}"
    return f"{sql} GROUP BY {groups} ORDER BY {groups} LIMIT {MAX_GROUPS + 1}", params


def raw_top_users(period: Period, limit: int) -> Raw:
    calls, prompt, completion, _, images, cost = _sums()
    return (
        f"SELECT user_id, {calls}, {prompt}, {completion}, {images}, {cost} AS cost_usd FROM usage_event"
        " WHERE created_at >= $1 AND created_at < $2 GROUP BY user_id ORDER BY cost_usd DESC, user_id LIMIT $3",
        (period.since, period.until, limit),
    )


def raw_refusals(period: Period) -> Raw:
    return (
        "SELECT (created_at AT TIME ZONE 'UTC')::date AS day, code, count(*) AS refusals FROM limit_refusal"
        " WHERE created_at >= $1 AND created_at < $2 GROUP BY 1, 2 ORDER BY 1, 2",
        (period.since, period.until),
    )


def raw_summary(user_id: str, now: datetime) -> Raw:
    """`usage.repository.summary`'s month and day by model, from the ledger."""
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month = day.replace(day=1)
    columns = ["model", *_sums(), *_sums("created_at >= $3 AND created_at < $4")]
    return (
        f"SELECT {', '.join(columns)} FROM usage_event WHERE user_id = $1 AND created_at >= $2"
        " GROUP BY model ORDER BY model",
        (user_id, month, day, day + timedelta(days=1)),
    )


# ---------------------------------------------------------------------------------------------- cases

Run = Callable[[AsyncSession], Awaitable[Any]]


@dataclass
class Case:
    name: str
    days: int
    run: Run  # as the route runs it
    raw: Raw | None  # the same answer from the ledger; None: the report reads no rollup


def frozen_at(instant: datetime) -> type[datetime]:
    """A `datetime` whose now() is `instant`: the summary as it runs on that day."""

    class Frozen(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> Self:
            return cls.fromtimestamp(instant.timestamp(), tz)

    return Frozen


def summary_at(instant: datetime | None) -> Run:
    async def run(session: AsyncSession) -> Any:
        if instant is None:
            return await usage_repository.summary(session, HEAVY_USER)
        with mock.patch.object(usage_repository, "datetime", frozen_at(instant)):
            return await usage_repository.summary(session, HEAVY_USER)

    return run


def cases(first: date, last: date) -> list[Case]:
    def period(n: int) -> Period:
        return Period(max(first, last - timedelta(days=n - 1)), last)

    p30, pall = period(30), Period(first, last)

    def usage(p: Period, group_by: list[Dimension], user_id: str | None = None, after: str | None = None) -> Case:
        name = (
            f"usage by {','.join(group_by)}"
            + (f" of {user_id}" if user_id else "")
            + (f" after {after}" if after else "")
        )
        page = reports.UserPage(after) if "user" in group_by and user_id is None else None
        return Case(
            name, p.days, lambda s: reports.usage(s, p, group_by, user_id, page), raw_usage(p, group_by, user_id, after)
        )

    listed = [
        usage(p30, ["day"]),
        usage(pall, ["day"]),
        usage(p30, ["model"]),
        usage(p30, ["route"]),
        usage(p30, ["user"]),
        usage(p30, ["user"], after="user-5"),  # a page from the middle: ids sort as text
        usage(p30, ["user", "day"]),
        usage(p30, ["day", "model"]),
        usage(pall, ["model"], HEAVY_USER),
        usage(p30, ["day"], HEAVY_USER),
    ]
    for p in (p30, pall):
        top = partial(reports.top_users, period=p, limit=10)
        listed.append(Case("top users (10)", p.days, top, raw_top_users(p, 10)))
    for p in (p30, pall):
        listed.append(Case("refusals by day", p.days, partial(reports.refusals, period=p), raw_refusals(p)))
    now = datetime.now(UTC)
    listed.append(Case(f"summary of {HEAVY_USER}, today", now.day, summary_at(None), raw_summary(HEAVY_USER, now)))
    month_end = now.date().replace(day=1) - timedelta(days=1)
    if month_end.replace(day=1) >= first:
        at = datetime.combine(month_end, datetime.min.time(), UTC) + timedelta(hours=12)
        listed.append(
            Case(f"summary of {HEAVY_USER}, {month_end}", month_end.day, summary_at(at), raw_summary(HEAVY_USER, at))
        )
    listed.append(
        Case(f"events of {HEAVY_USER}, page of 100", 0, lambda s: reports.user_events(s, HEAVY_USER, None, 100), None)
    )
    return listed


# ---------------------------------------------------------------------------------------------- measuring


@dataclass
class Timing:
    p50: float
    p99: float


@dataclass
class Result:
    name: str
    days: int
    groups: int
    rollup: Timing
    route: Timing
    rollup_plan: Plan
    raw: Timing | None = None
    raw_plan: Plan | None = None
    same: bool | None = None
    slow_plan: str | None = None
    sql: str = field(default="", repr=False)

    @property
    def slow(self) -> bool:
        return self.rollup.p50 >= SLOW_MS or self.route.p50 >= SLOW_MS


def timing(samples: list[float]) -> Timing:
    # p99 interpolated between the two slowest runs when there are fewer than 100.
    p99 = statistics.quantiles(samples, n=100, method="inclusive")[98] if len(samples) > 1 else samples[0]
    return Timing(statistics.median(samples), p99)


async def timed(repeat: int, call: Callable[[], Awaitable[Any]]) -> tuple[Timing, Any]:
    result = await call()  # warm-up: caches, the prepared statement
    samples = []
    for _ in range(repeat):
        began = time.perf_counter()
        result = await call()
        samples.append((time.perf_counter() - began) * 1000)
    return timing(samples), result


class Capture:
    """The SQL and parameters a repository function sends, as the asyncpg dialect sends them."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.sent: list[tuple[str, tuple[Any, ...]]] = []
        self.on = False
        event.listen(engine.sync_engine, "before_cursor_execute", self.record)

    def record(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if self.on:
            self.sent.append((statement, tuple(parameters or ())))

    async def of(self, sessions: async_sessionmaker[AsyncSession], run: Run) -> tuple[str, tuple[Any, ...]]:
        """The last statement the function sends: the one whose rows are the report (top users first
        read the monthly bounds of their candidates; the route column times every statement)."""
        self.sent, self.on = [], True
        try:
            async with sessions() as session:
                await run(session)
        finally:
            self.on = False
        return self.sent[-1]


def groups_of(result: Any) -> int:
    for name in ("by_day", "data", "month"):
        value = getattr(result, name, None)
        if value is not None:
            return len(value.by_model) if name == "month" else len(value)
    return 0


async def measure(url: str, repeat: int, raw_repeat: int, first: date, last: date) -> list[Result]:
    engine = create_async_engine(sqlalchemy_url(url), pool_size=2)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    capture = Capture(engine)
    connection = await asyncpg.connect(url)
    results = []
    try:
        for case in cases(first, last):
            sql, params = await capture.of(sessions, case.run)
            rollup, rollup_rows = await timed(repeat, partial(connection.fetch, sql, *params))
            async with sessions() as session:
                route, report = await timed(repeat, partial(case.run, session))
            result = Result(
                case.name, case.days, groups_of(report), rollup, route, await explain(connection, sql, params), sql=sql
            )
            if case.raw is not None:
                raw_sql, raw_params = case.raw
                result.raw, raw_rows = await timed(raw_repeat, partial(connection.fetch, raw_sql, *raw_params))
                result.raw_plan = await explain(connection, raw_sql, raw_params)
                result.same = [tuple(r.values()) for r in rollup_rows] == [tuple(r.values()) for r in raw_rows]
            if result.slow:
                result.slow_plan = await explain_text(connection, sql, params)
            print_row(result)
            results.append(result)
    finally:
        await connection.close()
        await engine.dispose()
    return results


HEADER = (
    f"{'report':<34} {'days':>4} {'groups':>6}  {'rollup p50':>10} {'p99':>7} {'route p50':>9}  "
    f"{'raw p50':>8} {'p99':>8} {'raw/rollup':>10}  {'rows read':>9} {'raw':>7}  same"
)


def print_row(r: Result) -> None:
    if r.raw:
        ratio = r.raw.p50 / r.rollup.p50
        raw = f"{r.raw.p50:>8.1f} {r.raw.p99:>8.1f} {ratio:>9.{1 if ratio < 10 else 0}f}x"
    else:
        raw = f"{'=':>8} {'':>8} {'':>10}"
    raw_read = human(r.raw_plan.rows_read) if r.raw_plan else ""
    same = {True: "yes", False: "NO", None: ""}[r.same]
    mark = " !" if r.slow else ""
    print(
        f"{r.name:<34} {r.days or '':>4} {r.groups:>6}  "
        f"{r.rollup.p50:>10.1f} {r.rollup.p99:>7.1f} {r.route.p50:>9.1f}  {raw}  "
        f"{human(r.rollup_plan.rows_read):>9} {raw_read:>7}  {same:<4}{mark}",
        flush=True,
    )


def print_plans(results: list[Result]) -> None:
    print("\nplans (scans and aggregates; rollup, then raw):")
    for r in results:
        print(f"  {r.name} ({r.days} days)" if r.days else f"  {r.name}")
        print(f"    rollup: {'; '.join(r.rollup_plan.scans)}")
        if r.raw_plan:
            print(f"    raw:    {'; '.join(r.raw_plan.scans)}")
    for r in results:
        if r.slow_plan:
            print(f"\n! {r.name} ({r.days} days): rollup p50 {r.rollup.p50:.1f} ms, route p50 {r.route.p50:.1f} ms")
            print(f"  {r.sql}\n")
            print("\n".join(f"  {line}" for line in r.slow_plan.splitlines()))


def print_scaling(runs: list[tuple[int, Seeding, float, list[Result]]]) -> None:
    width = 26
    print("\nscaling: p50 ms, rollup statement / route (repository function) / raw scan; ! = rollup or route >= 100 ms")
    print(f"{'report':<34} {'days':>4}  " + "".join(f"{human(rows) + ' rows':>{width}}" for rows, *_ in runs))
    for i, r in enumerate(runs[0][3]):
        cells = []
        for *_, results in runs:
            other = results[i]
            raw = f"{other.raw.p50:.1f}" if other.raw else "="
            cells.append(f"{other.rollup.p50:.1f} / {other.route.p50:.1f}{'!' if other.slow else ''} / {raw}")
        print(f"{r.name:<34} {r.days or '':>4}  " + "".join(f"{c:>{width}}" for c in cells))
    print(f"{'seeding, rows/s (with the triggers)':<40} " + "".join(f"{s.rate:>{width},.0f}" for _, s, _, _ in runs))
    print(f"{'the whole size, seconds':<40} " + "".join(f"{total:>{width}.0f}" for *_, total, _ in runs))
    slow = [(rows, r) for rows, _, _, results in runs for r in results if r.slow]
    for rows, r in slow:
        print(f"  ! {human(rows)} rows: {r.name} ({r.days} days) {r.rollup.p50:.1f} ms, route {r.route.p50:.1f} ms")
    if not slow:
        print(f"every report under {SLOW_MS:.0f} ms p50 at every size")


async def run_size(
    server: str, name: str, rows: int, args: argparse.Namespace, first: date, last: date
) -> tuple[Seeding, list[Result]]:
    admin = await asyncpg.connect(server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = with_database(server, name)
        try:
            print(f"\ndatabase {name}: migrating, then seeding {rows:,} rows over {args.days} days ({first} to {last})")
            await asyncio.to_thread(migrations.upgrade, url)
            seeding = await seed(url, rows, args.days, args.users, first, args.jobs)
            print(
                f"\n{rows:,} usage rows over {args.days} days, {rows // 20:,} refusals; ms, p50 and p99 of "
                f"{args.repeat} runs after a warm-up (raw: {args.raw_repeat or args.repeat}); "
                f"! = rollup or route p50 {SLOW_MS:.0f} ms or more\n"
            )
            print(HEADER)
            print("-" * len(HEADER))
            results = await measure(url, args.repeat, args.raw_repeat or args.repeat, first, last)
            print_plans(results)
            return seeding, results
        finally:
            if args.keep:
                print(f"\nkept database {name}: {url}")
            else:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=count, default=3_000_000, help="usage rows (one size)")
    parser.add_argument("--sizes", help="several sizes, one after the other, e.g. 1M,3M,10M (instead of --rows)")
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=20, help="timed runs of each statement, after a warm-up")
    parser.add_argument("--raw-repeat", type=int, help="timed runs of each raw scan (default: --repeat)")
    parser.add_argument("--jobs", type=int, default=2, help="connections seeding at once")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database(s)")
    args = parser.parse_args()
    sizes = [count(size) for size in args.sizes.split(",")] if args.sizes else [args.rows]

    server = server_url()
    last = datetime.now(UTC).date() - timedelta(days=1)
    first = last - timedelta(days=args.days - 1)
    runs = []
    for rows in sizes:
        began = time.perf_counter()
        name = f"gateway_bench_admin_{os.getpid()}" + (f"_{rows}" if len(sizes) > 1 else "")
        seeding, results = await run_size(server, name, rows, args, first, last)
        runs.append((rows, seeding, time.perf_counter() - began, results))
    if len(runs) > 1:
        print_scaling(runs)


if __name__ == "__main__":
    asyncio.run(main())
