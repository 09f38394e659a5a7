"""The gateway under test: served by uvicorn inside the test's event loop, or as a real `python -m app serve`.

In process (`serve`), a test talks to it over loopback HTTP and may peek at its state
through `support.internals`. As a process (`gateway_process`), it is configured by
environment like an operator's, stopped with SIGTERM (SIGKILL after a grace period), and
its log can be read afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from app.config import Settings
from app.main import create_app
from app.server import connection_options
from support.auth import ADMIN_KEY, JWT_SECRET
from support.fake_upstream import FakeUpstream
from support.processes import (
    ROOT,
    Proc,
    ProcessError,
    free_port,
    start_process,
    stop_process_async,
    wait_for_health_async,
)
from support.waiting import wait_for

__all__ = [
    "ROOT",
    "Gateway",
    "GatewayFactory",
    "GatewayProcess",
    "Proc",
    "ProcessError",
    "app_command",
    "app_command_async",
    "free_port",
    "gateway_env",
    "gateway_process",
    "make_settings",
    "running_gateways",
    "serve",
]


def make_settings(database_url: str, upstream: FakeUpstream | None, **overrides: Any) -> Settings:
    """Test settings: fast flushes and retries, our admin key and JWT secret; no upstream means simulated."""
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
        # Its own spool: a gateway replays whatever it finds in its spool folder, other tests' files included.
        "usage_spool_dir": Path(tempfile.mkdtemp(prefix="gateway-spool-")),
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


class _Admin:
    """What a gateway, in process or not, can do with the admin key."""

    client: httpx.AsyncClient

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


@dataclass(eq=False)
class Gateway(_Admin):
    """A gateway running in this process: its URL, an HTTP client, and the app (see support.internals)."""

    url: str
    client: httpx.AsyncClient
    app: Any
    server: uvicorn.Server | None = field(default=None, repr=False)

    def requests_in_flight(self) -> int:
        """Requests uvicorn is still handling (a stream the client left may still be finishing)."""
        return len(self.server.server_state.tasks) if self.server is not None else 0

    async def settle_requests(self, seconds: float = 30.0) -> None:
        """Wait until no request is being handled."""

        async def idle() -> bool:
            return self.requests_in_flight() == 0

        await wait_for(idle, seconds, what=f"the gateway at {self.url} to finish its requests in flight")


_running: list[Gateway] = []


def running_gateways() -> list[Gateway]:
    """The in-process gateways running now, oldest first."""
    return list(_running)


@contextlib.asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[Gateway]:
    """Run the app in uvicorn on a loopback port inside the test's event loop."""
    app = create_app(settings)
    # The protocol `python -m app serve` runs, with these settings' connection limits.
    options = connection_options(settings, in_process=True)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", **options)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("uvicorn stopped before it started")  # serve() returned without raising
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        gateway = Gateway(url, client, app, server)
        _running.append(gateway)
        try:
            yield gateway
        finally:
            _running.remove(gateway)
            server.should_exit = True
            await task


GatewayFactory = Callable[..., contextlib.AbstractAsyncContextManager[Gateway]]


# --- as a process ------------------------------------------------------------------------


def gateway_env(database_url: str, upstream: FakeUpstream | None, **values: str) -> dict[str, str]:
    """Our environment plus what a gateway process needs, like `make_settings` says it for one in process."""
    env = {
        **os.environ,
        "ENVIRONMENT": "test",
        "DATABASE_URL": database_url,
        "ADMIN_API_KEY": ADMIN_KEY,
        "JWT_SECRET": JWT_SECRET,
        "USAGE_FLUSH_INTERVAL": "0.05",
        "DB_POOL_SIZE": "5",
    }
    if upstream is not None:
        env |= {"OPENAI_API_KEY": upstream.api_key, "OPENAI_BASE_URL": upstream.base_url}
    return env | values


@dataclass(eq=False)
class GatewayProcess(_Admin):
    """A `python -m app serve` process: its URL, a client for it, and the process with its log."""

    url: str
    client: httpx.AsyncClient
    proc: Proc

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def log_text(self) -> str:
        return self.proc.log_text()

    async def wait_for_log(self, needle: str, count: int = 1, seconds: float = 60.0) -> None:
        """Wait until `needle` appears `count` times in its log (e.g. once per worker started)."""

        async def logged() -> bool:
            return self.log_text().count(needle) >= count

        await wait_for(logged, seconds, what=f"{count} x {needle!r} in the gateway's log", interval=0.05)


@contextlib.asynccontextmanager
async def gateway_process(
    env: dict[str, str],
    log: Path,
    *args: str,
    log_level: str = "warning",
    start_timeout: float = 60.0,
    grace: float = 30.0,
    limits: httpx.Limits | None = None,
) -> AsyncIterator[GatewayProcess]:
    """`python -m app serve --port P --log-level L *args` with `env`; ready once /healthz answers 200.

    Its stderr goes to `log` (stdout is discarded). On leaving, SIGTERM and up to `grace`
    seconds to stop before SIGKILL; `returncode` and `log_text()` stay readable afterwards.
    """
    port = free_port()
    command = [sys.executable, "-m", "app", "serve", "--port", str(port), "--log-level", log_level, *args]
    proc = start_process("gateway", command, log, env, stdout_to_log=False)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            await wait_for_health_async(proc, url + "/healthz", start_timeout)
        except ProcessError as error:
            raise AssertionError(str(error)) from None
        async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits or httpx.Limits()) as client:
            yield GatewayProcess(url, client, proc)
    finally:
        stopped = await stop_process_async(proc, grace)
    if not stopped:  # only reached when the block itself did not fail
        raise AssertionError(f"the gateway process did not stop within {grace:g} s of SIGTERM:\n{proc.log_tail()}")


def app_command(
    *args: str, env: dict[str, str], timeout: float = 60.0, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """`python -m app *args` to completion, as an operator runs a CLI command; stdout and stderr as text."""
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )


async def python_async(
    *args: str, env: dict[str, str], seconds: float = 60.0, stderr_apart: bool = False
) -> tuple[int, str, str]:
    """`python *args` in the repository without blocking the event loop: (exit code, stdout, stderr);
    stderr is interleaved into stdout unless `stderr_apart`. Killed, and an AssertionError, past `seconds`."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE if stderr_apart else asyncio.subprocess.STDOUT,
    )
    try:
        output, errors = await asyncio.wait_for(process.communicate(), seconds)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"`python {' '.join(args)}` did not finish in {seconds:g} s") from None
    return process.returncode or 0, output.decode(), (errors or b"").decode()


async def app_command_async(*args: str, env: dict[str, str], seconds: float = 60.0) -> tuple[int, str]:
    """`app_command` without blocking the event loop: (exit code, stdout and stderr interleaved)."""
    code, output, _ = await python_async("-m", "app", *args, env=env, seconds=seconds)
    return code, output
