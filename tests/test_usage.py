"""The usage writer (batched, retried, never stuck behind one bad row) and reconciling its costs with the upstream's."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from app.usage.ledger import new_call_id
from app.usage.record import UsageRecord
from support import internals
from support.gateway import Gateway, app_command_async
from support.waiting import usage_rows


def record(user: str, **values) -> UsageRecord:
    return UsageRecord(
        call_id=new_call_id(),
        request_id="req_test",
        user_id=user,
        api_key_id=None,
        route="chat.completions",
        model="gpt-5-mini",
        status="ok",
        http_status=200,
        **values,
    )


async def test_a_row_the_database_rejects_does_not_block_the_others(gateway: Gateway, db) -> None:
    writer = internals.usage_writer(gateway.app)
    poison = record("poison-user", error_code="x" * 500)  # longer than the column allows
    writer.record(poison)
    writer.record(record("healthy-user", prompt_tokens=3))
    [row] = await usage_rows(db, user_id="healthy-user")
    assert row["prompt_tokens"] == 3
    assert await db.fetchval("SELECT count(*) FROM usage_event WHERE user_id = 'poison-user'") == 0
    quarantined = await db.fetchrow("SELECT call_id, error, entry FROM usage_quarantine")
    assert quarantined["call_id"] == poison.call_id and "too long" in quarantined["error"]
    assert writer.queue_depth == 0


# Reconciliation: our cost per day and model against the upstream's costs export.

DAY_ONE, DAY_TWO = datetime(2026, 11, 30, 12, tzinfo=UTC), datetime(2026, 12, 1, 23, 59, tzinfo=UTC)


async def seed_costs(db: asyncpg.Pool) -> None:
    """Rows as the writer leaves them: two paid days, and two rows the operator's key never paid for."""
    rows = [
        (DAY_ONE, "gpt-5-mini", "ok", "1.25", None),
        (DAY_ONE, "gpt-5-mini", "error", "0.25", None),  # a failure the upstream billed: counted
        (DAY_ONE, "gpt-image-1-mini", "ok", "0.40", None),
        (DAY_TWO, "gpt-5-mini", "ok", "2.00", None),
        (DAY_TWO, "gpt-5-mini", "simulated", "9.00", None),  # no upstream paid
        (DAY_TWO, "gpt-5-mini", "ok", "7.00", '{"key": "user"}'),  # the user's own key paid
    ]
    for created_at, model, status, cost, detail in rows:
        await db.execute(
            "INSERT INTO usage_event (created_at, request_id, user_id, route, model, status, http_status, stream,"
            " prompt_tokens, completion_tokens, cached_tokens, tokens_estimated, images, cost_usd, latency_ms, detail)"
            " VALUES ($1, 'req', 'u', 'r', $2, $3, 200, false, 0, 0, 0, false, 0, $4::numeric, 1, $5::jsonb)",
            created_at,
            model,
            status,
            cost,
            detail,
        )


def costs_page(day: datetime, results: list[tuple[str | None, float]]) -> dict[str, Any]:
    """A bucket of OpenAI's organization costs endpoint, grouped by line item."""
    start = int(day.replace(hour=0, minute=0).timestamp())
    return {
        "object": "bucket",
        "start_time": start,
        "end_time": start + 86_400,
        "results": [
            {"object": "organization.costs.result", "amount": {"value": value, "currency": "usd"}, "line_item": item}
            for item, value in results
        ],
    }


async def reconcile(database_url: str, export: Path) -> tuple[int, str]:
    return await app_command_async("reconcile", str(export), env={**os.environ, "DATABASE_URL": database_url})


async def test_reconcile_prints_each_day_and_models_difference(
    gateway: Gateway, db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    await seed_costs(db)
    export = tmp_path / "costs.json"
    page = {
        "object": "page",
        "data": [
            costs_page(DAY_ONE, [("gpt-5-mini-2025-08-07, input", 0.5), ("gpt-5-mini-2025-08-07, output", 1.0)]),
            costs_page(DAY_ONE, [("gpt-image-1-mini, image generation", 0.4)]),
            costs_page(DAY_TWO, [("gpt-5-mini-2025-08-07, output", 2.5), (None, 0.1)]),
            costs_page(DAY_TWO, [("gpt-realtime-mini, audio input", 3.0)]),  # a client secret's unattached session
        ],
        "has_more": False,
    }
    export.write_text(json.dumps([page]))  # a list of pages, as a paging client saves them
    code, output = await reconcile(database_url, export)
    assert code == 1, output
    lines = [line.split() for line in output.splitlines()]
    assert ["2026-11-30", "gpt-5-mini", "1.500000", "1.500000", "+0.000000"] in lines
    assert ["2026-11-30", "gpt-image-1-mini", "0.400000", "0.400000", "+0.000000"] in lines
    assert ["2026-12-01", "gpt-5-mini", "2.000000", "2.500000", "-0.500000", "<--", "differs"] in lines
    assert ["2026-12-01", "(unattributed)", "0.000000", "0.100000", "-0.100000", "<--", "differs"] in lines
    assert ["2026-12-01", "gpt-realtime-mini", "0.000000", "3.000000", "-3.000000", "<--", "differs"] in lines
    assert ["total", "3.900000", "7.500000", "-3.600000"] in lines
    assert "3 of 5 day-and-model lines differ by more than $0.01" in output


async def test_reconcile_reads_a_csv_export_and_exits_0_when_it_agrees(
    gateway: Gateway, db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    await seed_costs(db)
    export = tmp_path / "costs.csv"
    export.write_text(
        "date,line_item,amount\n"
        '2026-11-30,"gpt-5-mini, input",1.500\n'
        "2026-11-30,gpt-image-1-mini,0.4\n"
        "2026-12-01,default-chat,1.995\n"  # an alias, and within the default tolerance of $0.01
    )
    code, output = await reconcile(database_url, export)
    assert code == 0, output
    assert "0 of 3 day-and-model lines differ" in output


async def test_reconcile_names_what_it_cannot_read(gateway: Gateway, database_url: str, tmp_path: Path) -> None:
    export = tmp_path / "costs.csv"
    export.write_text("when,line_item,amount\n2026-11-30,gpt-5-mini,1\n")
    code, output = await reconcile(database_url, export)
    assert code == 1 and "no column named date or start_time or day" in output
    export.write_text("date,line_item,amount\n2026-11-30,gpt-5-mini,lots\n")
    code, output = await reconcile(database_url, export)
    assert code == 1 and "line 2: 'lots' is not an amount" in output
    pages = tmp_path / "costs.json"
    pages.write_text(json.dumps({"data": [{"start_time": 1_764_460_800, "results": ["not an object"]}]}))
    code, output = await reconcile(database_url, pages)
    assert code == 1 and "is not an object" in output and "Traceback" not in output
