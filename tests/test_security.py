"""The edge under attack: each test is an attack that once worked, and what a client sees now."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import secrets
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from app.auth.keys import hash_key, visible_prefix
from app.observability.logs import JsonFormatter
from support.auth import ADMIN_KEY, bearer, make_jwt
from support.errors import assert_error
from support.gateway import Gateway, GatewayFactory, app_command, app_command_async
from support.tcp_proxy import TcpProxy
from support.waiting import wait_for

ORIGIN = "https://app.example"


async def unsigned_key(db: asyncpg.Pool, user: str) -> str:
    """A key of the form made before keys were signed, stored as those were."""
    key = "gw_" + secrets.token_urlsafe(32)
    await db.execute("INSERT INTO app_user (id, tier) VALUES ($1, 'free') ON CONFLICT DO NOTHING", user)
    await db.execute(
        "INSERT INTO api_key (id, user_id, prefix, key_hash) VALUES ($1, $2, $3, $4)",
        uuid.uuid4(),
        user,
        visible_prefix(key),
        hash_key(key),
    )
    return key


# Authentication: junk is refused by the process itself, valid credentials are never guarded.


async def test_junk_tokens_never_lock_valid_callers_out(gateway_with: GatewayFactory) -> None:
    async with gateway_with(auth_failures_per_minute=5) as gw:
        key, _ = await gw.key("free")
        other, _ = await gw.key("free")
        forged = key.rpartition(".")[0] + "." + "A" * 22
        junk = [f"junk{i}" for i in range(40)] + [forged] * 10 + [make_jwt("x", secret="not-ours-" * 4)] * 5
        for token in junk:
            assert_error(await gw.client.get("/v1/models", headers=bearer(token)), 401, code="invalid_api_key")
        # Same address, right after: a key never used in this process, and a JWT, both served.
        assert (await gw.client.get("/v1/models", headers=bearer(other))).status_code == 200
        assert (await gw.client.get("/v1/models", headers=bearer(make_jwt("mobile-1")))).status_code == 200


async def test_junk_costs_no_database_work(
    gateway_with: GatewayFactory, cuttable_database: TcpProxy, database_url: str
) -> None:
    """With Postgres cut, junk still gets 401 at once: nothing was looked up. A key we issued is looked up (503)."""
    async with gateway_with(database_url=cuttable_database.url_for(database_url)) as gw:
        key, _ = await gw.key("free")
        cuttable_database.cut()
        try:
            for token in ["junk", key.rpartition(".")[0] + ".forgedforgedforgedforg", "gw_" + "x" * 43 + ".y"]:
                assert_error(await gw.client.get("/v1/models", headers=bearer(token)), 401)
            assert_error(await gw.client.get("/v1/models", headers=bearer(key)), 503, code="auth_unavailable")
        finally:
            cuttable_database.restore()


async def test_unsigned_keys_are_guarded_and_valid_ones_pass(gateway_with: GatewayFactory, db: asyncpg.Pool) -> None:
    async with gateway_with(auth_failures_per_minute=3) as gw:
        legacy = await unsigned_key(db, "legacy-user")
        assert (await gw.client.get("/v1/models", headers=bearer(legacy))).status_code == 200
        statuses = [(await gw.client.get("/v1/models", headers=bearer(f"gw_guess{i}"))).status_code for i in range(5)]
        assert statuses == [401, 401, 401, 429, 429]
        # Blocked for unsigned lookups only: signed keys and JWTs from the same address go through.
        fresh, _ = await gw.key("free")
        assert (await gw.client.get("/v1/models", headers=bearer(fresh))).status_code == 200
        assert (await gw.client.get("/v1/models", headers=bearer(make_jwt("someone")))).status_code == 200


async def test_an_unknown_key_is_remembered(gateway_with: GatewayFactory) -> None:
    """The same unknown key asked again is answered from the negative cache: it never trips the guard."""
    async with gateway_with(auth_failures_per_minute=2) as gw:
        statuses = [
            (await gw.client.get("/v1/models", headers=bearer("gw_same-unknown"))).status_code for _ in range(6)
        ]
        assert statuses == [401] * 6


async def test_an_oversized_token_is_refused_before_anything(gateway: Gateway) -> None:
    error = assert_error(await gateway.client.get("/v1/models", headers=bearer("gw_" + "a" * 9000)), 401)
    assert "8192" in error["message"]
    jwt = make_jwt("big", padding="p" * 9000)
    assert_error(await gateway.client.get("/v1/models", headers=bearer(jwt)), 401)


@pytest.mark.parametrize("form", ["postgresql://", "postgresql+asyncpg://"])
async def test_revocation_reaches_every_process_at_once(
    gateway_with: GatewayFactory, database_url: str, form: str
) -> None:
    """Revoked by the CLI (another process): this gateway stops taking the key long before its cache TTL."""
    url = database_url.replace("postgresql://", form, 1)
    async with gateway_with(database_url=url, auth_cache_ttl=600) as gw:
        key, _ = await gw.key("free")
        assert (await gw.client.get("/v1/models", headers=bearer(key))).status_code == 200
        code, output = await app_command_async("revoke-key", key, env={**os.environ, "DATABASE_URL": url})
        assert code == 0, output

        async def refused() -> bool:
            return (await gw.client.get("/v1/models", headers=bearer(key))).status_code == 401

        await wait_for(refused, 10, what="the revoked key to be refused")


# Identity namespaces.


async def test_a_jwt_is_never_a_key_user(gateway: Gateway) -> None:
    key, user = await gateway.key("free")
    made = await gateway.client.post("/v1/threads", json={"metadata": {"app": "coach"}}, headers=bearer(key))
    assert made.status_code == 200, made.text
    thread_id = made.json()["id"]
    as_key = await gateway.client.get("/v1/threads", headers=bearer(key))
    assert [thread["id"] for thread in as_key.json()["data"]] == [thread_id]
    as_jwt = await gateway.client.get("/v1/threads", headers=bearer(make_jwt(user)))
    assert as_jwt.status_code == 200 and as_jwt.json()["data"] == []
    opened = await gateway.client.get(f"/v1/threads/{thread_id}", headers=bearer(make_jwt(user)))
    assert_error(opened, 404, code="thread_not_found")
    refused = await gateway.admin("POST", "/admin/keys", json={"user_id": "jwt:someone", "tier": "free"})
    assert_error(refused, 400, param="user_id")


# Secrets and defaults.


def production_env(**values: str) -> dict[str, str]:
    strong = secrets.token_urlsafe(32)
    env = {name: value for name, value in os.environ.items() if not name.startswith(("ENVIRONMENT", "ADMIN_", "JWT_"))}
    return env | {
        "DATABASE_URL": "postgresql://postgres@127.0.0.1:9/none",  # never reached: refused before
        "ADMIN_API_KEY": strong,
        "JWT_SECRET": strong + "j",
        "IMAGE_URL_SECRET": strong + "i",
        "IMAGE_PUBLIC_BASE_URL": "https://api.example.com",
        **values,
    }


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"ADMIN_API_KEY": "adm"}, ["ADMIN_API_KEY is 3 characters"]),
        ({"JWT_SECRET": "changeme-changeme-changeme-changeme"}, ["JWT_SECRET looks like a placeholder"]),
        ({"IMAGE_URL_SECRET": ""}, ["IMAGE_URL_SECRET is unset"]),
        ({"ADMIN_API_KEY": "a" * 40, "IMAGE_PUBLIC_BASE_URL": ""}, ["ADMIN_API_KEY looks", "IMAGE_PUBLIC_BASE_URL"]),
    ],
    ids=["short", "placeholder", "missing", "two-at-once"],
)
def test_production_refuses_weak_secrets(values: dict[str, str], named: list[str]) -> None:
    result = app_command("serve", "--port", "0", env=production_env(**values), timeout=30)
    assert result.returncode != 0
    assert "refusing to start in production" in result.stderr
    for text in named:
        assert text in result.stderr
    assert "Traceback" not in result.stderr


def test_production_is_the_default() -> None:
    env = production_env(ADMIN_API_KEY="short")
    assert "ENVIRONMENT" not in env
    result = app_command("serve", "--port", "0", env=env, timeout=30)
    assert result.returncode != 0 and "ADMIN_API_KEY" in result.stderr


async def test_admin_guessing_is_throttled(gateway_with: GatewayFactory) -> None:
    async with gateway_with(auth_failures_per_minute=3) as gw:
        guesses = [await gw.client.get("/admin/keys", headers=bearer(f"guess-{i}")) for i in range(5)]
        assert [r.status_code for r in guesses] == [401, 401, 401, 429, 429]
        assert_error(guesses[-1], 429, code="too_many_auth_failures")
        # Blocked means blocked: the right key is not even compared from this address now.
        assert (await gw.client.get("/admin/keys", headers=bearer(ADMIN_KEY))).status_code == 429
        elsewhere = await gw.client.get("/admin/keys", headers={**bearer(ADMIN_KEY), "x-forwarded-for": "192.0.2.7"})
        assert elsewhere.status_code == 200


async def test_metrics_are_for_this_machine_unless_a_token_is_set(gateway_with: GatewayFactory) -> None:
    remote = {"x-forwarded-for": "203.0.113.9"}  # our test client is a trusted proxy (127.0.0.1)
    async with gateway_with() as gw:
        assert (await gw.client.get("/metrics")).status_code == 200
        assert_error(await gw.client.get("/metrics", headers=remote), 403)
    token = secrets.token_urlsafe(24)
    async with gateway_with(metrics_token=token) as gw:
        assert_error(await gw.client.get("/metrics", headers=remote), 401, code="invalid_metrics_token")
        assert (await gw.client.get("/metrics", headers={**remote, **bearer(token)})).status_code == 200


async def test_signed_image_urls_ignore_the_host_header(gateway_with: GatewayFactory) -> None:
    async with gateway_with(simulated=True, image_public_base_url="https://images.example.com/") as gw:
        key, _ = await gw.key("free")
        headers = {**bearer(key), "host": "evil.example"}
        body = {"prompt": "a lighthouse", "model": "gpt-image-1-mini", "size": "1024x1024"}
        made = await gw.client.post("/v1/images/generations", json=body, headers=headers)
        assert made.status_code == 200, made.text
        assert made.json()["data"][0]["url"].startswith("https://images.example.com/v1/images/")


async def test_logs_never_carry_sql_parameters(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database error on a 500 is logged with its SQL and SQLSTATE, never with the values it was given."""
    from app.threads.service import ThreadService
    from support import internals

    prompt = "my secret diary entry " + secrets.token_hex(4)
    sessions = internals.sessionmaker(gateway.app)

    async def failing(*_args: object, **_kwargs: object) -> None:
        from sqlalchemy import text

        async with sessions() as session:
            # Postgres quotes the value back: invalid input syntax for type uuid: "<the prompt>".
            await session.execute(text("SELECT CAST(CAST(:value AS text) AS uuid)"), {"value": prompt})

    monkeypatch.setattr(ThreadService, "list_threads", failing)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logging.getLogger("app.errors").addHandler(handler)
    try:
        key, _ = await gateway.key("free")
        response = await gateway.client.get("/v1/threads", headers=bearer(key))
    finally:
        logging.getLogger("app.errors").removeHandler(handler)
    assert_error(response, 500)
    logged = stream.getvalue()
    assert "unhandled error" in logged and "SELECT CAST" in logged and "SQLSTATE 22P02" in logged
    assert prompt not in logged and "diary" not in logged


# HTTP details browsers and generated clients rely on.


async def test_a_413_is_readable_cross_origin(gateway_with: GatewayFactory) -> None:
    async with gateway_with(cors_origins=[ORIGIN], max_body_bytes=4096) as gw:
        key, _ = await gw.key("free")
        headers = {**bearer(key), "origin": ORIGIN, "content-type": "application/json"}
        body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "' + b"x" * 8192 + b'"}]}'
        response = await gw.client.post("/v1/chat/completions", content=body, headers=headers)
        assert_error(response, 413)
        assert response.headers["access-control-allow-origin"] == ORIGIN
        chunked = await gw.client.post("/v1/chat/completions", content=_chunks(body), headers=headers)
        assert_error(chunked, 413)
        assert chunked.headers["access-control-allow-origin"] == ORIGIN


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(body), 1024):
        yield body[start : start + 1024]
        await asyncio.sleep(0)


ZEROS = "0" * 32
THREAD_ID = f"thread_{ZEROS}"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/v1/images/batches", "POST"),
        ("GET", "/v1/assistants/asst_coach/thread", "POST"),
        ("PUT", f"/v1/threads/{THREAD_ID}", "DELETE, GET, HEAD, POST"),
        ("DELETE", "/v1/threads", "GET, HEAD, POST"),
        ("PATCH", f"/v1/threads/{THREAD_ID}/messages/msg_{ZEROS}", "DELETE, GET, HEAD, POST"),
        ("GET", f"/v1/threads/{THREAD_ID}/runs/run_{ZEROS}/cancel", "POST"),
        ("POST", "/v1/images/estimate/x", None),
    ],
)
async def test_a_wrong_method_is_405_with_every_allowed_method(
    gateway: Gateway, method: str, path: str, allow: str | None
) -> None:
    key, _ = await gateway.key("free")
    response = await gateway.client.request(method, path, headers=bearer(key))
    if allow is None:
        assert_error(response, 404)
        return
    assert_error(response, 405, code="method_not_allowed")
    assert response.headers["allow"] == allow
