"""Named upstreams: a model served by several, failover before any byte, cool-downs, Azure's URL style.

The gateway of these tests runs with the shipped catalog plus a `backup` upstream (a second
fake) and an `azure` one (the same fake, addressed the Azure way): gpt-5-mini is served by
`default` then `backup` (where it has another name), gpt-5-nano by `azure` alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import openai
import pytest
import pytest_asyncio

from app.config import PACKAGE_DIR
from app.configcheck import ConfigurationError
from app.registry import load_catalog
from app.runtime import Runtime
from support.fake_upstream import CONTENT, FakeUpstream, Reply
from support.gateway import Gateway, GatewayFactory, make_settings
from support.waiting import usage_rows

CHAT = "/v1/chat/completions"
BACKUP_KEY = "sk-backup-upstream"
AZURE_DEPLOYMENT = "/openai/deployments/nano-deployment/chat/completions"
AZURE_VERSION = "2024-10-21"


@pytest_asyncio.fixture(scope="module")
async def backup() -> AsyncIterator[FakeUpstream]:
    server = FakeUpstream(api_key=BACKUP_KEY)
    await server.start()
    yield server
    await server.stop()


def catalog_with_upstreams(path: Path, backup: FakeUpstream, *, failures: int = 2) -> Path:
    shipped = (PACKAGE_DIR / "catalog.toml").read_text()
    mini = 'id = "gpt-5-mini"\n'
    nano = 'id = "gpt-5-nano"\n'
    assert mini in shipped and nano in shipped
    text = shipped.replace(
        mini,
        mini + 'upstreams = ["default", { upstream = "backup", model = "gpt-5-mini-backup" }]\n',
    ).replace(nano, nano + 'upstreams = [{ upstream = "azure", model = "nano-deployment" }]\n')
    root = backup.base_url.removesuffix("/v1")
    text += f"""
[[upstream]]
name = "backup"
base_url = "{backup.base_url}"
api_key_env = "BACKUP_TEST_KEY"
headers = {{ "x-team" = "gateway" }}

[[upstream]]
name = "azure"
api = "azure"
base_url = "{root}"
api_version = "{AZURE_VERSION}"
api_key_env = "AZURE_TEST_KEY"

[failover]
failures = {failures}
cooldown_seconds = 60
"""
    path.write_text(text)
    return path


@pytest.fixture
def failover(
    gateway_with: GatewayFactory,
    backup: FakeUpstream,
    upstream: FakeUpstream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Any:
    """`async with failover(**settings) as gw`: a gateway on the catalog above, the fakes reset."""
    backup.reset()
    upstream.reset()
    monkeypatch.setenv("BACKUP_TEST_KEY", BACKUP_KEY)
    monkeypatch.setenv("AZURE_TEST_KEY", BACKUP_KEY)
    catalog = catalog_with_upstreams(tmp_path / "catalog.toml", backup)

    def start(**overrides: Any) -> contextlib.AbstractAsyncContextManager[Gateway]:
        return gateway_with(catalog_file=catalog, **overrides)

    return start


async def client_of(gateway: Gateway) -> tuple[str, openai.AsyncOpenAI]:
    key, user_id = await gateway.key("pro")
    return user_id, openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


async def ask(client: openai.AsyncOpenAI, model: str = "gpt-5-mini") -> str:
    answer = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    return answer.choices[0].message.content or ""


async def test_failures_move_a_call_to_the_next_deployment_and_cool_the_upstream_down(
    failover: Any, upstream: FakeUpstream, backup: FakeUpstream, db: asyncpg.Pool
) -> None:
    async with failover() as gateway:
        user_id, client = await client_of(gateway)
        assert await ask(client) == CONTENT  # both healthy: the first deployment answers
        assert len(upstream.received()) == 1 and backup.received() == []

        # A 500, then a 429 that asks for more patience than the retry policy has: each goes to `backup`.
        upstream.script(CHAT, Reply(status=500), Reply(status=429, headers={"retry-after": "30"}))
        assert await ask(client) == CONTENT
        assert await ask(client) == CONTENT
        assert len(upstream.received()) == 3
        sent = backup.received()
        assert [request.json["model"] for request in sent] == ["gpt-5-mini-backup"] * 2  # type: ignore[index]
        assert sent[0].headers["authorization"] == f"Bearer {BACKUP_KEY}" and sent[0].headers["x-team"] == "gateway"

        # Two failures in a row: `default` is cooled down, and the next calls go straight to `backup`.
        assert await ask(client) == CONTENT
        assert len(upstream.received()) == 3 and len(backup.received()) == 3
        ready = (await gateway.client.get("/readyz")).json()
        assert ready["upstreams"]["default"].startswith("cooling") and ready["upstreams"]["backup"] == "ok"
        metrics = (await gateway.client.get("/metrics")).text
        assert 'gateway_upstream_cooling{upstream="default"} 1.0' in metrics
        assert 'gateway_upstream_failures_total{upstream="default"} 2.0' in metrics

        # Streamed too: the failover happens before any byte reaches the client.
        stream = await client.chat.completions.create(
            model="gpt-5-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
        assert text == CONTENT

        rows = await usage_rows(db, count=5, user_id=user_id)
        assert [(row["upstream"], row["status"]) for row in rows] == [("default", "ok")] + [("backup", "ok")] * 4


async def test_a_dead_upstream_fails_over_and_a_refusal_does_not(
    failover: Any, upstream: FakeUpstream, backup: FakeUpstream, db: asyncpg.Pool
) -> None:
    async with failover(openai_base_url="http://127.0.0.1:9/v1") as gateway:  # nothing listens there
        user_id, client = await client_of(gateway)
        assert await ask(client) == CONTENT
        assert len(backup.received()) == 1
        [row] = await usage_rows(db, user_id=user_id)
        assert row["upstream"] == "backup"

    backup.reset()
    async with failover() as gateway:
        _, client = await client_of(gateway)
        upstream.script(CHAT, Reply(status=400))  # the upstream refused the request itself: no other is asked
        with pytest.raises(openai.BadRequestError):
            await ask(client)
        assert backup.received() == []


async def test_when_every_deployment_fails_the_call_fails_once(
    failover: Any, upstream: FakeUpstream, backup: FakeUpstream, db: asyncpg.Pool
) -> None:
    async with failover() as gateway:
        user_id, client = await client_of(gateway)
        upstream.script(CHAT, *[Reply(status=503)] * 3)
        backup.script(CHAT, *[Reply(status=503)] * 3)
        with pytest.raises(openai.APIStatusError) as failed:
            await ask(client)
        assert failed.value.status_code == 502
        # The one retry policy's three attempts: default, backup, default again.
        assert (len(upstream.received()), len(backup.received())) == (2, 1)
        [row] = await usage_rows(db, user_id=user_id)
        assert row["status"] == "error"


async def test_an_azure_upstream_is_called_its_way(failover: Any, backup: FakeUpstream, db: asyncpg.Pool) -> None:
    answer = {
        "id": "chatcmpl-azure",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-5-nano",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "From Azure."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }
    async with failover() as gateway:
        user_id, client = await client_of(gateway)
        backup.script(AZURE_DEPLOYMENT, Reply(body=answer))
        assert await ask(client, "gpt-5-nano") == "From Azure."
        [sent] = backup.received(AZURE_DEPLOYMENT)
        assert sent.query == {"api-version": AZURE_VERSION}
        assert sent.headers["api-key"] == BACKUP_KEY and "authorization" not in sent.headers
        assert sent.json is not None and sent.json["model"] == "nano-deployment"
        [row] = await usage_rows(db, user_id=user_id)
        assert (row["upstream"], row["model"], row["prompt_tokens"]) == ("azure", "gpt-5-nano", 5)


async def test_a_response_is_read_where_it_was_made(
    failover: Any, upstream: FakeUpstream, backup: FakeUpstream, db: asyncpg.Pool
) -> None:
    async with failover() as gateway:
        _, client = await client_of(gateway)
        upstream.script("/v1/responses", Reply(status=500))
        made = await client.responses.create(model="gpt-5-mini", input="Remember me.")
        assert await db.fetchval("SELECT upstream FROM response_owner WHERE id = $1", made.id) == "backup"
        fetched = await client.responses.retrieve(made.id)  # `default` is healthy, but it never saw this one
        assert fetched.id == made.id
        assert [r.method for r in backup.requests if r.path == f"/v1/responses/{made.id}"] == ["GET"]
        assert not [r for r in upstream.requests if r.path.startswith("/v1/responses/")]
        # A response that continues it is made there too.
        follow = await client.responses.create(model="gpt-5-mini", input="And now?", previous_response_id=made.id)
        assert await db.fetchval("SELECT upstream FROM response_owner WHERE id = $1", follow.id) == "backup"


async def test_a_missing_upstream_key_stops_start_up(
    backup: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BACKUP_TEST_KEY", raising=False)
    monkeypatch.setenv("AZURE_TEST_KEY", BACKUP_KEY)
    catalog = catalog_with_upstreams(tmp_path / "catalog.toml", backup)
    settings = make_settings("postgresql://127.0.0.1:9/never", backup, catalog_file=catalog)
    with pytest.raises(ConfigurationError) as stopped:
        await Runtime.start(settings)
    assert stopped.value.problems == [
        f"CATALOG_FILE {catalog}: upstream 'backup' reads its key from BACKUP_TEST_KEY, which is not set"
    ]


@pytest.mark.parametrize(
    ("addition", "named"),
    [
        ('\n[[upstream]]\nname = "default"\nbase_url = "http://x"\napi_key_env = "K"\n', "'default'"),
        ('\n[[upstream]]\nname = "a"\nbase_url = "http://x"\napi_key_env = "K"\napi = "azure"\n', "api_version"),
        ('\n[[upstream]]\nname = "a"\nbase_url = "ftp://x"\napi_key_env = "K"\n', "base_url"),
    ],
)
def test_bad_upstreams_stop_start_up_naming_the_problem(tmp_path: Path, addition: str, named: str) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text((PACKAGE_DIR / "catalog.toml").read_text() + addition)
    with pytest.raises(SystemExit) as stopped:
        load_catalog(path)
    assert named in str(stopped.value)


def test_a_model_may_name_only_known_upstreams(tmp_path: Path) -> None:
    path = tmp_path / "catalog.toml"
    shipped = (PACKAGE_DIR / "catalog.toml").read_text()
    path.write_text(shipped.replace('id = "gpt-5"\n', 'id = "gpt-5"\nupstreams = ["default", "nowhere"]\n'))
    with pytest.raises(SystemExit, match="unknown upstreams"):
        load_catalog(path)


def test_deployments_of_equal_priority_share_calls_by_weight() -> None:
    from app.registry import Deployment
    from app.upstream.failover import _weighted_order

    heavy, light = Deployment(upstream="heavy", weight=9), Deployment(upstream="light", weight=1)
    firsts = [_weighted_order([heavy, light])[0].upstream for _ in range(2000)]
    share = firsts.count("heavy") / len(firsts)
    assert 0.85 < share < 0.95, share  # 9 to 1
