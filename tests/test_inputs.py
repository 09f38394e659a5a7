"""No input is a 5xx: NUL, lone surrogates, over-long ids, overflowing dates, foreign cursors and numbers, deep JSON.

Every route family gets inputs that used to reach Postgres, the driver or an encoder and fail
there with a 500 (an image prompt with a NUL was generated and charged first). Each must be
refused with our 400 naming the field (`param`), before any statement and any upstream call:
the fake upstream receives nothing, and no usage row, thread message, image row or image file
is left behind (nor a thread run or step).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from support import internals
from support.auth import ADMIN_KEY, bearer, make_jwt
from support.errors import assert_error
from support.fake_upstream import FakeUpstream
from support.gateway import Gateway
from support.waiting import wait_for

NUL = "a\x00b"
LONE = "a\ud800b"  # a lone surrogate: Python's JSON parser reads it from the escape "\ud800"
LONG_USER = "u" * 201  # user ids are stored in 200 characters
ZERO_ID = "00000000-0000-0000-0000-000000000000"
# Tables a refused request must leave empty (the key's own rows are the only ones expected).
WRITTEN = (
    "usage_event",
    "usage_pending",
    "thread_message",
    "thread_run",
    "run_step",
    "image",
    "image_batch",
    "image_batch_item",
)
# Ids of the Assistants API: a prefix and 32 hex digits; only the right prefix's are a list's cursors.
ZEROS = "0" * 32
NOT_HEX = "g" * 32


def encoded(body: Any) -> bytes:
    """JSON with every non-ASCII character escaped, so a lone surrogate travels as `\\ud800`
    (httpx's `json=` would have to encode it as UTF-8, which it cannot)."""
    return json.dumps(body).encode()


def deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def image_cursor(created: str) -> str:
    return base64.urlsafe_b64encode(f"{created}|{ZERO_ID}".encode()).decode().rstrip("=")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="module")
def gateway_settings(image_dir: Path) -> dict[str, Any]:
    return {"image_dir": image_dir, "byok_encryption_keys": [base64.urlsafe_b64encode(b"k" * 32).decode()]}


@pytest.fixture
async def caller(gateway: Gateway) -> dict[str, str]:
    key, _ = await gateway.key("pro")
    return bearer(key)


@pytest.fixture
async def thread_id(gateway: Gateway, caller: dict[str, str]) -> str:
    response = await gateway.client.post("/v1/threads", json={}, headers=caller)
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


async def send(
    gateway: Gateway, headers: dict[str, str], method: str, path: str, body: Any = None, **params: Any
) -> httpx.Response:
    content = None if body is None else body if isinstance(body, bytes) else encoded(body)
    return await gateway.client.request(
        method, path, content=content, params=params or None, headers={**headers, "content-type": "application/json"}
    )


def stored_files(image_dir: Path) -> list[Path]:
    return [path for path in image_dir.rglob("*") if path.is_file()]


async def assert_nothing_done(gateway: Gateway, db: asyncpg.Pool, upstream: FakeUpstream, image_dir: Path) -> None:
    """Nothing reached the upstream, and nothing was written (a usage row on its way would have landed:
    the gateway's background writes are drained first)."""
    await gateway.settle_requests()
    await internals.drain(gateway.app)
    assert upstream.requests == []
    for table in WRITTEN:
        assert await db.fetchval(f"SELECT count(*) FROM {table}") == 0, table
    assert stored_files(image_dir) == []


async def refused(
    gateway: Gateway,
    db: asyncpg.Pool,
    upstream: FakeUpstream,
    image_dir: Path,
    headers: dict[str, str],
    method: str,
    path: str,
    body: Any,
    param: str,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    response = await send(gateway, headers, method, path, body, **(params or {}))
    error = assert_error(response, 400, param=param)
    assert error["type"] == "invalid_request_error"
    await assert_nothing_done(gateway, db, upstream, image_dir)
    return error


# Chat: nothing of the body is stored, but whatever either parser refuses is a 400 naming its part.

CHAT = "/v1/chat/completions"


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "default-chat", "messages": [{"role": "user", "content": "Hello"}], **extra}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        pytest.param(chat(model=NUL), "model", id="nul-model"),
        pytest.param(chat(messages=[{"role": "user", "content": LONE}]), "messages.0.content", id="lone-content"),
        pytest.param(chat(model="m" * 10_000), "model", id="long-model"),
        pytest.param(chat(max_completion_tokens=2**64), "max_completion_tokens", id="huge-cap"),
        pytest.param(chat(n=2**64), "n", id="huge-n"),
        pytest.param(encoded(chat())[:-1] + b', "seed": 1e400}', "seed", id="beyond-double"),
        pytest.param(encoded(chat())[:-1] + b', "logit_bias": {"1": NaN}}', "logit_bias.1", id="nan"),
        pytest.param(encoded(chat(metadata={"k": LONE})), "metadata.k", id="lone-extra"),
    ],
)
async def test_chat(gateway: Gateway, db, upstream, image_dir: Path, caller, body: Any, param: str) -> None:
    await refused(gateway, db, upstream, image_dir, caller, "POST", CHAT, body, param)


async def test_chat_nesting_beyond_the_parser_names_the_field(
    gateway: Gateway, db, upstream, image_dir, caller
) -> None:
    body = encoded(chat())[:-1] + b', "tools": ' + b"[" * 300 + b"]" * 300 + b"}"
    response = await send(gateway, caller, "POST", CHAT, body)
    assert assert_error(response, 400)["param"].startswith("tools.0.0.0")
    await assert_nothing_done(gateway, db, upstream, image_dir)


async def test_chat_passes_a_nul_in_a_message_through(gateway: Gateway, upstream: FakeUpstream, caller) -> None:
    """The chat route stores no text of the body: a NUL is the upstream's to judge, as with OpenAI."""
    response = await send(gateway, caller, "POST", CHAT, chat(messages=[{"role": "user", "content": NUL}]))
    assert response.status_code == 200, response.text
    assert upstream.requests[-1].json["messages"][0]["content"] == NUL


# Threads, messages and runs.

RUNS = "/v1/threads/runs"
GET_OR_CREATE = "/v1/assistants/asst_coach/thread"


def message(content: Any = "hi", **extra: Any) -> dict[str, Any]:
    return {"role": "user", "content": content, **extra}


def run(**extra: Any) -> dict[str, Any]:
    return {"assistant_id": "asst_coach", **extra}


@pytest.mark.parametrize(
    ("method", "path", "body", "params", "param"),
    [
        ("POST", "/v1/threads", {"messages": [message(NUL)]}, None, "messages.0.content"),
        ("POST", "/v1/threads", {"messages": [message(LONE)]}, None, "messages.0.content"),
        ("POST", "/v1/threads", {"messages": [message("m" * 256_001)]}, None, "messages.0.content"),
        (
            "POST",
            "/v1/threads",
            {"messages": [message([{"type": "text", "text": NUL}])]},
            None,
            "messages.0.content.0.text",
        ),
        (
            "POST",
            "/v1/threads",
            {"messages": [message(metadata={"goal_id": LONE})]},
            None,
            "messages.0.metadata.goal_id",
        ),
        ("POST", "/v1/threads", {"metadata": {"title": NUL}}, None, "metadata.title"),
        ("POST", "/v1/threads", {"metadata": {"title": LONE}}, None, "metadata.title"),
        ("POST", "/v1/threads", {"metadata": {"title": "t" * 513}}, None, "metadata"),
        ("POST", "/v1/threads", {"metadata": {"k": NUL}}, None, "metadata.k"),
        ("POST", "/v1/threads", {"metadata": {NUL: "v"}}, None, "metadata.a\\u0000b.[key]"),
        ("POST", RUNS, {"assistant_id": NUL}, None, "assistant_id"),
        ("POST", RUNS, {"assistant_id": "a" * 121}, None, "assistant_id"),
        ("POST", RUNS, run(thread={"messages": [message(LONE)]}), None, "thread.messages.0.content"),
        ("POST", RUNS, run(thread={"metadata": {"title": NUL}}), None, "thread.metadata.title"),
        ("POST", RUNS, run(context={"k": NUL}), None, "context"),
        ("POST", GET_OR_CREATE, {"chat_type": LONE}, None, "chat_type"),
        ("POST", "/v1/assistants/a%00b/thread", {}, None, "assistant_id"),
        ("POST", GET_OR_CREATE, {"chat_type": "c" * 101}, None, "chat_type"),
        ("POST", GET_OR_CREATE, {"metadata": {"title": NUL}}, None, "metadata.title"),
        ("GET", "/v1/threads/a%00b", None, None, "thread_id"),
        ("DELETE", f"/v1/threads/{'t' * 65}", None, None, "thread_id"),
        ("GET", "/v1/threads", None, {"assistant_id": NUL}, "assistant_id"),
        ("GET", "/v1/threads", None, {"assistant_id": "a" * 121}, "assistant_id"),
        ("GET", "/v1/threads", None, {"metadata_key": NUL, "metadata_value": "v"}, "metadata_key"),
        ("GET", "/v1/threads", None, {"metadata_key": "k", "metadata_value": "v" * 513}, "metadata_value"),
        ("GET", "/v1/threads", None, {"metadata_key": "k"}, "metadata_key"),
        ("GET", "/v1/threads", None, {"limit": 2**64}, "limit"),
        ("GET", "/v1/threads", None, {"after": "c" * 65}, "after"),
        ("GET", "/v1/threads", None, {"after": NUL}, "after"),
        ("GET", "/v1/threads", None, {"after": f"thread_{NOT_HEX}"}, "after"),
        ("GET", "/v1/threads", None, {"before": f"msg_{ZEROS}"}, "before"),
        ("GET", "/v1/threads", None, {"before": f"thread_{ZEROS}0"}, "before"),
    ],
)
async def test_thread_routes(
    gateway: Gateway, db, upstream, image_dir: Path, caller, method, path, body, params, param
) -> None:
    await refused(gateway, db, upstream, image_dir, caller, method, path, body, param, params)
    assert await db.fetchval("SELECT count(*) FROM thread") == 0


@pytest.mark.parametrize(
    ("method", "suffix", "body", "params", "param"),
    [
        ("POST", "", {"metadata": {"title": NUL}}, None, "metadata.title"),
        ("POST", "", {"metadata": {"k": LONE}}, None, "metadata.k"),
        ("POST", "", {"metadata": {"title": "t" * 513}}, None, "metadata"),
        ("POST", "/messages", message(NUL), None, "content"),
        ("POST", "/messages", message(LONE), None, "content"),
        ("POST", "/messages", message("m" * 256_001), None, "content"),
        ("POST", "/messages", message([{"type": "text", "text": LONE}]), None, "content.0.text"),
        (
            "POST",
            "/messages",
            message([{"type": "image_url", "image_url": {"url": NUL}}]),
            None,
            "content.0.image_url.url",
        ),
        ("POST", "/messages", message(metadata={"goal_id": NUL}), None, "metadata.goal_id"),
        ("POST", "/messages", message(metadata={"goal_id": "g" * 513}), None, "metadata"),
        ("POST", "/messages", message(metadata={"chat_type": NUL}), None, "metadata.chat_type"),
        ("POST", "/messages", message(attachments=[{"file_id": NUL}]), None, "attachments.0.file_id"),
        ("POST", "/runs", {"assistant_id": NUL}, None, "assistant_id"),
        ("POST", "/runs", run(instructions=NUL), None, "instructions"),
        ("POST", "/runs", run(additional_instructions=LONE), None, "additional_instructions"),
        ("POST", "/runs", run(additional_messages=[message(NUL)]), None, "additional_messages.0.content"),
        ("POST", "/runs", run(metadata={"k": NUL}), None, "metadata.k"),
        ("POST", "/runs", run(max_completion_tokens=2**64), None, "max_completion_tokens"),
        ("POST", "/runs", encoded(run())[:-1] + b', "temperature": NaN}', None, "temperature"),
        ("POST", "/runs", run(context={"k": NUL}), None, "context"),
        ("POST", "/runs", run(context={LONE: 1}), None, "context"),
        ("POST", "/runs", run(context=deep(17)), None, "context"),
        ("POST", "/runs", run(context=deep(254)), None, "context"),
        ("POST", "/runs", run(context={"n": 2**64}), None, "context"),
        ("POST", "/runs", encoded(run())[:-1] + b', "context": {"n": NaN}}', None, "context"),
        ("POST", "/runs", encoded(run())[:-1] + b', "context": {"n": -Infinity}}', None, "context"),
        (
            "POST",
            f"/runs/run_{ZEROS}/submit_tool_outputs",
            {"tool_outputs": [{"tool_call_id": NUL, "output": "x"}]},
            None,
            "tool_outputs.0.tool_call_id",
        ),
        ("GET", "/messages", None, {"after": f"msg_{NOT_HEX}"}, "after"),
        ("GET", "/messages", None, {"after": f"run_{ZEROS}"}, "after"),
        ("GET", "/messages", None, {"before": "m" * 65}, "before"),
        ("GET", "/messages", None, {"before": NUL}, "before"),
        ("GET", "/messages", None, {"run_id": NUL}, "run_id"),
        ("GET", "/messages", None, {"run_id": f"msg_{ZEROS}"}, "run_id"),
        ("GET", "/runs", None, {"after": f"thread_{ZEROS}"}, "after"),
        ("GET", "/runs", None, {"limit": 2**64}, "limit"),
        ("GET", "/messages/a%00b", None, None, "message_id"),
        ("POST", "/runs/a%00b/cancel", None, None, "run_id"),
    ],
)
async def test_one_thread_routes(
    gateway: Gateway, db, upstream, image_dir: Path, caller, thread_id: str, method, suffix, body, params, param
) -> None:
    path = f"/v1/threads/{thread_id}{suffix}"
    await refused(gateway, db, upstream, image_dir, caller, method, path, body, param, params)


async def test_context_nesting_within_the_cap_is_answered(gateway: Gateway, caller, thread_id: str) -> None:
    body = run(context=deep(16), additional_messages=[message()])
    response = await send(gateway, caller, "POST", f"/v1/threads/{thread_id}/runs", body)
    assert response.status_code == 200, response.text
    path = f"/v1/threads/{thread_id}/runs/{response.json()['id']}"

    async def ended() -> dict[str, Any] | None:
        polled = (await send(gateway, caller, "GET", path)).json()
        return polled if polled["status"] not in ("queued", "in_progress") else None

    assert (await wait_for(ended, what="the run to end"))["status"] == "completed"


# Images and batches.


@pytest.mark.parametrize(
    ("method", "path", "body", "params", "param"),
    [
        ("POST", "/v1/images/generations", {"prompt": NUL}, None, "prompt"),
        ("POST", "/v1/images/generations", {"prompt": LONE}, None, "prompt"),
        ("POST", "/v1/images/generations", {"prompt": "fox", "user": NUL}, None, "user"),
        ("POST", "/v1/images/generations", {"prompt": "fox", "size": NUL}, None, "size"),
        ("POST", "/v1/images/generations", {"prompt": "fox", "model": "m" * 101}, None, "model"),
        ("POST", "/v1/images/generations", {"prompt": "fox", "n": 2**64}, None, "n"),
        ("POST", "/v1/images/estimate", {"prompt": NUL}, None, "prompt"),
        ("POST", f"/v1/images/{ZERO_ID}/regenerate", {"prompt": NUL}, None, "prompt"),
        ("POST", f"/v1/images/{ZERO_ID}/regenerate", {"quality": LONE}, None, "quality"),
        ("POST", "/v1/images/batches", {"items": [{"prompt": NUL}]}, None, "items.0.prompt"),
        ("POST", "/v1/images/batches", {"items": [{"prompt": "fox", "custom_id": NUL}]}, None, "items.0.custom_id"),
        ("POST", "/v1/images/batches", {"items": [{"prompt": "fox", "custom_id": LONE}]}, None, "items.0.custom_id"),
        ("POST", "/v1/images/batches", {"items": [{"prompt": "f", "custom_id": "c" * 201}]}, None, "items.0.custom_id"),
        ("GET", "/v1/images", None, {"after": image_cursor("0001-01-01T00:00:00+14:00")}, "after"),
        ("GET", "/v1/images", None, {"after": image_cursor("9999-12-31T23:59:59-14:00")}, "after"),
        ("GET", "/v1/images", None, {"after": image_cursor("2026-01-01T00:00:00+23:59:59.999999")}, "after"),
        ("GET", "/v1/images", None, {"after": image_cursor("2026-01-01T00:00:00")}, "after"),
        ("GET", "/v1/images", None, {"after": "c" * 201}, "after"),
    ],
)
async def test_image_routes(
    gateway: Gateway, db, upstream, image_dir: Path, caller, method, path, body, params, param
) -> None:
    await refused(gateway, db, upstream, image_dir, caller, method, path, body, param, params)


# Realtime and bring-your-own-key.


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"role": "student", "session": {"model": ["gpt-realtime-mini"]}}, "session.model"),
        ({"role": "student", "session": {"type": {"realtime": True}}}, "session.type"),
        ({"role": "student", "session": {"audio": {"output": {"voice": ["coral"]}}}}, "session.audio.output.voice"),
        ({"role": "student", "session": {"audio": ["output"]}}, "session.audio"),
        ({"role": "teacher", "session": {"instructions": NUL}}, "session.instructions"),
        ({"role": NUL}, "role"),
        ({"role": "student", "language": LONE}, "language"),
        ({"role": "r" * 101}, "role"),
    ],
)
async def test_realtime(gateway: Gateway, db, upstream, image_dir: Path, caller, body, param) -> None:
    await refused(gateway, db, upstream, image_dir, caller, "POST", "/v1/realtime/client_secrets", body, param)


@pytest.mark.parametrize("api_key", [f"sk-{NUL}-0123456789", f"sk-{LONE}-0123456789", "sk-" + "k" * 600])
async def test_byok(gateway: Gateway, db, upstream, image_dir: Path, caller, api_key: str) -> None:
    error = await refused(
        gateway, db, upstream, image_dir, caller, "PUT", "/v1/me/openai-key", {"api_key": api_key}, "api_key"
    )
    assert api_key not in error["message"]
    assert await db.fetchval("SELECT count(*) FROM user_openai_key") == 0


# Admin: keys, users, reports.

ADMIN = bearer(ADMIN_KEY)


@pytest.mark.parametrize(
    ("method", "path", "body", "params", "param"),
    [
        ("POST", "/admin/keys", {"user_id": NUL}, None, "user_id"),
        ("POST", "/admin/keys", {"user_id": LONE}, None, "user_id"),
        ("POST", "/admin/keys", {"user_id": LONG_USER}, None, "user_id"),
        ("POST", "/admin/keys", {"user_id": "alice", "name": NUL}, None, "name"),
        ("POST", "/admin/keys", {"user_id": "alice", "tier": LONE}, None, "tier"),
        ("GET", "/admin/keys", None, {"user_id": NUL}, "user_id"),
        ("GET", "/admin/keys", None, {"user_id": LONG_USER}, "user_id"),
        ("PATCH", "/admin/users/a%00b", {"tier": "pro"}, None, "user_id"),
        ("PATCH", f"/admin/users/{'u' * 301}", {"tier": "pro"}, None, "user_id"),
        ("PATCH", "/admin/users/alice", {"tier": NUL}, None, "tier"),
        ("PATCH", "/admin/users/alice", {"limit_overrides": {NUL: 1}}, None, "limit_overrides.a\\u0000b.[key]"),
        (
            "PATCH",
            "/admin/users/alice",
            {"limit_overrides": {"images_per_day": -1}},
            None,
            "limit_overrides.images_per_day",
        ),
        (
            "PATCH",
            "/admin/users/alice",
            {"limit_overrides": {"images_per_day": 1e300}},
            None,
            "limit_overrides.images_per_day",
        ),
        ("PATCH", "/admin/users/alice", {"limit_overrides": {"max_messages": 0}}, None, "limit_overrides.max_messages"),
        (
            "PATCH",
            "/admin/users/alice",
            b'{"limit_overrides": {"images_per_day": NaN}}',
            None,
            "limit_overrides.images_per_day",
        ),
        (
            "PATCH",
            "/admin/users/alice",
            b'{"limit_overrides": {"images_per_day": Infinity}}',
            None,
            "limit_overrides.images_per_day",
        ),
        ("GET", "/admin/reports/usage", None, {"end": "0001-01-01"}, "end"),
        ("GET", "/admin/reports/usage", None, {"end": "9999-12-31"}, "end"),
        ("GET", "/admin/reports/usage", None, {"start": "9999-12-31", "end": "2026-01-01"}, "start"),
        ("GET", "/admin/reports/usage", None, {"start": "0001-01-01", "end": "0001-01-02"}, "start"),
        ("GET", "/admin/reports/usage", None, {"start": "0001-01-02", "end": "9999-12-30"}, "end"),
        ("GET", "/admin/reports/usage", None, {"user_id": NUL}, "user_id"),
        ("GET", "/admin/reports/usage", None, {"user_id": LONG_USER}, "user_id"),
        ("GET", "/admin/reports/usage", None, {"group_by": "day," * 100}, "group_by"),
        ("GET", "/admin/reports/top-users", None, {"end": "9999-12-31"}, "end"),
        ("GET", "/admin/reports/top-users", None, {"limit": 2**64}, "limit"),
        ("GET", "/admin/reports/refusals", None, {"start": "0001-01-01", "end": "0001-01-01"}, "end"),
        ("GET", "/admin/reports/refusals", None, {"start": "0001-01-01", "end": "2026-01-01"}, "start"),
        ("GET", "/admin/reports/usage", None, {"group_by": "user", "after": NUL}, "after"),
        ("GET", "/admin/reports/usage", None, {"group_by": "user", "limit": 0}, "limit"),
        ("GET", "/admin/reports/usage", None, {"group_by": "user", "limit": 1001}, "limit"),
        ("POST", "/admin/vector_stores/a%00b/reindex", None, None, "vector_store_id"),
        ("DELETE", "/admin/users/a%00b/knowledge", None, None, "user_id"),
    ],
)
async def test_admin_routes(gateway: Gateway, db, upstream, image_dir: Path, method, path, body, params, param) -> None:
    await refused(gateway, db, upstream, image_dir, ADMIN, method, path, body, param, params)
    assert await db.fetchval("SELECT count(*) FROM app_user") == 0
    assert await db.fetchval("SELECT count(*) FROM api_key") == 0


@pytest.mark.parametrize("end", ["0001-01-02", "0001-01-20", "9999-12-30"])
async def test_reports_at_the_ends_of_the_calendar(gateway: Gateway, end: str) -> None:
    """The default start (29 days before `end`) stops at the first day a range may start on."""
    for path in ("/admin/reports/usage", "/admin/reports/top-users", "/admin/reports/refusals"):
        response = await gateway.admin("GET", path, params={"end": end})
        assert response.status_code == 200, response.text
        assert response.json()["start"] >= "0001-01-02"


async def test_a_user_id_at_the_column_width_is_taken(gateway: Gateway) -> None:
    user = "u" * 200
    response = await gateway.admin("PATCH", f"/admin/users/{user}", json={"tier": "pro"})
    assert response.status_code == 200, response.text
    assert (await gateway.admin("GET", "/admin/keys", params={"user_id": user})).status_code == 200


# Usage, through a JWT: its subject is the user id every statement filters on.


async def test_usage_with_an_over_long_subject(gateway: Gateway, upstream, db, image_dir: Path) -> None:
    response = await gateway.client.get("/v1/usage", headers=bearer(make_jwt(LONG_USER)))
    assert_error(response, 401)
    await assert_nothing_done(gateway, db, upstream, image_dir)


@pytest.mark.parametrize("subject", [NUL, LONE], ids=["nul", "lone"])
async def test_usage_with_an_unstorable_subject(gateway: Gateway, subject: str) -> None:
    response = await gateway.client.get("/v1/usage", headers=bearer(make_jwt(subject)))
    assert_error(response, 401)


# Errors quoting bad input still render.


async def test_an_error_can_name_a_key_with_a_lone_surrogate(gateway: Gateway, db, upstream, image_dir, caller) -> None:
    """The key is in the error's location: it must come back as JSON text, not fail the response."""
    response = await send(gateway, caller, "POST", "/v1/threads", {"metadata": {LONE: "v"}})
    param = assert_error(response, 400)["param"]
    assert param.startswith("metadata.a") and param.endswith("b.[key]")
    await assert_nothing_done(gateway, db, upstream, image_dir)
