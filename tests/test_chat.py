"""Chat completions through the official `openai` client, against the fake upstream over loopback."""

from __future__ import annotations

import asyncio
import itertools
from decimal import Decimal

import aiohttp
import asyncpg
import openai
import pytest

from support.auth import bearer
from support.errors import assert_error
from support.fake_upstream import CONTENT, CONTENT_PIECES, FakeUpstream, Reply
from support.gateway import Gateway, GatewayFactory
from support.waiting import usage_rows

MESSAGES = [{"role": "user", "content": "Say hello"}]
CHAT = "/v1/chat/completions"


def sdk(gateway: Gateway, key: str, **options) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, **options)


def gpt5_mini_cost(prompt: int, completion: int, cached: int = 0) -> Decimal:
    return Decimal(str(round(((prompt - cached) * 0.25 + cached * 0.025 + completion * 2.0) / 1_000_000, 8)))


async def test_plain_completion(gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool) -> None:
    key, user = await gateway.key("free")
    client = sdk(gateway, key)
    raw = await client.chat.completions.with_raw_response.create(model="default-chat", messages=MESSAGES)
    completion = raw.parse()
    assert completion.choices[0].message.content == CONTENT
    assert completion.usage.total_tokens == 18
    assert raw.headers["x-upstream-request-id"] == "req_fake_1"
    assert raw.headers["x-ratelimit-limit-requests"] == "10"
    assert raw.headers["x-ratelimit-remaining-requests"] == "9"
    assert "x-gateway-simulated" not in raw.headers
    sent = upstream.requests[-1]
    assert sent.json["model"] == "gpt-5-mini"  # the alias resolved
    assert sent.headers["authorization"] == f"Bearer {upstream.api_key}"  # our key, not the client's
    [row] = await usage_rows(db, user_id=user)
    assert row["status"] == "ok" and row["http_status"] == 200 and row["stream"] is False
    assert row["route"] == "chat.completions" and row["model"] == "gpt-5-mini"
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == (11, 7, 2)
    assert row["tokens_estimated"] is False
    assert row["cost_usd"] == gpt5_mini_cost(11, 7, 2)
    assert row["upstream_request_id"] == "req_fake_1"
    assert row["request_id"] == raw.headers["x-request-id"]
    assert row["api_key_id"] is not None and row["latency_ms"] > 0 and row["ttft_ms"] is None
    await client.close()


async def test_streamed_completion_without_usage(gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool) -> None:
    key, user = await gateway.key("free")
    client = sdk(gateway, key)
    chunks = [
        chunk
        async for chunk in await client.chat.completions.create(model="default-chat", messages=MESSAGES, stream=True)
    ]
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert tuple(pieces) == CONTENT_PIECES
    assert all(c.choices for c in chunks), "the usage chunk the client did not ask for is stripped"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert upstream.requests[-1].json["stream_options"] == {"include_usage": True}  # asked for anyway
    [row] = await usage_rows(db, user_id=user)
    assert row["status"] == "ok" and row["stream"] is True
    assert (row["prompt_tokens"], row["completion_tokens"]) == (11, 7)
    assert row["tokens_estimated"] is False and row["ttft_ms"] is not None
    await client.close()


async def test_streamed_completion_with_usage(gateway: Gateway, db: asyncpg.Pool) -> None:
    key, user = await gateway.key("free")
    client = sdk(gateway, key)
    stream = await client.chat.completions.create(
        model="default-chat", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 18
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == CONTENT
    [row] = await usage_rows(db, user_id=user)
    assert row["cost_usd"] == gpt5_mini_cost(11, 7, 2)
    await client.close()


async def test_raw_sse_wire_format(gateway: Gateway) -> None:
    key, _ = await gateway.key("free")
    async with gateway.client.stream(
        "POST", CHAT, json={"model": "default-chat", "messages": MESSAGES, "stream": True}, headers=bearer(key)
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        body = b"".join([part async for part in response.aiter_bytes()])
    events = body.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(event.startswith("data: {") for event in events[:-2])


async def test_upstream_429_then_success_is_retried(gateway: Gateway, upstream: FakeUpstream, db) -> None:
    upstream.script(CHAT, Reply(status=429, headers={"retry-after-ms": "10"}), Reply())
    key, user = await gateway.key("free")
    client = sdk(gateway, key, max_retries=0)  # the gateway retries, not the SDK
    completion = await client.chat.completions.create(model="default-chat", messages=MESSAGES)
    assert completion.choices[0].message.content == CONTENT
    assert [r.path for r in upstream.requests] == [CHAT, CHAT]
    [row] = await usage_rows(db, user_id=user)
    assert row["status"] == "ok"
    await client.close()


async def test_long_upstream_retry_after_reaches_the_client(gateway: Gateway, upstream: FakeUpstream, db) -> None:
    upstream.script(CHAT, Reply(status=429, headers={"retry-after": "30"}))
    key, user = await gateway.key("free")
    client = sdk(gateway, key, max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="default-chat", messages=MESSAGES)
    assert caught.value.response.headers["retry-after"] == "30"
    assert caught.value.code == "upstream_rate_limited"
    assert len(upstream.requests) == 1
    [row] = await usage_rows(db, user_id=user)
    assert (row["status"], row["http_status"], row["error_code"]) == ("error", 429, "upstream_rate_limited")
    await client.close()


@pytest.mark.parametrize(
    ("reply", "status", "code"),
    [
        (Reply(status=500), 502, "upstream_error"),
        (Reply(status=401), 502, "upstream_auth_error"),
        (
            Reply(
                status=400,
                body={
                    "error": {
                        "message": "bad temp",
                        "type": "invalid_request_error",
                        "param": "temperature",
                        "code": None,
                    }
                },
            ),
            400,
            None,
        ),
    ],
)
async def test_upstream_errors_map_to_ours(
    gateway: Gateway, upstream: FakeUpstream, db, reply: Reply, status: int, code: str | None
) -> None:
    upstream.script(CHAT, reply, reply, reply)
    key, user = await gateway.key("free")
    response = await gateway.client.post(
        CHAT, json={"model": "default-chat", "messages": MESSAGES}, headers=bearer(key)
    )
    error = assert_error(response, status, code=code)
    if status == 400:
        assert error["param"] == "temperature" and error["message"] == "bad temp"
        assert len(upstream.requests) == 1  # the client's fault: not retried
    [row] = await usage_rows(db, user_id=user)
    assert row["status"] == "error" and row["http_status"] == status


async def test_upstream_timeout_is_504(gateway_with: GatewayFactory, upstream: FakeUpstream) -> None:
    upstream.reset()
    upstream.script(CHAT, Reply(hang=True))
    async with gateway_with(upstream_read_timeout=0.3) as gw:
        key, _ = await gw.key("free")
        response = await gw.client.post(CHAT, json={"model": "default-chat", "messages": MESSAGES}, headers=bearer(key))
        assert_error(response, 504, code="upstream_timeout")


async def test_upstream_500_mid_stream_becomes_an_error_event(gateway: Gateway, upstream: FakeUpstream, db) -> None:
    upstream.script(CHAT, Reply(error_after=3))
    key, user = await gateway.key("free")
    client = sdk(gateway, key)
    received = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in await client.chat.completions.create(model="default-chat", messages=MESSAGES, stream=True):
            received.append(chunk)
    assert "upstream exploded" in str(caught.value)
    assert len(received) == 3
    [row] = await usage_rows(db, user_id=user)
    assert row["status"] == "error" and row["stream"] is True and row["error_code"] == "upstream_error"
    assert row["tokens_estimated"] is True and row["completion_tokens"] > 0
    await client.close()


async def test_dropped_upstream_connection_mid_stream(gateway: Gateway, upstream: FakeUpstream, db) -> None:
    upstream.script(CHAT, Reply(drop_after=2, chunk_delay=0.05))
    key, user = await gateway.key("free")
    async with gateway.client.stream(
        "POST", CHAT, json={"model": "default-chat", "messages": MESSAGES, "stream": True}, headers=bearer(key)
    ) as response:
        body = b"".join([part async for part in response.aiter_bytes()]).decode()
    assert body.count("data: {") == 3 and '"error"' in body.split("\n\n")[-2]
    assert "[DONE]" not in body
    [row] = await usage_rows(db, user_id=user)
    assert row["status"] == "error"


async def test_client_disconnect_cancels_upstream_and_records(gateway: Gateway, upstream: FakeUpstream, db) -> None:
    upstream.script(CHAT, Reply(chunk_delay=0.3))
    key, user = await gateway.key("free")
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            gateway.url + CHAT,
            json={"model": "default-chat", "messages": MESSAGES, "stream": True},
            headers=bearer(key),
        )
        seen = b""
        while b'"content":"Hello"' not in seen:
            seen += await response.content.readany()
        response.close()  # the app goes away mid-answer
    assert await upstream.wait_streams_closed(timeout=3), "the gateway kept the upstream stream open"
    [row] = await usage_rows(db, user_id=user)
    assert row["status"] == "cancelled" and row["stream"] is True
    assert row["tokens_estimated"] is True
    assert row["completion_tokens"] >= 1 and row["prompt_tokens"] >= 1
    assert row["cost_usd"] > 0


async def test_heartbeats_while_the_upstream_is_silent(gateway_with: GatewayFactory, upstream: FakeUpstream) -> None:
    upstream.reset()
    upstream.script(CHAT, Reply(chunk_delay=0.35))
    async with gateway_with(stream_heartbeat_seconds=0.1) as gw:
        key, _ = await gw.key("free")
        async with gw.client.stream(
            "POST", CHAT, json={"model": "default-chat", "messages": MESSAGES, "stream": True}, headers=bearer(key)
        ) as response:
            body = b"".join([part async for part in response.aiter_bytes()]).decode()
    assert ": keep-alive" in body
    assert body.endswith("data: [DONE]\n\n")


async def test_chunks_are_forwarded_as_they_arrive(gateway: Gateway, upstream: FakeUpstream) -> None:
    upstream.script(CHAT, Reply(chunk_delay=0.15))
    key, _ = await gateway.key("free")
    loop = asyncio.get_running_loop()
    arrivals = []
    async with gateway.client.stream(
        "POST", CHAT, json={"model": "default-chat", "messages": MESSAGES, "stream": True}, headers=bearer(key)
    ) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                arrivals.append(loop.time())
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert len(arrivals) == 7
    assert all(gap > 0.08 for gap in gaps), gaps  # not buffered into one burst


async def test_fallback_to_simulated(gateway_with: GatewayFactory, upstream: FakeUpstream, db) -> None:
    upstream.reset()
    upstream.script(CHAT, *[Reply(status=503)] * 6)
    async with gateway_with(fallback_to_simulated=True) as gw:
        key, user = await gw.key("free")
        client = sdk(gw, key)
        raw = await client.chat.completions.with_raw_response.create(model="default-chat", messages=MESSAGES)
        completion = raw.parse()
        assert raw.headers["x-gateway-fallback"] == "true" and raw.headers["x-gateway-simulated"] == "true"
        assert completion.system_fingerprint == "simulated" and completion.id.startswith("sim-")
        stream = await client.chat.completions.create(model="default-chat", messages=MESSAGES, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == completion.choices[0].message.content
        rows = await usage_rows(db, count=2, user_id=user)
        assert [r["status"] for r in rows] == ["fallback", "fallback"]
        assert all(r["cost_usd"] == 0 for r in rows)
        await client.close()


async def test_user_switched_to_simulated(gateway: Gateway, upstream: FakeUpstream, db) -> None:
    key, user = await gateway.key("free")
    assert (await gateway.admin("PATCH", f"/admin/users/{user}", json={"use_upstream": False})).status_code == 200
    await asyncio.sleep(0.1)  # the NOTIFY reaches the principal cache
    client = sdk(gateway, key)
    raw = await client.chat.completions.with_raw_response.create(model="default-chat", messages=MESSAGES)
    assert raw.headers["x-gateway-simulated"] == "true"
    assert raw.parse().system_fingerprint == "simulated"
    assert upstream.requests == []
    [row] = await usage_rows(db, user_id=user)
    assert row["status"] == "simulated" and row["cost_usd"] == 0
    await client.close()


async def test_simulated_mode_without_a_key(gateway_with: GatewayFactory, db) -> None:
    async with gateway_with(simulated=True) as gw:
        key, user = await gw.key("free")
        client = sdk(gw, key)
        first = await client.chat.completions.create(model="default-chat", messages=MESSAGES)
        second = await client.chat.completions.create(model="default-chat", messages=MESSAGES)
        assert first.choices[0].message.content == second.choices[0].message.content  # deterministic
        stream = await client.chat.completions.create(
            model="default-chat", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        assert chunks[-1].usage is not None
        assert (
            "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == first.choices[0].message.content
        )
        rows = await usage_rows(db, count=3, user_id=user)
        assert {r["status"] for r in rows} == {"simulated"}
        await client.close()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "gpt-5", "messages": MESSAGES}, "model"),  # pro only
        ({"model": "no-such-model", "messages": MESSAGES}, "model"),
        ({"model": "default-image", "messages": MESSAGES}, "model"),  # not a chat model
        ({"model": "default-chat", "messages": MESSAGES, "max_tokens": 5000}, "max_tokens"),
        ({"model": "default-chat", "messages": MESSAGES, "max_completion_tokens": 5000}, "max_completion_tokens"),
        ({"model": "default-chat", "messages": MESSAGES * 101}, "messages"),
        ({"model": "default-chat", "messages": [{"role": "user", "content": "x" * 64001}]}, "messages"),
        ({"model": "default-chat", "messages": []}, "messages"),
        ({"model": "default-chat", "messages": MESSAGES, "temperature": 3}, "temperature"),
    ],
)
async def test_tier_caps_and_bad_requests(gateway: Gateway, upstream: FakeUpstream, db, body, param) -> None:
    key, user = await gateway.key("free")
    client = sdk(gateway, key)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(**body)
    assert caught.value.param == param
    assert upstream.requests == []
    assert await db.fetchval("SELECT count(*) FROM usage_event WHERE user_id = $1", user) == 0
    await client.close()


async def test_pro_tier_may_use_more(gateway: Gateway, upstream: FakeUpstream) -> None:
    key, _ = await gateway.key("pro")
    client = sdk(gateway, key)
    completion = await client.chat.completions.create(model="gpt-5", messages=MESSAGES, max_tokens=5000)
    assert completion.choices[0].message.content == CONTENT
    assert upstream.requests[-1].json["max_tokens"] == 5000
    await client.close()


async def test_usage_report_for_the_caller(gateway: Gateway, db) -> None:
    key, user = await gateway.key("free")
    other_key, _ = await gateway.key("free")
    client = sdk(gateway, key)
    for _ in range(2):
        await client.chat.completions.create(model="default-chat", messages=MESSAGES)
    await sdk(gateway, other_key).chat.completions.create(model="default-chat", messages=MESSAGES)
    await usage_rows(db, count=2, user_id=user)
    report = (await gateway.client.get("/v1/usage", headers=bearer(key))).json()
    assert report["user_id"] == user
    for period in ("today", "month"):
        assert report[period]["requests"] == 2
        assert report[period]["prompt_tokens"] == 22 and report[period]["completion_tokens"] == 14
        [model] = report[period]["by_model"]
        assert model["model"] == "gpt-5-mini" and model["cost_usd"] == float(gpt5_mini_cost(11, 7, 2) * 2)
    await client.close()


async def test_usage_is_not_lost_on_shutdown(gateway_with: GatewayFactory, db) -> None:
    async with gateway_with(usage_flush_interval=3600, usage_batch_size=10_000) as gw:
        key, user = await gw.key("internal")
        client = sdk(gw, key)
        await asyncio.gather(
            *[client.chat.completions.create(model="default-chat", messages=MESSAGES) for _ in range(20)]
        )
        await client.close()
        rows = "SELECT count(*) FROM usage_event WHERE user_id = $1"
        pending = "SELECT count(*) FROM usage_pending WHERE user_id = $1"
        assert await db.fetchval(rows, user) == 0 and await db.fetchval(pending, user) == 20  # rows wait in memory
    assert await db.fetchval(rows, user) == 20 and await db.fetchval(pending, user) == 0


async def test_completion_without_usage_is_estimated(gateway: Gateway, upstream: FakeUpstream, db) -> None:
    body = {
        "id": "chatcmpl-nousage",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-5-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * 40}, "finish_reason": "stop"}],
    }
    upstream.script(CHAT, Reply(body=body))
    key, user = await gateway.key("free")
    response = await gateway.client.post(
        CHAT, json={"model": "default-chat", "messages": MESSAGES}, headers=bearer(key)
    )
    assert response.status_code == 200 and response.json()["id"] == "chatcmpl-nousage"
    [row] = await usage_rows(db, user_id=user)
    assert row["tokens_estimated"] is True
    assert row["completion_tokens"] == 10 and row["prompt_tokens"] >= 1
    assert row["cost_usd"] > 0
