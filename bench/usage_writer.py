"""The usage writer's throughput: rows per second its settle statement writes into the ledger.

    .venv/bin/python bench/usage_writer.py [--rows 200000] [--batch 1000] [--writers 1,4] [--no-rollups]

Each writer is one connection writing batches of `--batch` rows with the writer's own statement
(`app.usage.writer.SETTLE`, one transaction per batch, as a flush is), all writers at once on
their own rows; rows carry 1,000 users, 3 models, 3 routes and the current time, as a busy
hour would. `--no-rollups` disables the ledger's triggers for the run, to show what the
rollups cost. The script works on any version of the schema that has that statement, so the
same file run from an older checkout measures the writer as it was. Postgres is
`BENCH_DATABASE_URL` or `TEST_DATABASE_URL` (else postgresql://postgres@127.0.0.1:5432/test);
a scratch database `gateway_bench_writer_<pid>` is made, migrated and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app import migrations
from app.usage.ledger import new_call_id
from app.usage.record import UsageRecord
from app.usage.writer import SETTLE, _arrays

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/test"
MODELS = ("gpt-5-mini", "gpt-5-nano", "gpt-image-1-mini")
ROUTES = ("chat.completions", "threads.runs", "responses")


def server_url() -> str:
    return os.environ.get("BENCH_DATABASE_URL") or os.environ.get("TEST_DATABASE_URL") or DEFAULT_SERVER


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def batch_of(size: int) -> list[UsageRecord]:
    now = datetime.now(UTC)
    return [
        UsageRecord(
            call_id=new_call_id(),
            created_at=now,
            request_id=f"req_{uuid.uuid4().hex[:12]}",
            user_id=f"user-{random.randrange(1000)}",
            api_key_id=None,
            route=random.choice(ROUTES),
            model=random.choice(MODELS),
            status="ok" if random.random() > 0.02 else "error",
            http_status=200,
            prompt_tokens=random.randrange(10, 2000),
            completion_tokens=random.randrange(10, 800),
            cost_usd=round(random.random() / 1000, 8),
            latency_ms=random.random() * 900,
        )
        for _ in range(size)
    ]


async def writer(url: str, batches: list[list[UsageRecord]]) -> None:
    connection = await asyncpg.connect(url)
    try:
        for batch in batches:
            async with connection.transaction():
                await connection.fetch(SETTLE, *_arrays(batch))
    finally:
        await connection.close()


async def run(url: str, rows: int, batch: int, writers: int) -> float:
    per_writer = rows // writers // batch
    work = [[batch_of(batch) for _ in range(per_writer)] for _ in range(writers)]
    started = time.perf_counter()
    await asyncio.gather(*[writer(url, batches) for batches in work])
    return per_writer * batch * writers / (time.perf_counter() - started)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--writers", default="1,4", help="comma-separated writer counts, each its own run")
    parser.add_argument("--no-rollups", action="store_true", help="disable the ledger's triggers for the run")
    args = parser.parse_args()
    server = server_url()
    name = f"gateway_bench_writer_{os.getpid()}"
    admin = await asyncpg.connect(server)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = with_database(server, name)
    try:
        await asyncio.to_thread(migrations.upgrade, url)
        connection = await asyncpg.connect(url)
        try:
            triggers = await connection.fetchval(
                "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'usage_event'::regclass AND NOT tgisinternal"
            )
            partitioned = await connection.fetchval("SELECT relkind = 'p' FROM pg_class WHERE relname = 'usage_event'")
            if args.no_rollups and triggers:
                await connection.execute("ALTER TABLE usage_event DISABLE TRIGGER USER")
        finally:
            await connection.close()
        rollups = bool(triggers) and not args.no_rollups
        shape = "partitioned" if partitioned else "one table"
        print(f"schema: usage_event {shape}, rollups {'on' if rollups else 'off'}")
        for writers in (int(n) for n in args.writers.split(",")):
            rate = await run(url, args.rows, args.batch, writers)
            print(f"  {writers} writer(s), batches of {args.batch}: {rate:,.0f} rows/s")
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
