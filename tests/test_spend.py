"""What a call reserves, what it is charged, and when the upstream is tried again: as a client sees it.

Every call reserves its worst case before the upstream hears of it: every billed input (tools,
schemas, images at their bound) and its completion cap times `n`, a cap the gateway sends
itself when the request named none. What the upstream reports is checked and clamped; an
answer that breaks off once its status line came is not retried and is charged the
reservation. While Postgres is away, rates are kept by the process itself.

The reservation a call took is read from `x-ratelimit-remaining-tokens` of a fresh user's
first call: the bucket was full, so the limit minus what remains is what the call reserved
(give or take one token: Postgres rounds what remains down, in float seconds since 1970).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from decimal import Decimal
from typing import Any

import asyncpg
import openai
import orjson
import pytest

from app.tokens import IMAGE_INPUT_TOKENS_LOW, IMAGE_INPUT_TOKENS_MAX
from support.auth import bearer
from support.errors import assert_error
from support.fake_upstream import CONTENT, CONTENT_PIECES, FakeUpstream, Reply
from support.gateway import Gateway, GatewayFactory
from support.spend import set_limits
from support.tcp_proxy import TcpProxy
from support.waiting import usage_rows

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Say hello"}]
FREE_CAP = 2048  # the free tier's max_completion_tokens (app/catalog.toml)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "description": "Looks an order up by its number and says where it is. " * 40,
            "parameters": {"type": "object", "properties": {"number": {"type": "string"}}, "required": ["number"]},
        },
    }
]
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "schema": {
            "type": "object",
            "description": "The answer, with the reasons for it and the sources it relies on. " * 40,
            "properties": {"text": {"type": "string"}},
        },
    },
}


@pytest.fixture(scope="module")
def gateway_settings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """This module's gateways keep their spool (and anything else on disk) in a folder of their own."""
    return {"data_dir": tmp_path_factory.mktemp("spend-data")}


def sdk(gateway: Gateway, key: str, **options: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, **options)


def gpt5_mini_cost(prompt: int, completion: int, cached: int = 0) -> float:
    return ((prompt - cached) * 0.25 + cached * 0.025 + completion * 2.0) / 1_000_000


def dollars(value: Decimal) -> Any:
    """A cost as the ledger keeps it (8 decimals), compared with one computed here."""
    return pytest.approx(float(value), abs=1.01e-8)


async def reservation(gateway: Gateway, **body: Any) -> int:
    """The tokens a chat call reserves: a fresh user's first call, read from its rate-limit headers."""
    key, _ = await gateway.key("free")
    async with sdk(gateway, key, max_retries=0) as client:
        raw = await client.chat.completions.with_raw_response.create(
            **{"model": "default-chat", "messages": MESSAGES, **body}
        )
    return int(raw.headers["x-ratelimit-limit-tokens"]) - int(raw.headers["x-ratelimit-remaining-tokens"])


# Reservations.


async def test_a_request_without_a_cap_is_sent_the_tiers_cap(gateway: Gateway, upstream: FakeUpstream) -> None:
    key, user = await gateway.key("free")
    async with sdk(gateway, key) as client:
        raw = await client.chat.completions.with_raw_response.create(model="default-chat", messages=MESSAGES)
        assert raw.parse().choices[0].message.content == CONTENT
        assert raw.headers["x-gateway-max-completion-tokens"] == str(FREE_CAP)
        assert upstream.received()[-1].json["max_completion_tokens"] == FREE_CAP

        # A cap the client named is sent as it is, and nothing is added.
        named = await client.chat.completions.with_raw_response.create(
            model="default-chat", messages=MESSAGES, max_tokens=100
        )
        assert "x-gateway-max-completion-tokens" not in named.headers
        sent = upstream.received()[-1].json
        assert sent["max_tokens"] == 100 and "max_completion_tokens" not in sent

    # A stream is capped the same way; the header comes with the stream's response.
    async with gateway.client.stream(
        "POST", CHAT, json={"model": "default-chat", "messages": MESSAGES, "stream": True}, headers=bearer(key)
    ) as response:
        assert response.status_code == 200
        assert response.headers["x-gateway-max-completion-tokens"] == str(FREE_CAP)
        await response.aread()
    assert upstream.received()[-1].json["max_completion_tokens"] == FREE_CAP

    # The tier's cap is the user's own when the admin overrode it.
    await set_limits(gateway, user, key, max_completion_tokens=300)
    async with sdk(gateway, key) as client:
        raw = await client.chat.completions.with_raw_response.create(model="default-chat", messages=MESSAGES)
    assert raw.headers["x-gateway-max-completion-tokens"] == "300"
    assert upstream.received()[-1].json["max_completion_tokens"] == 300


async def test_the_reservation_is_the_completion_cap_times_n(gateway: Gateway, upstream: FakeUpstream) -> None:
    one = await reservation(gateway, max_tokens=1000)
    three = await reservation(gateway, max_tokens=1000, n=3)
    uncapped_two = await reservation(gateway, n=2)
    prompt = one - 1000
    assert 0 < prompt < 50  # "Say hello" and the chat format's own tokens
    assert three - one == pytest.approx(2 * 1000, abs=1)
    assert uncapped_two - one == pytest.approx(2 * FREE_CAP - 1000, abs=1)  # the cap the gateway sent, n times
    assert upstream.received()[-1].json["n"] == 2

    # A call whose n choices may need more than the rate allows is refused before the upstream hears of it.
    key, user = await gateway.key("free")
    await set_limits(gateway, user, key, chat_tokens_per_minute=2500)
    sent = len(upstream.received())
    async with sdk(gateway, key, max_retries=0) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="default-chat", messages=MESSAGES, max_tokens=1000, n=3)
        error = assert_error(caught.value.response, 429, code="rate_limit_exceeded")
        needed = int(re.search(r"needs up to (\d+) tokens, over the rate limit of 2500", error["message"]).group(1))
        assert needed == pytest.approx(prompt + 3 * 1000, abs=1)
        assert len(upstream.received()) == sent
        await client.chat.completions.create(model="default-chat", messages=MESSAGES, max_tokens=1000, n=2)
    assert len(upstream.received()) == sent + 1


@pytest.mark.parametrize("extra", [{"tools": TOOLS}, {"response_format": SCHEMA}], ids=["tools", "response_format"])
async def test_tools_and_schemas_count_against_the_prompt_cap(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool, extra: dict[str, Any]
) -> None:
    key, user = await gateway.key("free")
    await set_limits(gateway, user, key, max_prompt_chars=2000)
    messages = [{"role": "user", "content": "x" * 1500}]
    async with sdk(gateway, key) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="default-chat", messages=messages, **extra)
        assert caught.value.param == "messages"
        error = assert_error(caught.value.response, 400, param="messages")
        counted = int(re.search(r"has (\d+) characters", error["message"]).group(1))
        [field] = extra.values()
        assert counted >= 1500 + len(orjson.dumps(field)) and "at most 2000" in error["message"]
        assert upstream.received() == []
        # The messages alone are within the cap.
        await client.chat.completions.create(model="default-chat", messages=messages)
    assert len(upstream.received()) == 1
    assert len(await usage_rows(db, user_id=user)) == 1


@pytest.mark.parametrize("extra", [{"tools": TOOLS}, {"response_format": SCHEMA}], ids=["tools", "response_format"])
async def test_tools_and_schemas_are_reserved(gateway: Gateway, extra: dict[str, Any]) -> None:
    bare = await reservation(gateway, max_tokens=50)
    with_field = await reservation(gateway, max_tokens=50, **extra)
    [field] = extra.values()
    chars = len(orjson.dumps(field))
    assert abs((with_field - bare) - chars / 4) <= 1  # about four characters a token


async def test_an_image_part_reserves_the_images_bound(gateway: Gateway, upstream: FakeUpstream) -> None:
    text = {"type": "text", "text": "What is in this picture?"}

    def picture(**detail: str) -> list[dict[str, Any]]:
        image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", **detail}}
        return [{"role": "user", "content": [text, image]}]

    bare = await reservation(gateway, max_tokens=50, messages=[{"role": "user", "content": [text]}])
    with_image = await reservation(gateway, max_tokens=50, messages=picture())
    with_small_image = await reservation(gateway, max_tokens=50, messages=picture(detail="low"))
    assert with_image - bare == pytest.approx(IMAGE_INPUT_TOKENS_MAX, abs=1)
    assert with_image - bare >= 1445  # at least what the largest image billed by tiles costs
    assert with_small_image - bare == pytest.approx(IMAGE_INPUT_TOKENS_LOW, abs=1)
    assert upstream.received()[1].json["messages"][0]["content"][1]["type"] == "image_url"  # sent as it came


async def test_the_budget_refuses_the_worst_case(gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool) -> None:
    prompt = await reservation(gateway) - FREE_CAP
    key, user = await gateway.key("free")
    await set_limits(gateway, user, key, monthly_budget_usd=0.01)
    sent = len(upstream.received())
    async with sdk(gateway, key, max_retries=0) as client:
        # Three uncapped choices may cost ~$0.0123: more than the $0.01 left, though nothing is spent yet.
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="default-chat", messages=MESSAGES, n=3)
        error = assert_error(caught.value.response, 429, code="budget_exceeded")
        found = re.fullmatch(
            r"This request could cost up to \$(\d+\.\d{6}), and \$(\d+\.\d{6}) of the monthly budget of \$0\.01 "
            r"is left; it resets in (\d+) seconds\.",
            error["message"],
        )
        assert found, error["message"]
        worst = gpt5_mini_cost(prompt, 3 * FREE_CAP)
        assert float(found.group(1)) == pytest.approx(worst, abs=1e-6) and float(found.group(2)) == 0.01
        assert found.group(3) == caught.value.response.headers["retry-after"]
        assert len(upstream.received()) == sent
        assert await db.fetchval("SELECT count(*) FROM usage_pending WHERE user_id = $1", user) == 0
        # One uncapped choice (~$0.0041 at worst) fits.
        await client.chat.completions.create(model="default-chat", messages=MESSAGES)
    [row] = await usage_rows(db, user_id=user)
    assert row["status"] == "ok" and gpt5_mini_cost(11, 7, 2) == dollars(row["cost_usd"])


# What the upstream reports.


@pytest.mark.parametrize(
    ("usage", "counted", "flags"),
    [
        ({"prompt_tokens": -5, "completion_tokens": 7, "total_tokens": 2}, (0, 7, 0), ["negative"]),
        ({"prompt_tokens": 50_000_000, "completion_tokens": 7, "total_tokens": 1}, (10_000_000, 7, 0), ["absurd"]),
        ({"prompt_tokens": 10.5, "completion_tokens": 6.2, "total_tokens": 16.7}, (11, 7, 0), ["not_integer"]),
        (
            {"prompt_tokens": 5, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 9}},
            (5, 7, 5),
            ["cached_over_prompt"],
        ),
        ({"prompt_tokens": -1, "completion_tokens": 2.5}, (0, 3, 0), ["negative", "not_integer"]),
    ],
    ids=["negative", "absurd", "fractional", "cached_over_prompt", "several"],
)
async def test_reported_usage_is_clamped_and_flagged(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool, usage: dict[str, Any], counted: tuple, flags: list
) -> None:
    upstream.script(CHAT, Reply(usage=usage))
    key, user = await gateway.key("free")
    async with sdk(gateway, key, max_retries=0) as client:
        completion = await client.chat.completions.create(model="default-chat", messages=MESSAGES)
    assert completion.choices[0].message.content == CONTENT  # the answer itself goes out untouched
    [row] = await usage_rows(db, user_id=user)
    assert (row["status"], row["http_status"], row["tokens_estimated"]) == ("ok", 200, False)
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == counted
    assert gpt5_mini_cost(*counted) == dollars(row["cost_usd"])
    assert json.loads(row["detail"])["usage_flags"] == flags


async def test_sound_usage_is_not_flagged(gateway: Gateway, db: asyncpg.Pool) -> None:
    key, user = await gateway.key("free")
    async with sdk(gateway, key) as client:
        await client.chat.completions.create(model="default-chat", messages=MESSAGES)
    [row] = await usage_rows(db, user_id=user)
    assert row["detail"] is None or "usage_flags" not in json.loads(row["detail"])


MALFORMED = {
    "text": Reply(usage={"prompt_tokens": "eleven", "completion_tokens": 7, "total_tokens": 18}),
    "object": Reply(usage={"prompt_tokens": 11, "completion_tokens": {"text": 7}}),
    "not_an_object": Reply(
        body={
            "id": "chatcmpl-odd",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-5-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": "plenty",
        }
    ),
}


@pytest.mark.parametrize("reply", MALFORMED.values(), ids=MALFORMED.keys())
async def test_usage_that_is_not_numbers_is_a_502_charged_the_reservation(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool, reply: Reply
) -> None:
    upstream.script(CHAT, reply)
    key, user = await gateway.key("free")
    async with sdk(gateway, key, max_retries=0) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model="default-chat", messages=MESSAGES)
    error = assert_error(caught.value.response, 502, code="upstream_error")
    assert "malformed" in error["message"]
    assert len(upstream.received()) == 1  # the upstream answered: not asked again
    [row] = await usage_rows(db, user_id=user)
    assert (row["status"], row["http_status"], row["error_code"]) == ("error", 502, "upstream_error")
    assert row["completion_tokens"] == FREE_CAP and row["prompt_tokens"] > 0 and row["tokens_estimated"] is True
    assert row["cost_usd"] > 0 and gpt5_mini_cost(row["prompt_tokens"], FREE_CAP) == dollars(row["cost_usd"])


async def test_usage_that_is_not_numbers_in_a_stream_is_estimated_and_flagged(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    upstream.script(CHAT, Reply(usage={"prompt_tokens": "eleven", "completion_tokens": 7}))
    key, user = await gateway.key("free")
    async with sdk(gateway, key) as client:
        stream = await client.chat.completions.create(model="default-chat", messages=MESSAGES, stream=True)
        pieces = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]
    assert "".join(piece or "" for piece in pieces) == CONTENT  # its text already went out: not an error
    [row] = await usage_rows(db, user_id=user)
    assert (row["status"], row["tokens_estimated"]) == ("ok", True)
    assert row["completion_tokens"] == (len(CONTENT) + 3) // 4 and row["prompt_tokens"] > 0
    assert json.loads(row["detail"])["usage_flags"] == ["malformed"]


# Retries: only before the upstream's status line.


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_5xx_before_the_answer_is_retried(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool, stream: bool
) -> None:
    upstream.script(CHAT, Reply(status=500), Reply())
    key, user = await gateway.key("free")
    async with sdk(gateway, key, max_retries=0) as client:  # the gateway retries, not the SDK
        if stream:
            chunks = await client.chat.completions.create(model="default-chat", messages=MESSAGES, stream=True)
            pieces = tuple(
                [c.choices[0].delta.content async for c in chunks if c.choices and c.choices[0].delta.content]
            )
            assert pieces == CONTENT_PIECES
        else:
            completion = await client.chat.completions.create(model="default-chat", messages=MESSAGES)
            assert completion.choices[0].message.content == CONTENT
    assert len(upstream.received()) == 2
    [row] = await usage_rows(db, user_id=user)
    assert (row["status"], row["http_status"], row["stream"]) == ("ok", 200, stream)
    assert row["upstream_request_id"] == f"req_fake_{len(upstream.requests)}"  # the answer's, not the failure's


async def test_a_body_cut_off_after_the_status_line_is_not_retried(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    upstream.script(CHAT, Reply(truncate_at=40), Reply())
    key, user = await gateway.key("free")
    async with sdk(gateway, key, max_retries=0) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model="default-chat", messages=MESSAGES)
    error = assert_error(caught.value.response, 502, code="upstream_error")
    assert "broke off" in error["message"]
    assert len(upstream.received()) == 1  # the upstream took the request: asking again could bill it twice
    [row] = await usage_rows(db, user_id=user)
    assert (row["status"], row["http_status"], row["error_code"]) == ("error", 502, "upstream_error")
    # Charged what it reserved: its prompt, and the cap the gateway sent.
    assert row["completion_tokens"] == FREE_CAP and row["prompt_tokens"] > 0 and row["tokens_estimated"] is True
    assert row["cost_usd"] > 0 and gpt5_mini_cost(row["prompt_tokens"], FREE_CAP) == dollars(row["cost_usd"])


async def test_a_failure_the_upstream_may_bill_is_charged_not_answered_simulated(
    gateway_with: GatewayFactory, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    upstream.script(CHAT, Reply(truncate_at=40))
    async with gateway_with(fallback_to_simulated=True) as gw:  # a 5xx would be answered simulated (test_chat)
        key, user = await gw.key("free")
        body = {"model": "default-chat", "messages": MESSAGES}
        response = await gw.client.post(CHAT, json=body, headers=bearer(key))
        assert_error(response, 502, code="upstream_error")
        assert "x-gateway-fallback" not in response.headers
        [row] = await usage_rows(db, user_id=user)
        assert (row["status"], row["completion_tokens"]) == ("error", FREE_CAP)
        assert row["cost_usd"] > 0 and gpt5_mini_cost(row["prompt_tokens"], FREE_CAP) == dollars(row["cost_usd"])


async def test_a_stream_left_before_its_first_byte_is_charged_its_prompt(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    upstream.script(CHAT, Reply(delay=1.0))  # the upstream takes its time to start the stream
    key, user = await gateway.key("free")
    body = {"model": "default-chat", "messages": MESSAGES, "stream": True}

    async def leave_early() -> None:
        async with gateway.client.stream("POST", CHAT, json=body, headers=bearer(key)):
            pass

    task = asyncio.create_task(leave_early())
    await asyncio.sleep(0.3)  # gone while the gateway waits for the upstream's first byte
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    [row] = await usage_rows(db, user_id=user)
    assert (row["status"], row["stream"], row["completion_tokens"]) == ("cancelled", True, 0)
    # The upstream took the request: its prompt is billed, and charged.
    assert row["prompt_tokens"] > 0 and row["cost_usd"] > 0
    assert gpt5_mini_cost(row["prompt_tokens"], 0) == dollars(row["cost_usd"])


# Postgres away: rates kept by the process.


async def chat(gateway: Gateway, key: str) -> Any:
    body = {"model": "default-chat", "messages": MESSAGES, "max_tokens": 16}
    return await gateway.client.post(CHAT, json=body, headers=bearer(key))


@pytest.mark.parametrize(("divisor", "allowed"), [(1, 10), (2, 5)])
async def test_rates_are_kept_by_the_process_while_the_database_is_away(
    gateway_with: GatewayFactory,
    cuttable_database: TcpProxy,
    database_url: str,
    upstream: FakeUpstream,
    db: asyncpg.Pool,
    divisor: int,
    allowed: int,
) -> None:
    """The free tier's 10 chats a minute, divided by RATELIMIT_LOCAL_DIVISOR, for a user without a budget;
    a user with a budget is refused (money is not guessed at). Once the database is back, what the
    process let through is not charged to the rates again: no lockout."""
    settings = {"ratelimit_timeout": 0.5, "ratelimit_local_divisor": divisor, "usage_replay_interval": 0.1}
    async with gateway_with(database_url=cuttable_database.url_for(database_url), **settings) as gw:
        rates_only, user = await gw.key("free")
        budgeted, _ = await gw.key("free")
        await set_limits(gw, user, rates_only, monthly_budget_usd=None)
        for key in (rates_only, budgeted):  # while the database answers: the keys are known, the user counted
            assert (await chat(gw, key)).status_code == 200
        await usage_rows(db, user_id=user)

        cuttable_database.cut()
        assert_error(await chat(gw, budgeted), 503, code="limits_unavailable")
        responses = [await chat(gw, rates_only) for _ in range(allowed + 2)]
        assert [r.status_code for r in responses] == [200] * allowed + [429] * 2
        assert "x-ratelimit-remaining-requests" not in responses[0].headers  # nothing was counted in Postgres
        refused = assert_error(responses[-1], 429, code="rate_limit_exceeded")
        assert "checked by this process" in refused["message"] and responses[-1].headers["retry-after"] == "1"
        assert len(upstream.received()) == 2 + allowed

        cuttable_database.restore()
        await usage_rows(db, 1 + allowed, user_id=user, seconds=15)  # the rows of the outage, from the spool
        after = await chat(gw, rates_only)
        assert after.status_code == 200, after.text
        # Postgres counts the call before the outage and this one, not the outage's: 8 or more of 10 remain.
        assert int(after.headers["x-ratelimit-remaining-requests"]) >= 8
        assert (await chat(gw, budgeted)).status_code == 200
