"""Times the admin report queries on a few million usage rows, and shows which index each plan reads.

    .venv/bin/python bench/admin_queries.py [--rows 3000000] [--days 90] [--users 20000] [--keep]

Postgres is `BENCH_DATABASE_URL` or `TEST_DATABASE_URL` when set, else
postgresql://postgres@127.0.0.1:5432/test. The run creates a scratch database
`gateway_bench_admin_<pid>`, migrates it with Alembic (so the indexes are the
migrations'), seeds `--rows` usage rows over `--days` days in time order (as the usage
writer appends them; users skewed so a few are heavy) and one refusal per 20 rows,
runs VACUUM ANALYZE, then times each report exactly as the routes run it (the
repository functions on an AsyncSession; median of `--repeat` runs after a warm-up)
and prints the scans of each statement's EXPLAIN ANALYZE. It drops the database at
the end unless `--keep`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from sqlalchemy import Select
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app import migrations
from app.admin import reports_repository as reports
from app.admin.reports_repository import Period
from app.db import sqlalchemy_url

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/test"
CHUNK = 500_000

# Rows land in time order, a few users are heavy (random()^3), models and routes are weighted.
SEED_USAGE = """
INSERT INTO usage_event (created_at, request_id, user_id, route, model, status, http_status, stream,
                         prompt_tokens, completion_tokens, cached_tokens, tokens_estimated, images, cost_usd,
                         latency_ms)
SELECT $1::timestamptz + (s.g / $3::float8) * ($4::text || ' days')::interval,
       'req_' || s.g,
       'user-' || floor($5::int * power(s.who, 3))::int,
       m.route, m.model,
       CASE WHEN s.fail < 0.02 THEN 'error' ELSE 'ok' END,
       200, s.fail > 0.5,
       t.prompt, t.completion, t.prompt / 4, false, m.images,
       round(((t.prompt * m.input + t.completion * m.output) / 1e6 + m.images * 0.04)::numeric, 8),
       50 + s.fail * 900
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


def server_url() -> str:
    return os.environ.get("BENCH_DATABASE_URL") or os.environ.get("TEST_DATABASE_URL") or DEFAULT_SERVER


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def seed(url: str, rows: int, days: int, users: int, first_day: date) -> None:
    start = datetime.combine(first_day, datetime.min.time(), UTC)
    connection = await asyncpg.connect(url)
    try:
        began = time.perf_counter()
        for offset in range(1, rows + 1, CHUNK):
            count = min(CHUNK, rows - offset + 1)
            await connection.execute(SEED_USAGE, start, offset, float(rows), str(days), users, count)
            print(f"  seeded {offset + count - 1:>11,} usage rows ({time.perf_counter() - began:5.1f} s)", flush=True)
        await connection.execute(SEED_REFUSALS, start, rows // 20, str(days), users)
        print(f"  seeded {rows // 20:>11,} refusals; VACUUM ANALYZE ...", flush=True)
        await connection.execute("VACUUM ANALYZE usage_event")
        await connection.execute("VACUUM ANALYZE limit_refusal")
        sizes = await connection.fetch(
            """SELECT c.relname, pg_size_pretty(pg_relation_size(c.oid)) AS size
               FROM pg_class c WHERE c.relname LIKE 'usage_event%' OR c.relname LIKE 'ix_usage_event%'
                  OR c.relname LIKE 'pk_usage_event' ORDER BY c.relname"""
        )
        print("  " + ", ".join(f"{r['relname']} {r['size']}" for r in sizes))
    finally:
        await connection.close()


def scans(plan: dict[str, Any]) -> list[str]:
    """The scans and aggregates of a JSON plan, e.g. `Index Scan ix_usage_event_created_at`, `HashAggregate`."""
    found = []
    node_type = plan.get("Node Type", "")
    if "Scan" in node_type:
        workers = " (parallel)" if plan.get("Parallel Aware") else ""
        found.append(f"{node_type} {plan.get('Index Name') or plan.get('Relation Name', '')}{workers}".strip())
    elif node_type == "Aggregate":
        found.append({"Hashed": "HashAggregate", "Sorted": "GroupAggregate"}.get(plan.get("Strategy"), "Aggregate"))
    elif node_type == "Sort" and "Disk" in (
        plan.get("Sort Space Type"),
        *(w.get("Sort Space Type") for w in plan.get("Workers", [])),
    ):
        found.append("Sort on disk")
    for child in plan.get("Plans", []):
        found.extend(scans(child))
    return found


async def explain(connection: asyncpg.Connection, statement: Select) -> tuple[list[str], float]:
    compiled = statement.compile(dialect=asyncpg_dialect.dialect())
    params = [compiled.params[name] for name in compiled.positiontup or ()]
    raw = await connection.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {compiled}", *params)
    [result] = json.loads(raw)
    return list(dict.fromkeys(scans(result["Plan"]))), result["Execution Time"]


Case = tuple[str, Period, Select, Callable[[AsyncSession], Awaitable[Any]]]


def cases(last: date, days: int, heavy_user: str) -> list[Case]:
    def period(n: int) -> Period:
        return Period(last - timedelta(days=min(n, days) - 1), last)

    listed: list[Case] = []
    for n in (1, 7, 30, days):
        p = period(n)
        listed.append(
            ("usage by day", p, reports.usage_statement(p, ["day"]), lambda s, p=p: reports.usage(s, p, ["day"]))
        )
    p30 = period(30)
    for group_by in (["model"], ["user"], ["route"], ["day", "model"]):
        listed.append(
            (
                f"usage by {','.join(group_by)}",
                p30,
                reports.usage_statement(p30, group_by),  # type: ignore[arg-type]
                lambda s, g=group_by: reports.usage(s, p30, g),  # type: ignore[arg-type]
            )
        )
    pall = period(days)
    listed.append(
        (
            "usage of one user, by model",
            pall,
            reports.usage_statement(pall, ["model"], heavy_user),
            lambda s: reports.usage(s, pall, ["model"], heavy_user),
        )
    )
    for n in (30, days):
        p = period(n)
        listed.append(
            ("top users (10)", p, reports.top_users_statement(p, 10), lambda s, p=p: reports.top_users(s, p, 10))
        )
    for n in (30, days):
        p = period(n)
        listed.append(("refusals", p, reports.refusals_by_day_statement(p), lambda s, p=p: reports.refusals(s, p)))
    return listed


def rows_of(result: Any) -> int:
    if hasattr(result, "by_day"):
        return len(result.by_day)
    return len(result.data)


async def measure(url: str, rows: int, days: int, repeat: int, last: date) -> None:
    engine = create_async_engine(sqlalchemy_url(url), pool_size=2)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    connection = await asyncpg.connect(url)
    print(f"\n{rows:,} usage rows over {days} days, {rows // 20:,} refusals; median of {repeat} runs after a warm-up\n")
    header = f"{'report':<30} {'days':>4} {'groups':>7} {'median ms':>10} {'min ms':>8}  plan"
    print(header)
    print("-" * len(header) + "-" * 40)
    try:
        for name, period, statement, run in cases(last, days, "user-0"):
            async with sessions() as session:
                result = await run(session)  # warm-up: caches, plan
                timings = []
                for _ in range(repeat):
                    began = time.perf_counter()
                    result = await run(session)
                    timings.append((time.perf_counter() - began) * 1000)
            plan, _ = await explain(connection, statement)
            print(
                f"{name:<30} {period.days:>4} {rows_of(result):>7} {statistics.median(timings):>10.1f} "
                f"{min(timings):>8.1f}  {'; '.join(plan)}",
                flush=True,
            )
    finally:
        await connection.close()
        await engine.dispose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args()

    server = server_url()
    name = f"gateway_bench_admin_{os.getpid()}"
    admin = await asyncpg.connect(server)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = with_database(server, name)
    last = datetime.now(UTC).date() - timedelta(days=1)
    try:
        print(f"database {name}: migrating, then seeding {args.rows:,} rows over {args.days} days")
        await asyncio.to_thread(migrations.upgrade, url)
        await seed(url, args.rows, args.days, args.users, last - timedelta(days=args.days - 1))
        await measure(url, args.rows, args.days, args.repeat, last)
    finally:
        if args.keep:
            print(f"\nkept database {name}: {url}")
        else:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
