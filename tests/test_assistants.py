"""Assistants through the official SDK's `client.beta.assistants`: a user's own, the shared ones
(ASSISTANTS_FILE's and the operator's), pages, ownership and refusals."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import asyncpg
import openai
import pytest

from app.config import PACKAGE_DIR
from support.auth import ADMIN_KEY, bearer, make_jwt
from support.errors import assert_error
from support.gateway import Gateway, GatewayFactory

# The SDK marks the Assistants API deprecated; these apps call it all the same, and so do the tests.
pytestmark = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")

FILE_ASSISTANTS = ["asst_coach", "asst_coach_health", "asst_coach_journal", "asst_teacher", "asst_zoo_lion"]
LION = {
    "model": "default-chat",
    "name": "Leo the lion",
    "instructions": "You are Leo, the zoo's lion. Answer visitors' questions in character.",
    "metadata": {"animal": "lion"},
}


def sdk(gateway: Gateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


async def own_ids(client: openai.AsyncOpenAI, **params: Any) -> list[str]:
    """Every id of the list, through the SDK's own paging (it follows `after` = the last id)."""
    return [assistant.id async for assistant in client.beta.assistants.list(**params)]


async def rows(db: asyncpg.Pool) -> int:
    return int(await db.fetchval("SELECT count(*) FROM assistant WHERE user_id IS NOT NULL"))


async def test_an_assistant_round_trips_through_the_sdk(gateway: Gateway) -> None:
    key, _ = await gateway.key("free")
    client = sdk(gateway, key)
    weather = {
        "type": "function",
        "function": {
            "name": "get_enclosure_weather",
            "description": "The weather at an enclosure.",
            "parameters": {"type": "object", "properties": {"enclosure": {"type": "string"}}},
        },
    }
    schema = {"name": "fact", "schema": {"type": "object", "properties": {"fact": {"type": "string"}}}}
    created = await client.beta.assistants.create(
        **LION,
        description="The lion of the zoo app.",
        tools=[weather],  # type: ignore[list-item]  # a dict as apps write it, not the SDK's TypedDict
        temperature=0.7,
        top_p=0.9,
        response_format={"type": "json_schema", "json_schema": schema},  # type: ignore[typeddict-item]
    )
    assert created.id.startswith("asst_") and created.object == "assistant"
    assert (created.name, created.model, created.metadata) == (LION["name"], "default-chat", {"animal": "lion"})
    assert created.tools[0].type == "function" and created.tools[0].function.name == "get_enclosure_weather"
    assert (created.temperature, created.top_p) == (0.7, 0.9)
    assert created.response_format.json_schema.name == "fact"  # type: ignore[union-attr]
    assert isinstance(created.created_at, int)
    assert created.model_extra is not None and created.model_extra["shared"] is False

    fetched = await client.beta.assistants.retrieve(created.id)
    assert fetched.model_dump() == created.model_dump()

    changed = await client.beta.assistants.update(
        created.id, name="Leonie", metadata={"animal": "lioness"}, tools=[], model="gpt-5-nano"
    )
    assert (changed.name, changed.metadata, changed.tools, changed.model) == (
        "Leonie",
        {"animal": "lioness"},
        [],
        "gpt-5-nano",
    )
    assert changed.instructions == LION["instructions"]  # what the update left out stays

    deleted = await client.beta.assistants.delete(created.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (created.id, True, "assistant.deleted")
    with pytest.raises(openai.NotFoundError):
        await client.beta.assistants.retrieve(created.id)


async def test_another_users_assistant_is_a_404_everywhere(gateway: Gateway, db: asyncpg.Pool) -> None:
    owner_key, _ = await gateway.key("free")
    other_key, _ = await gateway.key("free")
    mine = await sdk(gateway, owner_key).beta.assistants.create(**LION)
    other = sdk(gateway, other_key)
    for attempt in (
        other.beta.assistants.retrieve(mine.id),
        other.beta.assistants.update(mine.id, name="stolen"),
        other.beta.assistants.delete(mine.id),
    ):
        with pytest.raises(openai.NotFoundError) as refused:
            await attempt
        assert refused.value.code == "assistant_not_found"
    assert mine.id not in await own_ids(other)
    assert (await sdk(gateway, owner_key).beta.assistants.retrieve(mine.id)).name == LION["name"]
    assert await rows(db) == 1


async def test_shared_assistants_come_after_your_own_and_are_read_only(gateway: Gateway) -> None:
    key, _ = await gateway.key("free")
    client = sdk(gateway, key)
    mine = [(await client.beta.assistants.create(**{**LION, "name": f"animal {n}"})).id for n in range(3)]

    newest_first = await own_ids(client, limit=2)  # the SDK pages through, two at a time
    assert newest_first[:3] == mine[::-1]
    assert sorted(newest_first[3:]) == FILE_ASSISTANTS  # shared ones after the caller's own
    oldest_first = await own_ids(client, limit=2, order="asc")
    assert oldest_first[:3] == mine and sorted(oldest_first[3:]) == FILE_ASSISTANTS

    page = await client.beta.assistants.list(limit=2, order="asc", after=mine[1])
    assert [a.id for a in page.data] == [mine[2], oldest_first[3]] and page.has_more
    back = await client.beta.assistants.list(limit=2, order="asc", before=oldest_first[3])
    assert [a.id for a in back.data] == mine[1:3]

    teacher = await client.beta.assistants.retrieve("asst_teacher")
    extra = teacher.model_extra or {}
    assert teacher.name == "Teacher assistant" and extra["shared"] is True
    assert teacher.instructions is None  # the operator's prompt is not shown to users
    assert "/ptm" in extra["shortcuts"] and extra["history_messages"] == 20
    assert "context_url" not in extra and "tiers" not in extra  # the operator's, not shown to users
    for attempt in (
        client.beta.assistants.update("asst_teacher", name="mine now"),
        client.beta.assistants.delete("asst_teacher"),
    ):
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await attempt
        assert refused.value.code == "assistant_read_only"


@pytest.mark.parametrize(
    ("change", "param", "code"),
    [
        ({"tools": [{"type": "code_interpreter"}]}, "tools.0.type", "unsupported_tool"),
        ({"tools": [{"type": "file_search", "file_search": {"max_num_results": 51}}]}, "tools.0", "invalid_request"),
        (
            {"tool_resources": {"file_search": {"vector_store_ids": ["vs_1"]}}},
            "tool_resources.file_search.vector_store_ids.0",
            "not_found",
        ),
        (
            {"tool_resources": {"file_search": {"vector_stores": [{"file_ids": []}]}}},
            "tool_resources",
            "unsupported_tool",
        ),
        ({"history_tokens": 10**12}, "history_tokens", "invalid_request"),
        ({"model": "no-such-model"}, "model", "model_not_found"),
        ({"model": "default-image"}, "model", "model_not_found"),
        ({"model": "gpt-5"}, "model", "model_not_found"),  # not the free tier's
        ({"name": "Leo\u0000"}, "name", "invalid_request"),
        ({"temperature": 3}, "temperature", "invalid_request"),
        ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools", "invalid_request"),
        ({"metadata": {"k" * 65: "v"}}, "metadata", "invalid_request"),
        ({"shortcuts": {"ptm": "no slash"}}, "shortcuts", "invalid_request"),
        ({"context_url": "http://127.0.0.1/"}, "context_url", "invalid_request"),  # an operator's field only
    ],
)
async def test_bad_assistants_get_a_400_and_nothing_is_stored(
    gateway: Gateway, db: asyncpg.Pool, change: dict[str, Any], param: str, code: str
) -> None:
    key, _ = await gateway.key("free")
    response = await gateway.client.post("/v1/assistants", json={**LION, **change}, headers=bearer(key))
    assert_error(response, 400, code=code)
    assert response.json()["error"]["param"].startswith(param)
    assert await rows(db) == 0


async def test_the_operator_shares_assistants_at_run_time(gateway: Gateway) -> None:
    key, _ = await gateway.key("free")
    client = sdk(gateway, key)
    body = {**LION, "slug": "zoo_tiger", "name": "Tara the tiger", "chat_types": ["tiger"], "history_messages": 8}
    made = await gateway.admin("POST", "/admin/assistants", json=body)
    assert made.status_code == 201, made.text
    assert made.json()["id"] == "asst_zoo_tiger" and made.json()["source"] == "admin"

    seen = await client.beta.assistants.retrieve("asst_zoo_tiger")  # no restart
    assert seen.name == "Tara the tiger" and (seen.model_extra or {})["chat_types"] == ["tiger"]
    again = await gateway.admin("POST", "/admin/assistants", json=body)
    assert_error(again, 409, code="conflict")
    claimed = await gateway.admin("POST", "/admin/assistants", json={**LION, "chat_types": ["tiger"]})
    assert_error(claimed, 409, code="conflict")
    assert "asst_zoo_tiger" in claimed.json()["error"]["message"]

    edited = await gateway.admin("PATCH", "/admin/assistants/asst_zoo_tiger", json={"instructions": "Roar first."})
    assert edited.status_code == 200 and edited.json()["history_messages"] == 8
    assert (await gateway.admin("GET", "/admin/assistants/asst_zoo_tiger")).json()["instructions"] == "Roar first."
    with pytest.raises(openai.PermissionDeniedError):
        await client.beta.assistants.update("asst_zoo_tiger", name="mine")

    teacher = await gateway.admin("GET", "/admin/assistants/asst_teacher")
    assert teacher.json()["instructions"].startswith("You are a teaching assistant")  # the operator sees it
    endless = await gateway.client.post(  # 1e999 is valid JSON, and Python reads it as infinity
        "/admin/assistants",
        content=b'{"model": "default-chat", "context_ttl_seconds": 1e999}',
        headers={**bearer(ADMIN_KEY), "content-type": "application/json"},
    )
    assert_error(endless, 400, code="invalid_request")
    from_file = await gateway.admin("PATCH", "/admin/assistants/asst_teacher", json={"name": "edited"})
    assert_error(from_file, 403, code="assistant_read_only")
    assert "ASSISTANTS_FILE" in from_file.json()["error"]["message"]
    denied = await gateway.admin("POST", "/admin/assistants", json={**LION, "model": "gpt-5"})  # not every tier's
    assert_error(denied, 400, code="invalid_request")
    assert "free" in denied.json()["error"]["message"]
    pro_only = await gateway.admin("POST", "/admin/assistants", json={**LION, "model": "gpt-5", "tiers": ["pro"]})
    assert pro_only.status_code == 201, pro_only.text

    assert (await gateway.admin("DELETE", "/admin/assistants/asst_zoo_tiger")).status_code == 200
    with pytest.raises(openai.NotFoundError):
        await client.beta.assistants.retrieve("asst_zoo_tiger")
    mine = await client.beta.assistants.create(**LION)
    assert_error(await gateway.admin("GET", f"/admin/assistants/{mine.id}"), 404, code="assistant_not_found")


async def test_assistants_file_changes_reach_the_shared_assistants_at_start(
    gateway_with: GatewayFactory, tmp_path: Path
) -> None:
    edited = tmp_path / "assistants.toml"
    shutil.copy(PACKAGE_DIR / "assistants.toml", edited)
    text = edited.read_text()
    lion_starts = text.index("[profile.zoo_lion]")
    edited.write_text(text[:lion_starts].replace('display_name = "Teacher assistant"', 'display_name = "Teacher"'))
    async with gateway_with() as gateway:
        key, _ = await gateway.key("free")
        async with gateway_with(assistants_file=edited) as restarted:
            listed = await restarted.client.get("/v1/assistants", params={"limit": 100}, headers=bearer(key))
            shared = {item["id"]: item for item in listed.json()["data"]}
            assert sorted(shared) == [a for a in FILE_ASSISTANTS if a != "asst_zoo_lion"]
            assert shared["asst_teacher"]["name"] == "Teacher"


async def test_an_operators_assistant_is_not_overwritten_by_a_profile_of_the_same_name(
    gateway_with: GatewayFactory, tmp_path: Path
) -> None:
    edited = tmp_path / "assistants.toml"
    text = (PACKAGE_DIR / "assistants.toml").read_text()
    profile = '[profile.support]\nmodel = "default-chat"\ninstructions = "From the file."\n'
    edited.write_text(text + "\n" + profile)
    async with gateway_with() as gateway:
        made = await gateway.admin("POST", "/admin/assistants", json={**LION, "slug": "support"})
        assert made.status_code == 201, made.text
        async with gateway_with(assistants_file=edited) as restarted:
            kept = await restarted.admin("GET", "/admin/assistants/asst_support")
            assert (kept.json()["source"], kept.json()["instructions"]) == ("admin", LION["instructions"])


async def test_sdk_reasoning_efforts_are_taken(gateway: Gateway) -> None:
    key, _ = await gateway.key("free")
    made = await sdk(gateway, key).beta.assistants.create(**LION, reasoning_effort="max")
    assert (made.model_extra or {})["reasoning_effort"] == "max"


async def test_a_jwt_user_and_a_key_user_see_only_their_own(gateway: Gateway) -> None:
    key, user = await gateway.key("free")
    await sdk(gateway, key).beta.assistants.create(**LION)
    token = make_jwt(user)  # the same `sub` as the key's user: another user all the same
    listed = await gateway.client.get("/v1/assistants", headers=bearer(token))
    assert listed.status_code == 200
    assert all(item["shared"] for item in listed.json()["data"])


async def test_paging_from_an_unknown_id_is_a_400(gateway: Gateway) -> None:
    key, _ = await gateway.key("free")
    response = await gateway.client.get("/v1/assistants", params={"after": "asst_nope"}, headers=bearer(key))
    assert_error(response, 400, code="invalid_request")
    assert response.json()["error"]["param"] == "after"
