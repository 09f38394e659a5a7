"""Bring your own key: checked with the upstream, sealed at rest, used for the owner's calls only, rotatable.

In production the operator's key and users' keys go to the same OPENAI_BASE_URL. Each
fake upstream accepts exactly one key, so the gateway here talks to a `KeyRouter`: one
base URL in front of two fakes, picked by the Authorization header. A user's key reaches
the fake that accepts it, the operator's key the other, and any other key is answered
401 by the operator's fake, as OpenAI would.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest
import pytest_asyncio
from aiohttp import ClientSession, web
from pydantic import ValidationError

from app.byok.crypto import KeyCipher, UnreadableKey, key_id_of
from app.byok.schemas import OpenAIKeyStore
from app.config import Settings, describe_errors
from app.upstream.user_clients import UserClient, UserClients
from support import internals
from support.auth import bearer, make_jwt
from support.errors import assert_error
from support.fake_upstream import CONTENT, FakeUpstream, Reply
from support.gateway import Gateway, GatewayFactory, app_command_async
from support.waiting import usage_rows, wait_for

OWN_KEY = "sk-user-own"
ME = "/v1/me/openai-key"
CHAT = "/v1/chat/completions"
CHAT_BODY = {"model": "default-chat", "messages": [{"role": "user", "content": "Say hello"}]}


def new_encryption_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


KEY_A, KEY_B, KEY_C = new_encryption_key(), new_encryption_key(), new_encryption_key()


class KeyRouter:
    """One OpenAI-style base URL in front of several fake upstreams, chosen by the bearer key."""

    def __init__(self, default: FakeUpstream, by_key: dict[str, FakeUpstream]) -> None:
        self.default = default
        self.by_key = by_key
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        self._session = ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        target = self.by_key.get(key, self.default)
        hop = {"host", "content-length", "transfer-encoding", "connection"}
        headers = {name: value for name, value in request.headers.items() if name.lower() not in hop}
        url = target.base_url.removesuffix("/v1") + request.path_qs
        async with self._session.request(request.method, url, data=await request.read(), headers=headers) as answer:
            response = web.StreamResponse(
                status=answer.status,
                headers={name: value for name, value in answer.headers.items() if name.lower() not in hop},
            )
            await response.prepare(request)
            async for chunk in answer.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response


@pytest_asyncio.fixture(scope="module")
async def own_upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream(api_key=OWN_KEY)
    await fake.start()
    yield fake
    await fake.stop()


@pytest_asyncio.fixture(scope="module")
async def key_router(upstream: FakeUpstream, own_upstream: FakeUpstream) -> AsyncIterator[KeyRouter]:
    router = KeyRouter(upstream, {OWN_KEY: own_upstream})
    await router.start()
    yield router
    await router.stop()


@pytest.fixture
def fakes(upstream: FakeUpstream, own_upstream: FakeUpstream) -> tuple[FakeUpstream, FakeUpstream]:
    upstream.reset()
    own_upstream.reset()
    return upstream, own_upstream


def byok_gateway(
    gateway_with: GatewayFactory, router: KeyRouter, keys: list[str] | None = None, **overrides: Any
) -> contextlib.AbstractAsyncContextManager[Gateway]:
    """A gateway whose upstream is the key router, with BYOK on (encryption key A unless told)."""
    return gateway_with(openai_base_url=router.base_url, byok_encryption_keys=keys or [KEY_A], **overrides)


async def store(gw: Gateway, token: str, api_key: object = OWN_KEY) -> httpx.Response:
    return await gw.client.put(ME, json={"api_key": api_key}, headers=bearer(token))


async def stored_row(db: asyncpg.Pool, user: str) -> asyncpg.Record | None:
    return await db.fetchrow("SELECT * FROM user_openai_key WHERE user_id = $1", user)


async def chat_authorization(gw: Gateway, token: str, fake: FakeUpstream) -> str:
    """Make one chat call as `token`; the Authorization header `fake` received for it."""
    before = len(fake.requests)
    response = await gw.client.post(CHAT, json=CHAT_BODY, headers=bearer(token))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == CONTENT
    assert len(fake.requests) == before + 1, "the call did not reach the expected upstream"
    return fake.requests[-1].headers["authorization"]


async def test_a_key_the_upstream_rejects_is_refused_and_not_stored(
    gateway_with: GatewayFactory, key_router: KeyRouter, fakes, db: asyncpg.Pool, caplog
) -> None:
    operator, _ = fakes
    caplog.set_level(logging.DEBUG)
    async with byok_gateway(gateway_with, key_router) as gw:
        token, user = await gw.key()
        response = await store(gw, token, "sk-stolen-or-mistyped")
        error = assert_error(response, 400, code="invalid_openai_key", param="api_key")
        assert "sk-stolen" not in response.text
        assert operator.requests[-1].path == "/v1/models"  # asked the upstream with that key
        assert operator.requests[-1].headers["authorization"] == "Bearer sk-stolen-or-mistyped"
        assert "rejected" in error["message"]

        operator.script("/v1/models", Reply(status=403))  # a key without access to the model list
        assert_error(await store(gw, token, "sk-restricted-key"), 400, code="invalid_openai_key", param="api_key")

        assert await stored_row(db, user) is None
        assert_error(await gw.client.get(ME, headers=bearer(token)), 404, code="openai_key_not_found")
        assert await chat_authorization(gw, token, operator) == f"Bearer {operator.api_key}"
    assert "sk-stolen" not in caplog.text and "sk-restricted" not in caplog.text


async def test_a_good_key_is_stored_encrypted_and_never_returned(
    gateway_with: GatewayFactory, key_router: KeyRouter, fakes, db: asyncpg.Pool, caplog
) -> None:
    _, own = fakes
    caplog.set_level(logging.DEBUG)
    async with byok_gateway(gateway_with, key_router) as gw:
        token, user = await gw.key()
        response = await store(gw, token)
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"last4", "created_at", "validated_at"} and body["last4"] == OWN_KEY[-4:]
        assert OWN_KEY not in response.text
        assert own.requests[-1].path == "/v1/models"  # validated with the upstream first

        shown = await gw.client.get(ME, headers=bearer(token))
        assert shown.status_code == 200 and shown.json() == body and OWN_KEY not in shown.text
        await chat_authorization(gw, token, own)

    row = await stored_row(db, user)
    assert row is not None and row["key_id"] == key_id_of(base64.urlsafe_b64decode(KEY_A))
    # The key appears nowhere in the row: not in any column, not as text, not hex-encoded.
    as_text = await db.fetchval("SELECT t::text FROM user_openai_key t WHERE user_id = $1", user)
    assert OWN_KEY not in as_text and OWN_KEY.encode().hex() not in as_text
    assert OWN_KEY.encode() not in row["ciphertext"]
    assert all(OWN_KEY not in str(value) for value in row.values())
    # The settings key opens it, for this user only: a ciphertext moved to another user does not decrypt.
    cipher = KeyCipher.from_texts([KEY_A])
    assert cipher.decrypt(user, row["key_id"], row["ciphertext"]) == OWN_KEY
    with pytest.raises(UnreadableKey):
        cipher.decrypt("someone-else", row["key_id"], row["ciphertext"])
    assert OWN_KEY not in caplog.text


async def test_their_calls_use_their_key_and_everyone_else_ours(
    gateway_with: GatewayFactory, key_router: KeyRouter, fakes, db: asyncpg.Pool
) -> None:
    operator, own = fakes
    async with byok_gateway(gateway_with, key_router) as gw:
        owner, owner_id = await gw.key()
        other, _ = await gw.key()
        assert await chat_authorization(gw, owner, operator) == f"Bearer {operator.api_key}"  # cached principal
        assert (await store(gw, owner)).status_code == 200
        assert await chat_authorization(gw, owner, own) == f"Bearer {OWN_KEY}"  # at once, no waiting
        assert await chat_authorization(gw, other, operator) == f"Bearer {operator.api_key}"

        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=owner, max_retries=0)
        stream = await client.chat.completions.create(model="default-chat", messages=CHAT_BODY["messages"], stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == CONTENT
        assert own.requests[-1].headers["authorization"] == f"Bearer {OWN_KEY}"
        secret = await client.realtime.client_secrets.create(extra_body={"role": "student"})  # the SDK path
        assert secret.value.startswith("ek_fake_")
        assert own.requests[-1].path == "/v1/realtime/client_secrets"
        assert own.requests[-1].headers["authorization"] == f"Bearer {OWN_KEY}"
        await client.close()

        clients = internals.user_clients(gw.app)
        assert owner_id in clients and len(clients) == 1  # one client, reused by every call

        async def all_calls_gave_it_back() -> bool:  # the stream's too, when it ended
            return internals.user_client(gw.app, owner_id).leases == 0

        assert await wait_for(all_calls_gave_it_back)
        rows = await usage_rows(db, 4, user_id=owner_id)
        assert {row["status"] for row in rows} == {"ok"}
        # Which key paid: the operator's for the first call, the user's own after they stored it.
        paid_by = [json.loads(row["detail"]).get("key") if row["detail"] else None for row in rows]
        assert paid_by == [None, "user", "user", "user"]


async def test_their_images_and_moderation_use_their_key(
    gateway_with: GatewayFactory, key_router: KeyRouter, fakes, tmp_path: Path
) -> None:
    operator, own = fakes
    async with byok_gateway(gateway_with, key_router, image_dir=tmp_path, image_moderation=True) as gw:
        token, _ = await gw.key()
        assert (await store(gw, token)).status_code == 200
        body = {"model": "default-image", "prompt": "a red fox in the snow"}
        response = await gw.client.post("/v1/images/generations", json=body, headers=bearer(token))
        assert response.status_code == 200, response.text
        assert [r.path for r in own.requests] == ["/v1/models", "/v1/moderations", "/v1/images/generations"]
        assert {r.headers["authorization"] for r in own.requests} == {f"Bearer {OWN_KEY}"}
        assert operator.requests == []


async def test_a_stored_key_the_upstream_later_rejects_is_the_users_to_fix(
    gateway_with: GatewayFactory, key_router: KeyRouter, fakes
) -> None:
    _, own = fakes
    async with byok_gateway(gateway_with, key_router) as gw:
        token, _ = await gw.key()
        assert (await store(gw, token)).status_code == 200
        own.script("/v1/chat/completions", Reply(status=401))  # revoked at OpenAI since
        response = await gw.client.post(CHAT, json=CHAT_BODY, headers=bearer(token))
        assert_error(response, 400, code="openai_key_rejected")


async def test_deleting_the_key_returns_them_to_ours(
    gateway_with: GatewayFactory, key_router: KeyRouter, fakes, db: asyncpg.Pool
) -> None:
    operator, own = fakes
    async with byok_gateway(gateway_with, key_router) as gw:
        token, user = await gw.key()
        assert (await store(gw, token)).status_code == 200
        assert await chat_authorization(gw, token, own) == f"Bearer {OWN_KEY}"
        clients = internals.user_clients(gw.app)
        client = internals.user_client(gw.app, user)

        response = await gw.client.delete(ME, headers=bearer(token))
        assert response.status_code == 204 and response.content == b""
        assert await stored_row(db, user) is None
        assert await chat_authorization(gw, token, operator) == f"Bearer {operator.api_key}"
        assert user not in clients and await wait_for(lambda: _closed(client), what="the dropped client to close")
        assert_error(await gw.client.get(ME, headers=bearer(token)), 404, code="openai_key_not_found")
        assert_error(await gw.client.delete(ME, headers=bearer(token)), 404, code="openai_key_not_found")


async def _closed(client: UserClient) -> bool:
    return client.closed


async def test_a_change_reaches_every_process(
    gateway_with: GatewayFactory, key_router: KeyRouter, fakes, db: asyncpg.Pool
) -> None:
    operator, own = fakes
    async with byok_gateway(gateway_with, key_router) as first, byok_gateway(gateway_with, key_router) as second:
        token, user = await first.key()
        assert await chat_authorization(second, token, operator) == f"Bearer {operator.api_key}"  # cached there

        async def second_dropped_its_view() -> bool:  # the NOTIFY arrived
            return internals.cached_principal(second.app, token) is None

        assert (await store(first, token)).status_code == 200
        assert await wait_for(second_dropped_its_view)
        assert await chat_authorization(second, token, own) == f"Bearer {OWN_KEY}"
        assert user in internals.user_clients(second.app)

        assert (await first.client.delete(ME, headers=bearer(token))).status_code == 204
        assert await wait_for(second_dropped_its_view)
        assert user not in internals.user_clients(second.app)
        assert await chat_authorization(second, token, operator) == f"Bearer {operator.api_key}"


async def test_jwt_users_bring_keys_without_a_user_row(
    gateway_with: GatewayFactory, key_router: KeyRouter, fakes, db: asyncpg.Pool
) -> None:
    _, own = fakes
    sub = f"jwt-{os.urandom(4).hex()}"
    token = make_jwt(sub)
    async with byok_gateway(gateway_with, key_router) as gw:
        assert (await store(gw, token)).status_code == 200
        assert await chat_authorization(gw, token, own) == f"Bearer {OWN_KEY}"
    assert await db.fetchval("SELECT count(*) FROM app_user WHERE id = $1", sub) == 0  # tier left to JWT_DEFAULT_TIER


async def test_in_simulated_mode_own_keys_still_reach_the_upstream(
    gateway_with: GatewayFactory, key_router: KeyRouter, fakes
) -> None:
    _, own = fakes
    async with byok_gateway(gateway_with, key_router, simulated=True) as gw:
        owner, _ = await gw.key()
        other, _ = await gw.key()
        assert (await store(gw, owner)).status_code == 200
        assert await chat_authorization(gw, owner, own) == f"Bearer {OWN_KEY}"
        simulated = await gw.client.post(CHAT, json=CHAT_BODY, headers=bearer(other))
        assert simulated.status_code == 200 and simulated.headers["x-gateway-simulated"] == "true"


async def test_an_unreachable_upstream_is_502_and_nothing_is_stored(
    gateway_with: GatewayFactory, db: asyncpg.Pool
) -> None:
    async with gateway_with(
        openai_base_url="http://127.0.0.1:9/v1", byok_encryption_keys=[KEY_A], upstream_max_retries=0
    ) as gw:
        token, user = await gw.key()
        response = await store(gw, token)
        assert_error(response, 502, code="upstream_error")
        assert OWN_KEY not in response.text
    assert await stored_row(db, user) is None


async def test_bad_inputs_name_api_key_and_reach_no_upstream(
    gateway_with: GatewayFactory, key_router: KeyRouter, fakes
) -> None:
    operator, own = fakes
    async with byok_gateway(gateway_with, key_router) as gw:
        token, _ = await gw.key()
        for body in ({}, {"api_key": ""}, {"api_key": 12345678901}, {"api_key": None}, {"api_key": "sk with spaces"}):
            response = await gw.client.put(ME, json=body, headers=bearer(token))
            assert_error(response, 400, param="api_key")
        assert_error(await gw.client.put(ME, json={"api_key": OWN_KEY, "x": 1}, headers=bearer(token)), 400, param="x")
        assert_error(await gw.client.put(ME, content=b"not json", headers=bearer(token)), 400)
        for method in ("PUT", "GET", "DELETE"):
            response = await gw.client.request(method, ME, json={"api_key": OWN_KEY})
            assert_error(response, 401, code="missing_api_key")
        assert_error(await store(gw, "gw_not-a-key"), 401)
        assert operator.requests == [] and own.requests == []


async def test_byok_is_off_without_encryption_keys(gateway: Gateway, upstream: FakeUpstream) -> None:
    token, _ = await gateway.key()
    assert_error(await store(gateway, token), 403, code="byok_disabled")
    assert upstream.requests == []


async def test_checks_are_rate_limited_per_user(gateway_with: GatewayFactory, key_router: KeyRouter, fakes) -> None:
    async with byok_gateway(gateway_with, key_router) as gw:
        token, _ = await gw.key()
        statuses = [(await store(gw, token, "sk-guessing-1234")).status_code for _ in range(11)]
        assert statuses == [400] * 10 + [429]


async def _rotate(database_url: str, keys: list[str]) -> tuple[int, str]:
    """`python -m app rotate-byok` in its own process, configured by environment like an operator's."""
    env = {**os.environ, "DATABASE_URL": database_url, "BYOK_ENCRYPTION_KEYS": ",".join(keys)}
    env.pop("OPENAI_API_KEY", None)
    return await app_command_async("rotate-byok", env=env)


async def test_rotation(
    gateway_with: GatewayFactory, key_router: KeyRouter, fakes, db: asyncpg.Pool, database_url: str
) -> None:
    _, own = fakes
    await db.execute("TRUNCATE user_openai_key")
    id_a, id_b = (key_id_of(base64.urlsafe_b64decode(key)) for key in (KEY_A, KEY_B))
    async with byok_gateway(gateway_with, key_router, [KEY_A]) as gw:
        token, user = await gw.key()
        assert (await store(gw, token)).status_code == 200
    assert (await stored_row(db, user))["key_id"] == id_a

    async with byok_gateway(gateway_with, key_router, [KEY_B, KEY_A]) as gw:  # B prepended: A still opens
        assert await chat_authorization(gw, token, own) == f"Bearer {OWN_KEY}"
    assert (await stored_row(db, user))["key_id"] == id_a

    code, output = await _rotate(database_url, [KEY_B, KEY_A])
    assert code == 0, output
    assert "re-encrypted 1 stored OpenAI keys" in output and OWN_KEY not in output and KEY_A not in output
    row = await stored_row(db, user)
    assert row["key_id"] == id_b
    assert KeyCipher.from_texts([KEY_B]).decrypt(user, row["key_id"], row["ciphertext"]) == OWN_KEY

    async with byok_gateway(gateway_with, key_router, [KEY_B]) as gw:  # A retired
        assert await chat_authorization(gw, token, own) == f"Bearer {OWN_KEY}"
        assert (await gw.client.get(ME, headers=bearer(token))).json()["last4"] == OWN_KEY[-4:]

    code, output = await _rotate(database_url, [KEY_B])
    assert code == 0 and "re-encrypted 0" in output, output

    # A gateway that lost the key says so (503), and does not quietly bill the operator instead.
    async with byok_gateway(gateway_with, key_router, [KEY_C]) as gw:
        response = await gw.client.post(CHAT, json=CHAT_BODY, headers=bearer(token))
        assert_error(response, 503, code="openai_key_unreadable")
    code, output = await _rotate(database_url, [KEY_C])
    assert code != 0 and "1 keys cannot be decrypted" in output and user in output


async def test_the_client_cache_is_bounded_and_closes_what_it_drops() -> None:
    settings = Settings(_env_file=None, openai_base_url="http://127.0.0.1:9/v1")  # type: ignore[call-arg]
    loads: list[str] = []
    release_load = asyncio.Event()
    release_load.set()

    async def loader(user_id: str) -> str | None:
        loads.append(user_id)
        await release_load.wait()
        return None if user_id == "nobody" else f"sk-key-of-{user_id}"

    clients = UserClients(settings, loader, max_clients=2)
    try:
        async with clients.lease("u1") as first:
            assert first is not None
        async with clients.lease("u2"):
            pass
        async with clients.lease("u1") as again:
            assert again is first  # a hit: no second load, and u1 is now the most recent
        async with clients.lease("u3"):
            pass
        assert loads == ["u1", "u2", "u3"] and "u2" not in clients and len(clients) == 2
        await asyncio.sleep(0)
        assert not first.closed

        held = await clients.acquire("u1")  # a call in flight, e.g. an open stream
        for user in ("u4", "u5"):
            async with clients.lease(user):
                pass
        assert "u1" not in clients and len(clients) == 2
        await asyncio.sleep(0.01)
        assert held is not None and not held.closed, "evicted while in use: kept open until released"
        clients.release(held)
        assert await wait_for(lambda: _closed(held), what="the released client to close")

        async with clients.lease("nobody") as none:
            assert none is None  # no key stored: the caller falls back to the operator's backend
        assert "nobody" not in clients

        release_load.clear()  # concurrent misses for one user share one load
        waiters = [asyncio.create_task(clients.acquire("u6")) for _ in range(5)]
        await asyncio.sleep(0.01)
        release_load.set()
        got = await asyncio.gather(*waiters)
        assert loads.count("u6") == 1 and all(client is got[0] for client in got)
        for client in got:
            clients.release(client)

        release_load.clear()  # the key changes while it is being read: the result is not kept
        pending = asyncio.create_task(clients.acquire("u7"))
        await asyncio.sleep(0.01)
        clients.forget("u7")
        release_load.set()
        stale = await pending
        assert stale is not None and "u7" not in clients
        await asyncio.sleep(0.01)
        assert not stale.closed, "the caller that waited for it still uses it"
        clients.release(stale)
        assert await wait_for(lambda: _closed(stale), what="the stale client to close")

        release_load.clear()  # a caller that gives up while the key loads holds no lease
        leaving = asyncio.create_task(clients.acquire("u8"))
        staying = asyncio.create_task(clients.acquire("u8"))
        await asyncio.sleep(0.01)
        leaving.cancel()
        release_load.set()
        u8 = await staying
        assert u8 is not None and u8.leases == 1
        clients.release(u8)

        release_load.clear()  # more new users at once than the cache holds: every caller gets an open client
        burst = [asyncio.create_task(clients.acquire(user)) for user in ("b1", "b2", "b3")]
        await asyncio.sleep(0.01)
        release_load.set()
        burst_clients = await asyncio.gather(*burst)
        await asyncio.sleep(0.01)
        assert len(clients) == 2 and not any(client.closed for client in burst_clients)
        for client in burst_clients:
            clients.release(client)
        evicted = burst_clients[0]  # the one evicted at once, now idle
        assert await wait_for(lambda: _closed(evicted), what="the evicted client to close")

        async with clients.lease("f1") as changed:  # the user's key changed (the auth NOTIFY)
            assert changed is not None
        assert "f1" in clients
        clients.forget("f1")
        assert "f1" not in clients and await wait_for(lambda: _closed(changed), what="the forgotten client to close")
        survivors = list(clients._entries.values())
    finally:
        await clients.close()
    assert survivors and all(client.closed for client in survivors)


def test_nothing_shows_a_key() -> None:
    assert OWN_KEY not in repr(OpenAIKeyStore(api_key=OWN_KEY))
    cipher = KeyCipher.from_texts([KEY_A])
    assert KEY_A not in repr(cipher) and base64.urlsafe_b64decode(KEY_A).hex() not in repr(cipher)
    settings = Settings(_env_file=None, byok_encryption_keys=[KEY_A])  # type: ignore[call-arg]
    assert KEY_A not in repr(settings)


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("not-a-key", "entry 1 is not base64"),
        (f"{KEY_A},c2hvcnQ=", "entry 2 decodes to 5 bytes"),
        (f'["{KEY_A}", "{KEY_A}"]', "entry 2 repeats entry 1"),
    ],
)
def test_malformed_encryption_keys_stop_start_up(monkeypatch, value: str, complaint: str) -> None:
    monkeypatch.setenv("BYOK_ENCRYPTION_KEYS", value)
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None)  # type: ignore[call-arg]
    message = describe_errors(caught.value)
    assert "BYOK_ENCRYPTION_KEYS" in message and complaint in message
    assert KEY_A not in message and "not-a-key" not in message


def test_encryption_keys_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("BYOK_ENCRYPTION_KEYS", f" {KEY_B} , {KEY_A} ")
    keys = [key.get_secret_value() for key in Settings(_env_file=None).byok_encryption_keys]  # type: ignore[call-arg]
    assert KeyCipher.from_texts(keys).primary_id == key_id_of(base64.urlsafe_b64decode(KEY_B))
