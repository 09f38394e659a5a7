"""Fault script: reproduce, against a real gateway process, each failure the gateway must survive.

Usage: .venv/bin/python bench/faults.py [--only CASE ...] [--runs N] [--jobs N] [--list]

Every case starts its own `python -m app serve` (one worker) on a fresh database (created
empty here, migrated by `serve`, dropped at the end), in front of a misbehaving fake OpenAI
upstream (tests/support/fake_upstream.py) and, where the database must fail, behind a
cuttable TCP proxy (tests/support/tcp_proxy.py: `cut`, `blackhole`, `cut_after_commit`).
Each case runs in a child process of its own with its own timeout (a case that overruns
reports TIMEOUT, and its processes and database are cleaned up); a few run side by side
(`--jobs`). What is measured is what a client and an operator see: HTTP statuses, SSE
events, rows in `usage_event`, requests the fake upstream received, wall-clock time.

It prints each case's measured figure next to the wanted one with PASS or FAIL, as an
aligned table, and exits non-zero when any case does not pass. Logs (the gateways', each
case's) are under bench/results/faults/. Postgres: FAULTS_DATABASE_URL, else
TEST_DATABASE_URL, else postgresql://postgres@127.0.0.1:5432/test (loopback only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # run as a script: tests/support is not on the path yet
from support.fake_upstream import CHAT_PATH, FakeUpstream, Reply  # noqa: E402
from support.processes import (  # noqa: E402
    Proc,
    ProcessError,
    free_port,
    kill_process_async,
    start_process,
    stop_process_async,
    wait_for_health_async,
)
from support.tcp_proxy import TcpProxy  # noqa: E402

# --- settings of the run (adjust here) ----------------------------------------------------

LOCAL_DATABASE = "postgresql://postgres@127.0.0.1:5432/test"
RESULTS_DIR = ROOT / "bench" / "results" / "faults"
CATALOG = ROOT / "app" / "catalog.toml"
ADMIN_KEY = "faults-admin-key-0123456789abcdef"
IMAGES_PATH = "/v1/images/generations"

# The later gateway's per-process fallback limit while Postgres is away: the setting's name
# and the value passed (a process allows the tier's limit divided by it). The older gateway
# ignores it.
RATELIMIT_LOCAL_DIVISOR_SETTING = "RATELIMIT_LOCAL_DIVISOR"
RATELIMIT_LOCAL_DIVISOR = 1

SETTLE_SECONDS = 15.0  # after a restart: the fixed gateway settles dead processes' rows after a ~10 s lease
KILL_RUNS = 4  # SIGKILL mid-load, how many times (--runs)
KILL_CLIENTS = 20
KILL_LOAD_SECONDS = 3.0
KILL_UPSTREAM_DELAY = 0.25  # each upstream answer takes this long: calls are in flight at the kill
THREAD_GIVE_UP = 90.0  # stop polling a busy thread after this long (reported as ">90 s")
THREAD_WANT_SECONDS = 30.0  # "usable again within seconds"
THREAD_ASSISTANT = "asst_coach"  # a shared assistant ([profile.coach] of app/assistants.toml)
RUN_GIVE_UP = 30.0  # stop polling a run that does not end after this long
# What the SDK's pollers stop at: a run in any of these waits for nothing more from the gateway.
TERMINAL_RUN_STATUSES = frozenset({"requires_action", "cancelled", "completed", "failed", "expired", "incomplete"})
LOCKOUT_WANT_SECONDS = 60.0  # no multi-minute lockout once the database is back
LOCKOUT_GIVE_UP = 75.0
RATELIMIT_TIMEOUT = 2.0  # RATELIMIT_TIMEOUT passed to the gateway of the blackhole case
LATENCY_SLACK = 1.0  # on top of the configured timeouts: the upstream answers at once
BLACKHOLE_SECONDS = 20.0
BLACKHOLE_RATE = 50  # requests per second
IDEMPOTENCY_GIVE_UP = 90.0  # a client retrying 409/503 once a second stops after this long
IMAGE_SECONDS = 3.0  # how long the fake upstream takes per image
STREAM_MAX_SECONDS = 5.0
TOOLS_CHARS = 900_000  # characters of tool descriptions in one request
TOOLS_WANT_SHARE = 0.9  # "reserved at its real size": at least this share of chars / 4
COMMIT_HOLD_SECONDS = 5.0  # the shutdown variant: the COMMIT's answer is held this long, SIGTERM meanwhile
STOP_GRACE = 40.0  # SIGTERM, then SIGKILL after this long
CLEANUP_GRACE = 45.0  # a child past its case's timeout gets this long to clean up before it is killed
DEFAULT_JOBS = 4


def _tier(name: str) -> dict[str, Any]:
    with CATALOG.open("rb") as file:
        tier: dict[str, Any] = tomllib.load(file)["tier"][name]
    return tier


FREE = _tier("free")


def report(line: str = "") -> None:
    print(line, flush=True)


# --- results ------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a case measured, and whether that is what we want."""

    measured: str
    passed: bool
    notes: list[str] = field(default_factory=list)


@dataclass
class Result:
    case: str
    status: str  # PASS, FAIL, TIMEOUT, ERROR
    measured: str
    seconds: float
    notes: list[str] = field(default_factory=list)


# --- the gateway and its surroundings ----------------------------------------------------


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


STRIPPED_SETTINGS = ("DATABASE_URL", "ADMIN_API_KEY", "JWT_SECRET", "CATALOG_FILE", "ASSISTANTS_FILE", "DATA_DIR")


def base_env() -> dict[str, str]:
    """Our environment without any gateway setting an operator's shell may carry."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("OPENAI_", "RATELIMIT_"))}
    for name in STRIPPED_SETTINGS:
        env.pop(name, None)
    return env


@dataclass(eq=False)
class Gateway:
    """A running `python -m app serve`: its URL, process (with its log) and a client."""

    url: str
    proc: Proc
    client: httpx.AsyncClient
    env: dict[str, str]

    def log_text(self) -> str:
        return self.proc.log_text()

    async def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await self.client.request(method, path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, **kwargs)

    async def key(self, tier: str = "free", overrides: dict[str, Any] | None = None) -> tuple[str, str]:
        """A new user with a key (admin API) and its limit overrides; returns (key, user id)."""
        user = f"flt-{secrets.token_hex(4)}"
        created = await self.admin("POST", "/admin/keys", json={"user_id": user, "tier": tier})
        if created.status_code != 201:
            raise RuntimeError(f"POST /admin/keys answered {created.status_code}: {created.text[:300]}")
        if overrides:
            patched = await self.admin("PATCH", f"/admin/users/{user}", json={"limit_overrides": overrides})
            if patched.status_code != 200:
                raise RuntimeError(f"PATCH /admin/users answered {patched.status_code}: {patched.text[:300]}")
        return created.json()["key"], user


@dataclass
class Stopped:
    seconds: float
    on_its_own: bool  # stopped within the grace period (else SIGKILLed)
    returncode: int | None
    log: str


class Harness:
    """One case's world: a fresh database, fake upstreams, proxies, gateway processes; all undone at exit."""

    def __init__(self, case: str, server: str, run_id: str, log_dir: Path) -> None:
        self.case = case
        self.server = server
        self.db_name = f"faults_{run_id}_{case}"
        self.db_url = with_database(server, self.db_name)
        self.log_dir = log_dir
        self.data_dir = Path()  # DATA_DIR (images only: the database is DATABASE_URL), a temporary folder
        self.gateways: list[Gateway] = []
        self.upstreams: list[FakeUpstream] = []
        self.proxies: list[TcpProxy] = []
        self.pool: asyncpg.Pool | None = None
        self.pidfile: Path | None = None
        self.progress = ""  # what the case is doing: shown if it times out
        self._started = 0

    async def __aenter__(self) -> Harness:
        admin = await asyncpg.connect(self.server)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{self.db_name}"')
        finally:
            await admin.close()
        for stale in self.log_dir.glob("gateway-*.log"):
            stale.unlink()
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"faults-{self.case}-"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for gateway in self.gateways:
            with contextlib.suppress(Exception):
                await gateway.client.aclose()
            await kill_process_async(gateway.proc)
        for upstream in self.upstreams:
            with contextlib.suppress(Exception):
                await upstream.stop()
        for proxy in self.proxies:
            with contextlib.suppress(Exception):
                await proxy.stop()
        if self.pool is not None:
            with contextlib.suppress(Exception):
                await self.pool.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        admin = await asyncpg.connect(self.server)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        finally:
            await admin.close()

    async def db(self) -> asyncpg.Pool:
        """A direct pool on the case's database (never through a proxy): how the operator looks."""
        if self.pool is None:
            self.pool = await asyncpg.create_pool(self.db_url, min_size=1, max_size=4)
        assert self.pool is not None
        return self.pool

    async def upstream(self) -> FakeUpstream:
        upstream = FakeUpstream("sk-faults-upstream")
        await upstream.start()
        self.upstreams.append(upstream)
        return upstream

    async def proxy(self) -> TcpProxy:
        proxy = TcpProxy.for_database(self.server)
        await proxy.start()
        self.proxies.append(proxy)
        return proxy

    async def gateway(
        self, upstream: FakeUpstream, *, via: TcpProxy | None = None, env: dict[str, str] | None = None
    ) -> Gateway:
        """Start a gateway (one worker) on the case's database, directly or through `via`; ready at /healthz."""
        values = {
            **base_env(),
            "ENVIRONMENT": "development",
            "DATABASE_URL": via.url_for(self.db_url) if via is not None else self.db_url,
            "OPENAI_API_KEY": upstream.api_key,
            "OPENAI_BASE_URL": upstream.base_url,
            "ADMIN_API_KEY": ADMIN_KEY,
            "DATA_DIR": str(self.data_dir),
            "FALLBACK_TO_SIMULATED": "false",
            "LOG_FORMAT": "text",
            **(env or {}),
        }
        return await self._start(values)

    async def restart(self, gateway: Gateway) -> Gateway:
        """Another gateway with the same settings (the same database), e.g. after a crash."""
        return await self._start(gateway.env)

    async def _start(self, env: dict[str, str]) -> Gateway:
        self._started += 1
        port = free_port()
        serve = ["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--log-level", "warning"]
        command = [sys.executable, "-m", "app", *serve]
        log = self.log_dir / f"gateway-{self._started}.log"
        proc = start_process(f"gateway-{self._started}", command, log, env)
        if self.pidfile is not None:
            with self.pidfile.open("a") as file:
                file.write(f"{proc.pid}\n")
        url = f"http://127.0.0.1:{port}"
        client = httpx.AsyncClient(
            base_url=url, timeout=60, limits=httpx.Limits(max_connections=2000, max_keepalive_connections=200)
        )
        gateway = Gateway(url, proc, client, env)
        self.gateways.append(gateway)
        await wait_for_health_async(proc, url + "/healthz", 60)
        return gateway

    async def kill(self, gateway: Gateway) -> None:
        """SIGKILL: no shutdown of any kind."""
        await kill_process_async(gateway.proc)

    async def terminate(self, gateway: Gateway, grace: float = STOP_GRACE) -> Stopped:
        """SIGTERM, as a deploy does; SIGKILL after `grace`."""
        started = time.monotonic()
        on_its_own = await stop_process_async(gateway.proc, grace)
        return Stopped(time.monotonic() - started, on_its_own, gateway.proc.returncode, gateway.log_text())

    # --- looking at the rows ---

    async def rows(self, where: str, *args: Any) -> list[asyncpg.Record]:
        pool = await self.db()
        return list(await pool.fetch(f"SELECT * FROM usage_event WHERE {where} ORDER BY id", *args))

    async def rows_for(self, request_ids: Iterable[str]) -> list[asyncpg.Record]:
        return await self.rows("request_id = ANY($1::text[])", list(request_ids))

    async def settled_rows(
        self, where: str, *args: Any, want: int | None = None, seconds: float = 10.0, quiet: float = 1.0
    ) -> list[asyncpg.Record]:
        """The rows once `want` of them are there (or nothing new came for `quiet` s), and `quiet` s more."""
        deadline = time.monotonic() + seconds
        rows = await self.rows(where, *args)
        last_change = time.monotonic()
        while time.monotonic() < deadline:
            if want is not None and len(rows) >= want:
                break
            if want is None and time.monotonic() - last_change >= quiet:
                break
            await asyncio.sleep(0.2)
            newer = await self.rows(where, *args)
            if len(newer) != len(rows):
                last_change = time.monotonic()
            rows = newer
        await asyncio.sleep(quiet)
        return await self.rows(where, *args)


# --- a client's view ----------------------------------------------------------------------


def bearer(key: str, request_id: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {key}"}
    if request_id:
        headers["x-request-id"] = request_id
    return headers


def chat_body(content: str, *, stream: bool = False, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "default-chat", "messages": [{"role": "user", "content": content}], **extra}
    if stream:
        body["stream"] = True
    return body


def rid(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


TAG = re.compile(r"\[rid:([A-Za-z0-9._:-]+)\]")


def tagged(request_id: str, text: str = "Say hello") -> str:
    """Message text carrying the request id, so the fake upstream's log can be matched to rows."""
    return f"{text} [rid:{request_id}]"


def upstream_ids(upstream: FakeUpstream, path: str = CHAT_PATH) -> list[str]:
    """The request ids found in what the upstream received on `path`, in arrival order."""
    found = []
    for recorded in upstream.received(path):
        match = TAG.search(orjson.dumps(recorded.json or {}).decode())
        if match:
            found.append(match.group(1))
    return found


async def chat(
    gateway: Gateway, key: str, request_id: str, body: dict[str, Any] | None = None, seconds: float = 30.0
) -> httpx.Response:
    return await gateway.client.post(
        "/v1/chat/completions",
        json=body if body is not None else chat_body(tagged(request_id)),
        headers=bearer(key, request_id),
        timeout=seconds,
    )


@dataclass
class Streamed:
    """An SSE response as the client saw it."""

    status: int
    events: list[tuple[str | None, bytes]] = field(default_factory=list)
    ended: bool = False  # the response body ended normally
    broke: str | None = None  # the transport error that ended it otherwise
    seconds: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def errors(self) -> list[dict[str, Any]]:
        """Error events: a named `error` event, or a `data:` payload that is an error object."""
        found = []
        for name, data in self.events:
            try:
                parsed = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(parsed, dict) and (name == "error" or "error" in parsed):
                found.append(parsed)
        return found


async def read_sse(
    client: httpx.AsyncClient,
    path: str,
    *,
    json_body: dict[str, Any],
    headers: dict[str, str],
    seconds: float = 60.0,
    on_event: Callable[[str | None, bytes], None] | None = None,
) -> Streamed:
    started = time.monotonic()
    result = Streamed(0)
    try:
        async with client.stream("POST", path, json=json_body, headers=headers, timeout=seconds) as response:
            result.status = response.status_code
            result.headers = dict(response.headers)
            if response.status_code != 200:
                result.body = await response.aread()
                result.ended = True
                return result
            name: str | None = None
            data: list[str] = []
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())
                elif not line and data:
                    event = (name, "\n".join(data).encode())
                    result.events.append(event)
                    if on_event is not None:
                        on_event(*event)
                    name, data = None, []
            result.ended = True
    except httpx.HTTPError as error:
        result.broke = type(error).__name__
    finally:
        result.seconds = time.monotonic() - started
    return result


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def error_shape(response: httpx.Response) -> bool:
    """Our error body: {"error": {"message", "type", "param", "code"}}."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)


def flag_of(row: asyncpg.Record) -> str | None:
    """How a row says its usage was not taken as reported: a detail, an error code, or estimated tokens."""
    detail = row["detail"]
    if detail and detail not in ("{}", "null"):
        return f"detail {detail}"
    if row["error_code"]:
        return f"error_code {row['error_code']}"
    if row["tokens_estimated"]:
        return "tokens_estimated"
    return None


def dollars(value: float) -> str:
    return f"-${-value:.2f}" if value < 0 else f"${value:.2f}"


def count_text(values: Iterable[int]) -> str:
    return ", ".join(str(value) for value in values)


def statuses_text(statuses: Counter[Any]) -> str:
    return " ".join(f"{status}x{count}" for status, count in sorted(statuses.items(), key=lambda item: str(item[0])))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def shutdown_trouble(stopped: Stopped) -> list[str]:
    """What went wrong with a SIGTERM'd gateway's shutdown, as its exit and log say."""
    trouble = []
    if not stopped.on_its_own:
        trouble.append(f"did not stop in {STOP_GRACE:.0f} s (SIGKILLed)")
    for needle in ("could not be written", "shutdown failed", "rows dropped"):
        if needle in stopped.log:
            line = next(line for line in stopped.log.splitlines() if needle in line)
            trouble.append(f"log: {line.strip()[-110:]}")
    return trouble


def last_exception(log: str) -> str | None:
    """The last exception a log shows (the closing line of its last traceback)."""
    found = [line for line in log.splitlines() if re.match(r"^[A-Za-z_.]*(Error|Exception): ", line)]
    return found[-1].strip()[:140] if found else None


# --- the cases ----------------------------------------------------------------------------


async def case_budget(h: Harness) -> Outcome:
    """$0.02 monthly budget, 100 concurrent streams without max_tokens, 16,000 completion tokens each."""
    budget = 0.02
    upstream = await h.upstream()
    upstream.set_default(CHAT_PATH, Reply(usage=usage(12, 16_000), pieces=5, chunk_delay=0.2))
    gateway = await h.gateway(upstream)
    key, user = await gateway.key(
        "free", {"monthly_budget_usd": budget, "chat_requests_per_minute": 100_000, "chat_tokens_per_minute": None}
    )
    h.progress = "100 streams"
    ids = [rid("bud") for _ in range(100)]
    results = await asyncio.gather(
        *(
            read_sse(
                gateway.client,
                "/v1/chat/completions",
                json_body=chat_body(tagged(i), stream=True),
                headers=bearer(key, i),
            )
            for i in ids
        )
    )
    admitted = sum(result.status == 200 for result in results)
    rows = await h.settled_rows("user_id = $1", user, want=admitted, seconds=15)
    spent = float(sum(row["cost_usd"] for row in rows))
    measured = f"{admitted} admitted, ${spent:.2f} spent ({spent / budget:.1f}x)"
    return Outcome(measured, spent <= budget + 1e-9, [f"statuses {statuses_text(Counter(r.status for r in results))}"])


async def case_token_rate(h: Harness) -> Outcome:
    """The free tier's tokens per minute, 100 concurrent streams of 5,012 tokens each."""
    limit = FREE["chat_tokens_per_minute"]
    upstream = await h.upstream()
    upstream.set_default(CHAT_PATH, Reply(usage=usage(12, 5_000), pieces=5, chunk_delay=0.2))
    gateway = await h.gateway(upstream)
    key, user = await gateway.key("free", {"chat_requests_per_minute": 100_000})
    h.progress = "100 streams"
    ids = [rid("tok") for _ in range(100)]
    results = await asyncio.gather(
        *(
            read_sse(
                gateway.client,
                "/v1/chat/completions",
                json_body=chat_body(tagged(i), stream=True),
                headers=bearer(key, i),
            )
            for i in ids
        )
    )
    admitted = sum(result.status == 200 for result in results)
    rows = await h.settled_rows("user_id = $1", user, want=admitted, seconds=15)
    tokens = sum(row["prompt_tokens"] + row["completion_tokens"] for row in rows)
    measured = f"{admitted} admitted, {tokens:,} tokens ({tokens / limit:.1f}x)"
    return Outcome(measured, tokens <= limit)


async def case_tools_prompt(h: Harness) -> Outcome:
    """Free tier, 900,000 characters inside `tools[]` (the prompt cap counts messages only)."""
    upstream = await h.upstream()

    def real_size(payload: dict[str, Any]) -> dict[str, Any]:
        chars = len(orjson.dumps(payload.get("messages") or [])) + len(orjson.dumps(payload.get("tools") or []))
        return usage(chars // 4, 7)

    upstream.set_default(CHAT_PATH, Reply(usage=real_size))
    gateway = await h.gateway(upstream)
    key, _ = await gateway.key("free")
    tools = [
        {"type": "function", "function": {"name": f"tool_{n}", "description": "x" * 100_000, "parameters": {}}}
        for n in range(TOOLS_CHARS // 100_000)
    ]
    tool_chars = sum(len(tool["function"]["description"]) for tool in tools)
    request_id = rid("tools")
    response = await chat(gateway, key, request_id, chat_body(tagged(request_id, "Which tool?"), tools=tools))
    real_tokens = tool_chars // 4
    if response.status_code != 200:
        refused = response.status_code in (400, 413, 429)
        code = (response.json().get("error") or {}).get("code") if error_shape(response) else None
        return Outcome(f"{response.status_code} {code or ''}".strip(), refused)
    limit = int(float(response.headers.get("x-ratelimit-limit-tokens", "0")))
    remaining = int(float(response.headers.get("x-ratelimit-remaining-tokens", "0")))
    reserved = limit - remaining
    rows = await h.settled_rows("request_id = $1", request_id, want=1)
    billed = rows[0]["prompt_tokens"] if rows else 0
    measured = f"200, {reserved:,} tokens reserved (upstream billed {billed:,} prompt tokens)"
    return Outcome(measured, reserved >= TOOLS_WANT_SHARE * real_tokens)


async def call_until(stop: asyncio.Event, gateway: Gateway, key: str, prefix: str, answered: list[str]) -> None:
    """One client calling in a loop until `stop`; the ids of calls answered in full go to `answered`."""
    sent = 0
    while not stop.is_set():
        sent += 1
        request_id = f"{prefix}-{sent}-{secrets.token_hex(3)}"
        try:
            response = await chat(gateway, key, request_id, seconds=10)
            if response.status_code == 200 and response.json().get("choices"):
                answered.append(response.headers.get("x-request-id", request_id))  # what the gateway calls it
        except (httpx.HTTPError, ValueError):
            await asyncio.sleep(0.05)


async def case_sigkill(h: Harness, runs: int) -> Outcome:
    """SIGKILL mid-load, restart on the same database, settle, and look for calls without a row."""
    upstream = await h.upstream()
    upstream.set_default(CHAT_PATH, Reply(delay=KILL_UPSTREAM_DELAY))
    gateway = await h.gateway(upstream)
    key, _ = await gateway.key("internal")
    answered_lost: list[int] = []
    answered_total: list[int] = []
    upstream_lost: list[int] = []
    inflight_lost: list[int] = []
    for run in range(1, runs + 1):
        h.progress = f"run {run}: load"
        answered: list[str] = []
        prefix = f"kill{run}"
        killed = asyncio.Event()

        tasks = [
            asyncio.create_task(call_until(killed, gateway, key, f"{prefix}-{n}", answered))
            for n in range(KILL_CLIENTS)
        ]
        await asyncio.sleep(KILL_LOAD_SECONDS + secrets.randbelow(1000) / 1000)
        await h.kill(gateway)
        killed.set()
        await asyncio.gather(*tasks)
        received = {i for i in upstream_ids(upstream) if i.startswith(prefix + "-")}
        h.progress = f"run {run}: restart and settle"
        gateway = await h.restart(gateway)
        await asyncio.sleep(SETTLE_SECONDS)
        recorded = {row["request_id"] for row in await h.rows("request_id LIKE $1", prefix + "-%")}
        answered_total.append(len(answered))
        answered_lost.append(sum(i not in recorded for i in answered))
        upstream_lost.append(sum(i not in recorded for i in received))
        inflight = received - set(answered)
        inflight_lost.append(sum(i not in recorded for i in inflight))
    measured = (
        f"answered w/o row: {count_text(answered_lost)} of {count_text(answered_total)}; "
        f"in-flight upstream calls w/o row: {count_text(inflight_lost)}"
    )
    lost = sum(answered_lost) + sum(upstream_lost)
    return Outcome(measured, lost == 0, [f"upstream-received w/o row: {count_text(upstream_lost)}"])


# A write of usage rows, however a version of the gateway makes it.
USAGE_WRITE = re.compile(rb'(?i)(insert\s+into|copy|update)\s+("?public"?\.)?"?usage_event\b')


async def case_commit(h: Harness) -> Outcome:
    """The usage writer's COMMIT reaches Postgres and the answer is lost: by a dropped link, by a shutdown.

    The trap is armed once the call has been answered (the writer flushes every 2 s here), so it
    catches the write of the call's row, not anything on the request's own path."""
    upstream = await h.upstream()
    proxy = await h.proxy()
    gateway = await h.gateway(upstream, via=proxy, env={"USAGE_FLUSH_INTERVAL": "2"})
    key, _ = await gateway.key("internal")
    warm = rid("warm")
    await chat(gateway, key, warm)
    await h.settled_rows("request_id = $1", warm, want=1)

    async def one(label: str, hold: float) -> tuple[str, bool, Stopped | None]:
        request_id = rid("cmt")
        response = await chat(gateway, key, request_id)
        proxy.cut_after_commit(USAGE_WRITE, hold=hold)
        try:
            await asyncio.wait_for(proxy.commit_reached.wait(), 15)
        except TimeoutError:
            proxy.restore()
            return f"{label}: no commit of a usage row seen in 15 s", False, None
        stopped = None
        if hold:
            await asyncio.sleep(0.3)
            stopped = await h.terminate(gateway)
        rows = len(await h.settled_rows("request_id = $1", request_id, want=2, seconds=hold + 8, quiet=1.0))
        answered = response.status_code == 200
        ok = rows == 1 if answered else rows <= 1
        text = f"{label}: {rows} rows for 1 call" + ("" if answered else f" (answered {response.status_code})")
        return text, ok, stopped

    h.progress = "link dropped after COMMIT"
    first, first_ok, _ = await one("link dropped", 0.0)
    h.progress = "SIGTERM while COMMIT in flight"
    second, second_ok, stopped = await one("shutdown", COMMIT_HOLD_SECONDS)
    notes = [f"commits cut: {proxy.commits_cut}", *(shutdown_trouble(stopped) if stopped else [])]
    return Outcome(f"{first}; {second}", first_ok and second_ok, notes)


async def case_outage_sigterm(h: Harness) -> Outcome:
    """Postgres unreachable, 50 calls served, then SIGTERM (a deploy during the outage); restart, settle."""
    upstream = await h.upstream()
    proxy = await h.proxy()
    gateway = await h.gateway(upstream, via=proxy)
    key, _ = await gateway.key("internal", {"monthly_budget_usd": None})
    warm = rid("warm")
    await chat(gateway, key, warm)
    await h.settled_rows("request_id = $1", warm, want=1)
    proxy.cut()
    h.progress = "50 calls, database cut"
    ids = [rid("out") for _ in range(50)]
    semaphore = asyncio.Semaphore(10)

    async def one(request_id: str) -> int:
        async with semaphore:
            try:
                return (await chat(gateway, key, request_id, seconds=20)).status_code
            except httpx.HTTPError:
                return 0

    statuses = await asyncio.gather(*(one(i) for i in ids))
    served = [i for i, status in zip(ids, statuses, strict=True) if status == 200]
    h.progress = "SIGTERM"
    stopped = await h.terminate(gateway)
    proxy.restore()
    h.progress = "restart and settle"
    await h.restart(gateway)
    await asyncio.sleep(SETTLE_SECONDS)
    recorded = {row["request_id"] for row in await h.rows_for(served)}
    lost = sum(i not in recorded for i in served)
    measured = f"{lost} of {len(served)} rows lost (stop took {stopped.seconds:.1f} s)"
    notes = [f"statuses while down: {statuses_text(Counter(statuses))}", *shutdown_trouble(stopped)]
    return Outcome(measured, lost == 0, notes)


async def case_usage_overflow(h: Harness) -> Outcome:
    """The upstream reports 2^31 + 5 prompt tokens; then three ordinary calls; then SIGTERM."""
    upstream = await h.upstream()
    upstream.script(CHAT_PATH, Reply(usage=usage(2**31 + 5, 7)))
    gateway = await h.gateway(upstream)
    key, _ = await gateway.key("internal")
    huge = rid("huge")
    first = await chat(gateway, key, huge)
    await asyncio.sleep(1.0)
    later = [rid("after") for _ in range(3)]
    for request_id in later:
        await chat(gateway, key, request_id)
    later_rows = await h.settled_rows("request_id = ANY($1::text[])", later, want=3, seconds=10)
    huge_rows = await h.rows_for([huge])
    h.progress = "SIGTERM"
    stopped = await h.terminate(gateway)
    trouble = shutdown_trouble(stopped)
    exception = last_exception(stopped.log)
    notes = [*trouble, f"last exception in the log: {exception}"] if exception else trouble
    if huge_rows:
        row = huge_rows[0]
        flag = flag_of(row)
        tokens = row["prompt_tokens"]
        huge_text = f"row written ({tokens:,} prompt tokens, {'flagged: ' + flag if flag else 'not flagged'})"
        huge_ok = tokens <= 2**31 - 1 and flag is not None
    else:
        huge_text, huge_ok = "no row", False
    shutdown = "clean shutdown" if not trouble else "shutdown failed"
    measured = f"{first.status_code}, {huge_text}; next calls: {len(later_rows)} of 3 rows; {shutdown}"
    return Outcome(measured, huge_ok and len(later_rows) == 3 and not trouble, notes)


async def case_usage_negative(h: Harness) -> Outcome:
    """The upstream reports -5,000,000 completion tokens."""
    upstream = await h.upstream()
    upstream.script(CHAT_PATH, Reply(usage=usage(10, -5_000_000)))
    gateway = await h.gateway(upstream)
    key, _ = await gateway.key("free")
    request_id = rid("neg")
    response = await chat(gateway, key, request_id)
    rows = await h.settled_rows("request_id = $1", request_id, want=1)
    if not rows:
        return Outcome(f"{response.status_code}, no row", False)
    row = rows[0]
    cost = float(row["cost_usd"])
    flag = flag_of(row)
    month = await gateway.client.get("/v1/usage", headers=bearer(key))
    spend = dollars(month.json()["month"]["cost_usd"]) if month.status_code == 200 else f"({month.status_code})"
    measured = (
        f"cost {dollars(cost)}, completion {row['completion_tokens']:,} tokens, "
        f"{'flagged: ' + flag if flag else 'not flagged'}; month's spend {spend}"
    )
    ok = cost >= 0 and row["prompt_tokens"] >= 0 and row["completion_tokens"] >= 0 and flag is not None
    return Outcome(measured, ok)


async def case_body_drop(h: Harness) -> Outcome:
    """The upstream drops the connection in the middle of a plain (not streamed) answer's body."""
    upstream = await h.upstream()
    upstream.set_default(CHAT_PATH, Reply(truncate_at=60))
    gateway = await h.gateway(upstream)
    key, _ = await gateway.key("free")
    request_id = rid("drop")
    response = await chat(gateway, key, request_id)
    rows = await h.settled_rows("request_id = $1", request_id, want=1)
    calls = len(upstream.received())
    if rows:
        row = rows[0]
        row_text = f"{row['status']} row ${float(row['cost_usd']):.6f}"
        row_ok = row["status"] == "error" and float(row["cost_usd"]) > 0
    else:
        row_text, row_ok = "no row", False
    measured = f"upstream called {calls}x, {response.status_code}, {row_text}"
    return Outcome(measured, calls == 1 and response.status_code == 502 and row_ok)


async def case_bad_json(h: Harness) -> Outcome:
    """The upstream answers 200 with bytes that are not JSON, a JSON array, and `"prompt_tokens": "lots"`."""
    upstream = await h.upstream()
    upstream.script(
        CHAT_PATH,
        Reply(raw=b'{"id": "chatcmpl-broken", "choices": [{"message": '),
        Reply(raw=b'[{"id": "chatcmpl-array"}]'),
        Reply(usage={"prompt_tokens": "lots", "completion_tokens": 7, "total_tokens": 7}),
    )
    gateway = await h.gateway(upstream)
    key, _ = await gateway.key("free")
    parts, ok = [], True
    for label in ("invalid JSON", "array", '"lots"'):
        request_id = rid("bad")
        response = await chat(gateway, key, request_id)
        rows = await h.settled_rows("request_id = $1", request_id, want=1, seconds=5, quiet=0.3)
        shape = error_shape(response)
        unshaped = "" if shape or response.status_code == 200 else " (not our shape)"
        parts.append(f"{label}: {response.status_code}{unshaped} {'row' if rows else 'no row'}")
        ok = ok and response.status_code == 502 and shape and len(rows) == 1
    return Outcome("; ".join(parts), ok)


async def case_stream_garbage(h: Harness) -> Outcome:
    """A `data:` line that is not JSON in the middle of a stream."""
    upstream = await h.upstream()
    upstream.script(CHAT_PATH, Reply(garbage_after=2, chunk_delay=0.05))
    gateway = await h.gateway(upstream)
    key, _ = await gateway.key("free")
    request_id = rid("garbage")
    result = await read_sse(
        gateway.client,
        "/v1/chat/completions",
        json_body=chat_body(tagged(request_id), stream=True),
        headers=bearer(key, request_id),
    )
    rows = await h.settled_rows("request_id = $1", request_id, want=1)
    errors = result.errors()
    status = rows[0]["status"] if rows else "no row"
    ending = "ended" if result.ended else f"aborted ({result.broke})"
    measured = f"{result.status}, error event: {'yes' if errors else 'no'}, stream {ending}, row {status}"
    return Outcome(measured, bool(errors) and result.ended and status == "error")


async def case_stream_max(h: Harness) -> Outcome:
    """STREAM_MAX_SECONDS=5; the upstream trickles a chunk every 0.5 s for 10 s."""
    upstream = await h.upstream()
    upstream.script(CHAT_PATH, Reply(pieces=20, chunk_delay=0.5))
    gateway = await h.gateway(upstream, env={"STREAM_MAX_SECONDS": str(STREAM_MAX_SECONDS)})
    key, _ = await gateway.key("free")
    request_id = rid("slow")
    result = await read_sse(
        gateway.client,
        "/v1/chat/completions",
        json_body=chat_body(tagged(request_id), stream=True),
        headers=bearer(key, request_id),
    )
    errors = result.errors()
    measured = f"ran {result.seconds:.1f} s, error event: {'yes' if errors else 'no'}"
    return Outcome(measured, result.seconds <= STREAM_MAX_SECONDS + LATENCY_SLACK and bool(errors))


def timeline(events: list[tuple[float, int]]) -> str:
    """`503 at 3.0 s, 409 x66 for 66 s, 200 at 70 s`: a client's retries, runs of one status folded."""
    runs: list[list[Any]] = []
    for at, status in events:
        if runs and runs[-1][0] == status:
            runs[-1][2] += 1
            runs[-1][3] = at
        else:
            runs.append([status, at, 1, at])
    parts = []
    for status, first, count, last in runs:
        name = "no answer" if status == 0 else str(status)
        if count == 1:
            parts.append(f"{name} at {first:.0f} s")
        else:
            parts.append(f"{name} x{count} for {last - first + 1:.0f} s")
    return ", ".join(parts)


async def case_image_idempotency(h: Harness) -> Outcome:
    """An image request with an Idempotency-Key; Postgres cut 1 s into a 3 s generation, back at 5 s;
    the client retries the same request once a second while it gets 409 or 503."""
    upstream = await h.upstream()
    upstream.set_default(IMAGES_PATH, Reply(delay=IMAGE_SECONDS))
    proxy = await h.proxy()
    image_dir = h.data_dir / "images"
    gateway = await h.gateway(
        upstream,
        via=proxy,
        # The idempotency lease is the longest a generation may take: read timeout x attempts + 60 s.
        env={"UPSTREAM_READ_TIMEOUT": "4", "UPSTREAM_MAX_RETRIES": "1", "IMAGE_DIR": str(image_dir)},
    )
    key, user = await gateway.key("free", {"image_requests_per_minute": 1000})
    headers = {**bearer(key), "Idempotency-Key": f"img-{secrets.token_hex(6)}"}
    body = {"model": "default-image", "prompt": "a lighthouse at dawn", "size": "1024x1024", "quality": "low"}
    started = time.monotonic()

    async def post() -> httpx.Response | None:
        try:
            return await gateway.client.post("/v1/images/generations", json=body, headers=headers, timeout=30)
        except httpx.HTTPError:
            return None

    async def outage() -> None:
        await asyncio.sleep(1.0)
        proxy.cut()
        await asyncio.sleep(4.0)
        proxy.restore()

    h.progress = "first request"
    cut = asyncio.create_task(outage())
    response = await post()
    events = [(time.monotonic() - started, response.status_code if response is not None else 0)]
    while (
        response is None or response.status_code in (409, 500, 502, 503)
    ) and time.monotonic() - started < IDEMPOTENCY_GIVE_UP:
        h.progress = f"retrying: {timeline(events)}"
        await asyncio.sleep(1.0)
        response = await post()
        events.append((time.monotonic() - started, response.status_code if response is not None else 0))
    gave_up = response is None or response.status_code != 200
    await cut
    await asyncio.sleep(1.0)
    rows = await h.settled_rows("user_id = $1 AND route = 'images.generations'", user, seconds=5)
    generations = len(upstream.received(IMAGES_PATH))
    charges = sum(float(row["cost_usd"]) > 0 for row in rows)
    pool = await h.db()
    stored = await pool.fetchval("SELECT count(*) FROM image WHERE user_id = $1", user)
    files = sum(1 for path in image_dir.rglob("*") if path.is_file()) if image_dir.exists() else 0
    history = timeline(events) + (f" (gave up after {IDEMPOTENCY_GIVE_UP:.0f} s)" if gave_up else "")
    replayed = response is not None and response.headers.get("idempotent-replayed") == "true"
    measured = f"{history}; {generations} generations, {charges} charges"
    notes = [
        f"image files {files}, image rows {stored} (orphaned files: {max(files - stored, 0)})",
        f"final answer replayed: {'yes' if replayed else 'no'}",
    ]
    return Outcome(measured, not gave_up and generations == 1 and charges == 1, notes)


async def case_image_batch_lease(h: Harness) -> Outcome:
    """An image batch of 2 items with a 2 s lease; each generation takes 3 s."""
    upstream = await h.upstream()
    upstream.set_default(IMAGES_PATH, Reply(delay=IMAGE_SECONDS))
    gateway = await h.gateway(
        upstream,
        env={
            "IMAGE_BATCH_LEASE_SECONDS": "2",
            "IMAGE_BATCH_ITEMS_PER_MINUTE": "600",
            "IMAGE_BATCH_POLL_SECONDS": "0.5",
        },
    )
    key, user = await gateway.key("free")
    body = {
        "model": "default-image",
        "quality": "low",
        "size": "1024x1024",
        "items": [{"prompt": "a red kite"}, {"prompt": "a blue kite"}],
    }
    created = await gateway.client.post("/v1/images/batches", json=body, headers=bearer(key))
    if created.status_code != 202:
        return Outcome(f"batch refused: {created.status_code} {created.text[:120]}", False)
    batch_id = created.json()["id"]
    h.progress = "waiting for the batch"
    deadline = time.monotonic() + 45
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = (await gateway.client.get(f"/v1/images/batches/{batch_id}", headers=bearer(key))).json()
        if state.get("finished_at"):
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(IMAGE_SECONDS + 2)  # a duplicate generation still under way finishes and is charged
    rows = await h.settled_rows("user_id = $1 AND route = 'images.batches'", user, seconds=5)
    generations = len(upstream.received(IMAGES_PATH))
    charges = sum(float(row["cost_usd"]) > 0 for row in rows)
    items = len(body["items"])
    measured = f"{generations} generations and {charges} charges for {items} items (batch {state.get('status')})"
    return Outcome(measured, generations == items and charges == items)


async def case_thread_sigkill(h: Harness) -> Outcome:
    """SIGKILL during a streamed run; restart; how long until the thread takes a run again (409 meanwhile)?

    Then the new run is polled to its end, and the user's usage rows are read: one per upstream call,
    the killed run's settled `interrupted` at what it reserved."""
    upstream = await h.upstream()
    upstream.script(CHAT_PATH, Reply(pieces=60, chunk_delay=0.5))
    gateway = await h.gateway(upstream)
    key, user = await gateway.key("free", {"chat_requests_per_minute": 100_000})
    first = {"messages": [{"role": "user", "content": "Tell me a long story"}]}
    created = await gateway.client.post("/v1/threads", json=first, headers=bearer(key))
    if created.status_code != 200:
        return Outcome(f"thread not created: {created.status_code} {created.text[:120]}", False)
    thread = created.json()["id"]
    runs_path = f"/v1/threads/{thread}/runs"
    delta = asyncio.Event()
    killed: list[str] = []

    def seen(name: str | None, data: bytes) -> None:
        if name == "thread.run.created":
            killed.append(orjson.loads(data)["id"])
        elif name == "thread.message.delta":
            delta.set()

    turn = asyncio.create_task(
        read_sse(
            gateway.client,
            runs_path,
            json_body={"assistant_id": THREAD_ASSISTANT, "stream": True},
            headers=bearer(key),
            on_event=seen,
        )
    )
    await asyncio.wait_for(delta.wait(), 15)
    await h.kill(gateway)
    await turn
    h.progress = "restart"
    gateway = await h.restart(gateway)
    started = time.monotonic()
    statuses: Counter[int] = Counter()
    while True:
        elapsed = time.monotonic() - started
        if elapsed > THREAD_GIVE_UP:
            measured = f"409 thread_busy for >{THREAD_GIVE_UP:.0f} s"
            return Outcome(measured, False, [f"statuses {statuses_text(statuses)}"])
        h.progress = f"starting a run on the thread: {elapsed:.0f} s of {statuses_text(statuses)}"
        try:
            response = await gateway.client.post(
                runs_path, json={"assistant_id": THREAD_ASSISTANT}, headers=bearer(key), timeout=30
            )
            status = response.status_code
        except httpx.HTTPError:
            status = 0
        statuses[status] += 1
        if status == 200 or (400 <= status < 500 and status not in (409, 429)):
            break
        await asyncio.sleep(0.5)
    measured = f"usable after {elapsed:.1f} s ({status}; {statuses[409]} x 409 before)"
    notes = [f"statuses {statuses_text(statuses)}"]
    if status != 200:
        return Outcome(measured, False, [*notes, f"refused: {response.text[:160]}"])
    h.progress = "polling the new run"
    new = await poll_run(gateway, key, thread, response.json()["id"])
    old = await poll_run(gateway, key, thread, killed[0]) if killed else None
    calls = len(upstream.received())
    rows = await h.settled_rows("user_id = $1", user, want=calls, seconds=SETTLE_SECONDS + 10)
    shown = ", ".join(f"{row['route']} {row['status']} ${float(row['cost_usd']):.6f}" for row in rows)
    notes += [
        f"killed run: {old['status'] if old else 'no id seen'}"
        + (f" ({(old.get('last_error') or {}).get('message')})" if old else ""),
        f"new run: {new['status']}; {calls} upstream calls, {len(rows)} usage rows: {shown}",
    ]
    interrupted = [row for row in rows if row["status"] == "interrupted"]
    rows_ok = len(rows) == calls == 2 and len(interrupted) == 1 and float(interrupted[0]["cost_usd"]) > 0
    usable = elapsed <= THREAD_WANT_SECONDS and new["status"] == "completed"
    ended = old is not None and old["status"] == "failed"  # the sweep's verdict on a dead process's run
    return Outcome(measured + f"; new run {new['status']}", usable and ended and rows_ok, notes)


async def poll_run(gateway: Gateway, key: str, thread: str, run: str) -> dict[str, Any]:
    """GET a run every 0.2 s until it is terminal (or RUN_GIVE_UP passes): its last state."""
    deadline = time.monotonic() + RUN_GIVE_UP
    state: dict[str, Any] = {"status": "unknown"}
    while time.monotonic() < deadline:
        try:
            response = await gateway.client.get(f"/v1/threads/{thread}/runs/{run}", headers=bearer(key))
        except httpx.HTTPError:
            response = None
        if response is not None:
            state = response.json() if response.status_code == 200 else {"status": f"HTTP {response.status_code}"}
            if state.get("status") in TERMINAL_RUN_STATUSES or response.status_code != 200:
                return state
        await asyncio.sleep(0.2)
    return {**state, "status": f"{state.get('status')} after {RUN_GIVE_UP:.0f} s"}


async def case_blackhole(h: Harness) -> Outcome:
    """50 req/s for 24 s; Postgres blackholed from 2 s to 22 s."""
    upstream = await h.upstream()
    proxy = await h.proxy()
    gateway = await h.gateway(upstream, via=proxy, env={"RATELIMIT_TIMEOUT": str(RATELIMIT_TIMEOUT)})
    key, _ = await gateway.key("internal", {"monthly_budget_usd": None})
    warm = rid("warm")
    await chat(gateway, key, warm)
    latencies: list[float] = []
    statuses: Counter[int] = Counter()

    async def timed() -> None:
        request_id = rid("bh")
        started = time.monotonic()
        try:
            response = await chat(gateway, key, request_id, seconds=60)
            statuses[response.status_code] += 1
        except httpx.HTTPError:
            statuses[0] += 1
        latencies.append(time.monotonic() - started)

    async def outage() -> None:
        await asyncio.sleep(2.0)
        proxy.blackhole()
        await asyncio.sleep(BLACKHOLE_SECONDS)
        proxy.restore()

    h.progress = "load with the database blackholed"
    total = BLACKHOLE_SECONDS + 4.0
    tasks = []
    start = time.monotonic()
    cut = asyncio.create_task(outage())
    for n in range(int(total * BLACKHOLE_RATE)):
        await asyncio.sleep(max(0.0, start + n / BLACKHOLE_RATE - time.monotonic()))
        tasks.append(asyncio.create_task(timed()))
    await cut
    h.progress = "waiting for the last answers"
    await asyncio.gather(*tasks)
    bound = RATELIMIT_TIMEOUT + LATENCY_SLACK
    p99, longest = percentile(latencies, 0.99), max(latencies)
    over = sum(latency > bound for latency in latencies)
    measured = f"p99 {p99:.1f} s, longest {longest:.1f} s (bound {bound:.1f} s)"
    notes = [f"statuses {statuses_text(statuses)}; {over} of {len(latencies)} over the bound"]
    return Outcome(measured, longest <= bound, notes)


async def case_unreachable(h: Harness) -> Outcome:
    """Postgres unreachable, a free user without a budget: 200 calls; then the database is back."""
    limit = FREE["chat_requests_per_minute"]
    allowed = math.ceil(limit / RATELIMIT_LOCAL_DIVISOR)
    upstream = await h.upstream()
    proxy = await h.proxy()
    gateway = await h.gateway(upstream, via=proxy, env={RATELIMIT_LOCAL_DIVISOR_SETTING: str(RATELIMIT_LOCAL_DIVISOR)})
    key, user = await gateway.key("free", {"monthly_budget_usd": None})
    await gateway.client.get("/v1/models", headers=bearer(key))  # the key is known (cached) before the outage
    proxy.cut()
    h.progress = "200 calls, database cut"
    semaphore = asyncio.Semaphore(10)

    async def one() -> int:
        async with semaphore:
            try:
                return (await chat(gateway, key, rid("down"), seconds=20)).status_code
            except httpx.HTTPError:
                return 0

    statuses = Counter(await asyncio.gather(*(one() for _ in range(200))))
    served = statuses[200]
    proxy.restore()
    back = time.monotonic()
    h.progress = "database back: waiting for the rows"
    await h.settled_rows("user_id = $1", user, want=served, seconds=20, quiet=0.5)
    after: Counter[int] = Counter()
    stated: list[int] = []
    while True:
        elapsed = time.monotonic() - back
        h.progress = f"database back {elapsed:.0f} s: {statuses_text(after)}"
        try:
            response: httpx.Response | None = await chat(gateway, key, rid("probe"), seconds=20)
        except httpx.HTTPError:
            response = None
        status = response.status_code if response is not None else 0
        after[status] += 1
        if status == 200:
            lockout = f"refused for {elapsed:.0f} s after it returned" if len(after) > 1 else "served at once after"
            locked_ok = elapsed <= LOCKOUT_WANT_SECONDS
            break
        if response is not None and status == 429:
            stated.append(int(float(response.headers.get("retry-after", "0"))))
        told = max(stated, default=0)
        if elapsed > LOCKOUT_GIVE_UP or (elapsed > 10 and told > 2 * LOCKOUT_WANT_SECONDS):
            lockout = f"429 for >{elapsed:.0f} s after it returned (retry-after {told} s)"
            locked_ok = False
            break
        await asyncio.sleep(1.0)
    measured = f"{served} of 200 served (limit {limit}/min); {lockout}"
    notes = [f"statuses while down: {statuses_text(statuses)}; after: {statuses_text(after)}"]
    return Outcome(measured, served <= allowed and locked_ok, notes)


# --- the table of cases -------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    fault: str
    before: str
    want: str
    timeout: float
    run: Callable[..., Awaitable[Outcome]]
    expected_seconds: float  # for scheduling: the longest start first
    busy: bool = False  # loads the machine, or measures latency: never beside another busy case


def cases(runs: int, cap: float | None = None) -> list[Case]:
    every = _cases(runs)
    if cap is None:
        return every
    return [dataclasses.replace(case, timeout=min(case.timeout, cap)) for case in every]


def _cases(runs: int) -> list[Case]:
    return [
        Case(
            "budget",
            "$0.02 budget, 100 streams x 16,000 tokens, no max_tokens",
            "20 admitted, $0.64 spent (32x)",
            "spent <= $0.02",
            90,
            case_budget,
            15,
            busy=True,
        ),
        Case(
            "token_rate",
            f"{FREE['chat_tokens_per_minute']:,} tokens/min, 100 streams x 5,012 tokens",
            "38 admitted, 190,456 tokens (9.5x)",
            f"<= {FREE['chat_tokens_per_minute']:,} tokens",
            90,
            case_token_rate,
            15,
            busy=True,
        ),
        Case(
            "tools_prompt",
            f"free tier ({FREE['max_prompt_chars']:,}-char cap), {TOOLS_CHARS:,} chars in tools[]",
            "200, 514 tokens reserved",
            f"refused, or >= {TOOLS_WANT_SHARE * TOOLS_CHARS / 4:,.0f} reserved",
            60,
            case_tools_prompt,
            8,
        ),
        Case(
            "sigkill",
            f"SIGKILL mid-load ({runs} runs)",
            "0, 1, 1, 15 of 333 answered w/o row; every in-flight call unrecorded",
            "0 lost",
            60 + runs * (SETTLE_SECONDS + 30),
            lambda h: case_sigkill(h, runs),
            runs * (SETTLE_SECONDS + 10),
            busy=True,
        ),
        Case(
            "commit",
            "COMMIT reached Postgres, link dropped / SIGTERM meanwhile",
            "2 rows for 1 call, every run",
            "exactly 1 row",
            120,
            case_commit,
            25,
        ),
        Case(
            "outage_sigterm",
            "DB down, 50 calls, then SIGTERM (a deploy during an outage)",
            "50 of 50 rows lost",
            "0 lost",
            150,
            case_outage_sigterm,
            45,
        ),
        Case(
            "usage_overflow",
            "upstream reports usage >= 2^31 tokens",
            "writer dies silently; next calls no row; shutdown fails",
            "row written (clamped, flagged), writer alive",
            120,
            case_usage_overflow,
            25,
        ),
        Case(
            "usage_negative",
            "upstream reports negative usage",
            "cost -$10.00 credited to the budget",
            "clamped to 0, flagged",
            60,
            case_usage_negative,
            8,
        ),
        Case(
            "body_drop",
            "upstream drops the connection mid-body (plain)",
            "upstream called 3x, 502, a $0 row",
            "called once, 502, error row with the estimate",
            60,
            case_body_drop,
            8,
        ),
        Case(
            "bad_json",
            'upstream answers invalid JSON / a JSON array / "lots"',
            "500, no row",
            "502 in our shape, a row",
            60,
            case_bad_json,
            10,
        ),
        Case(
            "stream_garbage",
            "garbage data: line in a stream",
            "aborted, no error event, recorded cancelled",
            "error event, stream ends, row error",
            60,
            case_stream_garbage,
            8,
        ),
        Case(
            "stream_max",
            f"STREAM_MAX_SECONDS={STREAM_MAX_SECONDS:g}, a chunk every 0.5 s for 10 s",
            "ran 10.3 s",
            f"ends at {STREAM_MAX_SECONDS:g} s with an error event",
            60,
            case_stream_max,
            15,
        ),
        Case(
            "image_idempotency",
            "Idempotency-Key image, DB cut 1 s into a 3 s generation",
            "503, 67 s of 409, 2nd generation + charge",
            "1 generation, 1 charge; retry gets the outcome",
            IDEMPOTENCY_GIVE_UP + 60,
            case_image_idempotency,
            80,
        ),
        Case(
            "image_batch_lease",
            "image batch, lease (2 s) shorter than a generation (3 s)",
            "4 generations, 4 charges for 2 items",
            "one per item",
            90,
            case_image_batch_lease,
            20,
        ),
        Case(
            "thread_sigkill",
            "SIGKILL during a streamed run",
            "409 thread_busy for 11 minutes",
            f"new run within {THREAD_WANT_SECONDS:.0f} s, completed; old failed; 1 row per call",
            THREAD_GIVE_UP + 60,
            case_thread_sigkill,
            25,
        ),
        Case(
            "blackhole",
            f"Postgres blackholed {BLACKHOLE_SECONDS:.0f} s at {BLACKHOLE_RATE} req/s",
            "p99 22.4 s; 2 s limit-check timeout not honoured",
            f"<= {RATELIMIT_TIMEOUT + LATENCY_SLACK:.0f} s (RATELIMIT_TIMEOUT + {LATENCY_SLACK:g} s)",
            150,
            case_blackhole,
            35,
            busy=True,
        ),
        Case(
            "unreachable",
            f"Postgres unreachable, free user ({FREE['chat_requests_per_minute']}/min), no budget",
            "200 of 200 served, then 19 minutes of 429",
            f"<= {math.ceil(FREE['chat_requests_per_minute'] / RATELIMIT_LOCAL_DIVISOR)} served, "
            f"429 <= {LOCKOUT_WANT_SECONDS:.0f} s after",
            150,
            case_unreachable,
            45,
        ),
    ]


# --- one case, in a child process ---------------------------------------------------------


async def run_case(case: Case, server: str, run_id: str, result_path: Path) -> Result:
    log_dir = RESULTS_DIR / case.name
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    harness = Harness(case.name, server, run_id, log_dir)
    harness.pidfile = result_path.with_suffix(".pids")
    result_path.with_suffix(".db").write_text(harness.db_name)
    try:
        async with harness:
            try:
                outcome = await asyncio.wait_for(case.run(harness), case.timeout)
            except TimeoutError:
                return Result(
                    case.name,
                    "TIMEOUT",
                    f"no result in {case.timeout:.0f} s ({harness.progress})",
                    time.monotonic() - started,
                )
    except (ProcessError, Exception) as error:  # the harness itself failed: report, do not hang
        text = f"{type(error).__name__}: {error}".splitlines()
        return Result(case.name, "ERROR", text[0][:200], time.monotonic() - started, text[1:8])
    status = "PASS" if outcome.passed else "FAIL"
    return Result(case.name, status, outcome.measured, time.monotonic() - started, outcome.notes)


def child_main(args: argparse.Namespace) -> int:
    case = next(case for case in cases(args.runs, args.timeout) if case.name == args.worker)
    result_path = Path(args.result)

    async def main() -> Result:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await run_case(case, args.server, args.run_id, result_path)

    try:
        result = asyncio.run(main())
    except asyncio.CancelledError:
        result = Result(case.name, "TIMEOUT", "stopped by the runner", 0.0)
    result_path.write_text(json.dumps(asdict(result)))
    return 0


# --- the runner ---------------------------------------------------------------------------


def pick_server() -> str:
    for variable in ("FAULTS_DATABASE_URL", "TEST_DATABASE_URL"):
        if os.environ.get(variable):
            return os.environ[variable]
    return LOCAL_DATABASE


def is_loopback(url: str) -> bool:
    return urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1")


async def drop_leftovers(server: str, run_id: str) -> None:
    admin = await asyncpg.connect(server)
    try:
        names = await admin.fetch("SELECT datname FROM pg_database WHERE datname LIKE $1", f"faults_{run_id}_%")
        for row in names:
            await admin.execute(f'DROP DATABASE IF EXISTS "{row["datname"]}" WITH (FORCE)')
    finally:
        await admin.close()


@dataclass
class Child:
    case: Case
    popen: subprocess.Popen[bytes]
    result: Path
    started: float
    stopping: float | None = None


def kill_recorded(pidfile: Path) -> None:
    """SIGKILL what a child started (its gateways, each in its own session), by the pids it wrote down."""
    if not pidfile.exists():
        return
    for line in pidfile.read_text().split():
        with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
            os.killpg(int(line), signal.SIGKILL)


def run_all(selected: list[Case], args: argparse.Namespace) -> list[Result]:
    server = args.server
    run_id = f"{os.getpid()}_{secrets.token_hex(2)}"
    work = RESULTS_DIR / "run"
    work.mkdir(parents=True, exist_ok=True)
    pending = sorted(selected, key=lambda case: -case.expected_seconds)
    running: list[Child] = []
    results: dict[str, Result] = {}
    try:
        while pending or running:
            while len(running) < args.jobs:
                busy_now = any(child.case.busy for child in running)
                case = next((case for case in pending if not (case.busy and busy_now)), None)
                if case is None:
                    break
                pending.remove(case)
                result = work / f"{case.name}.json"
                for suffix in (".json", ".pids", ".db"):
                    result.with_suffix(suffix).unlink(missing_ok=True)
                command = [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--worker",
                    case.name,
                    "--result",
                    str(result),
                    "--server",
                    server,
                    "--run-id",
                    run_id,
                    "--runs",
                    str(args.runs),
                    *(["--timeout", str(args.timeout)] if args.timeout else []),
                ]
                log = RESULTS_DIR / case.name
                log.mkdir(parents=True, exist_ok=True)
                with (log / "case.log").open("wb") as out:
                    popen = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
                running.append(Child(case, popen, result, time.monotonic()))
                report(f"  started  {case.name}")
            time.sleep(0.2)
            for child in list(running):
                elapsed = time.monotonic() - child.started
                if child.popen.poll() is None:
                    if child.stopping is None and elapsed > child.case.timeout + CLEANUP_GRACE:
                        child.popen.terminate()  # the child cancels its case and cleans up
                        child.stopping = time.monotonic()
                    elif child.stopping is not None and time.monotonic() - child.stopping > 15:
                        child.popen.kill()
                        child.popen.wait()
                    continue
                running.remove(child)
                kill_recorded(child.result.with_suffix(".pids"))
                if child.result.exists():
                    result = Result(**json.loads(child.result.read_text()))
                    result.seconds = elapsed
                elif child.stopping is not None:
                    result = Result(child.case.name, "TIMEOUT", f"killed after {elapsed:.0f} s", elapsed)
                else:
                    tail = (RESULTS_DIR / child.case.name / "case.log").read_text(errors="replace").splitlines()[-3:]
                    result = Result(child.case.name, "ERROR", f"exited {child.popen.returncode}", elapsed, tail)
                results[child.case.name] = result
                report(f"  finished {child.case.name} in {elapsed:.0f} s: {result.status}")
    finally:  # interrupted: let each child clean up (its case is cancelled), then make sure
        for child in running:
            child.popen.terminate()
        for child in running:
            try:
                child.popen.wait(20)
            except subprocess.TimeoutExpired:
                child.popen.kill()
                child.popen.wait()
            kill_recorded(child.result.with_suffix(".pids"))
        asyncio.run(drop_leftovers(server, run_id))
    return [results[case.name] for case in selected if case.name in results]


def aligned(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()

    return [line(header), line(tuple("-" * width for width in widths)), *(line(row) for row in rows)]


def table(selected: list[Case], results: list[Result]) -> list[str]:
    """The results (measured next to wanted), the notes, then what each case does and what an older version did."""
    by_name = {result.case: result for result in results}
    ran = [case for case in selected if case.name in by_name]
    lines = aligned(
        ("case", "measured", "want", "result", "time"),
        [
            (
                case.name,
                by_name[case.name].measured,
                case.want,
                by_name[case.name].status,
                f"{by_name[case.name].seconds:.0f} s",
            )
            for case in ran
        ],
    )
    notes = [(result.case, note) for result in results for note in result.notes]
    if notes:
        lines += ["", "notes:", *(f"  {name}: {note}" for name, note in notes)]
    lines += ["", "the cases, and what an older version measured:"]
    lines += aligned(("case", "fault", "measured before"), [(case.name, case.fault, case.before) for case in ran])
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="CASE", help="run only these cases")
    parser.add_argument("--runs", type=int, default=KILL_RUNS, help="SIGKILL runs of the sigkill case")
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help="cases run side by side")
    parser.add_argument("--timeout", type=float, help="cap every case's own timeout at this many seconds")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--server", default=pick_server(), help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--run-id", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return child_main(args)
    every = cases(args.runs, args.timeout)
    if args.list:
        for case in every:
            report(f"{case.name:<18} {case.fault}")
        return 0
    names = {case.name for case in every}
    unknown = set(args.only or ()) - names
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}; known: {', '.join(sorted(names))}")
    if not is_loopback(args.server):
        parser.error(f"Postgres must be on loopback (faults cut and blackhole it): {urlsplit(args.server).hostname}")
    selected = [case for case in every if not args.only or case.name in args.only]
    started = time.monotonic()
    report(f"fault cases: {len(selected)}, {args.jobs} at a time; Postgres {urlsplit(args.server).netloc}")
    results = run_all(selected, args)
    report("")
    for line in table(selected, results):
        report(line)
    failed = [result for result in results if result.status != "PASS"] + [
        case for case in selected if case.name not in {result.case for result in results}
    ]
    report("")
    report(
        f"{len(results) - len(failed)} of {len(selected)} passed in {time.monotonic() - started:.0f} s; "
        f"logs in {RESULTS_DIR.relative_to(ROOT)}/"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
