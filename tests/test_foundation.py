"""Health, auth, errors, the model list, the CLI and the OpenAPI document, as a client sees them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import asyncpg
import openai
import pytest

from app import migrations
from app.cli import render_openapi
from support import internals
from support.auth import ADMIN_KEY, JWT_SECRET, bearer, make_jwt
from support.errors import assert_error
from support.gateway import Gateway, GatewayFactory, app_command, gateway_env, gateway_process
from support.processes import kill_process_async

ROOT = Path(__file__).resolve().parent.parent


async def test_health_and_readiness(gateway: Gateway) -> None:
    live = await gateway.client.get("/healthz")
    assert live.status_code == 200 and live.json() == {"status": "ok"}
    ready = await gateway.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["database"] == "ok"
    assert ready.json()["migrations"] == migrations.head()
    assert ready.headers["x-request-id"].startswith("req_")


async def test_readiness_reports_pending_migrations(gateway: Gateway, db: asyncpg.Pool) -> None:
    await db.execute("UPDATE alembic_version SET version_num = 'old'")
    try:
        response = await gateway.client.get("/readyz")
    finally:
        await db.execute("UPDATE alembic_version SET version_num = $1", migrations.head())
    assert_error(response, 503, code="migrations_pending")


async def test_client_request_id_is_echoed(gateway: Gateway) -> None:
    response = await gateway.client.get("/healthz", headers={"x-request-id": "app-trace-42"})
    assert response.headers["x-request-id"] == "app-trace-42"
    hostile = await gateway.client.get("/healthz", headers={"x-request-id": "bad id with spaces"})
    assert hostile.headers["x-request-id"].startswith("req_")


async def test_models_lists_what_the_tier_may_use(gateway: Gateway) -> None:
    free_key, _ = await gateway.key("free")
    pro_key, _ = await gateway.key("pro")
    free = await gateway.client.get("/v1/models", headers=bearer(free_key))
    pro = await gateway.client.get("/v1/models", headers=bearer(pro_key))
    assert free.status_code == 200 and pro.status_code == 200
    free_ids = {m["id"] for m in free.json()["data"]}
    pro_ids = {m["id"] for m in pro.json()["data"]}
    assert "gpt-5-mini" in free_ids and "gpt-5" not in free_ids
    assert "gpt-5" in pro_ids
    mini = next(m for m in free.json()["data"] if m["id"] == "gpt-5-mini")
    assert mini["kind"] == "chat" and "default-chat" in mini["aliases"]
    assert mini["prices"]["output_per_1m"] == 2.0


async def test_models_through_the_official_sdk(gateway: Gateway) -> None:
    key, _ = await gateway.key("free")
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key)
    models = await client.models.list()
    assert "gpt-5-mini" in {m.id for m in models.data}
    await client.close()


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer"}, "missing_api_key"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "missing_api_key"),
        ({"Authorization": "Bearer gw_not-a-real-key-at-all"}, "invalid_api_key"),
        ({"Authorization": "Bearer sk-something-else"}, "invalid_api_key"),
        ({"Authorization": "Bearer a.b.c"}, "invalid_api_key"),
    ],
)
async def test_bad_credentials_are_401_without_echo(gateway: Gateway, headers: dict[str, str], code: str) -> None:
    response = await gateway.client.get("/v1/models", headers=headers)
    error = assert_error(response, 401, code=code)
    secret = headers.get("Authorization", "").removeprefix("Bearer ").removeprefix("Basic ")
    if len(secret) > 8:
        assert secret not in response.text
    assert error["type"] == "invalid_request_error"


async def test_revoked_key_is_refused_at_once(gateway: Gateway) -> None:
    key, _ = await gateway.key("free")
    assert (await gateway.client.get("/v1/models", headers=bearer(key))).status_code == 200  # now cached
    listed = await gateway.admin("GET", "/admin/keys")
    key_id = next(k["id"] for k in listed.json()["data"] if key.startswith(k["prefix"]))
    revoked = await gateway.admin("DELETE", f"/admin/keys/{key_id}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    # The NOTIFY reaches the cache asynchronously; it must land well inside the cache TTL.
    for _ in range(100):
        response = await gateway.client.get("/v1/models", headers=bearer(key))
        if response.status_code == 401:
            break
        await asyncio.sleep(0.02)
    assert_error(response, 401, code="invalid_api_key")
    again = await gateway.admin("DELETE", f"/admin/keys/{key_id}")
    assert_error(again, 404)


async def test_jwt_principal_and_tier_change(gateway: Gateway) -> None:
    token = make_jwt("supabase-user-1")
    free = await gateway.client.get("/v1/models", headers=bearer(token))
    assert free.status_code == 200
    assert "gpt-5" not in {m["id"] for m in free.json()["data"]}
    changed = await gateway.admin("PATCH", "/admin/users/jwt:supabase-user-1", json={"tier": "pro"})
    assert changed.status_code == 200 and changed.json()["tier"] == "pro"
    for _ in range(100):
        pro = await gateway.client.get("/v1/models", headers=bearer(token))
        if "gpt-5" in {m["id"] for m in pro.json()["data"]}:
            break
        await asyncio.sleep(0.02)
    assert "gpt-5" in {m["id"] for m in pro.json()["data"]}


@pytest.mark.parametrize(
    ("sub", "options", "code"),
    [
        ("u1", {"expires_in": -10}, "token_expired"),
        ("u1", {"secret": "another-secret-entirely-0123456789"}, "invalid_api_key"),
        ("", {"expires_in": 60}, "invalid_api_key"),
    ],
    ids=["expired", "wrong-secret", "empty-subject"],
)
async def test_bad_jwts_are_401(gateway: Gateway, sub: str, options: dict, code: str) -> None:
    token = make_jwt(sub, **options)  # made now, not at collection: its expiry counts from the test's start
    response = await gateway.client.get("/v1/models", headers=bearer(token))
    assert_error(response, 401, code=code)
    assert token not in response.text


async def test_jwt_without_expiry_is_refused(gateway: Gateway) -> None:
    import jwt as pyjwt

    token = pyjwt.encode({"sub": "u1"}, JWT_SECRET, algorithm="HS256")
    assert_error(await gateway.client.get("/v1/models", headers=bearer(token)), 401)


async def test_admin_routes_need_the_admin_key(gateway: Gateway) -> None:
    user_key, _ = await gateway.key("free")
    assert_error(await gateway.client.get("/admin/keys"), 401, code="missing_api_key")
    assert_error(await gateway.client.get("/admin/keys", headers=bearer(user_key)), 401)
    assert (await gateway.client.get("/admin/keys", headers=bearer(ADMIN_KEY))).status_code == 200


async def test_admin_rejects_unknown_tier_and_limits(gateway: Gateway) -> None:
    bad_tier = await gateway.admin("POST", "/admin/keys", json={"user_id": "x", "tier": "platinum"})
    assert_error(bad_tier, 400, param="tier")
    bad_limit = await gateway.admin("PATCH", "/admin/users/x", json={"limit_overrides": {"bogus": 1}})
    assert_error(bad_limit, 400, param="limit_overrides")


async def test_bad_bodies_get_our_error_shape(gateway: Gateway) -> None:
    key, _ = await gateway.key("free")
    headers = {**bearer(key), "content-type": "application/json"}
    not_json = await gateway.client.post("/v1/chat/completions", content=b"{not json", headers=headers)
    assert_error(not_json, 400)
    wrong_type = await gateway.client.post(
        "/v1/chat/completions", json={"model": "default-chat", "messages": "hello"}, headers=bearer(key)
    )
    assert_error(wrong_type, 400, param="messages")
    bad_role = await gateway.client.post(
        "/v1/chat/completions",
        json={"model": "default-chat", "messages": [{"role": "robot", "content": "hi"}]},
        headers=bearer(key),
    )
    assert_error(bad_role, 400, param="messages.0.role")
    missing = await gateway.client.post("/v1/chat/completions", json={"messages": []}, headers=bearer(key))
    assert_error(missing, 400)
    array = await gateway.client.post("/v1/chat/completions", json=[1, 2], headers=bearer(key))
    assert_error(array, 400)


async def test_oversized_body_is_413(gateway: Gateway) -> None:
    key, _ = await gateway.key("free")
    huge = b'{"model": "default-chat", "messages": [{"role": "user", "content": "' + b"x" * 2_000_000 + b'"}]}'
    response = await gateway.client.post(
        "/v1/chat/completions", content=huge, headers={**bearer(key), "content-type": "application/json"}
    )
    assert_error(response, 413, code="payload_too_large")

    async def chunked():  # no content-length: the cap is enforced while reading
        for _ in range(40):
            yield b"x" * 65536

    streamed = await gateway.client.post(
        "/v1/chat/completions", content=chunked(), headers={**bearer(key), "content-type": "application/json"}
    )
    assert_error(streamed, 413, code="payload_too_large")


async def test_unknown_route_and_wrong_method(gateway: Gateway) -> None:
    assert_error(await gateway.client.get("/v1/nope"), 404, code="not_found")
    assert_error(await gateway.client.delete("/healthz"), 405, code="method_not_allowed")


async def test_unexpected_error_is_a_bare_500_with_request_id(gateway: Gateway, caplog) -> None:
    async def explode() -> None:
        raise RuntimeError("secret internals: password=hunter2")

    gateway.app.add_api_route("/test-explode", explode)
    response = await gateway.client.get("/test-explode")
    error = assert_error(response, 500)
    assert "hunter2" not in response.text
    assert response.headers["x-request-id"] in error["message"]
    assert any("unhandled error" in r.message for r in caplog.records)


async def test_last_used_at_is_written_in_batches(gateway: Gateway, db: asyncpg.Pool) -> None:
    key, user = await gateway.key("free")
    assert await db.fetchval("SELECT last_used_at FROM api_key WHERE user_id = $1", user) is None
    for _ in range(3):
        await gateway.client.get("/v1/models", headers=bearer(key))
    assert await db.fetchval("SELECT last_used_at FROM api_key WHERE user_id = $1", user) is None
    await internals.flush_key_touches(gateway.app)
    assert await db.fetchval("SELECT last_used_at FROM api_key WHERE user_id = $1", user) is not None
    stored = await db.fetchval("SELECT key_hash FROM api_key WHERE user_id = $1", user)
    assert key not in stored and len(stored) == 64


async def test_failed_auth_flood_is_stopped_before_the_database(gateway_with: GatewayFactory) -> None:
    async with gateway_with(auth_failures_per_minute=3) as gw:
        valid, _ = await gw.key("free")
        assert (await gw.client.get("/v1/models", headers=bearer(valid))).status_code == 200
        statuses = [(await gw.client.get("/v1/models", headers=bearer(f"gw_bad{i}"))).status_code for i in range(5)]
        assert statuses == [401, 401, 401, 429, 429]
        blocked = await gw.client.get("/v1/models", headers=bearer("gw_bad-again"))
        assert_error(blocked, 429, code="too_many_auth_failures")
        assert blocked.headers["retry-after"]
        # A key already known keeps working: only lookups are guarded.
        assert (await gw.client.get("/v1/models", headers=bearer(valid))).status_code == 200


def test_invalid_settings_stop_start_up_naming_the_variable() -> None:
    env = {**os.environ, "OPENAI_BASE_URL": "ftp://nowhere", "DB_POOL_SIZE": "zero"}
    result = app_command("migrate", env=env)
    assert result.returncode != 0
    assert "OPENAI_BASE_URL" in result.stderr and "DB_POOL_SIZE" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_create_and_revoke_key(database_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": database_url}
    created = app_command("create-key", "--user", "cli-user", "--tier", "pro", env=env, check=True)
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("gw_") and len(key) > 40
    revoked = app_command("revoke-key", key, env=env, check=True)
    assert "revoked key" in revoked.stdout and key not in revoked.stdout


def test_committed_openapi_matches_the_app() -> None:
    committed = (ROOT / "openapi.json").read_text()
    assert committed == render_openapi(), "openapi.json drifted: run `python -m app openapi`"
    document = json.loads(committed)
    operation_ids = [op["operationId"] for path in document["paths"].values() for op in path.values()]
    assert len(operation_ids) == len(set(operation_ids))
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert "422" not in chat["responses"]
    assert chat["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")


async def test_cors_for_configured_origins(gateway_with: GatewayFactory) -> None:
    async with gateway_with(cors_origins=["https://app.example"]) as gw:
        preflight = await gw.client.options(
            "/v1/chat/completions",
            headers={
                "origin": "https://app.example",
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization,content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        response = await gw.client.get("/healthz", headers={"origin": "https://app.example"})
        exposed = response.headers["access-control-expose-headers"]
        assert "x-request-id" in exposed and "x-ratelimit-remaining-requests" in exposed
        other = await gw.client.get("/healthz", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        # Refused before any route runs, and still readable by the browser that sent it.
        key, _ = await gw.key("free")
        huge = await gw.client.post(
            "/v1/chat/completions",
            content=b"x" * 2_000_000,
            headers={**bearer(key), "content-type": "application/json", "origin": "https://app.example"},
        )
        assert_error(huge, 413, code="payload_too_large")
        assert huge.headers["access-control-allow-origin"] == "https://app.example"


def _postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().splitlines()[0])


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_serve_stops_the_embedded_postgres_even_after_a_killed_run(tmp_path: Path) -> None:
    """No DATABASE_URL: `serve` starts Postgres in DATA_DIR; a SIGKILLed run leaves it running with a
    stale handle, and the next run, stopped with SIGTERM, still stops it."""
    env = {name: value for name, value in gateway_env("", None).items() if name != "DATABASE_URL"}
    env |= {"DATA_DIR": str(tmp_path), "ENVIRONMENT": "development"}
    pgdata = tmp_path / "pg"
    server = 0
    try:
        async with gateway_process(env, tmp_path / "killed.log") as killed:
            server = _postmaster_pid(pgdata)
            await kill_process_async(killed.proc)
        assert _running(server), "nothing stopped the server of a killed run"
        async with gateway_process(env, tmp_path / "next.log") as following:
            assert _postmaster_pid(pgdata) == server  # joined, not started twice
            assert (await following.client.get("/readyz")).status_code == 200
        for _ in range(200):
            if not _running(server):
                break
            await asyncio.sleep(0.05)
        assert not _running(server), "the embedded Postgres outlived the gateway"
        assert not (pgdata / "postmaster.pid").exists()
    finally:
        if server and _running(server):
            os.kill(server, signal.SIGQUIT)  # immediate shutdown: never leave a server behind
