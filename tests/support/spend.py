"""Helpers for tests of what calls reserve and are charged: limit overrides, buckets, dead processes, spools."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from support import internals
from support.gateway import Gateway
from support.waiting import wait_for


async def set_limits(gateway: Gateway, user: str, key: str, **limits: float | None) -> None:
    """Set a user's limit overrides (they replace any earlier ones; None: no limit), and wait until the gateway
    no longer holds the key's principal as it was before (the change reaches its cache by NOTIFY)."""
    response = await gateway.admin("PATCH", f"/admin/users/{user}", json={"limit_overrides": limits})
    assert response.status_code == 200, response.text

    async def fresh() -> bool:
        cached = internals.cached_principal(gateway.app, key)
        return cached is None or all(
            cached.limit_overrides.get(name, "unset") == value for name, value in limits.items()
        )

    await wait_for(fresh, what=f"the gateway's cache to see {user}'s new limits")


def budget_key(user: str) -> str:
    """The key of a user's monthly budget bucket in `rate_limit_bucket` (this month, UTC)."""
    return f"monthly_budget_usd:{user}:{datetime.now(UTC):%Y-%m}"


async def bucket_value(db: asyncpg.Pool, key: str) -> float | None:
    """A limit bucket's value: what a calendar window has used (budgets: dollars), or a rate's arrival time."""
    value = await db.fetchval("SELECT value FROM rate_limit_bucket WHERE key = $1", key)
    return None if value is None else float(value)


async def dead_instance(db: asyncpg.Pool | asyncpg.Connection, seconds_ago: float = 60.0) -> uuid.UUID:
    """A registered gateway process whose last beat was `seconds_ago`: past its lease (10 s), not yet forgotten."""
    instance = uuid.uuid4()
    await db.execute(
        "INSERT INTO gateway_instance (id, host, pid, started_at, heartbeat_at)"
        " VALUES ($1, 'gone', 1, now() - make_interval(secs => $2 * 2), now() - make_interval(secs => $2))",
        instance,
        float(seconds_ago),
    )
    return instance


async def insert_pending(db: asyncpg.Pool, owner: uuid.UUID, user: str, **values: Any) -> uuid.UUID:
    """A call under way as its limit check writes it into `usage_pending`, owned by `owner`; returns its call id."""
    row: dict[str, Any] = {
        "call_id": uuid.uuid4(),
        "created_at": datetime.now(UTC),
        "owner": owner,
        "request_id": "req_pending",
        "user_id": user,
        "route": "chat.completions",
        "model": "gpt-5-mini",
        "stream": False,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "images": 0,
        "cost_usd": 0,
        **values,
    }
    names = ", ".join(row)
    places = ", ".join(f"${number}" for number in range(1, len(row) + 1))
    await db.execute(f"INSERT INTO usage_pending ({names}) VALUES ({places})", *row.values())
    return row["call_id"]


def spool_files(directory: Path) -> list[Path]:
    """The spool files waiting to be written (not the quarantine's, not half-written temporaries)."""
    return sorted(directory.glob("*.jsonl")) if directory.is_dir() else []
