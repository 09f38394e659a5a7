"""Fixtures: a real Postgres, a real fake upstream on loopback, the gateway served by uvicorn.

The helpers themselves live in `support/`; this file only makes fixtures of them, and test
modules import nothing from it. Isolation does not depend on test order:

- the session migrates one template database (`support.database`); each test module gets
  its own clone, and its own shared gateway on it (`shared_gateway`, module scope);
- before each test that uses a gateway, the fake upstream is reset, every running
  in-process gateway is drained of background work (`support.internals.drain`) and all
  tables are emptied (the list comes from the catalog).

A module can give its gateways settings of their own by overriding `gateway_settings`.
pytest-asyncio runs every test and fixture on one session-wide event loop (pyproject.toml),
so the module-scoped servers and pools below all live on it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
import pytest_asyncio

from support import database, internals
from support.fake_upstream import FakeUpstream
from support.gateway import Gateway, GatewayFactory, make_settings, running_gateways, serve
from support.tcp_proxy import TcpProxy

SESSION = {"loop_scope": "session"}


@pytest.fixture(scope="session")
def database_server() -> str:
    """The Postgres server's URL: TEST_DATABASE_URL, else an embedded server."""
    return database.server_url()


@pytest_asyncio.fixture(scope="session", **SESSION)
async def template_database(database_server: str) -> AsyncIterator[str]:
    """The name of a database migrated to head once per session; every test database is a copy of it."""
    name = await database.create_template(database_server)
    try:
        yield name
    finally:
        await database.drop(database_server, name)


@pytest_asyncio.fixture(scope="module", **SESSION)
async def database_url(
    database_server: str, template_database: str, request: pytest.FixtureRequest
) -> AsyncIterator[str]:
    """This module's own database, cloned from the template and dropped after the module."""
    async with database.cloned_database(database_server, template_database, request.module.__name__) as url:
        yield url


@pytest.fixture
async def cuttable_database(database_url: str) -> AsyncIterator[TcpProxy]:
    """A TCP proxy in front of this module's database, to cut, blackhole or trap (`url_for`)."""
    if not urlsplit(database_url).port:
        pytest.skip("needs a TCP database (TEST_DATABASE_URL) to cut")
    async with TcpProxy.for_database(database_url) as proxy:
        yield proxy


@pytest.fixture
def fresh_database(database_server: str, template_database: str) -> Callable[..., Any]:
    """Another clone for one test: `async with fresh_database() as url:`."""

    def clone(label: str = "fresh") -> contextlib.AbstractAsyncContextManager[str]:
        return database.cloned_database(database_server, template_database, label)

    return clone


@pytest_asyncio.fixture(scope="module", **SESSION)
async def db(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest_asyncio.fixture(scope="module", **SESSION)
async def tables(db: asyncpg.Pool) -> list[str]:
    """Every table to empty between tests, from the catalog (all of the schema but alembic_version)."""
    return await database.tables(db)


@pytest_asyncio.fixture(scope="session", **SESSION)
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture(scope="module")
def gateway_settings() -> dict[str, Any]:
    """Settings every gateway of the module runs with (on top of `make_settings`); modules override this."""
    return {}


@pytest_asyncio.fixture(scope="module", **SESSION)
async def shared_gateway(
    database_url: str, upstream: FakeUpstream, gateway_settings: dict[str, Any]
) -> AsyncIterator[Gateway]:
    """The module's gateway, on the module's database; tests get it through `gateway`."""
    async with serve(make_settings(database_url, upstream, **gateway_settings)) as gateway:
        yield gateway


@pytest_asyncio.fixture(**SESSION)
async def clean(upstream: FakeUpstream, db: asyncpg.Pool, tables: list[str]) -> None:
    """Reset the fake upstream; let running gateways settle; empty every table (but for the
    shared assistants a gateway writes when it starts).

    Emptying is repeated (up to three times) if a gateway did anything in the meantime,
    e.g. its batch runner took another item between the drain and the TRUNCATE.
    """
    upstream.reset()
    for _ in range(3):
        for running in running_gateways():
            await running.settle_requests()
            await internals.drain(running.app)
        await database.empty(db, tables)
        for running in running_gateways():
            await internals.sync_assistants(running.app)  # what a start-up writes: ASSISTANTS_FILE's assistants
        if all(running.requests_in_flight() == 0 and internals.idle(running.app) for running in running_gateways()):
            return
    raise AssertionError("the running gateways kept working while their tables were being emptied")


@pytest_asyncio.fixture(**SESSION)
async def gateway(shared_gateway: Gateway, clean: None) -> Gateway:
    """The module's shared gateway, settled, with the fake upstream and the tables reset for this test."""
    return shared_gateway


@pytest.fixture
def gateway_with(
    database_url: str, upstream: FakeUpstream, gateway_settings: dict[str, Any], clean: None
) -> GatewayFactory:
    """Start a gateway with particular settings on the module's database (tables reset first):
    `async with gateway_with(fallback_to_simulated=True) as gw`."""

    def start(simulated: bool = False, **overrides: Any) -> contextlib.AbstractAsyncContextManager[Gateway]:
        url = overrides.pop("database_url", database_url)
        return serve(make_settings(url, None if simulated else upstream, **{**gateway_settings, **overrides}))

    return start
