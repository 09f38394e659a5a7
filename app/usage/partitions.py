"""The ledger's monthly partitions: made ahead of time, and dropped whole when they age out.

`usage_event` is range-partitioned by `created_at`, one partition per UTC month
(`usage_event_y2026m12`). A row's month is its call's start, carried from the pending row to
the settled one, so a replayed or re-settled row always lands in the partition of its first
write and `(call_id, created_at)` keeps one row per call.

A row for a month without a partition cannot be written, so the service keeps
`USAGE_PARTITIONS_AHEAD` months ready (a job in every replica; creating one that exists is a
no-op), and so does `python -m app usage-partitions`. Retention detaches and drops the
partitions wholly older than `USAGE_RETENTION_MONTHS`, with their months' rollups (a DROP
fires no trigger), instead of deleting rows one by one.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, date, datetime, timedelta

import asyncpg

from app.config import Settings

log = logging.getLogger("app.usage.partitions")

PARENT = "usage_event"
DAILY_ROLLUPS = ("usage_daily", "usage_daily_totals", "usage_user_daily")
NAME = re.compile(r"^usage_event_y(\d{4})m(\d{2})$")
# One process at a time makes or drops partitions (DDL takes strong locks; two would queue anyway).
PARTITION_LOCK = 727_020
LOCK_TIMEOUT = "2s"


def month_start(day: date) -> date:
    return day.replace(day=1)


def add_months(month: date, count: int) -> date:
    index = month.year * 12 + month.month - 1 + count
    return date(index // 12, index % 12 + 1, 1)


def partition_name(month: date) -> str:
    return f"{PARENT}_y{month.year:04d}m{month.month:02d}"


def create_statement(month: date) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {partition_name(month)} PARTITION OF {PARENT}"
        f" FOR VALUES FROM ('{month.isoformat()} 00:00:00+00') TO ('{add_months(month, 1).isoformat()} 00:00:00+00')"
    )


def this_month() -> date:
    return month_start(datetime.now(UTC).date())


Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


async def existing(connection: Connection) -> list[date]:
    """The months that have a partition, oldest first."""
    rows = await connection.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = $1::regclass",
        PARENT,
    )
    months = []
    for row in rows:
        found = NAME.match(row["relname"])
        if found:
            months.append(date(int(found[1]), int(found[2]), 1))
    return sorted(months)


async def _ddl(connection: Connection) -> None:
    """In a transaction: one process at a time, and a DDL statement that cannot have the ledger's lock
    soon gives up (the job tries again next time) rather than queue every usage write behind it."""
    await connection.execute("SELECT pg_advisory_xact_lock($1)", PARTITION_LOCK)
    await connection.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")


async def ensure(connection: Connection, ahead: int, since: date | None = None) -> list[date]:
    """Partitions from `since` (default: this month) to `ahead` months after this one; the months made.
    Each is made in its own short transaction: creating one locks the ledger against writes."""
    first = month_start(since) if since is not None else this_month()
    last = add_months(this_month(), ahead)
    made: list[date] = []
    month = first
    while month <= last:
        async with connection.transaction():
            await _ddl(connection)
            if month not in set(await existing(connection)):
                await connection.execute(create_statement(month))
                made.append(month)
        month = add_months(month, 1)
    if made:
        log.info("usage partitions made: %s", ", ".join(partition_name(month) for month in made))
    return made


async def drop_older_than(connection: Connection, months: int) -> list[date]:
    """Drop the partitions of months that ended more than `months` whole months ago, and their rollups;
    the months dropped. This month counts as month 0: with 12, a year of whole months is kept."""
    oldest_kept = add_months(this_month(), -months)
    dropped: list[date] = []
    for month in [month for month in await existing(connection) if month < oldest_kept]:
        # The ledger is locked only while its partition goes (no row can be written for a month without
        # partition); the rollups go after, holding no lock on it.
        async with connection.transaction():
            await _ddl(connection)
            name = partition_name(month)
            await connection.execute(f"ALTER TABLE {PARENT} DETACH PARTITION {name}")
            await connection.execute(f"DROP TABLE {name}")
        dropped.append(month)
    await _drop_rollups_before(connection, oldest_kept)
    if dropped:
        log.info("usage partitions dropped (retention): %s", ", ".join(partition_name(month) for month in dropped))
    return dropped


async def _drop_rollups_before(connection: Connection, first_kept: date) -> None:
    """The rollups of the days before `first_kept`, a day per transaction; also what an earlier run left
    when it stopped between a partition and its rollups."""
    await connection.execute("DELETE FROM usage_user_monthly WHERE month < $1", first_kept)
    oldest = await connection.fetchval(
        "SELECT least((SELECT min(hour) FROM usage_hourly) AT TIME ZONE 'UTC',"
        + ", ".join(f" (SELECT min(day) FROM {rollup})" for rollup in DAILY_ROLLUPS)
        + ")::date"
    )
    day = oldest
    while day is not None and day < first_kept:
        async with connection.transaction():
            await connection.execute(
                "DELETE FROM usage_hourly WHERE hour >= $1::date::timestamp AT TIME ZONE 'UTC'"
                " AND hour < ($1::date + 1)::timestamp AT TIME ZONE 'UTC'",
                day,
            )
            for rollup in DAILY_ROLLUPS:
                await connection.execute(f"DELETE FROM {rollup} WHERE day = $1", day)
        day += timedelta(days=1)


async def maintain(pool: asyncpg.Pool, settings: Settings) -> str | None:
    """The job: partitions made ahead, and (with USAGE_RETENTION_MONTHS) the old ones dropped; what changed."""
    async with pool.acquire() as connection:
        made = await ensure(connection, settings.usage_partitions_ahead)
        dropped = (
            await drop_older_than(connection, settings.usage_retention_months)
            if settings.usage_retention_months
            else []
        )
    changes = [f"made {partition_name(month)}" for month in made] + [f"dropped {partition_name(m)}" for m in dropped]
    return ", ".join(changes) or None
