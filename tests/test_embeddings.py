"""Embeddings and single models through the official SDK: against the fake upstream and simulated,
recorded once and priced; refusals before any upstream call."""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import asyncpg
import openai
import pytest

from support.auth import bearer
from support.errors import assert_error
from support.fake_upstream import EMBEDDING_LENGTH, EMBEDDING_TOKENS_PER_INPUT, FakeUpstream, Reply
from support.gateway import Gateway, GatewayFactory
from support.waiting import usage_rows

EMBEDDINGS = "/v1/embeddings"
SMALL_PRICE = Decimal("0.02")  # USD per 1M input tokens of text-embedding-3-small (catalog.toml)


def sdk(gateway: Gateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


async def test_embeddings_through_the_sdk_are_relayed_and_recorded_once(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    key, user = await gateway.key("free")
    texts = ["The lion sleeps in the afternoon sun.", "Tigers swim well."]
    result = await sdk(gateway, key).embeddings.create(model="default-embedding", input=texts)
    # The SDK asks for base64 and decodes it: the floats survive the relay exactly.
    assert [item.index for item in result.data] == [0, 1]
    for index, item in enumerate(result.data):
        expected = [round((index + 1) / (k + 2), 4) for k in range(EMBEDDING_LENGTH)]
        assert item.embedding == pytest.approx(expected, rel=1e-6)
    tokens = EMBEDDING_TOKENS_PER_INPUT * 2
    assert (result.usage.prompt_tokens, result.usage.total_tokens) == (tokens, tokens)

    [sent] = upstream.received(EMBEDDINGS)
    assert sent.json == {"model": "text-embedding-3-small", "input": texts, "encoding_format": "base64"}
    [row] = await usage_rows(db, user_id=user, route="embeddings")
    assert (row["model"], row["status"], row["prompt_tokens"], row["completion_tokens"]) == (
        "text-embedding-3-small",
        "ok",
        tokens,
        0,
    )
    assert not row["tokens_estimated"]
    assert row["cost_usd"] == SMALL_PRICE * tokens / 1_000_000


async def test_floats_dimensions_and_token_ids_pass_through(gateway: Gateway, upstream: FakeUpstream) -> None:
    key, _ = await gateway.key("free")
    raw = await gateway.client.post(
        EMBEDDINGS,
        json={
            "model": "text-embedding-3-small",
            "input": [[101, 2023, 102]],
            "dimensions": 4,
            "encoding_format": "float",
        },
        headers=bearer(key),
    )
    assert raw.status_code == 200, raw.text
    assert raw.headers["x-ratelimit-limit-requests"]
    [item] = raw.json()["data"]
    assert item["embedding"] == [round(1 / (k + 2), 4) for k in range(4)]
    assert upstream.received(EMBEDDINGS)[0].json == {
        "model": "text-embedding-3-small",
        "input": [[101, 2023, 102]],
        "dimensions": 4,
        "encoding_format": "float",
    }


async def test_simulated_embeddings_are_unit_vectors_that_know_shared_words(
    gateway_with: GatewayFactory, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    async with gateway_with(simulated=True) as gw:
        key, user = await gw.key("free")
        client = sdk(gw, key)
        texts = ["the lion sleeps in the sun", "a lion sleeping in the sun", "quarterly tax return deadline"]
        response = await client.embeddings.with_raw_response.create(model="default-embedding", input=texts)
        assert response.headers["x-gateway-simulated"] == "true"
        vectors = [item.embedding for item in response.parse().data]
        assert [len(vector) for vector in vectors] == [1536] * 3
        assert all(math.isclose(sum(x * x for x in vector), 1.0, rel_tol=1e-5) for vector in vectors)
        assert cosine(vectors[0], vectors[1]) > 0.5 > abs(cosine(vectors[0], vectors[2]))
        again = await client.embeddings.create(model="default-embedding", input=texts[0], dimensions=256)
        assert len(again.data[0].embedding) == 256
        rows = await usage_rows(db, 2, user_id=user, route="embeddings")
        assert {row["status"] for row in rows} == {"simulated"} and {row["cost_usd"] for row in rows} == {0}
    assert upstream.received(EMBEDDINGS) == []


async def test_a_failed_upstream_is_never_stood_in_for_by_simulated_vectors(
    gateway_with: GatewayFactory, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    upstream.script(EMBEDDINGS, *[Reply(status=503)] * 6)
    async with gateway_with(fallback_to_simulated=True) as gw:  # chat would fall back; embeddings must not
        key, user = await gw.key("free")
        with pytest.raises(openai.InternalServerError) as failed:
            await sdk(gw, key).embeddings.create(model="default-embedding", input="lion")
        assert failed.value.status_code == 502
        [row] = await usage_rows(db, user_id=user, route="embeddings")
        assert (row["status"], row["cost_usd"]) == ("error", 0)


@pytest.mark.parametrize(
    ("change", "param", "code"),
    [
        ({"input": ""}, "input", "invalid_request"),
        ({"input": []}, "input", "invalid_request"),
        ({"input": 5}, "input", "invalid_request"),
        ({"input": ["a", 1]}, "input", "invalid_request"),
        ({"input": "lion\u0000"}, "input", "invalid_request"),
        ({"input": ["x"] * 2049}, "input", "invalid_request"),
        ({"input": "word " * 40_000}, "input", "invalid_request"),  # over the model's 8,192 tokens
        ({"dimensions": 5000}, "dimensions", "invalid_request"),
        ({"dimensions": 0}, "dimensions", "invalid_request"),
        ({"dimensions": "8"}, "dimensions", "invalid_request"),
        ({"encoding_format": "hex"}, "encoding_format", "invalid_request"),
        ({"model": "text-embedding-3-large"}, "model", "model_not_found"),  # not the free tier's
        ({"model": "default-chat"}, "model", "model_not_found"),  # not an embedding model
        ({"stream": True}, "stream", "invalid_request"),
    ],
)
async def test_bad_embedding_requests_are_400_before_any_upstream_call(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool, change: dict[str, Any], param: str, code: str
) -> None:
    key, _ = await gateway.key("free")
    body = {"model": "default-embedding", "input": "lion", **change}
    response = await gateway.client.post(EMBEDDINGS, json=body, headers=bearer(key))
    assert_error(response, 400, code=code)
    assert response.json()["error"]["param"].startswith(param)
    assert upstream.received(EMBEDDINGS) == []
    assert await db.fetchval("SELECT count(*) FROM usage_event") == 0


async def test_the_embedding_token_limit_refuses_before_the_call(gateway: Gateway, upstream: FakeUpstream) -> None:
    key, user = await gateway.key("free")
    limits = {"embedding_tokens_per_minute": 12}
    await gateway.admin("PATCH", f"/admin/users/{user}", json={"limit_overrides": limits})
    client = sdk(gateway, key)
    # 20 characters: 5 tokens reserved, and 5 reported (EMBEDDING_TOKENS_PER_INPUT), so settling moves nothing.
    for _ in range(2):
        await client.embeddings.create(model="default-embedding", input="x" * 20)
    with pytest.raises(openai.RateLimitError) as refused:
        await client.embeddings.create(model="default-embedding", input="x" * 20)
    assert refused.value.code == "rate_limit_exceeded"
    assert len(upstream.received(EMBEDDINGS)) == 2


@pytest.mark.parametrize(
    "reply",
    [
        Reply(raw=b"not json"),
        Reply(body={"object": "list", "data": [], "usage": {"prompt_tokens": 1}}),
        Reply(body={"object": "list", "data": [{"embedding": [0.1]}], "usage": {"prompt_tokens": "lots"}}),
    ],
)
async def test_an_unreadable_answer_is_a_502_charged_its_reservation(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool, reply: Reply
) -> None:
    key, user = await gateway.key("free")
    upstream.script(EMBEDDINGS, reply)
    response = await gateway.client.post(
        EMBEDDINGS, json={"model": "default-embedding", "input": "x" * 400}, headers=bearer(key)
    )
    assert_error(response, 502)
    [row] = await usage_rows(db, user_id=user, route="embeddings")
    assert (row["status"], row["http_status"], row["prompt_tokens"]) == ("error", 502, 100)
    assert row["cost_usd"] == SMALL_PRICE * 100 / 1_000_000


async def test_a_model_is_retrieved_by_id_or_alias_within_the_tier(gateway: Gateway) -> None:
    key, _ = await gateway.key("free")
    client = sdk(gateway, key)
    by_id = await client.models.retrieve("text-embedding-3-small")
    by_alias = await client.models.retrieve("default-embedding")
    assert by_id.id == by_alias.id == "text-embedding-3-small" and by_id.object == "model"
    assert (by_id.model_extra or {})["dimensions"] == 1536 and (by_id.model_extra or {})["kind"] == "embedding"
    assert (await client.models.retrieve("default-image")).model_extra["max_images"] >= 1  # type: ignore[index]
    for hidden in ("gpt-5", "no-such-model"):  # another tier's model reads like one that does not exist
        with pytest.raises(openai.NotFoundError) as missing:
            await client.models.retrieve(hidden)
        assert missing.value.code == "model_not_found"
