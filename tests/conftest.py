"""Test harness: a real Postgres, a real fake upstream on loopback, the gateway served by uvicorn.

The database is `TEST_DATABASE_URL` when set (CI points it at the local server), else an
embedded server. Each run creates its own database and migrates it with Alembic, so the
migrations are tested too; tables are emptied between tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import jwt
import pytest
import pytest_asyncio
import uvicorn
from fake_upstream import FakeUpstream

from app import migrations
from app.config import Settings
from app.main import create_app

ADMIN_KEY = "test-admin-key-0123456789"
JWT_SECRET = "test-jwt-secret-0123456789abcdef"
TABLES = (
    "usage_event",
    "api_key",
    "app_user",
    "rate_limit_bucket",
    "thread_message",
    "thread",
    "user_context_cache",
    "image_batch_item",
    "image_batch",
    "image",
    "idempotency_key",
    "user_openai_key",
    "limit_refusal",
)


def _server_url() -> str:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        return url
    from app.db import start_embedded_postgres

    return start_embedded_postgres(__import__("pathlib").Path(tempfile.gettempdir()) / "gateway-test-pg")


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest_asyncio.fixture(scope="session")
async def database_url() -> AsyncIterator[str]:
    server = _server_url()
    name = f"gateway_test_{os.getpid()}_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(server)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = _with_database(server, name)
    try:
        await asyncio.to_thread(migrations.upgrade, url)
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest_asyncio.fixture(scope="session")
async def db(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest_asyncio.fixture(scope="session")
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    await fake.start()
    yield fake
    await fake.stop()


def make_settings(database_url: str, upstream: FakeUpstream | None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "environment": "test",
        "database_url": database_url,
        "openai_api_key": upstream.api_key if upstream else None,
        "openai_base_url": upstream.base_url if upstream else "http://127.0.0.1:9/v1",
        "admin_api_key": ADMIN_KEY,
        "jwt_secret": JWT_SECRET,
        "usage_flush_interval": 0.05,
        "upstream_retry_base_delay": 0.01,
        "auth_failures_per_minute": 100_000,
        "ratelimit_prune_interval": 3600,
        "db_pool_size": 5,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@dataclass
class Gateway:
    """A running gateway: its URL, an HTTP client, and the app for peeking at its state."""

    url: str
    client: httpx.AsyncClient
    app: Any

    async def key(self, tier: str = "free", user: str | None = None) -> tuple[str, str]:
        """A fresh key through the admin API; returns (key, user id)."""
        user = user or f"user-{secrets.token_hex(4)}"
        response = await self.client.post(
            "/admin/keys", json={"user_id": user, "tier": tier}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )
        assert response.status_code == 201, response.text
        return response.json()["key"], user

    async def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await self.client.request(method, path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, **kwargs)


@contextlib.asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[Gateway]:
    """Run the app in uvicorn on a loopback port inside the test's event loop."""
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        try:
            yield Gateway(url, client, app)
        finally:
            server.should_exit = True
            await task


GatewayFactory = Callable[..., contextlib.AbstractAsyncContextManager[Gateway]]


@pytest.fixture
def gateway_with(database_url: str, upstream: FakeUpstream) -> GatewayFactory:
    """Start a gateway with particular settings: `async with gateway_with(fallback_to_simulated=True) as gw`."""

    def start(simulated: bool = False, **overrides: Any) -> contextlib.AbstractAsyncContextManager[Gateway]:
        url = overrides.pop("database_url", database_url)
        return serve(make_settings(url, None if simulated else upstream, **overrides))

    return start


@pytest_asyncio.fixture(scope="session")
async def shared_gateway(database_url: str, upstream: FakeUpstream) -> AsyncIterator[Gateway]:
    async with serve(make_settings(database_url, upstream)) as gateway:
        yield gateway


@pytest_asyncio.fixture
async def gateway(shared_gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool) -> AsyncIterator[Gateway]:
    """The shared gateway, with the fake upstream and the tables reset for this test."""
    upstream.reset()
    await db.execute(f"TRUNCATE {', '.join(TABLES)} CASCADE")
    yield shared_gateway


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_jwt(sub: str, *, expires_in: int = 300, secret: str = JWT_SECRET, **claims: Any) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + expires_in, **claims}, secret, algorithm="HS256")


async def wait_for(check: Callable[[], Awaitable[Any]], seconds: float = 5.0) -> Any:
    """Poll until `check` returns something truthy (usage rows are written in the background)."""
    deadline = time.monotonic() + seconds
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.02)


async def usage_rows(db: asyncpg.Pool, count: int = 1, **where: Any) -> list[asyncpg.Record]:
    """Wait for `count` usage rows matching `where` and return them oldest first."""
    clauses = " AND ".join(f"{name} = ${i}" for i, name in enumerate(where, 1)) or "true"
    query = f"SELECT * FROM usage_event WHERE {clauses} ORDER BY id"

    async def fetch() -> list[asyncpg.Record] | None:
        rows = await db.fetch(query, *where.values())
        return rows if len(rows) >= count else None

    return await wait_for(fetch) or await db.fetch(query, *where.values())
