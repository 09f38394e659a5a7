"""Slow and oversized clients against a real gateway: are they cut in time, and does /healthz stay fast?

Usage: .venv/bin/python bench/slow_clients.py [--headers N] [--bodies N] [--huge N] [--timeout S]

One `python -m app serve` (one worker, the access log at INFO) on a scratch database, with
HEADER_TIMEOUT_SECONDS and BODY_TIMEOUT_SECONDS set to `--timeout`. Phases, each timing
`GET /healthz` (sequential, one connection per request) while the attack runs:

1. quiet: nothing else;
2. slow clients: `--headers` connections sending a partial request line and header, then one
   byte a second, and `--bodies` connections sending complete headers (with a valid key, so
   the body is read) promising a body that arrives one byte a second; afterwards, how many
   were answered 408, and how many were still open `--timeout` + 5 s after they started;
3. huge headers: `--huge` clients at once, each sending a 1.3 MB `Authorization` header in a
   loop, then one 50 MB junk header: what each was answered, and how long that took;
4. batch streams: a user of tier `internal` (no stream cap) opens `--batch-streams` event
   streams on one slow image batch, and another user's `GET /v1/threads` is timed meanwhile;
   then a `free` user opens one stream more than the free tier's cap.

Connections past MAX_CONNECTIONS (2048 by default) are answered 503 once their headers are
in: `/healthz` requests refused so are counted. Everything stays on loopback.
Postgres: BENCH_DATABASE_URL, else TEST_DATABASE_URL, else postgresql://postgres@127.0.0.1:5432/test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # run as a script: tests/support is not on the path yet
from support.database import database_name, with_database  # noqa: E402
from support.gateway import GatewayProcess, gateway_env, gateway_process  # noqa: E402

LOCAL_DATABASE = "postgresql://postgres@127.0.0.1:5432/test"
HEALTH_SAMPLES = 200


async def read_status(reader: asyncio.StreamReader) -> str:
    """The status code of the answer, or how the connection ended without one."""
    try:
        line = await reader.readline()
    except (ConnectionError, OSError):
        return "reset"
    return line.split(b" ")[1].decode() if line.startswith(b"HTTP/1.1 ") else "closed"


async def health(host: str, port: int, stop: asyncio.Event | None = None) -> tuple[list[float], Counter[str]]:
    """`GET /healthz` one after another (a new connection each): latencies in ms, and the statuses."""
    timings: list[float] = []
    statuses: Counter[str] = Counter()
    while len(timings) < HEALTH_SAMPLES and not (stop is not None and stop.is_set()):
        began = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /healthz HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
            status = await asyncio.wait_for(read_status(reader), 30)
            writer.close()
        except (OSError, TimeoutError) as error:
            status = type(error).__name__
        timings.append((time.perf_counter() - began) * 1000)
        statuses[status] += 1
    return timings, statuses


async def slow_client(host: str, port: int, head: bytes, results: Counter[str], open_at: list[float]) -> None:
    """Send `head`, then a byte a second, until the server answers or closes; record what it did."""
    began = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        results["connect failed"] += 1
        return
    writer.write(head)
    answer = asyncio.ensure_future(read_status(reader))
    while not answer.done():
        try:
            await asyncio.wait_for(asyncio.shield(answer), 1)
        except TimeoutError:
            try:
                writer.write(b"x")
                await writer.drain()
            except (ConnectionError, OSError):
                break
    status = await answer
    results[status] += 1
    open_at.append(time.perf_counter() - began)
    writer.close()


async def huge_header(host: str, port: int, size: int) -> tuple[str, float]:
    """One request with a `size`-byte Authorization header: its status and seconds to the answer."""
    began = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    status = "?"
    try:
        writer.write(b"GET /v1/models HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer ")
        sent = 0
        chunk = b"a" * 65536
        answer = asyncio.ensure_future(read_status(reader))
        while sent < size and not answer.done():
            writer.write(chunk)
            sent += len(chunk)
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                break
        if not answer.done():
            writer.write(b"\r\n\r\n")
        status = await asyncio.wait_for(answer, 30)
    finally:
        writer.close()
    return status, time.perf_counter() - began


async def threads_p50(client: httpx.AsyncClient, key: str) -> tuple[list[float], Counter[str]]:
    timings: list[float] = []
    statuses: Counter[str] = Counter()
    for _ in range(HEALTH_SAMPLES):
        began = time.perf_counter()
        response = await client.get("/v1/threads", headers={"authorization": f"Bearer {key}"})
        timings.append((time.perf_counter() - began) * 1000)
        statuses[str(response.status_code)] += 1
    return timings, statuses


async def batch_streams(gateway: GatewayProcess, count: int) -> None:
    """`count` event streams on one slow batch, another user's thread list timed meanwhile."""
    holder, _ = await gateway.key("internal")
    other, _ = await gateway.key("free")
    auth = {"authorization": f"Bearer {holder}"}
    client = gateway.client
    print(f"{'GET /v1/threads, quiet':<34} {summary(*await threads_p50(client, other))}")
    items = [{"prompt": f"a slow picture {n}"} for n in range(30)]
    created = await client.post("/v1/images/batches", json={"items": items}, headers=auth)
    created.raise_for_status()
    url = f"{gateway.url}/v1/images/batches/{created.json()['id']}/events"
    opened: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=None, limits=limits) as streams:

        async def hold(ready: asyncio.Event) -> None:
            async with streams.stream("GET", url, headers=auth) as response:
                opened[str(response.status_code)] += 1
                ready.set()
                async for _ in response.aiter_bytes():
                    pass

        readies = [asyncio.Event() for _ in range(count)]
        holders = [asyncio.ensure_future(hold(ready)) for ready in readies]
        await asyncio.wait_for(asyncio.gather(*(ready.wait() for ready in readies)), 120)
        shown = ", ".join(f"{status} x{n}" for status, n in opened.most_common())
        label = f"... with {count} batch streams open"
        print(f"{label:<34} {summary(*await threads_p50(client, other))}  (streams: {shown})")
        for task in holders:
            task.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
    free, _ = await gateway.key("free")
    free_auth = {"authorization": f"Bearer {free}"}
    mine = await client.post("/v1/images/batches", json={"items": items[:2]}, headers=free_auth)
    mine.raise_for_status()
    free_url = f"{gateway.url}/v1/images/batches/{mine.json()['id']}/events"
    statuses: Counter[str] = Counter()
    async with httpx.AsyncClient(timeout=None) as streams:
        responses = []
        for _ in range(5):
            request = streams.build_request("GET", free_url, headers=free_auth)
            response = await streams.send(request, stream=True)
            statuses[str(response.status_code)] += 1
            responses.append(response)
        for response in responses:
            await response.aclose()
    shown = ", ".join(f"{status} x{n}" for status, n in sorted(statuses.items()))
    print(f"{'a free user opening 5 streams':<34} {shown}")


def report_errors(log: str) -> None:
    """The unhandled errors the gateway logged, counted by their last line: there should be none."""
    errors: Counter[str] = Counter()
    for line in log.splitlines():
        if line.startswith("{") and '"exception"' in line:
            errors[json.loads(line)["exception"].rstrip().rsplit("\n", 1)[-1]] += 1
    print(f"\n{'errors in the gateway log':<34} {sum(errors.values())}")
    for error, count in errors.most_common():
        print(f"{'':<34} {count} x {error}")


def summary(timings: list[float], statuses: Counter[str]) -> str:
    ordered = sorted(timings)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    shown = ", ".join(f"{status} x{count}" for status, count in statuses.most_common())
    return f"p50 {statistics.median(timings):7.1f} ms  p99 {p99:7.1f} ms  ({shown})"


async def run(args: argparse.Namespace) -> None:
    server = os.environ.get("BENCH_DATABASE_URL") or os.environ.get("TEST_DATABASE_URL") or LOCAL_DATABASE
    name = database_name("gateway_slow_clients")
    admin = await asyncpg.connect(server)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = gateway_env(
                with_database(server, name),
                None,
                ENVIRONMENT="development",
                IMAGE_BATCH_ITEMS_PER_MINUTE="2",  # a batch that outlasts the measurement
                HEADER_TIMEOUT_SECONDS=str(args.timeout),
                BODY_TIMEOUT_SECONDS=str(args.timeout),
            )
            log = Path(tmp) / "gateway.log"
            async with gateway_process(env, log, log_level="info", start_timeout=120) as gateway:
                host, port = "127.0.0.1", int(gateway.url.rsplit(":", 1)[1])
                print(f"gateway {gateway.url}; header and body timeouts {args.timeout:g} s\n")
                print(f"{'quiet':<34} {summary(*await health(host, port))}")

                if args.headers or args.bodies:
                    results: Counter[str] = Counter()
                    open_for: list[float] = []
                    partial_head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\nx-slow: "
                    key, _ = await gateway.key("free")  # so the body is read, not refused unread with a 401
                    partial_body = (
                        b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
                        b"authorization: Bearer " + key.encode() + b"\r\ncontent-length: 100000\r\n\r\n{"
                    )
                    clients = [
                        *(slow_client(host, port, partial_head, results, open_for) for _ in range(args.headers)),
                        *(slow_client(host, port, partial_body, results, open_for) for _ in range(args.bodies)),
                    ]
                    began = time.perf_counter()
                    attack = asyncio.gather(*clients)
                    await asyncio.sleep(1)  # let them connect
                    label = f"{args.headers} slow headers + {args.bodies} bodies"
                    print(f"{label:<34} {summary(*await health(host, port))}")
                    try:
                        await asyncio.wait_for(attack, args.timeout + 5)
                        still_open = 0
                    except TimeoutError:
                        still_open = len(clients) - sum(results.values())
                    shown = ", ".join(f"{status} x{count}" for status, count in results.most_common())
                    print(
                        f"{'':<34} slow clients answered: {shown}; "
                        f"still open {args.timeout + 5:g} s after: {still_open}; "
                        f"all done {time.perf_counter() - began:.1f} s after they started, "
                        f"longest {max(open_for, default=0):.1f} s"
                    )

                if args.huge:
                    stop = asyncio.Event()
                    huge: Counter[str] = Counter()
                    huge_times: list[float] = []

                    async def hammer() -> None:
                        while not stop.is_set():
                            status, seconds = await huge_header(host, port, 1_300_000)
                            huge[status] += 1
                            huge_times.append(seconds)

                    hammers = [asyncio.ensure_future(hammer()) for _ in range(args.huge)]
                    await asyncio.sleep(0.5)
                    timings, statuses = await health(host, port)
                    stop.set()
                    await asyncio.gather(*hammers)
                    print(f"{f'{args.huge} x 1.3 MB headers in a loop':<34} {summary(timings, statuses)}")
                    shown = ", ".join(f"{status} x{count}" for status, count in huge.most_common())
                    print(
                        f"{'':<34} 1.3 MB headers answered: {shown}; p50 {statistics.median(huge_times) * 1000:.1f} ms"
                    )
                    status, seconds = await huge_header(host, port, 50_000_000)
                    print(f"{'one 50 MB header':<34} answered {status} in {seconds * 1000:.1f} ms")
                    print(f"{'quiet again':<34} {summary(*await health(host, port))}")
                if args.batch_streams:
                    await batch_streams(gateway, args.batch_streams)
                report_errors(gateway.log_text())
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--headers", type=int, default=1000, help="slow-header connections")
    parser.add_argument("--bodies", type=int, default=1000, help="slow-body connections")
    parser.add_argument("--huge", type=int, default=4, help="clients sending 1.3 MB headers at once")
    parser.add_argument("--batch-streams", type=int, default=1500, help="event streams on one batch (0: skip)")
    parser.add_argument("--timeout", type=float, default=10.0, help="HEADER_ and BODY_TIMEOUT_SECONDS")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
