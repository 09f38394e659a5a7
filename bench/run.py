"""Measure the gateway against a bare FastAPI pass-through, both in front of the same fake upstream.

Usage: .venv/bin/python bench/run.py [--duration S] [--connections N] [--streams N]
                                     [--runs N] [--run-poll-ms MS] [--passages N] [--searches N]
                                     [--phases P,...]

Five phases, each with its own fake upstream and fresh gateway and baseline processes:
load (wrk: throughput and 1-connection latency), streaming (TTFB and chunk delivery, with
20 ms between upstream chunks), runs (Assistants API runs, below), open streams (gateway
RSS with N streams held open) and knowledge (vector stores, below). Load and streaming are
measured for chat completions, then for the Responses API (`POST /v1/responses`, plain and
streamed) on the same processes. `--phases` runs some of them only (e.g. `--phases runs`).

Runs: the upstream answers at once, so what a run takes beyond its baseline is the gateway's
own work. One client, one request at a time: `--runs` plain runs of `asst_coach` (`POST
/v1/threads/{id}/runs` with `stream: false`, answered `queued`, then `GET .../runs/{run_id}`
back to back, or every `--run-poll-ms`, until a poll sees it `completed`), each followed by
one baseline call; then as many streamed runs (`stream: true`, events read to `[DONE]`), the
same way. Every run has its own thread, made beforehand with the one user message the run
answers (timed apart, not counted). The baseline of both kinds is what the gateway sends
upstream for every run, polled or streamed: one chat completion streamed with
`include_usage`, here through the bare pass-through, read to `[DONE]`. Compared: the
client's time per run (p50) and the server's CPU per run (the gateway's includes the polls
and what it does after the run ended, such as the usage row). Bare plain (non-streamed)
completions are measured too, as a reference only.

Knowledge: a simulated-mode gateway on each retrieval path, full text on the run's database
(the machine's Postgres has no pgvector) and hybrid on an embedded Postgres with pgvector
(tests/support/pgvector.py). Through the API, as a client would: `--passages` passages of
bench/knowledge_core.py's made-up zoo (450-780 characters, ten to a file) are uploaded
(`POST /v1/files`, not timed), a store is created with them and a static chunking of 200 tokens
(a passage a chunk), and polled every 50 ms until `completed`: the indexing rate is passages per
second from the create to the poll that saw it done (parse, chunk, embed through the pipeline:
the simulated embedding in hybrid mode, none in full text, write). Then `--searches` questions,
each about one passage, one at a time (`POST .../search`, `rewrite_query`, 10 results): p50 and
p99 of the client's time, and how often the passage that answers ranks first.

Results are printed as a table and written to bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import itertools
import json
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import orjson
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # run as a script: tests/support is not on the path yet
from support.processes import Proc, ProcessError, Processes, free_port, wait_for_health, wait_for_log  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
LOG_DIR = RESULTS_DIR / "logs"
PYTHON = sys.executable
LOCAL_DATABASE = "postgresql://postgres@127.0.0.1:5432/test"

GATEWAY_MODEL = "default-chat"
BARE_MODEL = "gpt-5-mini"
WARMUP_SECONDS = 2
STREAM_SAMPLES = 50
STREAM_CHUNKS = 8
STREAM_DELAY_MS = 20.0
HOLD_CHUNKS = 6
HOLD_DELAY_MS = 2000.0
HOLD_TIMEOUT = 60.0
RUN_SAMPLES = 200
RUN_ASSISTANT = "asst_coach"  # a shared assistant: [profile.coach] of app/assistants.toml
RUN_MESSAGE = "Say hello"
RUN_ROUTE = "threads.runs"  # the usage_event route of a run's upstream call
UPSTREAM_TEXT = "".join(f" token{i}" for i in range(STREAM_CHUNKS))  # what bench/fast_upstream.py streams
# What the SDK's pollers stop at (`create_and_poll`).
TERMINAL_RUN_STATUSES = frozenset({"requires_action", "cancelled", "completed", "failed", "expired", "incomplete"})
RUN_GIVE_UP = 30.0  # seconds: a plain run not seen ending by then fails the bench
PHASES = ("load", "streaming", "runs", "open_streams", "knowledge")
KNOWLEDGE_PASSAGES = 1000
KNOWLEDGE_SEARCHES = 200
# A passage a chunk: passages are 450-780 characters, and a chunk ends at a paragraph past half its room.
KNOWLEDGE_CHUNKING = {"type": "static", "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": 0}}
KNOWLEDGE_POLL_SECONDS = 0.05
KNOWLEDGE_GIVE_UP = 900.0  # seconds: a store not indexed by then fails the bench
NO_UPSTREAM = "http://127.0.0.1:9/v1"  # simulated mode: never called

TARGET_THROUGHPUT_RATIO = 0.5
TARGET_ADDED_P50_MS = 1.0
TARGET_TTFB_MS = 2.0
TARGET_RSS_MB = 200.0

T = TypeVar("T")


class BenchError(Exception):
    """A failure that stops the run, with a message meant for the reader."""


def report(line: str = "") -> None:
    """Print one line of the report."""
    print(line, flush=True)


def run_async(coroutine: Awaitable[T]) -> T:
    """Run a coroutine to completion on a fresh uvloop loop."""
    return uvloop.run(coroutine)  # type: ignore[arg-type]


# --- processes --------------------------------------------------------------------------
# Starting, health-checking and stopping processes is tests/support/processes.py, shared with the tests.


def start_upstream(procs: Processes, name: str, chunks: int, delay_ms: float) -> str:
    """Start bench/fast_upstream.py; returns its OpenAI base URL."""
    port = free_port()
    command = [PYTHON, "bench/fast_upstream.py", "--port", str(port)]
    command += ["--stream-chunks", str(chunks), "--chunk-delay-ms", str(delay_ms)]
    wait_for_log(procs.start(name, command), "listening")
    return f"http://127.0.0.1:{port}/v1"


# --- targets ----------------------------------------------------------------------------


@dataclass
class Target:
    """One server under test: where it listens and how it is called."""

    name: str
    base_url: str
    pid: int
    model: str
    headers: dict[str, str]
    api: Literal["chat", "responses"] = "chat"

    @property
    def url(self) -> str:
        """Where every measurement sends its request: chat completions, or the Responses API."""
        return self.base_url + ("/v1/chat/completions" if self.api == "chat" else "/v1/responses")

    def body(self, stream: bool = False) -> bytes:
        """The request body every measurement sends."""
        payload: dict[str, Any] = {"model": self.model}
        if self.api == "chat":
            payload |= {"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 16}
        else:
            payload |= {"input": "Say hello", "max_output_tokens": 16}
        if stream:
            payload["stream"] = True
        return json.dumps(payload).encode()

    def of(self, api: Literal["chat", "responses"]) -> Target:
        """The same server, called through another API."""
        return replace(self, api=api)


def child_env(**values: str) -> dict[str, str]:
    """Our environment plus `values`."""
    return {**os.environ, **values}


def start_gateway(procs: Processes, name: str, database_url: str, upstream: str, key: str, **env: str) -> Target:
    """Start `python -m app serve` on a free port and wait for /healthz."""
    port = free_port()
    command = [PYTHON, "-m", "app", "serve", "--port", str(port), "--workers", "1", "--log-level", "info"]
    values = {
        "ENVIRONMENT": "development",
        "DATABASE_URL": database_url,
        "OPENAI_API_KEY": "sk-bench",
        "OPENAI_BASE_URL": upstream,
        "FALLBACK_TO_SIMULATED": "false",
        **env,
    }
    proc = procs.start(name, command, child_env(**values))
    base = f"http://127.0.0.1:{port}"
    wait_for_health(proc, base + "/healthz")
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    return Target("gateway", base, proc.popen.pid, GATEWAY_MODEL, headers)


def start_bare(procs: Processes, name: str, upstream: str) -> Target:
    """Start bench/bare_passthrough.py on a free port and wait for /healthz."""
    port = free_port()
    command = [PYTHON, "bench/bare_passthrough.py", "--port", str(port), "--upstream", upstream]
    proc = procs.start(name, command)
    base = f"http://127.0.0.1:{port}"
    wait_for_health(proc, base + "/healthz")
    return Target("bare", base, proc.popen.pid, BARE_MODEL, {"Content-Type": "application/json"})


async def probe(target: Target, stream: bool = False) -> None:
    """One request; raises with the status and body unless it answers 200."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(target.url, data=target.body(stream), headers=target.headers) as response,
    ):
        body = await response.read()
        if response.status != 200:
            raise BenchError(f"{target.name} answered {response.status}: {body[:500]!r}")


async def sample_statuses(target: Target, requests: int, concurrency: int) -> dict[str, Any]:
    """Send `requests` calls `concurrency` at a time; count statuses and keep one body per error status."""
    statuses: Counter[int] = Counter()
    examples: dict[int, str] = {}
    body = target.body()

    async def worker(session: aiohttp.ClientSession, count: int) -> None:
        for _ in range(count):
            async with session.post(target.url, data=body, headers=target.headers) as response:
                payload = await response.read()
                statuses[response.status] += 1
                if response.status >= 300:
                    examples.setdefault(response.status, payload[:500].decode(errors="replace"))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(worker(session, requests // concurrency) for _ in range(concurrency)))
    return {"statuses": dict(statuses), "error_bodies": examples}


# --- database ---------------------------------------------------------------------------


@dataclass
class BenchDatabase:
    """The server chosen for the run and the fresh database on it."""

    server_url: str
    source: str
    name: str = field(default_factory=lambda: f"gateway_bench_{os.getpid()}")

    @property
    def url(self) -> str:
        """The bench database's URL."""
        return urlunsplit(urlsplit(self.server_url)._replace(path=f"/{self.name}"))


async def accepts_connections(url: str) -> bool:
    """Whether a Postgres at `url` lets us in."""
    try:
        connection = await asyncpg.connect(url, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await connection.close()
    return True


def start_embedded_postgres() -> str:
    """The gateway's own embedded Postgres, in a temporary DATA_DIR held for this process's life."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # run as a script, only bench/ is on the path
    from app.db import start_embedded_postgres as start

    data_dir = Path(tempfile.mkdtemp(prefix="gateway-bench-pg-"))
    # Registered before pgserver's own atexit hook, so it runs after the server has stopped.
    atexit.register(shutil.rmtree, data_dir, ignore_errors=True)
    return start(data_dir)


def pick_server() -> tuple[str, str]:
    """The server URL and where it came from: env var, local server, else embedded."""
    for variable in ("BENCH_DATABASE_URL", "TEST_DATABASE_URL"):
        if os.environ.get(variable):
            return os.environ[variable], variable
    if run_async(accepts_connections(LOCAL_DATABASE)):
        return LOCAL_DATABASE, "local server"
    return start_embedded_postgres(), "embedded (temporary DATA_DIR)"


async def create_database(db: BenchDatabase) -> None:
    """Create the run's database (replacing a leftover of the same name)."""
    admin = await asyncpg.connect(db.server_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{db.name}"')
    finally:
        await admin.close()


async def drop_database(db: BenchDatabase) -> None:
    """Drop the run's database."""
    admin = await asyncpg.connect(db.server_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)')
    finally:
        await admin.close()


async def usage_rows(db: BenchDatabase) -> dict[str, int]:
    """Rows in usage_event, by status and stream flag."""
    connection = await asyncpg.connect(db.url)
    try:
        rows = await connection.fetch(
            "SELECT status, stream, count(*) AS n FROM usage_event GROUP BY 1, 2 ORDER BY 1, 2"
        )
    finally:
        await connection.close()
    return {f"{row['status']}{' (stream)' if row['stream'] else ''}": row["n"] for row in rows}


async def route_rows(db: BenchDatabase, route: str) -> dict[str, int]:
    """Rows in usage_event of one route, by status and stream flag."""
    connection = await asyncpg.connect(db.url)
    try:
        rows = await connection.fetch(
            "SELECT status, stream, count(*) AS n FROM usage_event WHERE route = $1 GROUP BY 1, 2 ORDER BY 1, 2",
            route,
        )
    finally:
        await connection.close()
    return {f"{row['status']}{' (stream)' if row['stream'] else ''}": row["n"] for row in rows}


def create_key(database_url: str) -> str:
    """An `internal` tier key, via the CLI (which also migrates the database)."""
    command = [PYTHON, "-m", "app", "create-key", "--user", "bench", "--tier", "internal"]
    done = subprocess.run(
        command, cwd=ROOT, env=child_env(DATABASE_URL=database_url), capture_output=True, text=True, check=False
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise BenchError(f"create-key failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return lines[-1].strip()


# --- wrk --------------------------------------------------------------------------------


@dataclass
class WrkRun:
    """What we read from one wrk run."""

    requests_per_sec: float
    requests: int
    non_2xx: int
    socket_errors: str | None
    p50_ms: float
    p99_ms: float


def write_wrk_script(target: Target) -> Path:
    """A wrk Lua script that POSTs the target's body with its headers."""
    lines = ['wrk.method = "POST"', f"wrk.body = [==[{target.body().decode()}]==]"]
    lines += [f'wrk.headers["{name}"] = "{value}"' for name, value in target.headers.items()]
    path = LOG_DIR / f"wrk-{target.name}.lua"
    path.write_text("\n".join(lines) + "\n")
    return path


def to_ms(value: str, unit: str) -> float:
    """A wrk duration in milliseconds."""
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def parse_wrk(output: str) -> WrkRun:
    """Requests/sec, counts, errors and the p50/p99 of wrk's --latency output."""

    def find(pattern: str) -> re.Match[str]:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None:
            raise BenchError(f"unexpected wrk output (no {pattern!r}):\n{output}")
        return match

    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: (.*)", output)
    p50 = find(r"^\s+50%\s+([\d.]+)(us|ms|s|m)\b")
    p99 = find(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\b")
    return WrkRun(
        requests_per_sec=float(find(r"Requests/sec:\s+([\d.]+)").group(1)),
        requests=int(find(r"(\d+) requests in").group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=socket_errors.group(1).strip() if socket_errors else None,
        p50_ms=to_ms(*p50.groups()),
        p99_ms=to_ms(*p99.groups()),
    )


def wrk(target: Target, script: Path, connections: int, seconds: int) -> WrkRun:
    """One wrk run, 1 thread, with latency percentiles."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "--latency"]
    done = subprocess.run([*command, "-s", str(script), target.url], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_phase(gateway: Target, bare: Target, connections: int, seconds: int) -> dict[str, Any]:
    """Throughput at `connections` and latency at 1 connection, for both targets."""
    results: dict[str, Any] = {}
    for target in (gateway, bare):
        run_async(probe(target))
        script = write_wrk_script(target)
        warmup = wrk(target, script, connections, WARMUP_SECONDS)
        report(f"  {target.name}: throughput, {connections} connections, {seconds}s ...")
        cpu_before = cpu_seconds(target.pid)
        load = wrk(target, script, connections, seconds)
        cpu_ms = (cpu_seconds(target.pid) - cpu_before) * 1000 / max(load.requests, 1)
        report(f"  {target.name}: latency, 1 connection, {seconds}s ...")
        single = wrk(target, script, 1, seconds)
        result: dict[str, Any] = {
            "throughput": asdict(load),
            "server_cpu_ms_per_request": cpu_ms,
            "latency_c1": asdict(single),
            "requests_sent": 1 + warmup.requests + load.requests + single.requests,  # 1: the probe
        }
        if warmup.non_2xx or load.non_2xx or single.non_2xx:
            report(f"  {target.name}: non-2xx answers seen; sampling 400 requests to see which ...")
            result["error_sample"] = run_async(sample_statuses(target, 400, connections))
        results[target.name] = result
    return results


# --- streaming --------------------------------------------------------------------------


@dataclass
class StreamSample:
    """One streamed request as the client saw it."""

    ttfb_ms: float
    first_content_ms: float | None
    events: int
    arrivals: int
    gaps_ms: list[float]


def has_content(payload: bytes) -> bool:
    """Whether a `data:` payload carries a non-empty delta content (a chat chunk's, or a response's text delta)."""
    if payload == b"[DONE]":
        return False
    event = orjson.loads(payload)
    if event.get("type") == "response.output_text.delta":
        return bool(event.get("delta"))
    choices = event.get("choices") or []
    return bool(choices and (choices[0].get("delta") or {}).get("content"))


async def stream_once(session: aiohttp.ClientSession, target: Target) -> StreamSample:
    """One streamed request; records when the first byte, first content and each event arrived."""
    started = time.perf_counter()
    first_byte: float | None = None
    first_content: float | None = None
    arrival_times: list[float] = []
    events = 0
    buffer = b""
    async with session.post(target.url, data=target.body(stream=True), headers=target.headers) as response:
        if response.status != 200:
            raise BenchError(f"{target.name} stream answered {response.status}: {(await response.read())[:500]!r}")
        async for chunk in response.content.iter_any():
            now = time.perf_counter()
            first_byte = first_byte or now
            buffer += chunk
            *complete, buffer = buffer.split(b"\n\n")
            data = [event[5:].strip() for event in complete if event.startswith(b"data:")]
            if not data:
                continue
            events += len(data)
            arrival_times.append(now)
            if first_content is None and any(has_content(payload) for payload in data):
                first_content = now
    if first_byte is None:
        raise BenchError(f"{target.name} stream sent no body")
    return StreamSample(
        ttfb_ms=(first_byte - started) * 1000,
        first_content_ms=(first_content - started) * 1000 if first_content else None,
        events=events,
        arrivals=len(arrival_times),
        gaps_ms=[(b - a) * 1000 for a, b in itertools.pairwise(arrival_times)],
    )


def summarize_streams(samples: list[StreamSample], delay_ms: float) -> dict[str, Any]:
    """Medians and the one-by-one verdict for one target's samples."""
    events = sum(s.events for s in samples)
    arrivals = sum(s.arrivals for s in samples)
    gaps = [gap for s in samples for gap in s.gaps_ms]
    contents = [s.first_content_ms for s in samples if s.first_content_ms is not None]
    median_gap = statistics.median(gaps) if gaps else 0.0
    return {
        "samples": len(samples),
        "ttfb_ms_p50": statistics.median(s.ttfb_ms for s in samples),
        "first_content_ms_p50": statistics.median(contents) if contents else None,
        "events": events,
        "distinct_arrivals": arrivals,
        "median_gap_ms": median_gap,
        "one_by_one": arrivals >= 0.98 * events and median_gap >= 0.5 * delay_ms,
    }


async def streaming_phase(gateway: Target, bare: Target, samples: int, delay_ms: float) -> dict[str, Any]:
    """Sequential streamed requests, alternating between the targets; 3 warm-up calls each first."""
    collected: dict[str, list[StreamSample]] = {gateway.name: [], bare.name: []}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for _ in range(3):
            for target in (gateway, bare):
                await stream_once(session, target)
        for _ in range(samples):
            for target in (gateway, bare):
                collected[target.name].append(await stream_once(session, target))
    summaries = {name: summarize_streams(items, delay_ms) for name, items in collected.items()}
    for summary in summaries.values():
        summary["requests_sent"] = samples + 3
    return summaries


# --- runs -------------------------------------------------------------------------------
# A run (Assistants API v2) makes one upstream call: a streamed chat completion with
# `stream_options.include_usage` (app/threads/runs.py), whether its client streams or polls.
# So the baseline of both kinds of run is the bare pass-through making that same call,
# streamed, read to [DONE]; a bare plain (non-streamed) completion is measured as a reference.


@dataclass
class StreamRead:
    """One streamed response read to its end, as the client saw it."""

    ttfb_ms: float
    first_content_ms: float | None
    total_ms: float
    events: list[tuple[str | None, bytes]]


@dataclass
class RunSample:
    """One run (or its baseline call), as the client saw it."""

    total_ms: float  # plain run: until a poll saw it completed; streamed: until [DONE] was read
    first_ms: float  # plain run: the create's answer (the queued run); streamed: the first body byte
    first_content_ms: float | None = None  # streamed: the first event with reply text
    polls: int = 0  # plain run: GETs of the run after the create


SSE_EVENT_END = re.compile(rb"\r?\n\r?\n")


def sse_event(raw: bytes) -> tuple[str | None, bytes] | None:
    """An SSE event's name and data, or None for a comment or keep-alive."""
    name: str | None = None
    data: list[bytes] = []
    for line in raw.splitlines():
        if line.startswith(b"event:"):
            name = line[6:].strip().decode()
        elif line.startswith(b"data:"):
            data.append(line[5:].strip())
    return (name, b"\n".join(data)) if data else None


def run_event_has_content(name: str | None, data: bytes) -> bool:
    """Whether an event carries reply text: a run's `thread.message.delta`, or a chat chunk's content."""
    if name == "thread.message.delta":
        parts = orjson.loads(data).get("delta", {}).get("content") or []
        return any((part.get("text") or {}).get("value") for part in parts)
    return name is None and has_content(data)


async def read_stream(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]) -> StreamRead:
    """POST, read the event stream to the end; when the first byte and first text came, and every event."""
    started = time.perf_counter()
    first_byte: float | None = None
    first_content: float | None = None
    events: list[tuple[str | None, bytes]] = []
    buffer = b""
    async with session.post(url, data=body, headers=headers) as response:
        if response.status != 200:
            raise BenchError(f"{url} answered {response.status}: {(await response.read())[:500]!r}")
        async for chunk in response.content.iter_any():
            now = time.perf_counter()
            first_byte = first_byte or now
            buffer += chunk
            *complete, buffer = SSE_EVENT_END.split(buffer)
            for raw in complete:
                event = sse_event(raw)
                if event is None:
                    continue
                events.append(event)
                if first_content is None and run_event_has_content(*event):
                    first_content = now
    ended = time.perf_counter()
    if first_byte is None:
        raise BenchError(f"{url} sent no body")
    return StreamRead(
        ttfb_ms=(first_byte - started) * 1000,
        first_content_ms=(first_content - started) * 1000 if first_content else None,
        total_ms=(ended - started) * 1000,
        events=events,
    )


def run_body(stream: bool) -> bytes:
    """Create a run of the shared assistant, polled or streamed."""
    return orjson.dumps({"assistant_id": RUN_ASSISTANT, "stream": stream})


def upstream_call_body(bare: Target, stream: bool = True) -> bytes:
    """The bare pass-through's equivalent of a run's upstream call: one user message, streamed with usage.

    The gateway's call also carries the assistant's instructions (a few hundred bytes more); the fast
    upstream answers both the same.
    """
    payload: dict[str, Any] = {
        "model": bare.model,
        "messages": [{"role": "user", "content": RUN_MESSAGE}],
        "max_completion_tokens": 16,
    }
    if stream:
        payload |= {"stream": True, "stream_options": {"include_usage": True}}
    return orjson.dumps(payload)


async def create_threads(session: aiohttp.ClientSession, gateway: Target, count: int) -> tuple[list[str], list[float]]:
    """`count` threads, each with the one user message a run answers; their ids and creation times (ms)."""
    body = orjson.dumps({"messages": [{"role": "user", "content": RUN_MESSAGE}], "metadata": {"bench": "runs"}})
    ids: list[str] = []
    times: list[float] = []
    for _ in range(count):
        started = time.perf_counter()
        async with session.post(gateway.base_url + "/v1/threads", data=body, headers=gateway.headers) as response:
            payload = await response.read()
            if response.status != 200:
                raise BenchError(f"POST /v1/threads answered {response.status}: {payload[:500]!r}")
        times.append((time.perf_counter() - started) * 1000)
        ids.append(orjson.loads(payload)["id"])
    return ids, times


def check_run(run: dict[str, Any], how: str) -> None:
    """A measured run must have completed, answered by the upstream (not simulated)."""
    if run.get("status") != "completed" or run.get("simulated"):
        summary = {key: run.get(key) for key in ("id", "status", "last_error", "incomplete_details", "simulated")}
        raise BenchError(f"a {how} run did not complete through the upstream: {summary}")


async def plain_run(
    session: aiohttp.ClientSession, gateway: Target, thread_id: str, poll_seconds: float
) -> tuple[RunSample, dict[str, Any]]:
    """Create a run (`stream: false`), then GET it until it is terminal; the time until it was seen completed."""
    runs_url = f"{gateway.base_url}/v1/threads/{thread_id}/runs"
    started = time.perf_counter()
    async with session.post(runs_url, data=run_body(stream=False), headers=gateway.headers) as response:
        payload = await response.read()
        if response.status != 200:
            raise BenchError(f"POST {runs_url} answered {response.status}: {payload[:500]!r}")
    answered = time.perf_counter()
    run = orjson.loads(payload)
    polls = 0
    while run["status"] not in TERMINAL_RUN_STATUSES:
        if time.perf_counter() - started > RUN_GIVE_UP:
            raise BenchError(f"run {run['id']} still {run['status']} after {RUN_GIVE_UP:.0f} s ({polls} polls)")
        if poll_seconds:
            await asyncio.sleep(poll_seconds)
        async with session.get(f"{runs_url}/{run['id']}", headers=gateway.headers) as response:
            payload = await response.read()
            if response.status != 200:
                raise BenchError(f"GET the run answered {response.status}: {payload[:500]!r}")
        polls += 1
        run = orjson.loads(payload)
    ended = time.perf_counter()
    check_run(run, "plain")
    return RunSample((ended - started) * 1000, (answered - started) * 1000, polls=polls), run


async def streamed_run(session: aiohttp.ClientSession, gateway: Target, thread_id: str) -> RunSample:
    """Create a run with `stream: true` and read its events to `[DONE]`."""
    url = f"{gateway.base_url}/v1/threads/{thread_id}/runs"
    read = await read_stream(session, url, run_body(stream=True), gateway.headers)
    names = [name for name, _ in read.events]
    if "thread.run.completed" not in names or read.events[-1] != ("done", b"[DONE]"):
        raise BenchError(f"a streamed run did not end with thread.run.completed and [DONE]: {names}")
    check_run(orjson.loads(read.events[names.index("thread.run.completed")][1]), "streamed")
    return RunSample(read.total_ms, read.ttfb_ms, read.first_content_ms)


async def bare_call(session: aiohttp.ClientSession, bare: Target, stream: bool) -> RunSample:
    """The bare pass-through's chat completion: streamed (with usage) to [DONE], or plain."""
    if stream:
        read = await read_stream(session, bare.url, upstream_call_body(bare), bare.headers)
        if not read.events or read.events[-1][1] != b"[DONE]":
            raise BenchError("the bare pass-through's stream did not end with [DONE]")
        return RunSample(read.total_ms, read.ttfb_ms, read.first_content_ms)
    started = time.perf_counter()
    async with session.post(bare.url, data=upstream_call_body(bare, stream=False), headers=bare.headers) as response:
        payload = await response.read()
        if response.status != 200:
            raise BenchError(f"bare answered {response.status}: {payload[:500]!r}")
    total = (time.perf_counter() - started) * 1000
    return RunSample(total, total)


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of some values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def summarize_runs(samples: list[RunSample], cpu_ms: float) -> dict[str, Any]:
    """Medians (and p90) of one series, with the server's CPU per run."""
    contents = [s.first_content_ms for s in samples if s.first_content_ms is not None]
    polls = [s.polls for s in samples]
    return {
        "samples": len(samples),
        "total_ms_p50": statistics.median(s.total_ms for s in samples),
        "total_ms_p90": quantile([s.total_ms for s in samples], 0.9),
        "first_ms_p50": statistics.median(s.first_ms for s in samples),
        "first_content_ms_p50": statistics.median(contents) if contents else None,
        "polls_p50": statistics.median(polls),
        "polls_max": max(polls),
        "server_cpu_ms_per_run": cpu_ms,
    }


async def runs_phase(gateway: Target, bare: Target, samples: int, poll_ms: float) -> dict[str, Any]:
    """Plain runs, then streamed runs, each alternating with the bare pass-through's equivalent call;
    then bare plain completions. Sequential, one client; every run on a fresh thread made beforehand."""
    warmup = 3
    poll_seconds = poll_ms / 1000
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        cpu_before = cpu_seconds(gateway.pid)
        threads, thread_ms = await create_threads(session, gateway, 2 * (warmup + samples))
        thread_cpu_ms = (cpu_seconds(gateway.pid) - cpu_before) * 1000 / len(threads)
        plain_threads, stream_threads = threads[: warmup + samples], threads[warmup + samples :]
        # A probe: the run stored the upstream's text as its reply.
        _, probe_run = await plain_run(session, gateway, plain_threads.pop(), poll_seconds)
        messages_url = f"{gateway.base_url}/v1/threads/{probe_run['thread_id']}/messages?run_id={probe_run['id']}"
        async with session.get(messages_url, headers=gateway.headers) as response:
            replies = orjson.loads(await response.read()).get("data") or []
        reply = replies[0]["content"][0]["text"]["value"] if replies else None
        if reply != UPSTREAM_TEXT:
            raise BenchError(f"the probe run {probe_run['id']} stored {reply!r}, not {UPSTREAM_TEXT!r}: {replies}")
        for _ in range(warmup - 1):
            await plain_run(session, gateway, plain_threads.pop(), poll_seconds)
            await streamed_run(session, gateway, stream_threads.pop())
            await bare_call(session, bare, stream=True)
            await bare_call(session, bare, stream=False)
        await streamed_run(session, gateway, stream_threads.pop())

        series: dict[str, list[RunSample]] = {}
        cpu: dict[str, float] = {}

        async def alternate(name: str, one: Callable[[str], Awaitable[RunSample]], thread_ids: list[str]) -> None:
            gateway_cpu, bare_cpu = cpu_seconds(gateway.pid), cpu_seconds(bare.pid)
            mine, theirs = series.setdefault(f"gateway_{name}", []), series.setdefault(f"bare_for_{name}", [])
            for thread_id in thread_ids:
                mine.append(await one(thread_id))
                theirs.append(await bare_call(session, bare, stream=True))
            await asyncio.sleep(0.5)  # what a run does after its client saw it end (usage row) is counted too
            cpu[f"gateway_{name}"] = (cpu_seconds(gateway.pid) - gateway_cpu) * 1000 / len(thread_ids)
            cpu[f"bare_for_{name}"] = (cpu_seconds(bare.pid) - bare_cpu) * 1000 / len(thread_ids)

        async def plain(thread_id: str) -> RunSample:
            return (await plain_run(session, gateway, thread_id, poll_seconds))[0]

        async def streamed(thread_id: str) -> RunSample:
            return await streamed_run(session, gateway, thread_id)

        await alternate("plain", plain, plain_threads)
        await alternate("streamed", streamed, stream_threads)
        bare_cpu = cpu_seconds(bare.pid)
        series["bare_plain"] = [await bare_call(session, bare, stream=False) for _ in range(samples)]
        cpu["bare_plain"] = (cpu_seconds(bare.pid) - bare_cpu) * 1000 / samples
    result: dict[str, Any] = {name: summarize_runs(items, cpu[name]) for name, items in series.items()}
    result["threads"] = {
        "created": len(threads),
        "create_ms_p50": statistics.median(thread_ms),
        "server_cpu_ms_per_thread": thread_cpu_ms,
    }
    result["probe_reply"] = reply
    result["poll_ms"] = poll_ms
    result["runs_started"] = 2 * (warmup + samples)
    return result


def run_lines(runs: dict[str, Any]) -> list[str]:
    """What the run phase compares, and the overhead per run: the lines of the report."""
    poll = f"every {runs['poll_ms']:g} ms" if runs["poll_ms"] else "back to back"
    threads = runs["threads"]
    lines = [
        f"{runs['gateway_plain']['samples']} runs of {RUN_ASSISTANT} of each kind, one client, one request at a time;"
        f" each run on its own thread, made beforehand with one user message ({threads['created']} threads:"
        f" POST /v1/threads p50 {threads['create_ms_p50']:.2f} ms, {threads['server_cpu_ms_per_thread']:.2f} ms"
        " server CPU each, not counted below)",
        "  bare: the run's one upstream call (a chat completion streamed with include_usage), through the bare"
        " pass-through, read to [DONE]",
    ]
    for name, what in (
        ("plain", f"POST .../runs (stream false), then GET the run {poll} until a poll sees it completed"),
        ("streamed", "POST .../runs (stream true), its events read to [DONE]"),
    ):
        mine, theirs = runs[f"gateway_{name}"], runs[f"bare_for_{name}"]
        added = mine["total_ms_p50"] - theirs["total_ms_p50"]
        ratio = mine["total_ms_p50"] / theirs["total_ms_p50"] if theirs["total_ms_p50"] else 0.0
        cpu = mine["server_cpu_ms_per_run"] - theirs["server_cpu_ms_per_run"]
        lines.append(
            f"  {name} run: {what}: p50 {mine['total_ms_p50']:.2f} ms vs bare {theirs['total_ms_p50']:.2f} ms,"
            f" {added:+.2f} ms per run ({ratio:.1f}x); server CPU per run {mine['server_cpu_ms_per_run']:.2f} ms"
            f" vs bare {theirs['server_cpu_ms_per_run']:.2f} ms ({cpu:+.2f} ms)"
        )
    return lines


# --- open streams and memory ------------------------------------------------------------


def vm_rss_mb(pid: int) -> float:
    """VmRSS of a process, in MB (10^6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    return 0.0


def descendants(pid: int) -> list[int]:
    """All processes below `pid`, from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def tree_rss_mb(pid: int) -> tuple[float, int]:
    """RSS of a process plus its descendants (an uvicorn supervisor's workers), and how many there are."""
    children = descendants(pid)
    total = vm_rss_mb(pid)
    for child in children:
        with suppress(OSError):  # it may have exited since
            total += vm_rss_mb(child)
    return total, len(children)


async def hold_streams(target: Target, count: int) -> dict[str, Any]:
    """Open `count` streams, wait for every first event, then read the server's RSS."""
    idle_mb, children = tree_rss_mb(target.pid)
    opened = ended = failed = 0
    failures: Counter[str] = Counter()
    settled = asyncio.Event()
    body = target.body(stream=True)

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal opened, ended, failed
        seen = False
        try:
            async with session.post(target.url, data=body, headers=target.headers) as response:
                if response.status != 200:
                    failures[f"HTTP {response.status}: {(await response.read())[:200]!r}"] += 1
                    return
                async for chunk in response.content.iter_any():
                    if not seen and b"data:" in chunk:
                        seen, opened = True, opened + 1
                        if opened + failed >= count:
                            settled.set()
        except (aiohttp.ClientError, TimeoutError) as error:
            failures[("mid-stream " if seen else "") + type(error).__name__] += 1
        finally:
            if seen:
                ended += 1
            else:
                failed += 1
                if opened + failed >= count:
                    settled.set()

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        started = time.perf_counter()
        tasks = [asyncio.create_task(one(session)) for _ in range(count)]
        with suppress(TimeoutError):
            await asyncio.wait_for(settled.wait(), HOLD_TIMEOUT)
        open_seconds = time.perf_counter() - started
        await asyncio.sleep(0.5)
        held_mb, _ = tree_rss_mb(target.pid)
        still_open = opened - ended
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "streams": count,
        "got_first_event": opened,
        "open_at_measurement": still_open,
        "seconds_to_open_all": open_seconds,
        "failures": dict(failures),
        "rss_idle_mb": idle_mb,
        "rss_with_streams_mb": held_mb,
        "child_processes": children,
    }


# --- knowledge --------------------------------------------------------------------------


async def upload_corpus(session: aiohttp.ClientSession, gateway: Target, made: Any) -> list[str]:
    """Each file of the corpus through `POST /v1/files`; their ids."""
    headers = {"Authorization": gateway.headers["Authorization"]}
    ids = []
    for _, filename, _, text in made.files:
        form = aiohttp.FormData()
        form.add_field("purpose", "assistants")
        form.add_field("file", text.encode(), filename=filename, content_type="text/plain")
        async with session.post(gateway.base_url + "/v1/files", data=form, headers=headers) as response:
            payload = await response.read()
            if response.status != 200:
                raise BenchError(f"POST /v1/files answered {response.status}: {payload[:500]!r}")
        ids.append(orjson.loads(payload)["id"])
    return ids


async def call_json(
    session: aiohttp.ClientSession, gateway: Target, method: str, path: str, body: Any = None
) -> dict[str, Any]:
    data = orjson.dumps(body) if body is not None else None
    async with session.request(method, gateway.base_url + path, data=data, headers=gateway.headers) as response:
        payload = await response.read()
        if response.status != 200:
            raise BenchError(f"{method} {path} answered {response.status}: {payload[:500]!r}")
    answer: dict[str, Any] = orjson.loads(payload)
    return answer


async def knowledge_path(gateway: Target, database_url: str, made: Any, searches: int) -> dict[str, Any]:
    """Index the corpus into a store through the API, then search it: the rate, the latencies, top-1."""
    async with aiohttp.ClientSession() as session:
        mode = (await call_json(session, gateway, "GET", "/readyz"))["vector_search"]
        started = time.perf_counter()
        file_ids = await upload_corpus(session, gateway, made)
        uploaded = time.perf_counter() - started
        body = {"name": "bench", "file_ids": file_ids, "chunking_strategy": KNOWLEDGE_CHUNKING}
        started = time.perf_counter()
        store = await call_json(session, gateway, "POST", "/v1/vector_stores", body)
        while store["status"] == "in_progress":
            if time.perf_counter() - started > KNOWLEDGE_GIVE_UP:
                raise BenchError(f"the store was not indexed within {KNOWLEDGE_GIVE_UP:.0f} s: {store['file_counts']}")
            await asyncio.sleep(KNOWLEDGE_POLL_SECONDS)
            store = await call_json(session, gateway, "GET", f"/v1/vector_stores/{store['id']}")
        indexed = time.perf_counter() - started
        if store["file_counts"]["completed"] != len(file_ids):
            raise BenchError(f"not every file was indexed: {store['file_counts']}")
        questions = random.Random(15).sample(made.passages, min(searches, len(made.passages)))
        latencies, first = [], 0
        for passage in questions:
            query = {"query": passage.question, "rewrite_query": True, "max_num_results": 10}
            before = time.perf_counter()
            page = await call_json(session, gateway, "POST", f"/v1/vector_stores/{store['id']}/search", query)
            latencies.append((time.perf_counter() - before) * 1000)
            first += bool(page["data"]) and page["data"][0]["content"][0]["text"] == passage.text
    connection = await asyncpg.connect(database_url)
    try:  # the usage rows are written in the background: read once the searches are done
        chunks = await connection.fetchval("SELECT count(*) FROM knowledge_chunk")
        embedded = await connection.fetchval(
            "SELECT count(*) FROM usage_event WHERE route = 'vector_stores.embeddings' AND detail->>'purpose' = 'index'"
        )
    finally:
        await connection.close()
    return {
        "mode": mode,
        "files": len(file_ids),
        "passages": len(made.passages),
        "chunks": chunks,
        "embedding_calls": embedded,
        "upload_seconds": uploaded,
        "index_seconds": indexed,
        "passages_per_second": len(made.passages) / indexed,
        "searches": len(latencies),
        "search_ms_p50": quantile(latencies, 0.5),
        "search_ms_p99": quantile(latencies, 0.99),
        "top1": first / len(latencies),
    }


def start_knowledge_gateway(procs: Processes, name: str, database_url: str, key: str) -> tuple[Target, Proc]:
    """A simulated-mode gateway (no upstream key: the simulated embedding) with its own file storage."""
    storage = tempfile.mkdtemp(prefix="gateway-bench-files-")
    atexit.register(shutil.rmtree, storage, ignore_errors=True)
    target = start_gateway(procs, name, database_url, NO_UPSTREAM, key, OPENAI_API_KEY="", IMAGE_DIR=storage)
    [proc] = [proc for proc in procs.running if proc.popen.pid == target.pid]
    return target, proc


async def knowledge_phase(
    procs: Processes, db: BenchDatabase, key: str, passages: int, searches: int
) -> dict[str, Any]:
    """Both retrieval paths: full text on the run's database, hybrid on an embedded Postgres with pgvector."""
    from knowledge_core import corpus  # bench/knowledge_core.py: the same zoo the core's benchmark uses

    from support.pgvector import pgvector_database

    made = corpus(passages)
    results: dict[str, Any] = {}
    gateway, proc = start_knowledge_gateway(procs, "gateway-knowledge-full-text", db.url, key)
    try:
        results["full_text"] = await knowledge_path(gateway, db.url, made, searches)
    finally:
        procs.stop(proc)
    async with pgvector_database() as url:
        gateway, proc = start_knowledge_gateway(procs, "gateway-knowledge-hybrid", url, create_key(url))
        try:
            results["hybrid"] = await knowledge_path(gateway, url, made, searches)
        finally:
            procs.stop(proc)  # before the server it uses stops
    return results


def knowledge_lines(knowledge: dict[str, Any]) -> list[str]:
    lines = []
    for path, found in knowledge.items():
        lines += [
            f"{path} (/readyz: {found['mode']}): {found['passages']} passages in {found['files']} files,"
            f" {found['chunks']} chunks, {found['embedding_calls']} embeddings calls",
            f"  indexed in {found['index_seconds']:.2f} s: {found['passages_per_second']:.0f} passages/s"
            f" (uploads, apart: {found['upload_seconds']:.2f} s)",
            f"  {found['searches']} searches: p50 {found['search_ms_p50']:.2f} ms, p99 {found['search_ms_p99']:.2f} ms,"
            f" the answering passage first in {found['top1']:.0%}",
        ]
    return lines


# --- report -----------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    """PASS or MISS."""
    return "PASS" if ok else "MISS"


def targets(results: dict[str, Any], streams: int) -> list[dict[str, Any]]:
    """Each target of the phases that ran: name, measured value, goal, PASS/MISS."""
    found: list[dict[str, Any]] = []
    load, stream = results.get("load"), results.get("streaming")
    if load is not None:
        bare_rps = load["bare"]["throughput"]["requests_per_sec"]
        ratio = load["gateway"]["throughput"]["requests_per_sec"] / bare_rps if bare_rps else 0.0
        added = load["gateway"]["latency_c1"]["p50_ms"] - load["bare"]["latency_c1"]["p50_ms"]
        found += [
            {
                "target": "throughput gateway/bare",
                "value": f"{ratio:.1%}",
                "goal": ">= 50%",
                "pass": ratio >= TARGET_THROUGHPUT_RATIO,
            },
            {
                "target": "p50 added latency (c=1)",
                "value": f"{added:+.2f} ms",
                "goal": "<= 1 ms",
                "pass": added <= TARGET_ADDED_P50_MS,
            },
        ]
    if stream is not None:
        ttfb = stream["gateway"]["ttfb_ms_p50"] - stream["bare"]["ttfb_ms_p50"]
        one_by_one = stream["gateway"]["one_by_one"]
        found += [
            {
                "target": "stream TTFB difference",
                "value": f"{ttfb:+.2f} ms",
                "goal": "<= 2 ms",
                "pass": ttfb <= TARGET_TTFB_MS,
            },
            {"target": "chunks one by one", "value": "yes" if one_by_one else "no", "goal": "yes", "pass": one_by_one},
        ]
    if load is not None:
        responses = results["responses_load"]
        bare_responses_rps = responses["bare"]["throughput"]["requests_per_sec"]
        responses_ratio = (
            responses["gateway"]["throughput"]["requests_per_sec"] / bare_responses_rps if bare_responses_rps else 0.0
        )
        found.append(
            {
                "target": "Responses throughput gateway/bare",
                "value": f"{responses_ratio:.1%}",
                "goal": ">= 50%",
                "pass": responses_ratio >= TARGET_THROUGHPUT_RATIO,
            }
        )
    if stream is not None:
        responses_stream = results["responses_streaming"]
        responses_ttfb = responses_stream["gateway"]["ttfb_ms_p50"] - responses_stream["bare"]["ttfb_ms_p50"]
        found.append(
            {
                "target": "Responses stream TTFB difference",
                "value": f"{responses_ttfb:+.2f} ms",
                "goal": "<= 2 ms",
                "pass": responses_ttfb <= TARGET_TTFB_MS,
            }
        )
    if "open_streams" in results:
        gateway_hold = results["open_streams"]["gateway"]
        rss = gateway_hold["rss_with_streams_mb"]
        all_open = gateway_hold["open_at_measurement"] == streams
        found.append(
            {
                "target": f"RSS with {streams} open streams",
                "value": f"{rss:.1f} MB" + ("" if all_open else f" ({gateway_hold['open_at_measurement']} open)"),
                "goal": "< 200 MB, all open",
                "pass": rss < TARGET_RSS_MB and all_open,
            }
        )
    return found


def table_rows(results: dict[str, Any], streams: int) -> list[tuple[str, str, str, str]]:
    """(label, gateway, bare, note) for each line of the table, for the phases that ran."""
    c = results["config"]["connections"]

    def both(
        section: dict[str, Any], path: tuple[str, ...], spec: str, names: tuple[str, str] = ("gateway", "bare")
    ) -> tuple[str, str]:
        values = []
        for name in names:
            value: Any = section[name]
            for key in path:
                value = value[key]
            values.append(format(value, spec))
        return values[0], values[1]

    rows: list[tuple[str, str, str, str]] = [("", "gateway", "bare", "")]
    if "load" in results:
        load = results["load"]
        rows += [
            (f"throughput (req/s, c={c})", *both(load, ("throughput", "requests_per_sec"), ".0f"), ""),
            (f"server CPU per request (ms, c={c})", *both(load, ("server_cpu_ms_per_request",), ".3f"), "server only"),
            ("non-2xx during load", *both(load, ("throughput", "non_2xx"), "d"), ""),
            ("latency p50 (ms, c=1)", *both(load, ("latency_c1", "p50_ms"), ".2f"), ""),
            ("latency p99 (ms, c=1)", *both(load, ("latency_c1", "p99_ms"), ".2f"), ""),
        ]
    if "streaming" in results:
        stream = results["streaming"]
        events = tuple(f"{stream[name]['events']}/{stream[name]['distinct_arrivals']}" for name in ("gateway", "bare"))
        delay = f"upstream: {STREAM_DELAY_MS:.0f} ms"
        rows += [
            ("stream TTFB p50 (ms)", *both(stream, ("ttfb_ms_p50",), ".2f"), ""),
            ("stream first content p50 (ms)", *both(stream, ("first_content_ms_p50",), ".2f"), delay),
            ("stream events / distinct arrivals", events[0], events[1], f"{STREAM_SAMPLES} streams each"),
            ("median gap between events (ms)", *both(stream, ("median_gap_ms",), ".1f"), delay),
        ]
    if "load" in results:
        responses = results["responses_load"]
        rows += [
            ("Responses: throughput (req/s)", *both(responses, ("throughput", "requests_per_sec"), ".0f"), ""),
            ("Responses: latency p50 (ms, c=1)", *both(responses, ("latency_c1", "p50_ms"), ".2f"), ""),
        ]
    if "streaming" in results:
        rows.append(
            ("Responses: stream TTFB p50 (ms)", *both(results["responses_streaming"], ("ttfb_ms_p50",), ".2f"), "")
        )
    if "runs" in results:
        runs = results["runs"]
        plain, streamed = ("gateway_plain", "bare_for_plain"), ("gateway_streamed", "bare_for_streamed")
        polls = f"{runs['gateway_plain']['polls_p50']:g}/{runs['gateway_plain']['polls_max']}"
        rows += [
            (
                "run plain: seen completed p50 (ms)",
                *both(runs, ("total_ms_p50",), ".2f", plain),
                "bare: the run's call",
            ),
            ("run plain: seen completed p90 (ms)", *both(runs, ("total_ms_p90",), ".2f", plain), ""),
            ("run plain: create answered p50 (ms)", format(runs["gateway_plain"]["first_ms_p50"], ".2f"), "", "queued"),
            ("run plain: polls per run p50/max", polls, "", ""),
            ("run plain: server CPU/run (ms)", *both(runs, ("server_cpu_ms_per_run",), ".2f", plain), "with polls"),
            ("run streamed: TTFB p50 (ms)", *both(runs, ("first_ms_p50",), ".2f", streamed), ""),
            ("run streamed: first text p50 (ms)", *both(runs, ("first_content_ms_p50",), ".2f", streamed), ""),
            ("run streamed: [DONE] p50 (ms)", *both(runs, ("total_ms_p50",), ".2f", streamed), ""),
            ("run streamed: [DONE] p90 (ms)", *both(runs, ("total_ms_p90",), ".2f", streamed), ""),
            ("run streamed: server CPU/run (ms)", *both(runs, ("server_cpu_ms_per_run",), ".2f", streamed), ""),
            ("plain chat completion p50 (ms)", "", format(runs["bare_plain"]["total_ms_p50"], ".2f"), "reference"),
        ]
    if "open_streams" in results:
        hold = results["open_streams"]
        rows += [
            ("RSS idle (MB)", *both(hold, ("rss_idle_mb",), ".1f"), ""),
            (f"RSS with {streams} open streams (MB)", *both(hold, ("rss_with_streams_mb",), ".1f"), ""),
            ("streams open at RSS reading", *both(hold, ("open_at_measurement",), "d"), f"of {streams}"),
            ("seconds until all first events", *both(hold, ("seconds_to_open_all",), ".1f"), ""),
        ]
    return rows


def problems(results: dict[str, Any]) -> list[str]:
    """Failures, socket errors and error samples worth a line each."""
    lines = []
    for name in ("gateway", "bare"):
        if "open_streams" in results and results["open_streams"][name]["failures"]:
            lines.append(f"{name} stream failures: {results['open_streams'][name]['failures']}")
        for section in ("load", "responses_load"):
            if section not in results:
                continue
            load = results[section][name]
            for run in ("throughput", "latency_c1"):
                if load[run]["socket_errors"]:
                    lines.append(f"{name} wrk socket errors ({section}, {run}): {load[run]['socket_errors']}")
            if "error_sample" in load:
                lines.append(f"{name} error sample ({section}): {load['error_sample']}")
    return lines


def print_report(results: dict[str, Any], streams: int) -> None:
    """The table, any problems, the targets, the runs' overhead and the usage rows."""
    report()
    for label, gateway, bare, note in table_rows(results, streams):
        report(f"  {label:<36}{gateway:>10}{bare:>10}   {note}".rstrip())
    for line in problems(results):
        report(f"  {line}")
    if results["targets"]:
        report()
    for item in results["targets"]:
        report(f"  {verdict(item['pass'])}  {item['target']:<30}{item['value']:>16}   (goal {item['goal']})")
    if "runs" in results:
        report()
        report("  overhead per run (no target set):")
        for line in run_lines(results["runs"]):
            report(f"    {line}")
    if "knowledge" in results:
        report()
        report("  knowledge, through the API (no target set):")
        for line in knowledge_lines(results["knowledge"]):
            report(f"    {line}")
    report()
    usage = results["usage_rows"]
    report(f"  usage_event rows written by the gateway: {sum(usage.values())} {usage}")
    wrk_note = " (wrk also cuts up to c requests in flight at the end of each run)" if "load" in results else ""
    report(f"  requests the bench completed against the gateway: {results['gateway_requests']}{wrk_note}")
    if "runs" in results:
        report(
            f"  usage_event rows of route {RUN_ROUTE}: {results['run_usage_rows']}"
            f" (runs started: {results['runs']['runs_started']}; thread creations and polls write none; the upstream"
            " call of every run is streamed, so is its row)"
        )


# --- the run ----------------------------------------------------------------------------


def raise_open_files_limit(needed: int) -> None:
    """Let us (and the children, who inherit it) hold `needed` descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@contextmanager
def phase(title: str, procs: Processes) -> Iterator[None]:
    """Report a phase; stop the processes it started when it ends."""
    report(f"== {title}")
    before = list(procs.running)
    try:
        yield
    finally:
        for proc in reversed([proc for proc in procs.running if proc not in before]):
            procs.stop(proc)


def run_phases(procs: Processes, db: BenchDatabase, key: str, args: argparse.Namespace) -> dict[str, Any]:
    """The phases asked for; each starts its upstream, gateway and baseline and stops them after."""
    results: dict[str, Any] = {}
    if "load" in args.phases:
        with phase("load: wrk against gateway and bare pass-through", procs):
            upstream = start_upstream(procs, "upstream-fast", STREAM_CHUNKS, 0)
            gateway = start_gateway(procs, "gateway-load", db.url, upstream, key)
            bare = start_bare(procs, "bare-load", upstream)
            results["load"] = load_phase(gateway, bare, args.connections, args.duration)
            report("  the Responses API, on the same servers:")
            results["responses_load"] = load_phase(
                gateway.of("responses"), bare.of("responses"), args.connections, args.duration
            )
            time.sleep(1)  # let the usage writer flush before the gateway stops
    if "streaming" in args.phases:
        title = f"streaming: {STREAM_SAMPLES} sequential streams each, {STREAM_DELAY_MS:.0f} ms between chunks"
        with phase(title, procs):
            upstream = start_upstream(procs, "upstream-stream", STREAM_CHUNKS, STREAM_DELAY_MS)
            gateway = start_gateway(procs, "gateway-stream", db.url, upstream, key)
            bare = start_bare(procs, "bare-stream", upstream)
            results["streaming"] = run_async(streaming_phase(gateway, bare, STREAM_SAMPLES, STREAM_DELAY_MS))
            results["responses_streaming"] = run_async(
                streaming_phase(gateway.of("responses"), bare.of("responses"), STREAM_SAMPLES, STREAM_DELAY_MS)
            )
            time.sleep(1)
    if "runs" in args.phases:
        poll = f"polled every {args.run_poll_ms:g} ms" if args.run_poll_ms else "polled back to back"
        title = f"runs: {args.runs} plain ({poll}) and {args.runs} streamed, sequential; the upstream answers at once"
        with phase(title, procs):
            upstream = start_upstream(procs, "upstream-runs", STREAM_CHUNKS, 0)
            gateway = start_gateway(procs, "gateway-runs", db.url, upstream, key)
            bare = start_bare(procs, "bare-runs", upstream)
            results["runs"] = run_async(runs_phase(gateway, bare, args.runs, args.run_poll_ms))
            time.sleep(1)
    if "open_streams" in args.phases:
        with phase(f"open streams: {args.streams} concurrent, {HOLD_DELAY_MS:.0f} ms between chunks", procs):
            upstream = start_upstream(procs, "upstream-hold", HOLD_CHUNKS, HOLD_DELAY_MS)
            # Each open stream holds one upstream connection: the gateway's pool must fit them all.
            limit = str(args.upstream_max_connections or args.streams)
            report(f"  gateway runs with UPSTREAM_MAX_CONNECTIONS={limit}")
            gateway = start_gateway(procs, "gateway-hold", db.url, upstream, key, UPSTREAM_MAX_CONNECTIONS=limit)
            bare = start_bare(procs, "bare-hold", upstream)
            results["open_streams"] = {
                "gateway": run_async(hold_streams(gateway, args.streams)),
                "bare": run_async(hold_streams(bare, args.streams)),
            }
            time.sleep(1)
    if "knowledge" in args.phases:
        title = f"knowledge: {args.passages} passages indexed, {args.searches} searches, on both retrieval paths"
        with phase(title, procs):
            results["knowledge"] = run_async(knowledge_phase(procs, db, key, args.passages, args.searches))
    return results


def phase_list(value: str) -> list[str]:
    """`--phases`: names from PHASES, comma-separated."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in PHASES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(PHASES)} (got {value!r})")
    return names


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument("--connections", type=int, default=20, help="wrk connections for throughput (default 20)")
    parser.add_argument("--streams", type=int, default=1000, help="concurrent open streams (default 1000)")
    parser.add_argument(
        "--runs", type=int, default=RUN_SAMPLES, help=f"plain runs, and streamed runs, measured (default {RUN_SAMPLES})"
    )
    parser.add_argument(
        "--run-poll-ms",
        type=float,
        default=0.0,
        help="pause between polls of a plain run (default 0: back to back; the SDK waits 200 ms)",
    )
    parser.add_argument(
        "--phases",
        type=phase_list,
        default=list(PHASES),
        help=f"comma-separated, of {','.join(PHASES)} (default: all)",
    )
    parser.add_argument(
        "--passages",
        type=int,
        default=KNOWLEDGE_PASSAGES,
        help=f"knowledge: passages indexed (default {KNOWLEDGE_PASSAGES})",
    )
    parser.add_argument(
        "--searches",
        type=int,
        default=KNOWLEDGE_SEARCHES,
        help=f"knowledge: searches timed (default {KNOWLEDGE_SEARCHES})",
    )
    parser.add_argument(
        "--upstream-max-connections",
        type=int,
        default=None,
        help="UPSTREAM_MAX_CONNECTIONS of the open-streams gateway (default: --streams; the app's default is 1024)",
    )
    return parser.parse_args()


def main() -> int:
    """Run everything, print the report, write the JSON; always clean up."""
    args = parse_args()
    if "load" in args.phases and shutil.which("wrk") is None:
        report("benchmark failed: the load phase needs wrk on the PATH (or leave it out: --phases)")
        return 1
    for signum in (signal.SIGINT, signal.SIGTERM):  # both clean up like Ctrl-C, even if inherited as ignored
        signal.signal(signum, signal.default_int_handler)
    raise_open_files_limit(4 * args.streams + 1024)
    procs = Processes(LOG_DIR, warn=report)
    db: BenchDatabase | None = None
    try:
        server, source = pick_server()
        db = BenchDatabase(server, source)
        run_async(create_database(db))
        report(f"database: {db.name} on {urlsplit(server).hostname or 'a local socket'} ({source})")
        key = create_key(db.url)
        results: dict[str, Any] = {
            "config": {**vars(args), "database_source": source, "python": sys.version.split()[0]},
            **run_phases(procs, db, key, args),
        }
        results["usage_rows"] = run_async(usage_rows(db))
        sent = [results[name]["gateway"]["requests_sent"] for name in ("load", "responses_load") if name in results]
        sent += [
            results[name]["gateway"]["requests_sent"]
            for name in ("streaming", "responses_streaming")
            if name in results
        ]
        if "runs" in results:
            sent.append(results["runs"]["runs_started"])  # one upstream call, one usage row, each
            results["run_usage_rows"] = run_async(route_rows(db, RUN_ROUTE))
        if "open_streams" in results:
            sent.append(results["open_streams"]["gateway"]["got_first_event"])
        results["gateway_requests"] = sum(sent)
        results["targets"] = targets(results, args.streams)
        print_report(results, args.streams)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        (RESULTS_DIR / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
        report(f"\n  results: {(RESULTS_DIR / 'latest.json').relative_to(ROOT)}; logs: {LOG_DIR.relative_to(ROOT)}/")
        return 0
    except (BenchError, ProcessError) as error:
        report(f"benchmark failed: {error}")
        return 1
    except KeyboardInterrupt:
        report("interrupted; cleaning up")
        return 130
    finally:
        procs.stop_all()
        if db is not None:
            try:
                run_async(drop_database(db))
            except (OSError, asyncpg.PostgresError) as error:
                report(f"warning: could not drop database {db.name}: {error}")


if __name__ == "__main__":
    sys.exit(main())
