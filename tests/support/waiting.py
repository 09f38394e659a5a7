"""Waiting for what the gateway does in the background, failing loudly when it does not happen."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

T = TypeVar("T")


def _describe(check: Callable[..., Any]) -> str:
    name = getattr(check, "__name__", "") or repr(check)
    return "a check" if name == "<lambda>" else name


async def wait_for(
    check: Callable[[], Awaitable[T]], seconds: float = 5.0, *, what: str | None = None, interval: float = 0.02
) -> T:
    """Poll `check` until it returns something truthy and return that.

    On timeout this raises AssertionError naming `what` it waited for (or the check's name)
    and the last value seen; it never hands a falsy value back to the test.
    """
    deadline = time.monotonic() + seconds
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {seconds:g} s for {what or _describe(check)}; last saw {result!r}")
        await asyncio.sleep(interval)


async def usage_rows(db: asyncpg.Pool, count: int = 1, *, seconds: float = 10.0, **where: Any) -> list[asyncpg.Record]:
    """Wait for at least `count` usage rows matching `where` (written in the background); oldest first.

    Fails, naming the filter and how many rows there were, if they do not all arrive in time.
    """
    clauses = " AND ".join(f"{name} = ${i}" for i, name in enumerate(where, 1)) or "true"
    query = f"SELECT * FROM usage_event WHERE {clauses} ORDER BY id"
    seen: list[asyncpg.Record] = []

    async def enough() -> list[asyncpg.Record] | None:
        nonlocal seen
        seen = await db.fetch(query, *where.values())
        return seen if len(seen) >= count else None

    filters = ", ".join(f"{name}={value!r}" for name, value in where.items()) or "any"
    try:
        return await wait_for(enough, seconds, what=f"{count} usage row(s) where {filters}")
    except AssertionError as error:
        raise AssertionError(f"{error} (found {len(seen)})") from None
