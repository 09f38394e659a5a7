"""The tests' databases: migrated once into a template, cloned per test module, emptied between tests.

The server is `TEST_DATABASE_URL` when set, else an embedded Postgres (pgserver). Alembic
runs once per session, into the template, so the migrations are tested too; every clone
(`CREATE DATABASE x TEMPLATE t`) starts at head without running them again. Which tables
to empty comes from the catalog, so a new migration's tables are emptied without anyone
keeping a list.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from app import migrations

# How often `empty` tries a TRUNCATE that Postgres cancelled as a deadlock with a gateway's job.
DEADLOCK_RETRIES = 3
EMBEDDED_DATA_DIR = Path(tempfile.gettempdir()) / "gateway-test-pg"
TABLES_QUERY = (
    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
    # Kept between tests: migrations; the running gateways; the secrets they loaded at start-up.
    " AND tablename NOT IN ('alembic_version', 'gateway_instance', 'gateway_secret')"
    # A partition is emptied with its partitioned table (and may be dropped by a test of retention).
    " AND NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = format('public.%I', tablename)::regclass)"
)


def server_url() -> str:
    """`TEST_DATABASE_URL`, or else the URL of an embedded server (started, or joined, here)."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        return url
    from app.db import start_embedded_postgres

    return start_embedded_postgres(EMBEDDED_DATA_DIR)


def with_database(url: str, name: str) -> str:
    """`url` pointing at database `name` on the same server."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def database_name(prefix: str, label: str = "") -> str:
    """A name no other run or module uses: prefix, a readable label, the pid and a random suffix."""
    label = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")[:24]
    return "_".join(part for part in (prefix, label, str(os.getpid()), secrets.token_hex(3)) if part)


async def create_template(server: str) -> str:
    """A new database migrated to head with Alembic; returns its name."""
    name = database_name("gateway_tmpl")
    admin = await asyncpg.connect(server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    await asyncio.to_thread(migrations.upgrade, with_database(server, name))
    return name


async def clone(server: str, template: str, label: str = "") -> str:
    """A new database copied from `template` (nobody may be connected to it); returns its URL."""
    name = database_name("gateway_test", label)
    admin = await asyncpg.connect(server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await admin.close()
    return with_database(server, name)


async def drop(server: str, name: str) -> None:
    """Drop a database, disconnecting whoever is still in it."""
    admin = await asyncpg.connect(server)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def name_of(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


@contextlib.asynccontextmanager
async def cloned_database(server: str, template: str, label: str = "") -> AsyncIterator[str]:
    """A clone of the template for the block; dropped afterwards. Yields its URL."""
    url = await clone(server, template, label)
    try:
        yield url
    finally:
        await drop(server, name_of(url))


async def tables(db: asyncpg.Pool | asyncpg.Connection) -> list[str]:
    """Every table of the schema except Alembic's, from the catalog."""
    return sorted(row["tablename"] for row in await db.fetch(TABLES_QUERY))


async def empty(db: asyncpg.Pool | asyncpg.Connection, names: list[str]) -> list[str]:
    """Empty the tables; returns those that had rows.

    Only tables holding rows are truncated (one cheap probe finds them): TRUNCATE costs a
    new file per table, and most tests write to a few of them only. A running gateway's
    background job (e.g. the run sweep, one UPDATE over thread_run, thread_message and
    run_step) may lock those tables in another order: Postgres then cancels one side as a
    deadlock, and a TRUNCATE it cancelled is simply tried again.
    """
    probe = " UNION ALL ".join(f"(SELECT '{name}' AS name FROM \"{name}\" LIMIT 1)" for name in names)
    filled = [row["name"] for row in await db.fetch(probe)]
    if filled:
        quoted = ", ".join(f'"{name}"' for name in filled)
        for attempt in range(DEADLOCK_RETRIES):
            try:
                await db.execute(f"TRUNCATE {quoted} CASCADE")
                break
            except asyncpg.DeadlockDetectedError:
                if attempt == DEADLOCK_RETRIES - 1:
                    raise
    return filled
