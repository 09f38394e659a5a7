"""Limits, quotas and budgets: exact under concurrency and across processes, with the headers clients know."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx
import openai
import pytest
from sqlalchemy import text

from app.auth.principal import Principal
from app.errors import RateLimited
from app.ratelimit.limiter import Bucket, Limiter, _window, format_duration
from support import internals
from support.auth import bearer
from support.errors import assert_error
from support.fake_upstream import FakeUpstream
from support.gateway import Gateway, GatewayFactory, gateway_env, gateway_process
from support.tcp_proxy import TcpProxy
from support.waiting import usage_rows

CHAT = "/v1/chat/completions"
# A small completion cap: with none, a free call reserves the tier's 2,048 tokens, and the 20,000
# tokens a minute would bind before the 10 requests a minute these tests are about.
BODY = {"model": "default-chat", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 16}


async def chat(gateway: Gateway, key: str, **extra) -> httpx.Response:
    return await gateway.client.post(CHAT, json={**BODY, **extra}, headers=bearer(key))


async def override(gateway: Gateway, user: str, **limits) -> None:
    response = await gateway.admin("PATCH", f"/admin/users/{user}", json={"limit_overrides": limits})
    assert response.status_code == 200, response.text
    await asyncio.sleep(0.1)  # the NOTIFY reaches the principal cache


async def test_burst_gets_exactly_the_limit(gateway: Gateway, upstream: FakeUpstream) -> None:
    key, _ = await gateway.key("free")  # chat: 10 per minute
    responses = await asyncio.gather(*[chat(gateway, key) for _ in range(25)])
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 10 + [429] * 15
    assert len(upstream.requests) == 10
    refused = next(r for r in responses if r.status_code == 429)
    error = assert_error(refused, 429, code="rate_limit_exceeded")
    assert error["type"] == "requests"
    assert 1 <= int(refused.headers["retry-after"]) <= 6
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


async def test_success_headers(gateway: Gateway) -> None:
    key, _ = await gateway.key("free")
    first, second = await chat(gateway, key), await chat(gateway, key)
    assert first.headers["ratelimit-limit"] == "10" and first.headers["ratelimit-remaining"] == "9"
    assert second.headers["ratelimit-remaining"] == "8"
    assert 1 <= int(second.headers["ratelimit-reset"]) <= 13
    assert second.headers["x-ratelimit-limit-requests"] == "10"
    assert second.headers["x-ratelimit-reset-requests"].endswith("s")
    assert second.headers["x-ratelimit-limit-tokens"] == "20000"
    assert int(second.headers["x-ratelimit-remaining-tokens"]) < 20000


async def test_official_sdk_raises_rate_limit_error(gateway: Gateway) -> None:
    key, user = await gateway.key("free")
    await override(gateway, user, chat_requests_per_minute=1)
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    await client.chat.completions.create(**BODY)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(**BODY)
    assert caught.value.code == "rate_limit_exceeded"
    await client.close()


async def test_several_processes_share_one_count(
    gateway: Gateway, upstream: FakeUpstream, database_url: str, tmp_path: Path
) -> None:
    """A second gateway process on the same database: together they let exactly 10 through."""
    key, _ = await gateway.key("free")
    env = gateway_env(database_url, upstream)
    async with gateway_process(env, tmp_path / "second-gateway.log") as other:
        clients = (gateway.client, other.client)
        requests = [client.post(CHAT, json=BODY, headers=bearer(key)) for _ in range(15) for client in clients]
        responses = await asyncio.gather(*requests)
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 10 and statuses.count(429) == 20
    assert len(upstream.requests) == 10


async def test_token_limit_reserves_then_settles(gateway: Gateway, db: asyncpg.Pool) -> None:
    key, user = await gateway.key("free")
    await override(gateway, user, chat_tokens_per_minute=600)
    too_big = await chat(gateway, key, max_tokens=1000)  # the reservation alone is over the limit
    assert_error(too_big, 429, code="rate_limit_exceeded")
    assert "tokens" in too_big.json()["error"]["message"]
    ok = await chat(gateway, key, max_tokens=500)
    assert ok.status_code == 200
    reserved_remaining = int(ok.headers["x-ratelimit-remaining-tokens"])
    assert reserved_remaining < 100  # ~3 prompt + 500 reserved out of 600
    await usage_rows(db, user_id=user)  # the writer settles the batch with the real 18 tokens
    await asyncio.sleep(0.1)
    after = await chat(gateway, key, max_tokens=16)
    assert after.status_code == 200
    assert int(after.headers["x-ratelimit-remaining-tokens"]) > 500  # 18 used, not 503


async def test_monthly_budget(gateway: Gateway, db: asyncpg.Pool) -> None:
    """A call is refused when what it may cost at worst would cross what is left, not once it is spent."""
    key, user = await gateway.key("free")
    # gpt-5-mini: $0.25 / $2.00 per 1M. A call capped at 16 tokens may cost ~$0.000038 at worst; the fake
    # upstream reports 11 prompt (2 cached) + 7 completion tokens: ~$0.0000163.
    await override(gateway, user, monthly_budget_usd=0.00005)
    assert (await chat(gateway, key, max_tokens=16)).status_code == 200  # its worst case fits
    [row] = await usage_rows(db, user_id=user)
    assert float(row["cost_usd"]) < 0.00002  # settled at what it really cost
    await asyncio.sleep(0.1)
    refused = await chat(gateway, key, max_tokens=16)  # its worst case is more than the ~$0.000034 left
    error = assert_error(refused, 429, code="budget_exceeded")
    assert "could cost up to $0.0000" in error["message"] and "is left" in error["message"]
    assert int(refused.headers["retry-after"]) > 0
    assert (await chat(gateway, key, max_tokens=4)).status_code == 200  # a smaller cap still fits


async def test_admin_override_and_removal(gateway: Gateway) -> None:
    key, user = await gateway.key("free")
    await override(gateway, user, chat_requests_per_minute=2)
    assert [(await chat(gateway, key)).status_code for _ in range(3)] == [200, 200, 429]
    await override(gateway, user, chat_requests_per_minute=None, chat_tokens_per_minute=None)
    unlimited = await chat(gateway, key)
    assert unlimited.status_code == 200
    assert "x-ratelimit-limit-requests" not in unlimited.headers


async def test_internal_tier_is_checked_but_never_bites(gateway: Gateway) -> None:
    key, _ = await gateway.key("internal")
    responses = await asyncio.gather(*[chat(gateway, key) for _ in range(30)])
    assert {r.status_code for r in responses} == {200}
    assert responses[0].headers["x-ratelimit-limit-requests"] == "100000000"


def bucket(key: str, kind: str, limit: float, period: float, cost: float = 1, name: str = "requests") -> Bucket:
    return Bucket(name, key, kind, limit, period, cost)  # type: ignore[arg-type]


@pytest.fixture
def limiter(shared_gateway: Gateway) -> Limiter:
    return internals.limiter(shared_gateway.app)


async def test_gcra_refills_steadily(limiter: Limiter) -> None:
    rate = [bucket(f"test:gcra:{time.time()}", "g", limit=2, period=0.6)]
    await limiter.take(rate)
    await limiter.take(rate)
    with pytest.raises(RateLimited) as caught:
        await limiter.take(rate)
    assert caught.value.headers["retry-after"] == "1"
    await asyncio.sleep(0.35)  # one unit (0.3 s) has refilled, not the whole window
    await limiter.take(rate)
    with pytest.raises(RateLimited):
        await limiter.take(rate)


async def test_calendar_quota_rolls_over_with_the_window(limiter: Limiter) -> None:
    today, tomorrow = f"test:day:{time.time()}:2026-11-22", f"test:day:{time.time()}:2026-11-23"
    quota = [Bucket("images", today, "q", 3, 60, 2, "daily_quota_exceeded")]
    decision = await limiter.take(quota)
    assert decision.counted
    with pytest.raises(RateLimited) as caught:  # 2 + 2 > 3: a quota counts the whole request
        await limiter.take(quota)
    assert caught.value.code == "daily_quota_exceeded"
    await limiter.take([Bucket("images", tomorrow, "q", 3, 60, 2, "daily_quota_exceeded")])


async def test_all_or_nothing(limiter: Limiter, db: asyncpg.Pool) -> None:
    stamp = time.time()
    roomy, full = f"test:roomy:{stamp}", f"test:full:{stamp}"
    await limiter.take([bucket(full, "g", 1, 60)])
    with pytest.raises(RateLimited):
        await limiter.take([bucket(roomy, "g", 5, 60), bucket(full, "g", 1, 60)])
    # The refused call charged nothing to the bucket that had room.
    decision = await limiter.take([bucket(roomy, "g", 5, 60)])
    assert decision.headers["x-ratelimit-remaining-requests"] == "4"


def test_calendar_windows_and_durations() -> None:
    window, seconds = _window(datetime(2026, 12, 31, 23, 59, 30, tzinfo=UTC), "day")
    assert (window, seconds) == ("2026-12-31", 30)
    window, seconds = _window(datetime(2026, 12, 31, 23, 0, tzinfo=UTC), "month")
    assert (window, seconds) == ("2026-12", 3600)
    assert [format_duration(s) for s in (0.02, 1.5, 6, 360, 3725)] == ["20ms", "1.5s", "6s", "6m0s", "1h2m5s"]


def test_image_buckets_follow_the_tier() -> None:
    from app.config import DEFAULT_CATALOG
    from app.registry import load_catalog

    limiter = Limiter(
        None,  # type: ignore[arg-type]
        load_catalog(DEFAULT_CATALOG),
        checks=None,  # type: ignore[arg-type]
        owner=uuid.uuid4(),
        fail_open_rates=True,
        fail_open_budgets=False,
        timeout=1,
        local_divisor=1,
    )
    principal = Principal(user_id="u", tier="free")
    single = {(b.name, b.kind, b.limit, b.cost) for b in limiter.image_buckets(principal, 2, 0.02)}
    assert single == {("requests", "g", 5, 1), ("images", "q", 50, 2), ("budget", "b", 5.0, 0.02)}
    batch = {(b.name, b.kind, b.limit, b.period) for b in limiter.image_buckets(principal, 4, 0.04, batch=True)}
    assert ("images", "g", 50, 3600.0) in batch


async def test_prune_removes_only_expired_rows(limiter: Limiter, db: asyncpg.Pool) -> None:
    await db.execute(
        "INSERT INTO rate_limit_bucket (key, value, expires_at) VALUES "
        "('test:old', 1, now() - interval '1 hour'), ('test:live', 1, now() + interval '1 hour')"
    )
    assert await limiter.prune() >= 1
    keys = {r["key"] for r in await db.fetch("SELECT key FROM rate_limit_bucket WHERE key LIKE 'test:%'")}
    assert "test:old" not in keys and "test:live" in keys


async def test_database_down_fails_closed_for_budgets_and_open_for_rates(
    gateway_with: GatewayFactory, cuttable_database: TcpProxy, database_url: str, db: asyncpg.Pool
) -> None:
    proxied = cuttable_database.url_for(database_url)
    async with gateway_with(database_url=proxied, ratelimit_timeout=0.5) as gw:
        budgeted, _ = await gw.key("free")
        rates_only, user = await gw.key("free")
        await override(gw, user, monthly_budget_usd=None)
        for key in (budgeted, rates_only):  # warm the principal cache while the database is up
            assert (await chat(gw, key)).status_code == 200
        await usage_rows(db, count=2)
        cuttable_database.cut()
        closed = await chat(gw, budgeted)
        assert_error(closed, 503, code="limits_unavailable")
        opened = await chat(gw, rates_only)
        assert opened.status_code == 200
        assert "x-ratelimit-remaining-requests" not in opened.headers  # nothing was counted
        unknown = await chat(gw, "gw_never-seen-before-key")
        assert_error(unknown, 503, code="auth_unavailable")  # not the caller's fault, so not a 401
        cuttable_database.restore()
        # The usage row and the charge it owes are written once the database is back.
        rows = await usage_rows(db, count=2, user_id=user)
        assert len(rows) == 2


async def test_database_down_fail_open_for_budgets_when_configured(
    gateway_with: GatewayFactory, cuttable_database: TcpProxy, database_url: str
) -> None:
    proxied = cuttable_database.url_for(database_url)
    async with gateway_with(database_url=proxied, ratelimit_timeout=0.5, ratelimit_fail_open_budgets=True) as gw:
        key, _ = await gw.key("free")
        assert (await chat(gw, key)).status_code == 200
        cuttable_database.cut()
        assert (await chat(gw, key)).status_code == 200
        cuttable_database.restore()


async def test_a_lost_database_connection_is_a_503_then_recovers(
    gateway_with: GatewayFactory, cuttable_database: TcpProxy, database_url: str
) -> None:
    proxied = cuttable_database.url_for(database_url)
    async with gateway_with(database_url=proxied, db_pool_size=1) as gw:
        key, _ = await gw.key("free")
        assert (await gw.client.get("/v1/usage", headers=bearer(key))).status_code == 200
        cuttable_database.cut()  # the pooled connection dies with it
        cuttable_database.restore()
        lost = await gw.client.get("/v1/usage", headers=bearer(key))
        assert_error(lost, 503, code="database_unavailable")
        assert (await gw.client.get("/v1/usage", headers=bearer(key))).status_code == 200


async def test_a_database_pool_kept_busy_is_a_503_to_retry_soon(gateway_with: GatewayFactory) -> None:
    async with gateway_with(db_pool_size=1, db_acquire_timeout=0.2) as gw:
        key, _ = await gw.key("free")
        sessions = internals.sessionmaker(gw.app)
        async with sessions() as first, sessions() as second:  # the pool's one connection and its one overflow
            await first.execute(text("SELECT 1"))
            await second.execute(text("SELECT 1"))
            busy = await gw.client.get("/v1/usage", headers=bearer(key))
            assert_error(busy, 503, code="database_busy")
            assert busy.headers["retry-after"] == "1"
        assert (await gw.client.get("/v1/usage", headers=bearer(key))).status_code == 200
