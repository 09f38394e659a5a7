"""Configuration checked at start-up, and tiers enforced per request: an unknown tier never means "all models".

The module's gateways read the shipped assistants file plus one profile and one voice preset
kept to the paid tiers, so their `tiers` can be seen refusing a free user.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import openai
import pytest

from app.config import PACKAGE_DIR, Settings
from app.configcheck import ConfigurationError, load_configuration
from app.registry import UnknownTier, load_catalog
from app.runtime import Runtime
from support.auth import bearer, make_jwt
from support.errors import assert_error
from support.fake_upstream import FakeUpstream
from support.gateway import Gateway, app_command, free_port, gateway_env
from support.waiting import wait_for

SHIPPED_ASSISTANTS = PACKAGE_DIR / "assistants.toml"
PREMIUM_PROFILE = """
[profile.premium]
model = "smart-chat"
instructions = "Premium."
tiers = ["pro", "internal"]
"""
PREMIUM_PRESET = """
[voice_preset.premium]
role = "premium"
model = "default-realtime"
instructions.en = "Premium voice."
tiers = ["pro", "internal"]
"""


def settings(**values: Any) -> Settings:
    """Settings for loading the configuration only: nothing here opens a database."""
    return Settings(_env_file=None, environment="test", **values)  # type: ignore[call-arg]


def sdk(gateway: Gateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def gateway_settings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("config") / "assistants.toml"
    path.write_text(SHIPPED_ASSISTANTS.read_text() + PREMIUM_PROFILE + PREMIUM_PRESET)
    return {"assistants_file": path}


# --- start-up ---------------------------------------------------------------------------------


def test_the_shipped_configuration_passes() -> None:
    configuration = load_configuration(settings())
    teacher = configuration.presets.find("teacher")
    assert teacher is not None and teacher.tiers is None  # every tier, free with a model of its own
    models = {tier: configuration.catalog.by_name[teacher.model_for(tier)].id for tier in configuration.catalog.tiers}
    assert models == {"free": "gpt-realtime-mini", "pro": "gpt-realtime", "internal": "gpt-realtime"}


async def test_an_unknown_default_tier_stops_the_runtime_naming_it() -> None:
    with pytest.raises(ConfigurationError) as stopped:
        await Runtime.start(settings(jwt_default_tier="fre", database_url="postgresql://127.0.0.1:9/never"))
    assert stopped.value.problems == [
        f"JWT_DEFAULT_TIER 'fre' is not a tier of CATALOG_FILE {PACKAGE_DIR / 'catalog.toml'}"
        " (tiers: free, pro, internal)"
    ]


def test_serve_refuses_an_unknown_default_tier_with_a_clean_message(database_url: str) -> None:
    env = gateway_env(database_url, None, JWT_DEFAULT_TIER="premium-typo")
    done = app_command("serve", "--port", str(free_port()), env=env)
    assert done.returncode == 1
    assert "refusing to start, the configuration is inconsistent" in done.stderr
    assert "JWT_DEFAULT_TIER 'premium-typo' is not a tier" in done.stderr
    assert "Traceback" not in done.stderr


def test_presets_and_profiles_are_checked_together_naming_file_and_item(tmp_path: Path) -> None:
    path = tmp_path / "assistants.toml"
    path.write_text("""
[voice_preset.gold_only]
role = "a"
model = "cheap-realtime"
instructions.en = "x"
tiers = ["gold", "pro"]

[voice_preset.everyone]
role = "b"
model = "default-realtime"
instructions.en = "x"

[voice_preset.chatty]
role = "c"
model = "default-chat"
instructions.en = "x"

[voice_preset.paid]
role = "d"
model = "default-realtime"
instructions.en = "x"
tiers = ["pro", "internal"]

[profile.cheap]
model = "smart-chat"
instructions = "x"
tiers = ["free"]

[profile.pictures]
model = "default-image"
instructions = "x"

[profile.ghost]
model = "gpt-9"
instructions = "x"
""")
    with pytest.raises(ConfigurationError) as stopped:
        load_configuration(settings(assistants_file=path))
    where = f"ASSISTANTS_FILE {path}"
    assert stopped.value.problems == [
        f"{where}: voice_preset.gold_only: tiers 'gold' are not tiers of the catalog (free, pro, internal)",
        f"{where}: voice_preset.everyone: model 'default-realtime' is not allowed for tiers 'free';"
        " set its `tiers` to those that may use it (pro, internal) or allow the model there",
        f"{where}: voice_preset.chatty: model 'default-chat' is of kind 'chat', not 'realtime'",
        f"{where}: profile.cheap: model 'smart-chat' is not allowed for tiers 'free';"
        " set its `tiers` to those that may use it (pro, internal) or allow the model there",
        f"{where}: profile.pictures: model 'default-image' is of kind 'image', not 'chat'",
        f"{where}: profile.ghost: model 'gpt-9' is not in the catalog",
    ]
    assert str(stopped.value).count("\n  ") == 6


def test_the_shipped_teacher_preset_without_its_free_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "assistants.toml"
    shipped = SHIPPED_ASSISTANTS.read_text()
    line = 'tier_models = { free = "cheap-realtime" }'
    assert line in shipped
    path.write_text(shipped.replace(line, ""))
    with pytest.raises(ConfigurationError) as stopped:
        load_configuration(settings(assistants_file=path))
    assert stopped.value.problems == [
        f"ASSISTANTS_FILE {path}: voice_preset.teacher: model 'default-realtime' is not allowed for tiers 'free';"
        " set its `tiers` to those that may use it (pro, internal) or allow the model there"
    ]


def test_each_tier_must_be_allowed_the_model_tier_models_gives_it(tmp_path: Path) -> None:
    path = tmp_path / "assistants.toml"
    path.write_text("""
[voice_preset.denied]
role = "a"
model = "cheap-realtime"
instructions.en = "x"
tier_models = { free = "default-realtime", pro = "gpt-realtime" }

[voice_preset.unknown_tier]
role = "b"
model = "default-realtime"
instructions.en = "x"
tier_models = { free = "cheap-realtime", gold = "cheap-realtime" }

[voice_preset.outside]
role = "c"
model = "default-realtime"
instructions.en = "x"
tiers = ["pro", "internal"]
tier_models = { free = "cheap-realtime" }

[voice_preset.wrong_kind]
role = "d"
model = "default-realtime"
instructions.en = "x"
tier_models = { free = "cheap-chat" }

[voice_preset.ghost]
role = "e"
model = "default-realtime"
instructions.en = "x"
tier_models = { free = "gpt-realtime-9" }

[voice_preset.fallback_denied]
role = "f"
model = "default-realtime"
instructions.en = "x"
tier_models = { pro = "cheap-realtime" }

[voice_preset.fine]
role = "g"
model = "default-realtime"
instructions.en = "x"
tiers = ["free", "pro"]
tier_models = { free = "gpt-realtime-mini" }

[profile.any]
instructions = "x"
""")
    with pytest.raises(ConfigurationError) as stopped:
        load_configuration(settings(assistants_file=path))
    where = f"ASSISTANTS_FILE {path}: voice_preset"
    assert stopped.value.problems == [
        f"{where}.denied: tier_models.free: model 'default-realtime' is not allowed for tier 'free';"
        " name a realtime model it may use (gpt-realtime-mini) or allow the model there",
        f"{where}.unknown_tier: tier_models.gold: tier 'gold' (model 'cheap-realtime') is not a tier of the catalog"
        " (free, pro, internal)",
        f"{where}.outside: tier_models.free: tier 'free' (model 'cheap-realtime') is not among the preset's tiers"
        " (pro, internal)",
        f"{where}.wrong_kind: tier_models.free: model 'cheap-chat' is of kind 'chat', not 'realtime'",
        f"{where}.ghost: tier_models.free: model 'gpt-realtime-9' is not in the catalog",
        f"{where}.fallback_denied: model 'default-realtime' is not allowed for tiers 'free';"
        " set its `tiers` to those that may use it (pro, internal) or allow the model there",
    ]


def test_context_urls_outside_the_allowed_hosts_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "assistants.toml"
    path.write_text("""
[profile.inside]
instructions = "x"
context_url = "https://App.Example.com/context"

[profile.outside]
instructions = "x"
context_url = "http://169.254.169.254/latest"
""")
    allowed = settings(assistants_file=path, context_allowed_hosts="app.example.com, other.example.com")
    assert allowed.context_allowed_hosts == ["app.example.com", "other.example.com"]
    with pytest.raises(ConfigurationError) as stopped:
        load_configuration(allowed)
    assert stopped.value.problems == [
        f"ASSISTANTS_FILE {path}: profile.outside: context_url http://169.254.169.254/latest is not on a host of"
        " CONTEXT_ALLOWED_HOSTS (app.example.com, other.example.com)"
    ]
    assert load_configuration(settings(assistants_file=path)).profiles.get("outside")  # no list: any host


def test_an_unknown_tier_may_use_no_model() -> None:
    catalog = load_catalog(PACKAGE_DIR / "catalog.toml")
    assert catalog.models_for("gold") == []
    assert not any(catalog.may_use("gold", spec) for spec in catalog.models)
    with pytest.raises(UnknownTier):
        catalog.tier("gold")


def catalog_with(tmp_path: Path, replace: str, by: str, extra: str = "") -> Path:
    path = tmp_path / "catalog.toml"
    shipped = (PACKAGE_DIR / "catalog.toml").read_text()
    assert replace in shipped
    path.write_text(shipped.replace(replace, by) + extra)
    return path


KNOWLEDGE = 'embedding_model = "text-embedding-3-small"'
SHORT_EMBEDDING = """
[[model]]
id = "short-embedding"
kind = "embedding"
dimensions = %s
adjustable_dimensions = %s
"""


def test_the_knowledge_model_is_the_catalogs_embedding_model_by_id() -> None:
    catalog = load_catalog(PACKAGE_DIR / "catalog.toml")
    assert catalog.knowledge_embedding_model == "text-embedding-3-small"
    assert catalog.by_name[catalog.knowledge_embedding_model].kind == "embedding"


@pytest.mark.parametrize(
    ("model", "extra"),
    [
        ("default-embedding", ""),  # an alias: the id is what vector stores record
        ("text-embedding-3-large", ""),  # 3072, asked for 1536
        ("short-embedding", SHORT_EMBEDDING % (1536, "false")),
    ],
)
def test_an_embedding_model_giving_1536_dimensions_may_be_the_knowledge_model(
    tmp_path: Path, model: str, extra: str
) -> None:
    catalog = load_catalog(catalog_with(tmp_path, KNOWLEDGE, f'embedding_model = "{model}"', extra))
    assert catalog.knowledge_embedding_model == catalog.by_name[model].id


@pytest.mark.parametrize(
    ("model", "extra", "named"),
    [
        ("text-embedding-4", "", "knowledge.embedding_model 'text-embedding-4' is not a model of the catalog"),
        ("default-chat", "", "knowledge.embedding_model 'default-chat' is of kind 'chat', not 'embedding'"),
        ("short-embedding", SHORT_EMBEDDING % (768, "true"), "'short-embedding' gives 768 dimensions"),
        ("short-embedding", SHORT_EMBEDDING % (3072, "false"), "'short-embedding' gives 3072 dimensions"),
    ],
)
def test_a_knowledge_model_that_cannot_give_1536_dimensions_stops_start_up(
    tmp_path: Path, model: str, extra: str, named: str
) -> None:
    with pytest.raises(SystemExit) as stopped:
        load_catalog(catalog_with(tmp_path, KNOWLEDGE, f'embedding_model = "{model}"', extra))
    assert named in str(stopped.value)


def test_file_caps_are_per_tier_and_a_negative_one_stops_start_up(tmp_path: Path) -> None:
    catalog = load_catalog(PACKAGE_DIR / "catalog.toml")
    free, pro, internal = (catalog.tier(name) for name in ("free", "pro", "internal"))
    assert free.file_bytes_max is not None and pro.file_bytes_max is not None
    assert free.file_bytes_max < pro.file_bytes_max
    assert (internal.file_bytes_max, internal.storage_bytes_max, internal.files_max) == (None, None, None)
    with pytest.raises(SystemExit, match="files_max"):
        load_catalog(catalog_with(tmp_path, "files_max = 100\n", "files_max = -1\n"))


# --- requests ---------------------------------------------------------------------------------


async def test_a_key_whose_tier_is_gone_is_refused_everywhere(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    key, user = await gateway.key("pro")
    await db.execute("UPDATE app_user SET tier = 'gold' WHERE id = $1", user)  # a tier since removed from the catalog
    client = sdk(gateway, key)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await client.chat.completions.create(model="gpt-5-mini", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 403 and caught.value.code == "unknown_tier"
    assert "'gold'" in caught.value.body["message"]
    with pytest.raises(openai.PermissionDeniedError) as listed:
        await client.models.list()
    assert listed.value.code == "unknown_tier"
    await client.close()
    for method, path, body in [
        ("GET", "/v1/threads", None),
        ("POST", "/v1/realtime/client_secrets", {"role": "student"}),
        ("POST", "/v1/images/generations", {"prompt": "a cat"}),
    ]:
        response = await gateway.client.request(method, path, json=body, headers=bearer(key))
        assert_error(response, 403, code="unknown_tier")
    assert upstream.requests == []


async def test_a_jwt_user_placed_in_a_missing_tier_is_refused(gateway: Gateway, db: asyncpg.Pool) -> None:
    await db.execute("INSERT INTO app_user (id, tier) VALUES ('jwt:gone-tier', 'gold')")
    response = await gateway.client.get("/v1/models", headers=bearer(make_jwt("gone-tier")))
    assert_error(response, 403, code="unknown_tier")
    fine = await gateway.client.get("/v1/models", headers=bearer(make_jwt("default-tier")))
    assert fine.status_code == 200 and {"gpt-5-mini"} <= {model["id"] for model in fine.json()["data"]}


async def test_a_preset_kept_to_paid_tiers(gateway: Gateway, upstream: FakeUpstream) -> None:
    """The `premium` role (PREMIUM_PRESET) is for the tiers it names only; a refused one calls no upstream."""
    free_key, _ = await gateway.key("free")
    free = sdk(gateway, free_key)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await free.realtime.client_secrets.create(extra_body={"role": "premium"})
    assert caught.value.status_code == 403 and caught.value.code == "preset_not_allowed"
    assert caught.value.body["message"] == "Role 'premium' is not available on your tier 'free'."
    assert upstream.requests == []
    await free.realtime.client_secrets.create(extra_body={"role": "student"})  # free may use the other presets
    await free.close()

    pro_key, _ = await gateway.key("pro")
    pro = sdk(gateway, pro_key)
    secret = await pro.realtime.client_secrets.create(extra_body={"role": "premium"})
    assert secret.session.model == "gpt-realtime"
    assert upstream.requests[-1].json["session"]["model"] == "gpt-realtime"
    await pro.close()


async def test_a_profile_kept_to_paid_tiers(gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool) -> None:
    """The profile's assistant (`asst_premium`) runs for the tiers it names only; a refused run writes nothing."""
    free_key, free_user = await gateway.key("free")
    message = {"role": "user", "content": "hi"}
    started = await gateway.client.post(
        "/v1/threads/runs",
        json={"assistant_id": "asst_premium", "thread": {"messages": [message]}},
        headers=bearer(free_key),
    )
    error = assert_error(started, 403, code="profile_not_allowed", param="assistant_id")
    assert error["message"] == "Assistant 'asst_premium' is not available on your tier 'free'."
    assert await db.fetchval("SELECT count(*) FROM thread WHERE user_id = $1", free_user) == 0

    own = await gateway.client.post("/v1/threads", json={"messages": [message]}, headers=bearer(free_key))
    assert own.status_code == 200, own.text
    runs = f"/v1/threads/{own.json()['id']}/runs"
    for stream in (False, True):
        body = {"assistant_id": "asst_premium", "additional_messages": [message], "stream": stream}
        refused = await gateway.client.post(runs, json=body, headers=bearer(free_key))
        assert_error(refused, 403, code="profile_not_allowed", param="assistant_id")
    assert await db.fetchval("SELECT count(*) FROM thread_run WHERE user_id = $1", free_user) == 0
    assert await db.fetchval("SELECT count(*) FROM thread_message") == 1  # the thread's own, no run's
    assert upstream.requests == []

    pro_key, _ = await gateway.key("pro")
    created = await gateway.client.post("/v1/threads", json={"messages": [message]}, headers=bearer(pro_key))
    assert created.status_code == 200, created.text
    run_path = f"/v1/threads/{created.json()['id']}/runs"
    queued = await gateway.client.post(run_path, json={"assistant_id": "asst_premium"}, headers=bearer(pro_key))
    assert queued.status_code == 200, queued.text
    assert queued.json()["assistant_id"] == "asst_premium"

    async def ended() -> dict[str, Any] | None:
        run = await gateway.client.get(f"{run_path}/{queued.json()['id']}", headers=bearer(pro_key))
        return run.json() if run.json()["status"] not in ("queued", "in_progress") else None

    run = await wait_for(ended, what="the premium run to end")
    assert run["status"] == "completed", run
    assert upstream.requests[-1].json["model"] == "gpt-5"
