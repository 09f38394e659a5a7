"""The usage rollups against the ledger: every rollup row must be the sum of its ledger rows, and none more."""

from __future__ import annotations

import asyncpg

# Each rollup: its bucket as the ledger computes it, and its other key columns.
ROLLUPS = {
    "usage_hourly": ("hour", "date_trunc('hour', created_at, 'UTC')", "user_id, model, route, status, upstream"),
    "usage_daily": ("day", "(created_at AT TIME ZONE 'UTC')::date", "user_id, model, route, status, upstream"),
    "usage_daily_totals": ("day", "(created_at AT TIME ZONE 'UTC')::date", "model, route, status, upstream"),
    "usage_user_daily": ("day", "(created_at AT TIME ZONE 'UTC')::date", "user_id, status"),
    "usage_user_monthly": ("month", "date_trunc('month', created_at AT TIME ZONE 'UTC')::date", "user_id"),
}
SUMS = "calls, prompt_tokens, completion_tokens, cached_tokens, images, cost_usd"


async def rollup_mismatches(db: asyncpg.Pool) -> dict[str, list[str]]:
    """Per rollup, the rows that differ from the ledger's own sums (both ways); empty when all agree."""
    found: dict[str, list[str]] = {}
    for table, (bucket, expression, keys) in ROLLUPS.items():
        ledger_keys = keys.replace("upstream", "coalesce(upstream, '') AS upstream")
        differing = await db.fetch(
            f"""
            WITH ledger AS (
                SELECT {expression} AS {bucket}, {ledger_keys}, count(*) AS calls, sum(prompt_tokens) AS prompt_tokens,
                       sum(completion_tokens) AS completion_tokens, sum(cached_tokens) AS cached_tokens,
                       sum(images) AS images, sum(cost_usd) AS cost_usd
                FROM usage_event GROUP BY 1, {keys}
            ), rollup AS (SELECT {bucket}, {keys}, {SUMS} FROM {table})
            (SELECT 'ledger' AS side, * FROM ledger EXCEPT SELECT 'ledger', * FROM rollup)
            UNION ALL
            (SELECT 'rollup', * FROM rollup EXCEPT SELECT 'rollup', * FROM ledger)
            """
        )
        if differing:
            found[table] = [str(dict(row)) for row in differing[:10]]
    return found
