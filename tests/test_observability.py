"""Operations: `/metrics` (one process and two workers) and the JSON log lines."""

from __future__ import annotations

import asyncio
import io
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import httpx
import orjson
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from app.observability.logs import JsonFormatter, TextFormatter
from support.auth import bearer
from support.fake_upstream import CHAT_PATH, Reply
from support.gateway import Gateway, GatewayFactory, gateway_env, gateway_process
from support.waiting import usage_rows

CHAT = "/v1/chat/completions"
PROMPT = "tell me about the purple elephant 7f3a"  # must not reach a log line unless LOG_PROMPTS=true
BODY = {"model": "default-chat", "messages": [{"role": "user", "content": PROMPT}]}
STREAM_BODY = {**BODY, "stream": True}
MODEL = "gpt-5-mini"  # what default-chat resolves to

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def scrape(client: httpx.AsyncClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse_metrics(response.text)


async def chat(client: httpx.AsyncClient, key: str, body: dict | None = None) -> httpx.Response:
    return await client.post(CHAT, json=body or BODY, headers=bearer(key))


async def stream(client: httpx.AsyncClient, key: str) -> httpx.Response:
    async with client.stream("POST", CHAT, json=STREAM_BODY, headers=bearer(key)) as response:
        await response.aread()
    return response


@contextmanager
def captured_lines(logger: str, formatter: logging.Formatter | None = None) -> Iterator[io.StringIO]:
    """Lines `logger` writes at INFO and above while the block runs, formatted as `serve` does."""
    target = logging.getLogger(logger)
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(formatter or JsonFormatter())
    level = target.level
    target.addHandler(handler)
    target.setLevel(logging.INFO)
    try:
        yield handler.stream  # type: ignore[misc]
    finally:
        target.removeHandler(handler)
        target.setLevel(level)


def json_lines(stream: io.StringIO) -> list[dict]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


async def test_metrics_count_requests_upstream_calls_and_refusals(
    gateway: Gateway, gateway_with: GatewayFactory, upstream, db: asyncpg.Pool
) -> None:
    """A fresh app (its own registry): a plain call, a stream, a refusal, an upstream failure, odd routes."""
    async with gateway_with(upstream_max_retries=0) as gw:
        key, user = await gw.key("free")
        limited_key, limited_user = await gw.key("free")
        response = await gw.admin(
            "PATCH", f"/admin/users/{limited_user}", json={"limit_overrides": {"chat_requests_per_minute": 1}}
        )
        assert response.status_code == 200, response.text
        await asyncio.sleep(0.1)  # the NOTIFY reaches the principal cache

        assert (await chat(gw.client, key)).status_code == 200
        assert (await stream(gw.client, key)).status_code == 200
        assert (await chat(gw.client, limited_key)).status_code == 200
        assert (await chat(gw.client, limited_key)).status_code == 429
        upstream.script(CHAT_PATH, Reply(status=500))
        assert (await chat(gw.client, key)).status_code == 502
        assert (await gw.client.get("/no/such/route")).status_code == 404
        thread_id = "thread_3f8a1c5200004000800000000000abcd"
        missing = await gw.client.get(f"/v1/threads/{thread_id}", headers=bearer(key))
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "thread_not_found"

        rows = [*await usage_rows(db, 3, user_id=user), *await usage_rows(db, 1, user_id=limited_user)]
        response = await gw.client.get("/metrics")
        text = response.text
        samples = parse_metrics(text)

    requests = "gateway_http_requests_total"
    route = {"method": "POST", "route": CHAT}
    assert value(samples, requests, **route, status="200") == 3
    assert value(samples, requests, **route, status="429") == 1
    assert value(samples, requests, **route, status="502") == 1
    assert value(samples, "gateway_http_request_duration_seconds_count", **route) == 5
    assert value(samples, requests, method="POST", route="/admin/keys", status="201") == 2
    assert value(samples, requests, method="PATCH", route="/admin/users/{user_id}", status="200") == 1
    assert value(samples, requests, method="GET", route="unmatched", status="404") == 1
    assert value(samples, requests, method="GET", route="/v1/threads/{thread_id}", status="404") == 1
    assert thread_id not in text and limited_user not in text, "labels are route templates, never raw paths"

    assert value(samples, "gateway_ratelimit_refusals_total", route=CHAT, code="rate_limit_exceeded") == 1
    calls = "gateway_upstream_calls_total"
    assert value(samples, calls, operation="chat.completions", model=MODEL, status="ok") == 3
    assert value(samples, calls, operation="chat.completions", model=MODEL, status="error") == 1
    errors = "gateway_upstream_errors_total"
    assert value(samples, errors, operation="chat.completions", model=MODEL, code="upstream_error") == 1
    assert value(samples, "gateway_upstream_latency_seconds_count", operation="chat.completions", model=MODEL) == 4
    assert value(samples, "gateway_time_to_first_token_seconds_count", operation="chat.completions", model=MODEL) == 1

    # Tokens and cost: exactly what the usage rows say.
    tokens = "gateway_tokens_total"
    assert value(samples, tokens, model=MODEL, kind="prompt") == sum(r["prompt_tokens"] for r in rows) > 0
    assert value(samples, tokens, model=MODEL, kind="completion") == sum(r["completion_tokens"] for r in rows) > 0
    assert value(samples, tokens, model=MODEL, kind="cached") == sum(r["cached_tokens"] for r in rows) > 0
    cost = value(samples, "gateway_cost_usd_total", model=MODEL)
    assert cost is not None and math.isclose(cost, float(sum(r["cost_usd"] for r in rows)), rel_tol=1e-6)

    assert value(samples, "gateway_open_streams", route=CHAT) == 0
    assert value(samples, "gateway_usage_queue_depth") is not None
    assert value(samples, "process_resident_memory_bytes") is not None


async def test_open_streams_gauge_while_a_stream_runs(gateway: Gateway, upstream) -> None:
    key, _ = await gateway.key("free")
    chunks = [{"choices": [{"index": 0, "delta": {"content": f"part {i}"}}]} for i in range(3)]
    upstream.script(CHAT_PATH, Reply(chunks=chunks, chunk_delay=0.3))
    async with gateway.client.stream("POST", CHAT, json=STREAM_BODY, headers=bearer(key)) as response:
        body = response.aiter_bytes()
        await anext(body)  # the first event is here: the stream is open
        during = value(await scrape(gateway.client), "gateway_open_streams", route=CHAT)
        async for _ in body:
            pass
    after = value(await scrape(gateway.client), "gateway_open_streams", route=CHAT)
    assert (during, after) == (1, 0)


async def test_metrics_token(gateway_with: GatewayFactory) -> None:
    token = "metrics-token-0123456789"
    async with gateway_with(metrics_token=token) as gw:
        refused = await gw.client.get("/metrics")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_metrics_token"
        assert (await gw.client.get("/metrics", headers=bearer(token))).status_code == 200
    async with gateway_with(metrics_enabled=False) as gw:
        assert (await gw.client.get("/metrics")).status_code == 404


async def test_access_line_fields(gateway: Gateway) -> None:
    key, user = await gateway.key("free")
    with captured_lines("app.access") as lines:
        ok = await chat(gateway.client, key, BODY)
        refused = await gateway.client.post(CHAT, json=BODY, headers=bearer("gw-not-a-real-key"))
    access = {line["request_id"]: line for line in json_lines(lines)}
    line = access[ok.headers["x-request-id"]]
    assert set(line) == {"ts", "level", "logger", "message", "request_id", "user_id", "method", "route", "status"} | {
        "latency_ms",
        "model",
    }
    assert line["level"] == "info" and line["logger"] == "app.access" and line["ts"].endswith("Z")
    assert (line["user_id"], line["method"], line["route"], line["status"]) == (user, "POST", CHAT, 200)
    assert line["model"] == MODEL and line["latency_ms"] > 0
    assert line["message"] == f"POST {CHAT} 200"
    unauthenticated = access[refused.headers["x-request-id"]]
    assert unauthenticated["status"] == 401 and "user_id" not in unauthenticated and "model" not in unauthenticated
    text = lines.getvalue()
    assert PROMPT not in text and key not in text and "gw-not-a-real-key" not in text


async def test_prompt_logged_only_when_allowed(gateway_with: GatewayFactory) -> None:
    long_prompt = PROMPT + " " + "x" * 2000
    body = {"model": "default-chat", "messages": [{"role": "system", "content": "be brief"}, *BODY["messages"]]}
    async with gateway_with(log_prompts=True) as gw:
        key, _ = await gw.key("free")
        with captured_lines("app.access") as lines:
            first = await chat(gw.client, key, body)
            second = await chat(gw.client, key, {**BODY, "messages": [{"role": "user", "content": long_prompt}]})
    access = {line["request_id"]: line for line in json_lines(lines)}
    assert access[first.headers["x-request-id"]]["prompt"] == PROMPT  # the last user message, not the system one
    truncated = access[second.headers["x-request-id"]]["prompt"]
    assert truncated.startswith(PROMPT) and len(truncated) == 1001
    assert key not in lines.getvalue()


async def test_every_line_of_a_request_carries_its_id(gateway_with: GatewayFactory, upstream) -> None:
    """Not only the access line: a warning logged while handling a request names it too."""
    async with gateway_with(fallback_to_simulated=True, upstream_max_retries=0) as gw:
        key, user = await gw.key("free")
        upstream.script(CHAT_PATH, Reply(status=500))
        with captured_lines("app.calls") as lines:
            response = await chat(gw.client, key)
    assert response.headers["x-gateway-fallback"] == "true"
    [warning] = json_lines(lines)
    assert warning["level"] == "warning" and "answering simulated" in warning["message"]
    assert warning["request_id"] == response.headers["x-request-id"] and warning["user_id"] == user


def test_text_format_keeps_the_fields() -> None:
    record = logging.makeLogRecord({"name": "app.access", "msg": "GET /healthz 200", "levelname": "INFO"})
    record.route, record.status = "/healthz", 200
    assert TextFormatter().format(record).endswith("INFO app.access GET /healthz 200 route=/healthz status=200")


def per_worker_requests(directory: Path) -> dict[str, float]:
    """Chat requests each worker counted, read from its own file in the multiprocess directory."""
    counts: dict[str, float] = {}
    for path in directory.glob("counter_*.db"):
        samples = [s for family in MultiProcessCollector.merge([str(path)]) for s in family.samples]
        counts[path.stem.removeprefix("counter_")] = sum(
            s.value for s in samples if s.name == "gateway_http_requests_total" and s.labels.get("route") == CHAT
        )
    return counts


async def test_two_workers_report_the_sum(gateway: Gateway, upstream, database_url: str, tmp_path: Path) -> None:
    """`serve --workers 2`: requests land on both workers, and any scrape answers for all of them."""
    key, user = await gateway.key("internal")
    metrics_dir = tmp_path / "metrics"
    log_path = tmp_path / "stderr.log"
    env = gateway_env(
        database_url,
        upstream,
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        LOG_FORMAT="json",
        LOG_PROMPTS="false",
    )
    sent: list[httpx.Response] = []
    no_reuse = httpx.Limits(max_keepalive_connections=0)  # a new connection each time: the workers share them
    async with gateway_process(env, log_path, "--workers", "2", log_level="info", limits=no_reuse) as process:
        client = process.client
        # /healthz answers once one worker is up; a second worker still starting would see no requests.
        await process.wait_for_log("Application startup complete", count=2)
        for _ in range(10):  # until both workers have answered some
            batch = [chat(client, key) for _ in range(8)] + [stream(client, key) for _ in range(4)]
            sent += await asyncio.gather(*batch)
            counts = per_worker_requests(metrics_dir)
            if len(counts) == 2 and all(counts.values()):
                break
        assert all(r.status_code == 200 for r in sent)
        total = len(sent)
        counts = per_worker_requests(metrics_dir)
        assert len(counts) == 2 and all(counts.values()), f"requests did not spread: {counts}"

        # Each worker counts after the response's last byte: wait for the last few, then check every scrape.
        for _ in range(100):
            samples = await scrape(client)
            if value(samples, "gateway_http_requests_total", method="POST", route=CHAT, status="200") == total:
                break
            await asyncio.sleep(0.02)
        chat_calls = {"operation": "chat.completions", "model": MODEL}
        for _ in range(8):
            samples = await scrape(client)
            assert value(samples, "gateway_http_requests_total", method="POST", route=CHAT, status="200") == total
            assert value(samples, "gateway_http_request_duration_seconds_count", method="POST", route=CHAT) == total
            assert value(samples, "gateway_upstream_calls_total", **chat_calls, status="ok") == total
            assert value(samples, "gateway_time_to_first_token_seconds_count", **chat_calls) == total // 3
            assert value(samples, "gateway_open_streams", route=CHAT) == 0
            assert value(samples, "gateway_usage_queue_depth") is not None
    assert process.returncode == 0
    assert not metrics_dir.exists() or not list(metrics_dir.glob("gauge_live*")), "workers took their gauges along"

    # The logs: every line on stderr is one JSON object, from the CLI, uvicorn, the workers.
    lines = [orjson.loads(line) for line in log_path.read_bytes().splitlines() if line.strip()]
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in lines)
    assert any(line["logger"] == "uvicorn.error" and "Started server process" in line["message"] for line in lines)
    access = {line["request_id"]: line for line in lines if line["logger"] == "app.access"}
    for response in sent:
        line = access[response.headers["x-request-id"]]
        assert (line["user_id"], line["route"], line["status"], line["model"]) == (user, CHAT, 200, MODEL)
        assert line["method"] == "POST" and line["latency_ms"] > 0
    text = log_path.read_text()
    assert key not in text and PROMPT not in text and upstream.api_key not in text
