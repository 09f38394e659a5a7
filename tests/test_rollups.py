"""Usage at scale: the monthly partitions of the ledger, and the rollups the reports read.

The rollups are kept by triggers in the ledger's own transactions; each test ends by
comparing every rollup row with the ledger's sums (tests/support/rollups.py).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import openai
import pytest

from app.usage import partitions
from support.auth import ADMIN_KEY
from support.errors import assert_error
from support.gateway import Gateway, GatewayFactory, app_command_async
from support.rollups import rollup_mismatches
from support.waiting import usage_rows, wait_for

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(autouse=True)
async def partitions_restored(db: asyncpg.Pool) -> AsyncIterator[None]:
    """Tests of retention drop months: the next test finds the year back that a migrated database has."""
    yield
    async with db.acquire() as connection:
        await partitions.ensure(connection, 3, since=partitions.add_months(partitions.this_month(), -12))


async def chat_calls(gateway: Gateway, key: str, count: int) -> None:
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    for _ in range(count):
        await client.chat.completions.create(model="gpt-5-mini", messages=[{"role": "user", "content": "hi"}])


async def test_rollups_equal_the_ledger_after_concurrent_writers(
    gateway: Gateway, gateway_with: GatewayFactory, db: asyncpg.Pool
) -> None:
    async with gateway_with() as second:  # another process's usage writer, flushing the same rollup rows
        keys = [await gateway.key("pro") for _ in range(3)]
        await asyncio.gather(
            *[chat_calls(writer, key, 15) for writer in (gateway, second) for key, _ in keys],
            *[chat_calls(writer, keys[0][0], 10) for writer in (gateway, second)],
        )
        for _, user_id in keys:
            await usage_rows(db, count=50 if user_id == keys[0][1] else 30, user_id=user_id)
    assert await rollup_mismatches(db) == {}
    calls = await db.fetchval("SELECT sum(calls) FROM usage_daily_totals WHERE model = 'gpt-5-mini'")
    assert calls == 110
    # The user's own summary and the admin report read the rollups, and say the same.
    summary = await gateway.client.get("/v1/usage", headers={"authorization": f"Bearer {keys[0][0]}"})
    assert summary.json()["month"]["requests"] == 50
    report = await gateway.client.get("/admin/reports/usage", params={"group_by": "user"}, headers=ADMIN)
    mine = {row["user_id"]: row["requests"] for row in report.json()["data"]}
    assert [mine[user_id] for _, user_id in keys] == [50, 30, 30]


async def seed(db: asyncpg.Pool, user: str, created: list[datetime]) -> None:
    await db.executemany(
        "INSERT INTO usage_event (created_at, request_id, user_id, route, model, status, http_status, stream,"
        " prompt_tokens, completion_tokens, cached_tokens, tokens_estimated, images, cost_usd, latency_ms, upstream)"
        " VALUES ($1, 'req', $2, 'chat.completions', 'gpt-5-mini', 'ok', 200, false, 10, 5, 2, false, 0, 0.001, 1,"
        " 'default')",
        [(instant, user) for instant in created],
    )


def month_back(months: int) -> datetime:
    first = partitions.add_months(partitions.this_month(), -months)
    return datetime(first.year, first.month, 15, 12, tzinfo=UTC)


async def test_retention_drops_whole_months_and_their_rollups(db: asyncpg.Pool) -> None:
    await seed(db, "retained", [month_back(3), month_back(3), month_back(1), datetime.now(UTC)])
    async with db.acquire() as connection:
        dropped = await partitions.drop_older_than(connection, 2)
    assert dropped and max(dropped) == partitions.add_months(partitions.this_month(), -3)
    assert await db.fetchval("SELECT count(*) FROM usage_event WHERE user_id = 'retained'") == 2
    assert await rollup_mismatches(db) == {}
    kept = await db.fetchval("SELECT min(day) FROM usage_user_daily WHERE user_id = 'retained'")
    assert kept == month_back(1).date()
    async with db.acquire() as connection:
        assert partitions.add_months(partitions.this_month(), -3) not in await partitions.existing(connection)
        assert await partitions.drop_older_than(connection, 2) == []  # nothing more to drop


async def test_the_service_keeps_partitions_ahead_and_drops_old_ones(
    gateway_with: GatewayFactory, db: asyncpg.Pool
) -> None:
    await seed(db, "aging", [month_back(6), datetime.now(UTC)])
    async with gateway_with(usage_partitions_ahead=6, usage_retention_months=4, usage_partition_interval=0.1):

        async def maintained() -> bool:
            async with db.acquire() as connection:
                months = await partitions.existing(connection)
            this = partitions.this_month()
            return partitions.add_months(this, 6) in months and partitions.add_months(this, -6) not in months

        await wait_for(maintained)
    assert await db.fetchval("SELECT count(*) FROM usage_event WHERE user_id = 'aging'") == 1
    assert await rollup_mismatches(db) == {}


async def test_the_usage_partitions_cli(db: asyncpg.Pool, database_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": database_url}
    code, output = await app_command_async("usage-partitions", "--ahead", "9", env=env)
    assert code == 0, output
    target = partitions.add_months(partitions.this_month(), 9)
    assert f"made {partitions.partition_name(target)}" in output
    code, output = await app_command_async("usage-partitions", "--retention-months", "11", env=env)
    assert code == 0, output
    oldest = partitions.add_months(partitions.this_month(), -12)
    assert f"dropped {partitions.partition_name(oldest)} (older than 11 months)" in output
    async with db.acquire() as connection:
        months = await partitions.existing(connection)
    assert months[0] == partitions.add_months(partitions.this_month(), -11) and months[-1] == target


async def test_a_row_for_a_month_without_partition_is_refused_not_misfiled(db: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await seed(db, "far", [datetime(2001, 1, 1, tzinfo=UTC)])


async def test_the_drill_down_reads_one_users_rows_a_page_at_a_time(gateway: Gateway, db: asyncpg.Pool) -> None:
    now = datetime.now(UTC)
    await seed(db, "drilled", [now - timedelta(minutes=n) for n in range(3)] + [now - timedelta(hours=1)] * 2)
    await seed(db, "other", [now])
    first = await gateway.client.get("/admin/reports/users/drilled/events", params={"limit": 3}, headers=ADMIN)
    assert first.status_code == 200, first.text
    page: dict[str, Any] = first.json()
    assert [row["created_at"] for row in page["data"]] == sorted((r["created_at"] for r in page["data"]), reverse=True)
    assert len(page["data"]) == 3 and page["data"][0]["upstream"] == "default"
    # Two rows share the last instant: the page boundary falls between them, and neither is lost.
    second = await gateway.client.get(
        "/admin/reports/users/drilled/events",
        params={"limit": 1, "before": page["next_before"], "before_id": page["next_before_id"]},
        headers=ADMIN,
    )
    rest = await gateway.client.get(
        "/admin/reports/users/drilled/events",
        params={"limit": 3, "before": second.json()["next_before"], "before_id": second.json()["next_before_id"]},
        headers=ADMIN,
    )
    assert len(second.json()["data"]) == 1 and len(rest.json()["data"]) == 1 and rest.json()["next_before"] is None
    seen = [row["call_id"] for row in page["data"] + second.json()["data"] + rest.json()["data"]]
    assert len(set(seen)) == 5
    assert (await gateway.client.get("/admin/reports/users/drilled/events")).status_code == 401
    for params, param in (
        ({"before": page["next_before"]}, "before_id"),  # half a cursor
        ({"limit": 0}, "limit"),
        ({"before": "yesterday", "before_id": 1}, "before"),
    ):
        bad = await gateway.client.get("/admin/reports/users/drilled/events", params=params, headers=ADMIN)
        assert_error(bad, 400, param=param)


def test_partition_names_and_bounds() -> None:
    assert partitions.partition_name(date(2027, 3, 1)) == "usage_event_y2027m03"
    assert partitions.add_months(date(2026, 12, 1), 1) == date(2027, 1, 1)
    assert partitions.add_months(date(2027, 1, 1), -13) == date(2025, 12, 1)
    assert "FROM ('2026-12-01 00:00:00+00') TO ('2027-01-01 00:00:00+00')" in partitions.create_statement(
        date(2026, 12, 1)
    )


async def test_top_users_are_exact_when_their_months_hold_more_than_the_period(
    gateway: Gateway, db: asyncpg.Pool
) -> None:
    """Users whose monthly bound is high for costs outside the period must not push out the period's own
    top users: the candidates widen until the answer is certain, and it equals the ledger's."""
    today = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    inside = today - timedelta(days=1)
    outside = today.replace(day=1) - timedelta(days=20)  # last month: in the bounds, not in the period
    rows = []
    for n in range(60):
        rows += [(inside, f"tu-{n:02d}", Decimal(n) / 1000)]  # the period's costs: tu-59 is top
        rows += [(outside, f"tu-{n:02d}", Decimal(60 - n))]  # big, earlier: bounds the other way round
    await db.executemany(
        "INSERT INTO usage_event (created_at, request_id, user_id, route, model, status, http_status, stream,"
        " prompt_tokens, completion_tokens, cached_tokens, tokens_estimated, images, cost_usd, latency_ms)"
        " VALUES ($1, 'req', $2, 'chat.completions', 'gpt-5-mini', 'ok', 200, false, 1, 1, 0, false, 0, $3, 1)",
        rows,
    )
    start = (outside + timedelta(days=10)).date()
    params = {"start": start.isoformat(), "end": today.date().isoformat(), "limit": 5}
    report = await gateway.client.get("/admin/reports/top-users", params=params, headers=ADMIN)
    assert report.status_code == 200, report.text
    expected = await db.fetch(
        "SELECT user_id, sum(cost_usd) AS cost FROM usage_event WHERE created_at >= $1 GROUP BY user_id"
        " ORDER BY cost DESC, user_id LIMIT 5",
        datetime(start.year, start.month, start.day, tzinfo=UTC),
    )
    assert [row["user_id"] for row in report.json()["data"]] == [row["user_id"] for row in expected]
    assert [row["user_id"] for row in expected] == ["tu-59", "tu-58", "tu-57", "tu-56", "tu-55"]
    assert await rollup_mismatches(db) == {}
