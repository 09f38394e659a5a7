"""Measure the gateway against a bare FastAPI pass-through, both in front of the same fake upstream.

Usage: .venv/bin/python bench/run.py [--duration S] [--connections N] [--streams N]

Three phases, each with its own fake upstream and fresh gateway and baseline processes:
load (wrk: throughput and 1-connection latency), streaming (TTFB and chunk delivery, with
20 ms between upstream chunks) and open streams (gateway RSS with N streams held open).
Load and streaming are measured for chat completions, then for the Responses API
(`POST /v1/responses`, plain and streamed) on the same processes.
Results are printed as a table and written to bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import itertools
import json
import os
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
from collections.abc import Awaitable, Iterator
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
from support.processes import ProcessError, Processes, free_port, wait_for_health, wait_for_log  # noqa: E402

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


# --- report -----------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    """PASS or MISS."""
    return "PASS" if ok else "MISS"


def targets(results: dict[str, Any], streams: int) -> list[dict[str, Any]]:
    """Each target: name, measured value, goal, PASS/MISS."""
    load, stream, hold = results["load"], results["streaming"], results["open_streams"]
    gateway_rps = load["gateway"]["throughput"]["requests_per_sec"]
    bare_rps = load["bare"]["throughput"]["requests_per_sec"]
    ratio = gateway_rps / bare_rps if bare_rps else 0.0
    added = load["gateway"]["latency_c1"]["p50_ms"] - load["bare"]["latency_c1"]["p50_ms"]
    ttfb = stream["gateway"]["ttfb_ms_p50"] - stream["bare"]["ttfb_ms_p50"]
    one_by_one = stream["gateway"]["one_by_one"]
    gateway_hold = hold["gateway"]
    rss = gateway_hold["rss_with_streams_mb"]
    all_open = gateway_hold["open_at_measurement"] == streams
    responses, responses_stream = results["responses_load"], results["responses_streaming"]
    bare_responses_rps = responses["bare"]["throughput"]["requests_per_sec"]
    responses_ratio = (
        responses["gateway"]["throughput"]["requests_per_sec"] / bare_responses_rps if bare_responses_rps else 0.0
    )
    responses_ttfb = responses_stream["gateway"]["ttfb_ms_p50"] - responses_stream["bare"]["ttfb_ms_p50"]
    return [
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
        {
            "target": "stream TTFB difference",
            "value": f"{ttfb:+.2f} ms",
            "goal": "<= 2 ms",
            "pass": ttfb <= TARGET_TTFB_MS,
        },
        {"target": "chunks one by one", "value": "yes" if one_by_one else "no", "goal": "yes", "pass": one_by_one},
        {
            "target": "Responses throughput gateway/bare",
            "value": f"{responses_ratio:.1%}",
            "goal": ">= 50%",
            "pass": responses_ratio >= TARGET_THROUGHPUT_RATIO,
        },
        {
            "target": "Responses stream TTFB difference",
            "value": f"{responses_ttfb:+.2f} ms",
            "goal": "<= 2 ms",
            "pass": responses_ttfb <= TARGET_TTFB_MS,
        },
        {
            "target": f"RSS with {streams} open streams",
            "value": f"{rss:.1f} MB" + ("" if all_open else f" ({gateway_hold['open_at_measurement']} open)"),
            "goal": "< 200 MB, all open",
            "pass": rss < TARGET_RSS_MB and all_open,
        },
    ]


def table_rows(results: dict[str, Any], streams: int) -> list[tuple[str, str, str, str]]:
    """(label, gateway, bare, note) for each line of the table."""
    c = results["config"]["connections"]
    load, stream, hold = results["load"], results["streaming"], results["open_streams"]

    def both(section: dict[str, Any], path: tuple[str, ...], spec: str) -> tuple[str, str]:
        values = []
        for name in ("gateway", "bare"):
            value: Any = section[name]
            for key in path:
                value = value[key]
            values.append(format(value, spec))
        return values[0], values[1]

    events = tuple(f"{stream[name]['events']}/{stream[name]['distinct_arrivals']}" for name in ("gateway", "bare"))
    delay = f"upstream: {STREAM_DELAY_MS:.0f} ms"
    return [
        ("", "gateway", "bare", ""),
        (f"throughput (req/s, c={c})", *both(load, ("throughput", "requests_per_sec"), ".0f"), ""),
        (f"server CPU per request (ms, c={c})", *both(load, ("server_cpu_ms_per_request",), ".3f"), "server only"),
        ("non-2xx during load", *both(load, ("throughput", "non_2xx"), "d"), ""),
        ("latency p50 (ms, c=1)", *both(load, ("latency_c1", "p50_ms"), ".2f"), ""),
        ("latency p99 (ms, c=1)", *both(load, ("latency_c1", "p99_ms"), ".2f"), ""),
        ("stream TTFB p50 (ms)", *both(stream, ("ttfb_ms_p50",), ".2f"), ""),
        ("stream first content p50 (ms)", *both(stream, ("first_content_ms_p50",), ".2f"), delay),
        ("stream events / distinct arrivals", events[0], events[1], f"{STREAM_SAMPLES} streams each"),
        ("median gap between events (ms)", *both(stream, ("median_gap_ms",), ".1f"), delay),
        (
            "Responses: throughput (req/s)",
            *both(results["responses_load"], ("throughput", "requests_per_sec"), ".0f"),
            "",
        ),
        ("Responses: latency p50 (ms, c=1)", *both(results["responses_load"], ("latency_c1", "p50_ms"), ".2f"), ""),
        ("Responses: stream TTFB p50 (ms)", *both(results["responses_streaming"], ("ttfb_ms_p50",), ".2f"), ""),
        ("RSS idle (MB)", *both(hold, ("rss_idle_mb",), ".1f"), ""),
        (f"RSS with {streams} open streams (MB)", *both(hold, ("rss_with_streams_mb",), ".1f"), ""),
        ("streams open at RSS reading", *both(hold, ("open_at_measurement",), "d"), f"of {streams}"),
        ("seconds until all first events", *both(hold, ("seconds_to_open_all",), ".1f"), ""),
    ]


def problems(results: dict[str, Any]) -> list[str]:
    """Failures, socket errors and error samples worth a line each."""
    lines = []
    for name in ("gateway", "bare"):
        if results["open_streams"][name]["failures"]:
            lines.append(f"{name} stream failures: {results['open_streams'][name]['failures']}")
        for section in ("load", "responses_load"):
            load = results[section][name]
            for run in ("throughput", "latency_c1"):
                if load[run]["socket_errors"]:
                    lines.append(f"{name} wrk socket errors ({section}, {run}): {load[run]['socket_errors']}")
            if "error_sample" in load:
                lines.append(f"{name} error sample ({section}): {load['error_sample']}")
    return lines


def print_report(results: dict[str, Any], streams: int) -> None:
    """The table, any problems, the targets and the usage rows."""
    report()
    for label, gateway, bare, note in table_rows(results, streams):
        report(f"  {label:<36}{gateway:>10}{bare:>10}   {note}".rstrip())
    for line in problems(results):
        report(f"  {line}")
    report()
    for item in results["targets"]:
        report(f"  {verdict(item['pass'])}  {item['target']:<30}{item['value']:>16}   (goal {item['goal']})")
    report()
    usage = results["usage_rows"]
    report(f"  usage_event rows written by the gateway: {sum(usage.values())} {usage}")
    report(
        f"  requests the bench completed against the gateway: {results['gateway_requests']}"
        " (wrk also cuts up to c requests in flight at the end of each run)"
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
    """The three phases; each starts its upstream, gateway and baseline and stops them after."""
    results: dict[str, Any] = {}
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
    with phase(f"streaming: {STREAM_SAMPLES} sequential streams each, {STREAM_DELAY_MS:.0f} ms between chunks", procs):
        upstream = start_upstream(procs, "upstream-stream", STREAM_CHUNKS, STREAM_DELAY_MS)
        gateway = start_gateway(procs, "gateway-stream", db.url, upstream, key)
        bare = start_bare(procs, "bare-stream", upstream)
        results["streaming"] = run_async(streaming_phase(gateway, bare, STREAM_SAMPLES, STREAM_DELAY_MS))
        results["responses_streaming"] = run_async(
            streaming_phase(gateway.of("responses"), bare.of("responses"), STREAM_SAMPLES, STREAM_DELAY_MS)
        )
        time.sleep(1)
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
    return results


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument("--connections", type=int, default=20, help="wrk connections for throughput (default 20)")
    parser.add_argument("--streams", type=int, default=1000, help="concurrent open streams (default 1000)")
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
        results["gateway_requests"] = (
            results["load"]["gateway"]["requests_sent"]
            + results["responses_load"]["gateway"]["requests_sent"]
            + results["streaming"]["gateway"]["requests_sent"]
            + results["responses_streaming"]["gateway"]["requests_sent"]
            + results["open_streams"]["gateway"]["got_first_event"]
        )
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
