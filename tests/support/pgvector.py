"""A database with pgvector, whatever `TEST_DATABASE_URL` points at: an embedded Postgres (pgserver,
which ships the extension) of its own, in a temporary folder, migrated to head.

The machine's Postgres (CI's too) has no pgvector, so the hybrid search path is tested here:
the migration creates the extension and the `embedding` column itself, as it would in production.
The server is stopped after the block (pgserver's `cleanup_mode="stop"`) and its folder removed.
Used by tests/test_knowledge_core.py and bench/knowledge_core.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg

from app import migrations
from support.database import with_database

DATABASE = "knowledge"


def _quietly(call: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        # Without XDG_RUNTIME_DIR (CI, containers) platformdirs warns that pgserver's runtime files go to /tmp.
        warnings.simplefilter("ignore")
        return call()


def _start(folder: Path) -> Any:
    def start() -> Any:
        import pgserver  # its import looks for the runtime folder

        return pgserver.get_server(str(folder), cleanup_mode="stop")

    folder.mkdir(parents=True, exist_ok=True)
    return _quietly(start)


@contextlib.asynccontextmanager
async def pgvector_database() -> AsyncIterator[str]:
    """A fresh embedded Postgres with a database migrated to head (pgvector, `embedding` column); its URL."""
    with tempfile.TemporaryDirectory(prefix="gateway-pgvector-") as folder:
        server = await asyncio.to_thread(_start, Path(folder) / "pg")
        try:
            admin = await asyncpg.connect(server.get_uri())
            try:
                await admin.execute(f'CREATE DATABASE "{DATABASE}"')
            finally:
                await admin.close()
            url = with_database(server.get_uri(), DATABASE)
            await asyncio.to_thread(migrations.upgrade, url)
            yield url
        finally:
            await asyncio.to_thread(_quietly, server.cleanup)
