"""Rows written straight into the database, for reports and the dashboard."""

from __future__ import annotations

from decimal import Decimal

import asyncpg


async def seed_usage(db: asyncpg.Pool, rows: list[tuple]) -> None:
    """Usage rows: (created_at, user, model, route, status, prompt, completion, cached, images, cost)."""
    await db.executemany(
        """INSERT INTO usage_event (created_at, request_id, user_id, route, model, status, http_status, stream,
               prompt_tokens, completion_tokens, cached_tokens, tokens_estimated, images, cost_usd, latency_ms)
           VALUES ($1, 'req_seed', $2, $3, $4, $5, 200, false, $6, $7, $8, false, $9, $10, 12.5)""",
        [
            (when, user, route, model, status, p, c, cached, images, Decimal(cost))
            for (when, user, model, route, status, p, c, cached, images, cost) in rows
        ],
    )


async def seed_refusals(db: asyncpg.Pool, rows: list[tuple]) -> None:
    """Limit refusals: (created_at, user, route, code)."""
    await db.executemany("INSERT INTO limit_refusal (created_at, user_id, route, code) VALUES ($1, $2, $3, $4)", rows)
