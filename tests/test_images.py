"""Image generation, storage, signed URLs, history, batches, idempotency and moderation, end to end.

Like every module, these tests run on a database of their own (a clone of the migrated
template), so no other module's batch runner takes their batch items; images are stored in
a temporary folder and the fake upstream answers over loopback.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest

from app.config import Settings
from app.images.storage import S3Storage, StoredImageMissing
from support import internals
from support.auth import bearer
from support.errors import assert_error
from support.fake_upstream import (
    IMAGE_INPUT_TOKENS,
    FakeUpstream,
    Reply,
    _png,
    edit_png,
    images_answer,
    partial_png,
)
from support.gateway import Gateway, GatewayFactory, app_command, make_settings, serve
from support.images import moto_s3, narrow_catalog, png_size, png_text, rgba_png
from support.waiting import usage_rows, wait_for

GENERATIONS = "/v1/images/generations"
BATCHES = "/v1/images/batches"
UPSTREAM_IMAGES = "/v1/images/generations"
UPSTREAM_MODERATIONS = "/v1/moderations"
EDITS = "/v1/images/edits"
UPSTREAM_EDITS = "/v1/images/edits"


def token_cost(input_tokens: int, output_tokens: int, input_price: float, output_price: float) -> Decimal:
    return Decimal(str(round((input_tokens * input_price + output_tokens * output_price) / 1_000_000, 8)))


def mini_cost(images: int) -> Decimal:
    """gpt-image-1-mini at the fake's usage: 50 input tokens, 1056 output tokens per image."""
    return Decimal(str(round((50 * 2.00 + 1056 * images * 8.00) / 1_000_000, 8)))


def image_options(image_dir: Path, catalog: Path, **overrides: Any) -> dict[str, Any]:
    """What every gateway of this module runs with: its image folder, the narrow catalog, fast batches."""
    values: dict[str, Any] = {
        "image_dir": image_dir,
        "catalog_file": catalog,
        "image_batch_items_per_minute": 6000,
        "image_batch_poll_seconds": 0.05,
        "stream_heartbeat_seconds": 0.5,
    }
    values.update(overrides)
    return values


def image_settings(
    url: str, upstream: FakeUpstream | None, image_dir: Path, catalog: Path, **overrides: Any
) -> Settings:
    return make_settings(url, upstream, **image_options(image_dir, catalog, **overrides))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return narrow_catalog(tmp_path_factory.mktemp("catalog"))


@pytest.fixture(scope="module")
def gateway_settings(image_dir: Path, catalog: Path) -> dict[str, Any]:
    """The shared gateway (`gw`) and every `start`ed one use the image folder and the narrow catalog."""
    return image_options(image_dir, catalog)


@pytest.fixture
def gw(gateway: Gateway) -> Gateway:
    return gateway


@pytest.fixture
def start(gateway_with: GatewayFactory) -> GatewayFactory:
    """Another gateway on this module's database: `async with start(image_moderation=True) as other:`."""
    return gateway_with


async def generate(gateway: Gateway, key: str, **body: Any) -> httpx.Response:
    payload = {"model": "default-image", "prompt": "a red fox in the snow", **body}
    return await gateway.client.post(GENERATIONS, json=payload, headers=bearer(key))


async def read_events(gateway: Gateway, key: str, batch_id: str) -> list[tuple[str, dict[str, Any]]]:
    """Every SSE event of a batch's stream until the server ends it."""
    events: list[tuple[str, dict[str, Any]]] = []
    name = ""
    async with gateway.client.stream(
        "GET", f"{BATCHES}/{batch_id}/events", headers=bearer(key), timeout=20
    ) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


def image_requests(upstream: FakeUpstream) -> list[dict[str, Any]]:
    return [r.json or {} for r in upstream.requests if r.path == UPSTREAM_IMAGES]


# Generation.


async def test_generate_with_the_openai_sdk(gw: Gateway, upstream: FakeUpstream, db, image_dir: Path) -> None:
    key, user = await gw.key("free")
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key)
    raw = await client.images.with_raw_response.generate(
        model="default-image", prompt="a red fox in the snow", size="1024x1024", quality="low"
    )
    result = raw.parse()
    await client.close()
    assert raw.headers["x-ratelimit-limit-requests"] == "5"  # the free tier's images per minute
    assert raw.headers["x-upstream-request-id"].startswith("req_fake_")
    assert "x-gateway-simulated" not in raw.headers
    [image] = result.data
    assert image.b64_json is None and image.url.startswith(gw.url + "/v1/images/")
    assert result.size == "1024x1024" and result.output_format == "png" and result.usage.output_tokens == 1056
    # What went upstream: the model resolved, our options, no response_format (GPT image models answer base64).
    [sent] = image_requests(upstream)
    assert sent == {
        "model": "gpt-image-1-mini",
        "prompt": "a red fox in the snow",
        "n": 1,
        "size": "1024x1024",
        "quality": "low",
    }
    # The URL serves the stored PNG without a bearer token.
    content = await httpx.AsyncClient().get(image.url)
    assert content.status_code == 200 and content.headers["content-type"] == "image/png"
    assert content.content == _png("a red fox in the snow") and png_size(content.content) == (8, 8)
    assert "max-age=" in content.headers["cache-control"]
    # The row, the stored bytes, the usage row.
    row = await db.fetchrow("SELECT * FROM image")
    assert (row["user_id"], row["prompt"], row["model"]) == (user, "a red fox in the snow", "gpt-image-1-mini")
    assert (row["size"], row["quality"], row["output_format"], row["content_type"]) == (
        "1024x1024",
        "low",
        "png",
        "image/png",
    )
    assert row["bytes"] == len(content.content) and row["cost_usd"] == mini_cost(1) and row["simulated"] is False
    assert str(row["id"]) == image.model_extra["id"]
    assert (image_dir / row["storage_key"]).read_bytes() == content.content
    [usage] = await usage_rows(db, user_id=user)
    assert (usage["route"], usage["model"], usage["status"], usage["http_status"]) == (
        "images.generations",
        "gpt-image-1-mini",
        "ok",
        200,
    )
    assert (usage["images"], usage["prompt_tokens"], usage["completion_tokens"]) == (1, 50, 1056)
    assert usage["cost_usd"] == mini_cost(1) and usage["upstream_request_id"] == raw.headers["x-upstream-request-id"]
    assert usage["request_id"] == raw.headers["x-request-id"] and usage["api_key_id"] is not None


async def test_b64_json_and_several_images(gw: Gateway, upstream: FakeUpstream, db) -> None:
    key, user = await gw.key("free")
    response = await generate(gw, key, n=3, response_format="b64_json")
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert len(data) == 3 and len({item["id"] for item in data}) == 3
    for item in data:
        inline = base64.b64decode(item["b64_json"])
        assert png_size(inline) == (8, 8)
        assert (await gw.client.get(item["url"])).content == inline
    assert "response_format" not in image_requests(upstream)[0]
    [usage] = await usage_rows(db, user_id=user)
    assert usage["images"] == 3 and usage["cost_usd"] == mini_cost(3)
    rows = await db.fetch("SELECT generation_id, cost_usd FROM image")
    assert len(rows) == 3 and len({r["generation_id"] for r in rows}) == 1
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(mini_cost(3), abs=Decimal("0.00000003"))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "no-such-model"}, "model"),
        ({"model": "default-chat"}, "model"),  # a chat model is not an image model
        ({"model": "hd-image"}, "model"),  # not in the free tier
        ({"size": "512x512"}, "size"),
        ({"quality": "ultra"}, "quality"),
        ({"output_format": "gif"}, "output_format"),
        ({"n": 0}, "n"),
        ({"n": 11}, "n"),
        ({"background": "neon"}, "background"),
        ({"background": "transparent", "output_format": "jpeg"}, "background"),
        ({"output_compression": 50}, "output_compression"),  # png has no compression level
        ({"output_compression": 101, "output_format": "jpeg"}, "output_compression"),
        ({"style": "vivid"}, "style"),  # a dall-e-3 parameter GPT image models do not take
        ({"stream": True, "n": 2}, "n"),  # a stream makes one image
        ({"partial_images": 2}, "partial_images"),  # partial images are streamed
        ({"stream": True, "partial_images": 4}, "partial_images"),
        ({"stream": "maybe"}, "stream"),
        ({"prompt": ""}, "prompt"),
        ({"response_format": "png"}, "response_format"),
    ],
)
async def test_invalid_parameters_are_400_before_any_upstream_call(
    gw: Gateway, upstream: FakeUpstream, db, body: dict[str, Any], param: str
) -> None:
    key, _ = await gw.key("free")
    assert_error(await generate(gw, key, **body), 400, param=param)
    assert upstream.requests == []
    await asyncio.sleep(0.1)
    assert await db.fetchval("SELECT count(*) FROM usage_event") == 0


@pytest.mark.parametrize(
    ("model", "body", "param"),
    [
        ("narrow-image", {"size": "1536x1024"}, "size"),
        ("narrow-image", {"quality": "high"}, "quality"),
        ("narrow-image", {"output_format": "webp"}, "output_format"),
        ("narrow-image", {"n": 3}, "n"),
        ("default-image", {"size": "1536x1024", "quality": "high", "output_format": "webp", "n": 3}, None),
        ("narrow-image", {"size": "1024x1024", "quality": "medium", "output_format": "png", "n": 2}, None),
    ],
)
async def test_each_model_accepts_what_the_registry_says(
    gw: Gateway, upstream: FakeUpstream, model: str, body: dict[str, Any], param: str | None
) -> None:
    key, _ = await gw.key("pro")
    response = await generate(gw, key, model=model, **body)
    if param is None:
        assert response.status_code == 200, response.text
        assert image_requests(upstream)[0]["size"] == body["size"]
    else:
        error = assert_error(response, 400, param=param, code="unsupported_value")
        assert "gpt-image-narrow" in error["message"]
        assert upstream.requests == []


async def test_estimate_is_what_the_budget_reserves(gw: Gateway, upstream: FakeUpstream, db) -> None:
    key, user = await gw.key("free")
    estimate = await gw.client.post(
        "/v1/images/estimate",
        json={"model": "default-image", "size": "1536x1024", "quality": "high", "n": 2},
        headers=bearer(key),
    )
    assert estimate.status_code == 200, estimate.text
    assert estimate.json() == {
        "object": "image.estimate",
        "model": "gpt-image-1-mini",
        "n": 2,
        "count": 1,
        "size": "1536x1024",
        "quality": "high",
        "style": None,
        "unit_price_usd": 0.054,  # 0.036 at 1024x1024, x1.5 for the larger size
        "estimated_cost_usd": 0.108,
        "currency": "usd",
    }
    auto = await gw.client.post("/v1/images/estimate", json={"quality": "low", "count": 10}, headers=bearer(key))
    assert auto.json()["size"] == "auto" and auto.json()["estimated_cost_usd"] == pytest.approx(0.075)
    assert_error(
        await gw.client.post("/v1/images/estimate", json={"quality": "ultra"}, headers=bearer(key)),
        400,
        param="quality",
    )
    # While the call is in flight, the monthly budget holds exactly the estimate; afterwards, the real cost.
    upstream.script(UPSTREAM_IMAGES, Reply(delay=0.6))
    budget_key = f"monthly_budget_usd:{user}:{time.strftime('%Y-%m', time.gmtime())}"
    call = asyncio.create_task(generate(gw, key, size="1536x1024", quality="high", n=2))

    async def reserved() -> float | None:
        return await db.fetchval("SELECT value FROM rate_limit_bucket WHERE key = $1", budget_key)

    assert await wait_for(reserved) == pytest.approx(0.108)
    assert (await call).status_code == 200
    await usage_rows(db, user_id=user)

    async def settled() -> bool:
        return await reserved() == pytest.approx(float(mini_cost(2)))

    assert await wait_for(settled)


async def test_simulated_mode_makes_real_pngs_offline(start, upstream: FakeUpstream, db) -> None:
    upstream.reset()
    async with start(simulated=True) as sim:
        key, user = await sim.key("free")
        first = await generate(sim, key, size="1536x1024", response_format="b64_json")
        again = await generate(sim, key, size="1536x1024", response_format="b64_json")
        other = await generate(sim, key, prompt="a blue whale", response_format="b64_json")
    assert first.status_code == 200 and first.headers["x-gateway-simulated"] == "true"
    png = base64.b64decode(first.json()["data"][0]["b64_json"])
    assert png_size(png) == (1536, 1024)
    assert "simulated" in png_text(png)["Software"]
    assert base64.b64decode(again.json()["data"][0]["b64_json"]) == png  # deterministic per prompt
    assert base64.b64decode(other.json()["data"][0]["b64_json"]) != png
    assert upstream.requests == []
    rows = await usage_rows(db, 3, user_id=user)
    assert {(r["status"], r["cost_usd"], r["images"]) for r in rows} == {("simulated", Decimal("0E-8"), 1)}
    assert await db.fetchval("SELECT bool_and(simulated) FROM image WHERE user_id = $1", user)


async def test_users_switched_off_the_upstream_get_simulated_images(gw: Gateway, upstream: FakeUpstream) -> None:
    key, user = await gw.key("free")
    await gw.admin("PATCH", f"/admin/users/{user}", json={"use_upstream": False})
    response = await generate(gw, key)
    assert response.status_code == 200 and response.headers["x-gateway-simulated"] == "true"
    assert image_requests(upstream) == []


# Upstream failures.


@pytest.mark.parametrize(
    ("replies", "status", "code", "attempts"),
    [
        ([Reply(status=429, headers={"retry-after": "30"})], 429, "upstream_rate_limited", 1),
        ([Reply(status=500)] * 3, 502, "upstream_error", 3),
        ([Reply(status=401)], 502, "upstream_auth_error", 1),
        (
            [
                Reply(
                    status=400,
                    body={
                        "error": {"message": "bad size", "type": "invalid_request_error", "param": "size", "code": None}
                    },
                )
            ],
            400,
            None,
            1,
        ),
    ],
)
async def test_upstream_errors_map_to_ours(
    gw: Gateway, upstream: FakeUpstream, db, replies: list[Reply], status: int, code: str | None, attempts: int
) -> None:
    upstream.script(UPSTREAM_IMAGES, *replies)
    key, user = await gw.key("free")
    response = await generate(gw, key)
    error = assert_error(response, status, code=code)
    if status == 429:
        assert response.headers["retry-after"] == "30"
    if status == 400:
        assert error["param"] == "size" and error["message"] == "bad size"
    assert len(image_requests(upstream)) == attempts
    [row] = await usage_rows(db, user_id=user)
    assert (row["status"], row["http_status"], row["images"], row["cost_usd"]) == ("error", status, 0, 0)
    assert await db.fetchval("SELECT count(*) FROM image") == 0


async def test_upstream_timeout_is_504(start, upstream: FakeUpstream) -> None:
    upstream.reset()
    upstream.script(UPSTREAM_IMAGES, Reply(hang=True))
    async with start(upstream_read_timeout=0.3) as slow:
        key, _ = await slow.key("free")
        assert_error(await generate(slow, key), 504, code="upstream_timeout")


async def test_fallback_to_simulated_images(start, upstream: FakeUpstream, db) -> None:
    upstream.reset()
    upstream.script(UPSTREAM_IMAGES, *[Reply(status=503)] * 3)
    async with start(fallback_to_simulated=True) as fallback:
        key, user = await fallback.key("free")
        response = await generate(fallback, key)
    assert response.status_code == 200
    assert response.headers["x-gateway-fallback"] == "true" and response.headers["x-gateway-simulated"] == "true"
    [row] = await usage_rows(db, user_id=user)
    assert (row["status"], row["images"], row["cost_usd"]) == ("fallback", 1, 0)


# Storage and signed URLs.


async def test_s3_storage_backend(start, upstream: FakeUpstream, db) -> None:
    from aiobotocore.session import get_session

    upstream.reset()
    with moto_s3() as endpoint:
        options = {
            "endpoint_url": endpoint,
            "region_name": "us-east-1",
            "aws_access_key_id": "test",
            "aws_secret_access_key": "test",
        }
        async with get_session().create_client("s3", **options) as s3:
            await s3.create_bucket(Bucket="portraits")
            async with start(
                image_storage="s3",
                image_s3_bucket="portraits",
                image_s3_endpoint_url=endpoint,
                image_s3_access_key_id="test",
                image_s3_secret_access_key="test",
            ) as gateway:
                key, _ = await gateway.key("free")
                response = await generate(gateway, key, prompt="a portrait in S3")
                assert response.status_code == 200, response.text
                [item] = response.json()["data"]
                storage_key = await db.fetchval("SELECT storage_key FROM image WHERE id = $1", uuid.UUID(item["id"]))
                stored = await s3.get_object(Bucket="portraits", Key=storage_key)
                assert stored["ContentType"] == "image/png"
                async with stored["Body"] as body:
                    assert await body.read() == _png("a portrait in S3")
                served = await gateway.client.get(item["url"])
                assert served.status_code == 200 and served.content == _png("a portrait in S3")
                deleted = await gateway.client.delete(f"/v1/images/{item['id']}", headers=bearer(key))
                assert deleted.json() == {"id": item["id"], "object": "image.deleted", "deleted": True}
                listing = await s3.list_objects_v2(Bucket="portraits")
                assert listing.get("KeyCount", 0) == 0
        # The backend on its own: a missing key is "missing", not an outage.
        settings = make_settings("postgresql://unused/db", None, image_storage="s3", image_s3_bucket="portraits",
                                 image_s3_endpoint_url=endpoint, image_s3_access_key_id="test",
                                 image_s3_secret_access_key="test")  # fmt: skip
        storage = await S3Storage.connect(settings)
        try:
            await storage.put("a/b.png", b"bytes", "image/png")
            assert await storage.get("a/b.png") == b"bytes"
            await storage.delete("a/b.png")
            with pytest.raises(StoredImageMissing):
                await storage.get("a/b.png")
        finally:
            await storage.close()


async def test_signed_urls_refuse_tampering_and_expiry(start, db) -> None:
    # A gateway of its own: the tables were just emptied, so the signing secret it makes at start-up is
    # the one in Postgres (the module's shared gateway keeps the secret it made when it started).
    async with start() as gw:
        key, _ = await gw.key("free")
        first, second = [(await generate(gw, key, prompt=p)).json()["data"][0] for p in ("one", "two")]
        url = httpx.URL(first["url"])
        params = dict(url.params)
        assert int(params["expires"]) == first["url_expires_at"] > time.time() + 3000
        content = f"/v1/images/{first['id']}/content"

        async def get(**changes: str) -> httpx.Response:
            return await gw.client.get(content, params={**params, **changes})

        assert (await get()).status_code == 200
        assert_error(await get(signature=params["signature"][:-2] + "AA"), 403, code="invalid_signature")
        assert_error(await get(expires=str(int(params["expires"]) + 60)), 403, code="invalid_signature")
        other = dict(httpx.URL(second["url"]).params)
        # Another image's signature.
        assert_error(await get(signature=other["signature"]), 403, code="invalid_signature")
        assert_error(await gw.client.get(content), 400, param="expires")
        # A URL signed an hour ago with a one-hour TTL has expired (the signature itself is valid).
        signer = internals.url_signer(gw.app)
        expired_url, expired_at = signer.sign(gw.url + "/v1", uuid.UUID(first["id"]), now=time.time() - 3700)
        assert expired_at < time.time()
        assert_error(await gw.client.get(expired_url), 403, code="url_expired")
        # The secret lives in Postgres: another replica (or a restart) verifies the same URLs.
        assert await db.fetchval("SELECT count(*) FROM gateway_secret WHERE name = 'image_url'") == 1
        async with start() as replica:
            assert (await replica.client.get(content, params=params)).status_code == 200
        # With IMAGE_URL_SECRET set, that secret signs instead.
        async with start(image_url_secret="x" * 40) as configured:
            assert_error(await configured.client.get(content, params=params), 403, code="invalid_signature")


# History, regeneration, deletion.


async def test_history_is_per_user_and_paginated(gw: Gateway) -> None:
    alice, _ = await gw.key("free")
    bob, _ = await gw.key("free")
    ids = [(await generate(gw, alice, prompt=f"alice {i}")).json()["data"][0]["id"] for i in range(3)]
    [bob_id] = [item["id"] for item in (await generate(gw, bob, prompt="bob")).json()["data"]]
    page = (await gw.client.get("/v1/images", params={"limit": 2}, headers=bearer(alice))).json()
    assert [item["id"] for item in page["data"]] == ids[::-1][:2] and page["has_more"] is True
    rest = (
        await gw.client.get("/v1/images", params={"limit": 2, "after": page["next_cursor"]}, headers=bearer(alice))
    ).json()
    assert (
        [item["id"] for item in rest["data"]] == [ids[0]] and rest["has_more"] is False and rest["next_cursor"] is None
    )
    item = rest["data"][0]
    assert item["object"] == "image" and item["prompt"] == "alice 0" and item["model"] == "gpt-image-1-mini"
    assert item["url"].startswith(gw.url) and item["cost_usd"] == float(mini_cost(1))
    assert [i["id"] for i in (await gw.client.get("/v1/images", headers=bearer(bob))).json()["data"]] == [bob_id]
    # Another user's image does not exist for them.
    assert_error(await gw.client.get(f"/v1/images/{ids[0]}", headers=bearer(bob)), 404)
    assert_error(await gw.client.delete(f"/v1/images/{ids[0]}", headers=bearer(bob)), 404)
    assert_error(await gw.client.post(f"/v1/images/{ids[0]}/regenerate", headers=bearer(bob)), 404)
    assert (await gw.client.get(f"/v1/images/{ids[0]}", headers=bearer(alice))).json()["id"] == ids[0]
    assert_error(
        await gw.client.get("/v1/images", params={"after": "garbage"}, headers=bearer(alice)), 400, param="after"
    )
    assert_error(await gw.client.get("/v1/images"), 401)


async def test_regenerate_keeps_or_changes_the_options(gw: Gateway, upstream: FakeUpstream, db) -> None:
    key, user = await gw.key("free")
    original = (await generate(gw, key, prompt="a lighthouse", size="1024x1536", quality="low")).json()["data"][0]
    same = await gw.client.post(f"/v1/images/{original['id']}/regenerate", headers=bearer(key))
    changed = await gw.client.post(
        f"/v1/images/{original['id']}/regenerate", json={"prompt": "a lighthouse at dusk", "n": 2}, headers=bearer(key)
    )
    assert same.status_code == 200 and changed.status_code == 200, changed.text
    first, second, third = image_requests(upstream)
    # Same prompt, model, size and quality, plus what the upstream reported it used for the original.
    assert second == {**first, "background": "opaque", "output_format": "png"}
    assert third["prompt"] == "a lighthouse at dusk" and third["n"] == 2 and third["size"] == "1024x1536"
    regenerated = (await gw.client.get(f"/v1/images/{changed.json()['data'][1]['id']}", headers=bearer(key))).json()
    assert regenerated["regenerated_from"] == original["id"] and regenerated["prompt"] == "a lighthouse at dusk"
    assert_error(
        await gw.client.post(f"/v1/images/{original['id']}/regenerate", json={"size": "7x7"}, headers=bearer(key)),
        400,
        param="size",
    )
    assert_error(await gw.client.post(f"/v1/images/{uuid.uuid4()}/regenerate", headers=bearer(key)), 404)
    rows = await usage_rows(db, 3, user_id=user)
    assert [r["images"] for r in rows] == [1, 1, 2]


async def test_delete_removes_row_and_bytes(gw: Gateway, db, image_dir: Path) -> None:
    key, _ = await gw.key("free")
    item = (await generate(gw, key)).json()["data"][0]
    storage_key = await db.fetchval("SELECT storage_key FROM image")
    assert (image_dir / storage_key).exists()
    deleted = await gw.client.delete(f"/v1/images/{item['id']}", headers=bearer(key))
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert not (image_dir / storage_key).exists()
    assert_error(await gw.client.get(f"/v1/images/{item['id']}", headers=bearer(key)), 404)
    assert_error(await gw.client.get(item["url"]), 404)  # a valid signature for an image that is gone
    assert_error(await gw.client.delete(f"/v1/images/{item['id']}", headers=bearer(key)), 404)


async def test_retention_prunes_old_images_and_expired_keys(gw: Gateway, db, image_dir: Path) -> None:
    key, _ = await gw.key("free")
    old, new = [(await generate(gw, key, prompt=p)).json()["data"][0]["id"] for p in ("old", "new")]
    old_key = await db.fetchval("SELECT storage_key FROM image WHERE id = $1", uuid.UUID(old))
    await db.execute("UPDATE image SET created_at = now() - interval '31 days' WHERE id = $1", uuid.UUID(old))
    await generate(gw, key, prompt="kept")
    await db.execute(
        "INSERT INTO idempotency_key (user_id, key, request_hash, state, expires_at)"
        " VALUES ('u', 'stale', 'h', 'done', now() - interval '1 second')"
    )
    pruned = await internals.prune_images(gw.app)
    assert (pruned.images, pruned.idempotency_keys) == (1, 1)
    assert not (image_dir / old_key).exists()
    remaining = {str(r["id"]) for r in await db.fetch("SELECT id FROM image")}
    assert old not in remaining and new in remaining


def test_prune_images_cli(database_url: str, image_dir: Path) -> None:
    env = {**os.environ, "DATABASE_URL": database_url, "IMAGE_DIR": str(image_dir), "OPENAI_API_KEY": ""}
    done = app_command("prune-images", "--days", "30", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pruned ") and "images" in done.stdout


# Moderation.


async def test_moderation_refuses_flagged_prompts(start, upstream: FakeUpstream, db) -> None:
    upstream.reset()
    async with start(image_moderation=True) as moderated:
        key, user = await moderated.key("free")
        refused = await generate(moderated, key, prompt="something forbidden")
        allowed = await generate(moderated, key, prompt="a friendly dog")
        batch = await moderated.client.post(
            BATCHES, json={"items": [{"prompt": "fine"}, {"prompt": "FORBIDDEN art"}]}, headers=bearer(key)
        )
    error = assert_error(refused, 400, code="content_policy_violation", param="prompt")
    assert "violence" in error["message"]
    assert allowed.status_code == 200
    assert_error(batch, 400, code="content_policy_violation", param="items.1.prompt")
    assert [(r.path, (r.json or {}).get("input")) for r in upstream.requests] == [
        (UPSTREAM_MODERATIONS, ["something forbidden"]),
        (UPSTREAM_MODERATIONS, ["a friendly dog"]),
        (UPSTREAM_IMAGES, None),
        (UPSTREAM_MODERATIONS, ["fine", "FORBIDDEN art"]),
    ]
    assert upstream.requests[0].json["model"] == "omni-moderation-latest"
    assert await db.fetchval("SELECT count(*) FROM image WHERE user_id = $1", user) == 1
    assert await db.fetchval("SELECT count(*) FROM image_batch WHERE user_id = $1", user) == 0
    rows = await usage_rows(db, 4, user_id=user)
    assert [(r["route"], r["error_code"]) for r in rows if r["route"] == "images.moderation"] == [
        ("images.moderation", "content_policy_violation"),
        ("images.moderation", None),
        ("images.moderation", "content_policy_violation"),
    ]
    # The refused request's reservation was given back: only the allowed image counts today.
    daily = await wait_for(
        lambda: db.fetchval("SELECT value FROM rate_limit_bucket WHERE key LIKE $1", f"images_per_day:{user}:%")
    )
    assert daily == 1


async def test_simulated_moderation_is_local(start, upstream: FakeUpstream) -> None:
    upstream.reset()
    async with start(simulated=True, image_moderation=True) as sim:
        key, _ = await sim.key("free")
        assert_error(await generate(sim, key, prompt="forbidden"), 400, code="content_policy_violation")
        assert (await generate(sim, key, prompt="a cat")).status_code == 200
    assert upstream.requests == []


# Idempotency.


async def test_idempotent_retry_returns_the_first_result(gw: Gateway, upstream: FakeUpstream, db) -> None:
    key, user = await gw.key("free")
    headers = {**bearer(key), "Idempotency-Key": "retry-1"}
    body = {"model": "default-image", "prompt": "a mountain", "response_format": "b64_json"}
    first = await gw.client.post(GENERATIONS, json=body, headers=headers)
    again = await gw.client.post(GENERATIONS, json=dict(reversed(body.items())), headers=headers)  # same, reordered
    assert first.status_code == again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert [d["id"] for d in again.json()["data"]] == [d["id"] for d in first.json()["data"]]
    assert again.json()["data"][0]["b64_json"] == first.json()["data"][0]["b64_json"]  # read back from storage
    assert len(image_requests(upstream)) == 1
    assert len(await usage_rows(db, user_id=user)) == 1
    # The same key with another body is a conflict the SDKs must not retry.
    conflict = await gw.client.post(GENERATIONS, json={**body, "prompt": "a valley"}, headers=headers)
    assert_error(conflict, 409, code="idempotency_key_reused")
    assert conflict.headers["x-should-retry"] == "false"
    # Keys are per user.
    other, _ = await gw.key("free")
    assert (
        await gw.client.post(GENERATIONS, json=body, headers={**bearer(other), "Idempotency-Key": "retry-1"})
    ).status_code == 200
    assert len(image_requests(upstream)) == 2
    # After a day the key is free again.
    await db.execute("UPDATE idempotency_key SET expires_at = now() - interval '1 second' WHERE user_id = $1", user)
    reused = await gw.client.post(GENERATIONS, json={**body, "prompt": "a valley"}, headers=headers)
    assert reused.status_code == 200 and "idempotent-replayed" not in reused.headers
    assert_error(
        await gw.client.post(GENERATIONS, json=body, headers={**bearer(key), "Idempotency-Key": "x" * 300}),
        400,
        param="Idempotency-Key",
    )


async def test_concurrent_duplicates_call_the_upstream_once(gw: Gateway, upstream: FakeUpstream) -> None:
    upstream.script(UPSTREAM_IMAGES, Reply(delay=0.5))
    key, _ = await gw.key("free")
    headers = {**bearer(key), "Idempotency-Key": "tap-tap"}
    body = {"model": "default-image", "prompt": "twice"}
    raw = await asyncio.gather(*(gw.client.post(GENERATIONS, json=body, headers=headers) for _ in range(2)))
    assert sorted(r.status_code for r in raw) == [200, 409]
    busy = next(r for r in raw if r.status_code == 409)
    assert_error(busy, 409, code="idempotency_key_in_use")
    assert busy.headers["retry-after"] == "1"
    assert len(image_requests(upstream)) == 1
    # The official SDK retries that 409 and gets the first result.
    upstream.script(UPSTREAM_IMAGES, Reply(delay=0.5))
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key)
    results = await asyncio.gather(
        *(
            client.images.generate(model="default-image", prompt="thrice", extra_headers={"Idempotency-Key": "sdk"})
            for _ in range(2)
        )
    )
    await client.close()
    assert results[0].data[0].url.split("?")[0] == results[1].data[0].url.split("?")[0]
    assert len(image_requests(upstream)) == 2


async def test_a_failed_request_releases_its_key(gw: Gateway, upstream: FakeUpstream) -> None:
    upstream.script(UPSTREAM_IMAGES, *[Reply(status=500)] * 3)
    key, _ = await gw.key("free")
    headers = {**bearer(key), "Idempotency-Key": "flaky"}
    body = {"model": "default-image", "prompt": "retry me"}
    assert_error(await gw.client.post(GENERATIONS, json=body, headers=headers), 502)
    retried = await gw.client.post(GENERATIONS, json=body, headers=headers)
    assert retried.status_code == 200 and "idempotent-replayed" not in retried.headers
    assert len(image_requests(upstream)) == 4


# Batches.


async def create_batch(gateway: Gateway, key: str, prompts: list[str], **options: Any) -> httpx.Response:
    items = [{"prompt": prompt, "custom_id": f"student-{i}"} for i, prompt in enumerate(prompts)]
    return await gateway.client.post(
        BATCHES, json={"model": "default-image", "items": items, **options}, headers=bearer(key)
    )


async def test_batch_progress_events_and_one_failure(gw: Gateway, upstream: FakeUpstream, db) -> None:
    upstream.script(UPSTREAM_IMAGES, Reply(), Reply(status=400))
    key, user = await gw.key("free")
    created = await create_batch(gw, key, ["Ada", "Grace", "Linus"], quality="low")
    assert created.status_code == 202, created.text
    batch = created.json()
    assert batch["object"] == "image.batch" and batch["counts"]["total"] == 3
    assert batch["estimated_cost_usd"] == pytest.approx(0.005 * 1.5 * 3)
    events = await read_events(gw, key, batch["id"])
    kinds = [name for name, _ in events]
    assert sorted(kinds[:-1]) == ["item.completed", "item.completed", "item.failed"]
    assert kinds[-1] == "batch.completed"
    assert events[-1][1]["counts"] == {
        "total": 3,
        "pending": 0,
        "running": 0,
        "completed": 2,
        "failed": 1,
        "cancelled": 0,
    }
    for name, data in events[:-1]:
        assert data["type"] == name and data["batch_id"] == batch["id"]
        assert data["item"]["custom_id"] == f"student-{data['item']['index']}"
    failed = next(data["item"] for name, data in events if name == "item.failed")
    assert failed["error"]["code"] is None or failed["error"]["message"]
    assert failed["images"] == [] and failed["attempts"] == 1
    done = (await gw.client.get(f"{BATCHES}/{batch['id']}", headers=bearer(key))).json()
    assert done["status"] == "completed" and done["finished_at"] is not None
    completed = [item for item in done["items"] if item["status"] == "completed"]
    assert len(completed) == 2 and all(len(item["images"]) == 1 for item in completed)
    served = await gw.client.get(completed[0]["images"][0]["url"])
    assert png_size(served.content) == (8, 8)
    rows = await usage_rows(db, 3, user_id=user)
    assert sorted((r["route"], r["status"], r["images"]) for r in rows) == [
        ("images.batches", "error", 0),
        ("images.batches", "ok", 1),
        ("images.batches", "ok", 1),
    ]
    assert await db.fetchval("SELECT count(*) FROM image WHERE batch_id = $1", uuid.UUID(batch["id"])) == 2
    # Batch images count against the per-hour batch limit, not the per-minute request limit.
    keys = {r["key"].split(":")[0] for r in await db.fetch("SELECT key FROM rate_limit_bucket")}
    assert "batch_images_per_hour" in keys and "image_requests_per_minute" not in keys
    # Others cannot see it.
    stranger, _ = await gw.key("free")
    assert_error(await gw.client.get(f"{BATCHES}/{batch['id']}", headers=bearer(stranger)), 404)
    assert_error(await gw.client.get(f"{BATCHES}/{batch['id']}/events", headers=bearer(stranger)), 404)


async def test_a_batch_waits_for_the_users_limits(gw: Gateway, upstream: FakeUpstream, db) -> None:
    key, user = await gw.key("free")
    await gw.admin("PATCH", f"/admin/users/{user}", json={"limit_overrides": {"batch_images_per_hour": 1}})
    created = (await create_batch(gw, key, ["first", "second"])).json()

    async def waiting() -> dict[str, Any] | None:
        batch = (await gw.client.get(f"{BATCHES}/{created['id']}", headers=bearer(key))).json()
        second = batch["items"][1]
        return batch if second["error"] and second["error"]["code"] == "rate_limit_exceeded" else None

    batch = await wait_for(waiting)
    assert batch is not None and batch["status"] == "running"
    first, second = batch["items"]
    assert first["status"] == "completed" and second["status"] == "pending" and second["attempts"] == 0
    assert len(image_requests(upstream)) == 1
    cancelled = await gw.client.post(f"{BATCHES}/{created['id']}/cancel", headers=bearer(key))
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["items"][1]["status"] == "cancelled"
    events = await read_events(gw, key, created["id"])
    assert [name for name, _ in events] == ["item.completed", "item.cancelled", "batch.cancelled"]


async def test_event_streams_beat_and_end_by_their_cap(start, upstream: FakeUpstream) -> None:
    upstream.reset()
    async with start(stream_max_seconds=1.0, stream_heartbeat_seconds=0.2) as capped:
        key, user = await capped.key("free")
        await capped.admin("PATCH", f"/admin/users/{user}", json={"limit_overrides": {"batch_images_per_hour": 0}})
        batch = (await create_batch(capped, key, ["never allowed"])).json()
        started = time.monotonic()
        async with capped.client.stream("GET", f"{BATCHES}/{batch['id']}/events", headers=bearer(key)) as response:
            body = (await response.aread()).decode()
        assert 0.9 < time.monotonic() - started < 5
        assert body.count(": keep-alive") >= 2
        assert body.rstrip().splitlines()[-1].startswith("data: ") and "event: stream.timeout" in body
        await capped.client.post(f"{BATCHES}/{batch['id']}/cancel", headers=bearer(key))
    assert image_requests(upstream) == []


async def test_transient_item_failures_are_retried(gw: Gateway, upstream: FakeUpstream, db) -> None:
    upstream.script(UPSTREAM_IMAGES, *[Reply(status=500)] * 3)  # one generation call, after its own retries
    key, _ = await gw.key("free")
    created = (await create_batch(gw, key, ["retry"])).json()

    async def requeued() -> bool:
        row = await db.fetchrow("SELECT status, attempts, error_code FROM image_batch_item")
        return row is not None and tuple(row) == ("pending", 1, "upstream_error")

    assert await wait_for(requeued)
    await db.execute("UPDATE image_batch_item SET not_before = now()")  # skip the backoff
    events = await read_events(gw, key, created["id"])
    assert [name for name, _ in events] == ["item.completed", "batch.completed"]
    assert events[0][1]["item"]["attempts"] == 1


async def test_batch_creation_is_validated_and_idempotent(gw: Gateway, upstream: FakeUpstream, db) -> None:
    key, _ = await gw.key("free")
    assert_error(await create_batch(gw, key, ["a"], size="9x9"), 400, param="size")
    assert_error(await create_batch(gw, key, []), 400, param="items")
    too_many = await create_batch(gw, key, ["p"] * 101)
    assert_error(too_many, 400, param="items")
    headers = {**bearer(key), "Idempotency-Key": "class-photos"}
    body = {"model": "default-image", "items": [{"prompt": "one"}, {"prompt": "two"}]}
    first = await gw.client.post(BATCHES, json=body, headers=headers)
    again = await gw.client.post(BATCHES, json=body, headers=headers)
    assert first.status_code == again.status_code == 202 and first.json()["id"] == again.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert await db.fetchval("SELECT count(*) FROM image_batch") == 1
    other = {**body, "items": [{"prompt": "three"}]}
    assert_error(await gw.client.post(BATCHES, json=other, headers=headers), 409, code="idempotency_key_reused")
    events = await read_events(gw, key, first.json()["id"])
    assert [name for name, _ in events] == ["item.completed", "item.completed", "batch.completed"]
    assert events[-1][1]["counts"]["completed"] == 2
    assert len(image_requests(upstream)) == 2


async def test_a_batch_survives_a_restart(
    fresh_database, upstream: FakeUpstream, image_dir: Path, catalog: Path
) -> None:
    upstream.reset()
    upstream.script(UPSTREAM_IMAGES, Reply(), Reply(delay=10))  # the second item is under way at shutdown
    # A database of its own: the module's shared gateway must not take these items.
    async with fresh_database("batch_restart") as url:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        try:

            async def statuses() -> list[str]:
                return [r["status"] for r in await pool.fetch("SELECT status FROM image_batch_item ORDER BY index")]

            paced = {"image_batch_items_per_minute": 600, "image_batch_concurrency": 1}
            async with serve(image_settings(url, upstream, image_dir, catalog, **paced)) as first:
                key, user = await first.key("free")
                batch = (await create_batch(first, key, [f"portrait {i}" for i in range(4)])).json()

                async def midway() -> bool:
                    return await statuses() == ["completed", "running", "pending", "pending"]

                assert await wait_for(midway), await statuses()
            assert await statuses() == ["completed", "pending", "pending", "pending"]  # handed back at shutdown
            async with serve(image_settings(url, upstream, image_dir, catalog)) as second:
                events = await read_events(second, key, batch["id"])
                final = (await second.client.get(f"{BATCHES}/{batch['id']}", headers=bearer(key))).json()
            assert [name for name, _ in events].count("item.completed") == 4 and events[-1][0] == "batch.completed"
            assert final["status"] == "completed" and [i["status"] for i in final["items"]] == ["completed"] * 4
            assert await pool.fetchval("SELECT count(*) FROM image") == 4
            assert len(image_requests(upstream)) == 5  # 4 items + the one interrupted call
            rows = await usage_rows(pool, 4, user_id=user, status="ok")
            assert sum(r["images"] for r in rows) == 4
        finally:
            await pool.close()


async def test_batch_routes_need_a_key_and_a_real_batch(gw: Gateway) -> None:
    key, _ = await gw.key("free")
    assert_error(await gw.client.post(BATCHES, json={"items": [{"prompt": "x"}]}), 401)
    assert_error(await gw.client.get(f"{BATCHES}/{uuid.uuid4()}", headers=bearer(key)), 404)
    assert_error(await gw.client.post(f"{BATCHES}/{uuid.uuid4()}/cancel", headers=bearer(key)), 404)


@pytest.mark.parametrize(
    ("usage", "flags"),
    [
        ({"input_tokens": -50, "output_tokens": 1056}, ["negative"]),  # no refund through a negative count
        ({"input_tokens": 50, "output_tokens": "lots"}, ["malformed"]),  # priced per image instead
        ({"input_tokens": 50, "output_tokens": 2**40}, ["absurd"]),
    ],
)
async def test_image_usage_that_is_not_sane_is_clamped_and_flagged(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool, usage: dict[str, Any], flags: list[str]
) -> None:
    answer = images_answer("a red fox in the snow", usage=usage, size=["not", "a", "size"], quality={"x": 1})
    upstream.script("/v1/images/generations", Reply(body=answer))
    key, user = await gateway.key("free")
    response = await generate(gateway, key)
    assert response.status_code == 200, response.text  # generated and stored: the client gets its image
    [row] = await usage_rows(db, user_id=user, route="images.generations")
    assert row["status"] == "ok" and json.loads(row["detail"])["usage_flags"] == flags
    assert row["prompt_tokens"] >= 0 and 0 < row["cost_usd"] < 100


# gpt-image-2: sizes within bounds, output options.


@pytest.mark.parametrize(
    ("size", "accepted"),
    [
        ("1536x864", True),
        ("3840x2160", True),  # the largest
        ("1024x2560", True),  # 2.5:1 standing
        ("1024x640", True),  # the fewest pixels, 655,360
        ("auto", True),
        ("1000x1000", False),  # not multiples of 16
        ("3856x2160", False),  # an edge over 3840
        ("3840x1024", False),  # 3.75:1
        ("512x512", False),  # too few pixels
        ("1024x", False),
        ("big", False),
    ],
)
async def test_gpt_image_2_takes_any_size_within_its_bounds(
    gw: Gateway, upstream: FakeUpstream, db, size: str, accepted: bool
) -> None:
    key, user = await gw.key("pro")
    response = await generate(gw, key, model="gpt-image-2", size=size)
    if not accepted:
        error = assert_error(response, 400, param="size", code="unsupported_value")
        assert "multiples of 16" in error["message"]
        assert upstream.requests == []
        return
    assert response.status_code == 200, response.text
    [sent] = image_requests(upstream)
    assert sent["model"] == "gpt-image-2" and sent["size"] == size
    [row] = await usage_rows(db, user_id=user)
    assert row["model"] == "gpt-image-2" and row["cost_usd"] == token_cost(50, 1056, 5.00, 30.00)


async def test_gpt_image_2_is_priced_by_pixels_and_takes_its_output_options(
    gw: Gateway, upstream: FakeUpstream
) -> None:
    key, _ = await gw.key("pro")
    estimate = await gw.client.post(
        "/v1/images/estimate",
        json={"model": "gpt-image-2", "size": "1536x864", "quality": "high", "n": 2},
        headers=bearer(key),
    )
    assert estimate.status_code == 200, estimate.text
    unit = round(0.211 * 1536 * 864 / (1024 * 1024), 8)  # per image at 1024x1024, scaled by pixels
    assert estimate.json()["unit_price_usd"] == pytest.approx(unit)
    assert estimate.json()["estimated_cost_usd"] == pytest.approx(2 * unit)
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    result = await client.images.generate(
        model="gpt-image-2",
        prompt="a harbour at dawn",
        size="1536x864",
        output_format="jpeg",
        output_compression=60,
        moderation="low",
        quality="high",
    )
    await client.close()
    assert result.data[0].url and result.usage.output_tokens == 1056
    [sent] = image_requests(upstream)
    assert sent == {
        "model": "gpt-image-2",
        "prompt": "a harbour at dawn",
        "n": 1,
        "size": "1536x864",
        "quality": "high",
        "output_format": "jpeg",
        "output_compression": 60,
        "moderation": "low",
    }
    models = (await gw.client.get("/v1/models", headers=bearer(key))).json()
    info = next(model for model in models["data"] if model["id"] == "gpt-image-2")
    assert info["size_bounds"] == {
        "multiple": 16,
        "max_edge": 3840,
        "max_ratio": 3.0,
        "min_pixels": 655360,
        "max_pixels": 8294400,
    }


# Streamed generations with partial images.


async def test_streamed_generation_with_partial_images(gw: Gateway, upstream: FakeUpstream, db) -> None:
    key, user = await gw.key("pro")
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    raw = await client.images.with_raw_response.generate(
        model="gpt-image-2", prompt="a fox in the snow", size="1536x864", stream=True, partial_images=2
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["x-ratelimit-limit-requests"] == "30"  # the pro tier's images per minute
    events = [event async for event in raw.parse()]
    await client.close()
    assert [event.type for event in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    first, second, completed = events
    assert (first.partial_image_index, second.partial_image_index) == (0, 1)
    assert base64.b64decode(first.b64_json) == partial_png("a fox in the snow", 0)
    assert base64.b64decode(second.b64_json) == partial_png("a fox in the snow", 1)
    assert completed.usage.input_tokens == 50 and completed.usage.output_tokens == 1056
    assert completed.size == "1536x864" and completed.output_format == "png"
    # The image is stored before the event goes out: the event names it and its signed URL serves it.
    extra = completed.model_extra or {}
    content = await gw.client.get(extra["url"])
    assert content.status_code == 200 and content.content == base64.b64decode(completed.b64_json)
    [sent] = image_requests(upstream)
    assert sent == {
        "model": "gpt-image-2",
        "prompt": "a fox in the snow",
        "n": 1,
        "size": "1536x864",
        "stream": True,
        "partial_images": 2,
    }
    row = await db.fetchrow("SELECT * FROM image WHERE id = $1", uuid.UUID(extra["id"]))
    assert (row["user_id"], row["model"], row["size"], row["simulated"]) == (user, "gpt-image-2", "1536x864", False)
    [usage] = await usage_rows(db, user_id=user)
    assert (usage["route"], usage["status"], usage["stream"], usage["images"]) == ("images.generations", "ok", True, 1)
    assert usage["cost_usd"] == token_cost(50, 1056, 5.00, 30.00) == row["cost_usd"]
    assert usage["upstream_request_id"].startswith("req_fake_")


async def test_a_stream_the_upstream_breaks_is_an_error_event_charged_its_reservation(
    gw: Gateway, upstream: FakeUpstream, db
) -> None:
    upstream.script(UPSTREAM_IMAGES, Reply(error_after=1))
    key, user = await gw.key("pro")
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    stream = await client.images.generate(
        model="gpt-image-2", prompt="a fox", size="1024x1024", quality="low", stream=True, partial_images=2
    )
    seen = []
    with pytest.raises(openai.APIError, match="upstream exploded"):
        async for event in stream:
            seen.append(event.type)
    await client.close()
    assert seen == ["image_generation.partial_image"]
    [usage] = await usage_rows(db, user_id=user)
    assert (usage["status"], usage["error_code"], usage["images"]) == ("error", "upstream_error", 1)
    assert usage["cost_usd"] == Decimal("0.006")  # the reservation: one low-quality image at 1024x1024
    assert await db.fetchval("SELECT count(*) FROM image") == 0


async def test_streamed_generation_in_simulated_mode(start, upstream: FakeUpstream, db) -> None:
    upstream.reset()
    async with start(simulated=True) as sim:
        key, user = await sim.key("pro")
        client = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key=key, max_retries=0)
        raw = await client.images.with_raw_response.generate(
            model="gpt-image-2", prompt="a lighthouse", size="1536x864", stream=True, partial_images=1
        )
        events = [event async for event in raw.parse()]
        again = [event async for event in await client.images.generate(
            model="gpt-image-2", prompt="a lighthouse", size="1536x864", stream=True
        )]  # fmt: skip
        await client.close()
        assert raw.headers["x-gateway-simulated"] == "true"
        assert [event.type for event in events] == ["image_generation.partial_image", "image_generation.completed"]
        partial, completed = (base64.b64decode(event.b64_json) for event in events)
        assert png_size(partial) == png_size(completed) == (1536, 864) and partial != completed
        assert "simulated" in png_text(completed)["Software"]
        assert [event.type for event in again] == ["image_generation.completed"]
        assert base64.b64decode(again[0].b64_json) == completed  # deterministic per prompt
        served = await sim.client.get((events[-1].model_extra or {})["url"])
        assert served.content == completed
    assert upstream.requests == []
    rows = await usage_rows(db, 2, user_id=user)
    assert {(r["status"], r["stream"], r["images"], r["cost_usd"]) for r in rows} == {
        ("simulated", True, 1, Decimal("0E-8"))
    }
    assert await db.fetchval("SELECT count(*) FROM image WHERE user_id = $1 AND simulated", user) == 2


async def test_streams_refuse_an_idempotency_key(gw: Gateway, upstream: FakeUpstream) -> None:
    key, _ = await gw.key("pro")
    response = await gw.client.post(
        GENERATIONS,
        json={"model": "gpt-image-2", "prompt": "x", "stream": True},
        headers={**bearer(key), "Idempotency-Key": "once"},
    )
    assert_error(response, 400, param="Idempotency-Key")
    assert upstream.requests == []


# Edits.


def upload_files() -> list[tuple[str, bytes, str]]:
    return [("first.png", _png("first"), "image/png"), ("second.png", _png("second"), "image/png")]


async def test_edit_images_with_a_mask_through_the_sdk(
    gw: Gateway, upstream: FakeUpstream, db, image_dir: Path
) -> None:
    key, user = await gw.key("free")
    upstream.script(UPSTREAM_EDITS, Reply(delay=0.6))
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    budget_key = f"monthly_budget_usd:{user}:{time.strftime('%Y-%m', time.gmtime())}"
    edit = asyncio.create_task(
        client.images.with_raw_response.edit(
            model="default-image",
            image=upload_files(),
            mask=("mask.png", rgba_png(8, 8), "image/png"),
            prompt="add a party hat",
            response_format="b64_json",
            input_fidelity="high",
        )
    )

    async def reserved() -> float | None:
        return await db.fetchval("SELECT value FROM rate_limit_bucket WHERE key = $1", budget_key)

    # In flight, the budget holds the worst case: the image (auto quality: the dearest, $0.036; auto
    # size: the largest, 1.5x) and both uploads at the most one input image may bill (6,000 tokens at
    # $2 per 1M).
    assert await wait_for(reserved) == pytest.approx(0.036 * 1.5 + 2 * 6000 * 2.00 / 1_000_000)
    raw = await edit
    result = raw.parse()
    await client.close()
    assert raw.headers["x-upstream-request-id"].startswith("req_fake_") and "x-gateway-simulated" not in raw.headers
    [image] = result.data
    assert base64.b64decode(image.b64_json) == edit_png("add a party hat", 2)
    content = await gw.client.get(image.url)
    assert content.status_code == 200 and content.content == edit_png("add a party hat", 2)
    # What went upstream: the model resolved, our fields, the files as sent (under our own names).
    [sent] = upstream.received(UPSTREAM_EDITS)
    assert sent.json == {"model": "gpt-image-1-mini", "prompt": "add a party hat", "n": "1", "input_fidelity": "high"}
    assert [(f.field, f.filename, f.content_type, f.data) for f in sent.files] == [
        ("image[]", "image-0.png", "image/png", _png("first")),
        ("image[]", "image-1.png", "image/png", _png("second")),
        ("mask", "mask.png", "image/png", rgba_png(8, 8)),
    ]
    row = await db.fetchrow("SELECT * FROM image WHERE user_id = $1", user)
    assert row["edited"] is True and row["prompt"] == "add a party hat" and row["simulated"] is False
    assert (image_dir / row["storage_key"]).read_bytes() == content.content
    edit_cost = token_cost(50 + 2 * IMAGE_INPUT_TOKENS, 1056, 2.00, 8.00)
    [usage] = await usage_rows(db, user_id=user)
    assert (usage["route"], usage["status"], usage["images"]) == ("images.edits", "ok", 1)
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (50 + 2 * IMAGE_INPUT_TOKENS, 1056)
    assert usage["cost_usd"] == edit_cost == row["cost_usd"]

    async def settled() -> bool:
        return await reserved() == pytest.approx(float(edit_cost))

    assert await wait_for(settled)
    listed = (await gw.client.get(f"/v1/images/{row['id']}", headers=bearer(key))).json()
    assert listed["edited"] is True
    # Its source images are not kept, so it cannot be regenerated.
    assert_error(await gw.client.post(f"/v1/images/{row['id']}/regenerate", headers=bearer(key)), 400)


async def test_one_image_goes_as_image_and_a_streamed_edit_relays_its_events(
    gw: Gateway, upstream: FakeUpstream, db
) -> None:
    key, user = await gw.key("pro")
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    stream = await client.images.edit(
        model="gpt-image-2",
        image=("photo.jpg", b"\xff\xd8\xff\xe0 a jpeg", "image/jpeg"),
        prompt="make it winter",
        size="1536x864",
        stream=True,
        partial_images=1,
    )
    events = [event async for event in stream]
    await client.close()
    assert [event.type for event in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert base64.b64decode(events[-1].b64_json) == edit_png("make it winter", 1)
    [sent] = upstream.received(UPSTREAM_EDITS)
    assert [(f.field, f.filename, f.content_type) for f in sent.files] == [("image", "image-0.jpeg", "image/jpeg")]
    assert sent.json is not None and (sent.json["stream"], sent.json["partial_images"]) == ("true", "1")
    [usage] = await usage_rows(db, user_id=user)
    assert (usage["route"], usage["status"], usage["stream"]) == ("images.edits", "ok", True)
    assert usage["cost_usd"] == token_cost(50 + IMAGE_INPUT_TOKENS, 1056, 5.00, 30.00)
    assert await db.fetchval("SELECT edited FROM image WHERE user_id = $1", user) is True


async def test_edits_in_simulated_mode(start, upstream: FakeUpstream, db) -> None:
    upstream.reset()
    async with start(simulated=True) as sim:
        key, user = await sim.key("free")
        client = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key=key, max_retries=0)

        async def edit(files: list[tuple[str, bytes, str]]) -> bytes:
            result = await client.images.edit(
                image=files, prompt="add a hat", size="1024x1536", response_format="b64_json"
            )
            return base64.b64decode(result.data[0].b64_json or "")

        first = await edit(upload_files())
        again = await edit(upload_files())
        other = await edit([("other.png", _png("another photo"), "image/png")])
        events = [event async for event in await client.images.edit(
            image=upload_files(), prompt="add a hat", stream=True, partial_images=2
        )]  # fmt: skip
        await client.close()
    assert png_size(first) == (1024, 1536) and "simulated" in png_text(first)["Software"]
    assert again == first and other != first  # drawn from the prompt and the uploaded files
    assert [event.type for event in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    assert upstream.requests == []
    rows = await usage_rows(db, 4, user_id=user)
    assert {(r["route"], r["status"], r["cost_usd"]) for r in rows} == {("images.edits", "simulated", Decimal("0E-8"))}
    assert await db.fetchval("SELECT count(*) FROM image WHERE user_id = $1 AND edited AND simulated", user) == 4


def upload_leftovers() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("gateway-upload-")}


PNG_8 = ("a.png", _png("photo"), "image/png")
MASK_8 = ("mask.png", rgba_png(8, 8), "image/png")


@pytest.mark.parametrize(
    ("fields", "files", "param", "code"),
    [
        ({"prompt": "x"}, [], "image", None),  # no image
        ({"prompt": "x"}, [("mask", MASK_8)], "image", None),  # a mask without an image
        ({"prompt": "x"}, [("image", PNG_8), ("mask", ("m.jpg", b"\xff\xd8\xff\xe0jpeg", "image/jpeg"))], "mask",
         "invalid_image"),  # a mask that is not a PNG
        ({"prompt": "x"}, [("image", PNG_8), ("mask", ("m.png", _png("rgb"), "image/png"))], "mask",
         "invalid_image"),  # a PNG without alpha
        ({"prompt": "x"}, [("image", PNG_8), ("mask", ("m.png", rgba_png(16, 8), "image/png"))], "mask",
         "invalid_image"),  # not the image's size
        ({"prompt": "x"}, [("image", PNG_8), ("mask", MASK_8), ("mask", MASK_8)], "mask", None),
        ({"prompt": "x"}, [("image", ("a.txt", b"hello, not an image", "text/plain"))], "image", "invalid_image"),
        ({"prompt": "x"}, [("image[]", PNG_8)] * 17, "image", "unsupported_value"),  # too many images
        ({"prompt": "x", "size": "7x7"}, [("image", PNG_8)], "size", "unsupported_value"),
        ({"prompt": "x", "style": "vaporwave"}, [("image", PNG_8)], "style", "unknown_style"),
        ({"prompt": "x", "model": "gpt-image-2"}, [("image", PNG_8)], "model", "model_not_found"),  # not free
        ({"prompt": "x", "n": "many"}, [("image", PNG_8)], "n", None),
        ({"prompt": "x", "colour": "red"}, [("image", PNG_8)], "colour", None),  # no such field
        ({"prompt": "x", "image": "a.png"}, [], "image", None),  # a file field sent as text
        ({}, [("image", PNG_8)], "prompt", None),
        ({"prompt": "x"}, [("photo", PNG_8)], "photo", None),  # files go in image and mask
    ],
)  # fmt: skip
async def test_bad_edits_are_400_before_any_upstream_call(
    gw: Gateway,
    upstream: FakeUpstream,
    db,
    fields: dict[str, str],
    files: list[tuple[str, tuple[str, bytes, str]]],
    param: str,
    code: str | None,
) -> None:
    before = upload_leftovers()
    key, _ = await gw.key("free")
    response = await gw.client.post(EDITS, data=fields, files=files or None, headers=bearer(key))
    if not files:  # httpx sends a form without files as urlencoded: send it as multipart all the same
        response = await gw.client.post(
            EDITS, files=[(name, (None, value.encode())) for name, value in fields.items()], headers=bearer(key)
        )
    assert_error(response, 400, param=param, code=code)
    assert upstream.requests == []
    await asyncio.sleep(0.1)
    assert await db.fetchval("SELECT count(*) FROM usage_event") == 0
    assert await db.fetchval("SELECT count(*) FROM image") == 0
    assert upload_leftovers() <= before  # every spooled upload was removed


async def test_an_edit_must_be_multipart(gw: Gateway, upstream: FakeUpstream) -> None:
    key, _ = await gw.key("free")
    as_json = await gw.client.post(EDITS, json={"prompt": "x", "image": "aGVsbG8="}, headers=bearer(key))
    assert "multipart/form-data" in assert_error(as_json, 400)["message"]
    broken = await gw.client.post(
        EDITS,
        content=b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx',  # never closed
        headers={**bearer(key), "content-type": "multipart/form-data; boundary=b"},
    )
    assert_error(broken, 400)
    assert_error(await gw.client.post(EDITS, files=[("image", PNG_8)]), 401)
    assert upstream.requests == []


async def test_uploads_are_capped_per_file_and_per_body(start, upstream: FakeUpstream, db) -> None:
    upstream.reset()
    async with start(image_upload_max_bytes=4096, image_edit_max_bytes=16384) as capped:
        key, _ = await capped.key("free")
        big_png = _png("big") + b"\x00" * 5000  # a PNG signature, but over the file cap

        async def post(files: list[tuple[str, tuple[str, bytes, str]]]) -> httpx.Response:
            return await capped.client.post(EDITS, data={"prompt": "x"}, files=files, headers=bearer(key))

        too_big = await post([("image", ("big.png", big_png, "image/png"))])
        assert_error(too_big, 400, param="image", code="image_too_large")
        # A body declared over IMAGE_EDIT_MAX_BYTES is refused from its headers, none of it read (sent
        # here without its body: a client still writing one would see the connection close under it).
        host, port = httpx.URL(capped.url).host, httpx.URL(capped.url).port
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            f"POST {EDITS} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 16385\r\n\r\n".encode()
        )
        status_line = await reader.readline()
        writer.close()
        assert status_line.split()[1] == b"413"
        # Other routes keep MAX_BODY_BYTES (1 MiB); the edit route's cap is its own.
        assert (await post([("image", PNG_8)])).status_code == 200
    assert [r.path for r in upstream.requests] == [UPSTREAM_EDITS]
    [row] = await usage_rows(db)
    assert row["route"] == "images.edits"


# Style presets.


async def test_styles_are_listed_and_shape_the_request(gw: Gateway, upstream: FakeUpstream, db) -> None:
    key, user = await gw.key("free")
    models = (await gw.client.get("/v1/models", headers=bearer(key))).json()
    styles = {style["id"]: style for style in models["styles"]}
    assert set(styles) == {"portrait", "illustration"}
    portrait = styles["portrait"]
    assert portrait["object"] == "image.style" and portrait["size"] == "1024x1536" and portrait["quality"] == "medium"
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    styled = await client.images.generate(model="default-image", prompt="Ada, age 10", extra_body={"style": "portrait"})
    await client.images.generate(
        model="default-image", prompt="Ada, age 10", size="1024x1024", extra_body={"style": "portrait"}
    )
    await client.close()
    first, second = image_requests(upstream)
    # The preset's text after the prompt, and its options where the request left them out.
    assert first == {
        "model": "gpt-image-1-mini",
        "prompt": "Ada, age 10\n\n" + portrait["prompt"],
        "n": 1,
        "size": "1024x1536",
        "quality": "medium",
    }
    assert second["size"] == "1024x1024" and second["quality"] == "medium"  # the request's own size wins
    image_id = uuid.UUID(styled.data[0].model_extra["id"])
    row = await db.fetchrow("SELECT prompt, style FROM image WHERE id = $1", image_id)
    assert tuple(row) == ("Ada, age 10", "portrait")  # the request's prompt, and the style named
    assert (await gw.client.get(f"/v1/images/{image_id}", headers=bearer(key))).json()["style"] == "portrait"
    # A regeneration keeps the style.
    again = await gw.client.post(f"/v1/images/{image_id}/regenerate", headers=bearer(key))
    assert again.status_code == 200, again.text
    assert image_requests(upstream)[-1]["prompt"] == "Ada, age 10\n\n" + portrait["prompt"]
    rows = await usage_rows(db, 3, user_id=user)
    assert len(rows) == 3
    assert_error(
        await gw.client.post(GENERATIONS, json={"prompt": "x", "style": "nope"}, headers=bearer(key)),
        400,
        param="style",
        code="unknown_style",
    )


async def test_a_style_skips_defaults_its_model_does_not_take(gw: Gateway) -> None:
    key, _ = await gw.key("pro")
    estimate = await gw.client.post(
        "/v1/images/estimate", json={"model": "narrow-image", "style": "portrait"}, headers=bearer(key)
    )
    assert estimate.status_code == 200, estimate.text
    # narrow-image makes 1024x1024 only: the preset's 1024x1536 is left out, its medium quality kept.
    assert (estimate.json()["size"], estimate.json()["quality"], estimate.json()["style"]) == (
        "auto",
        "medium",
        "portrait",
    )


async def test_batch_items_use_the_batch_style(gw: Gateway, upstream: FakeUpstream) -> None:
    key, _ = await gw.key("free")
    created = await create_batch(gw, key, ["Ada", "Grace"], style="illustration")
    assert created.status_code == 202, created.text
    events = await read_events(gw, key, created.json()["id"])
    assert [name for name, _ in events][-1] == "batch.completed"
    prompts = sorted(request["prompt"] for request in image_requests(upstream))
    suffix = "\n\nFlat vector illustration, clean outlines, friendly pastel palette, no text or lettering."
    assert prompts == ["Ada" + suffix, "Grace" + suffix]
    assert {request["background"] for request in image_requests(upstream)} == {"opaque"}
