"""Threads as a client sees them: conversations through the fake upstream, streamed events, context, retention.

A gateway for this module runs with its own assistants file (profiles made for the
tests) and a small aiohttp server that plays the app's context URL.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import httpx
import orjson
import pytest
import pytest_asyncio
from aiohttp import web
from sqlalchemy import event

from app.config import PACKAGE_DIR
from app.threads.context import ContextSource
from app.threads.profiles import load_profiles
from app.threads.retention import RETENTION_LOCK, prune_idle_threads
from support import internals
from support.auth import bearer, make_jwt
from support.errors import assert_error
from support.fake_upstream import CONTENT, CONTENT_PIECES, FakeUpstream, Reply
from support.gateway import Gateway, GatewayFactory, app_command, make_settings
from support.tcp_proxy import TcpProxy
from support.waiting import usage_rows, wait_for

CHAT = "/v1/chat/completions"
CONTEXT_TOKEN = "ctx-token-0123456789"


class ContextServer:
    """The app's context endpoint: answers per user, records each call, can fail or dawdle."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.status = 200
        self.contexts: dict[str, dict[str, Any]] = {}
        self.redirect_to = ""
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/context", self._context)
        app.router.add_get("/slow", self._slow)
        app.router.add_get("/redirect", self._redirect)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    def reset(self) -> None:
        self.calls.clear()
        self.contexts.clear()
        self.status = 200
        self.redirect_to = ""

    def _record(self, request: web.Request) -> str:
        self.calls.append(
            {"path": request.path, "query": dict(request.query), "auth": request.headers.get("Authorization")}
        )
        return request.query.get("user_id", "")

    async def _context(self, request: web.Request) -> web.Response:
        user = self._record(request)
        if self.status != 200:
            return web.json_response({"error": "down"}, status=self.status)
        return web.json_response(self.contexts.get(user, {"mood": "curious", "streak": 3}))

    async def _redirect(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.Response(status=302, headers={"Location": self.redirect_to})

    async def _slow(self, request: web.Request) -> web.Response:
        self._record(request)
        await asyncio.sleep(5)
        return web.json_response({"never": "seen"})


def profiles_toml(port: int) -> str:
    base = f"http://127.0.0.1:{port}"
    return f"""
title = "test assistants: only [profile.*] is read by threads"

[unrelated_table]
anything = ["goes"]

[profile.tutor]
model = "default-chat"
instructions = "You tutor for {{{{user_id}}}}. Student: {{{{context.student}}}}."
temperature = 0.5
max_tokens = 300
history_messages = 4
fallback = "never"

[profile.tutor.shortcuts]
"/ptm" = "Prepare a parent-teacher meeting about {{{{args}}}}."
"/lesson" = "Plan a lesson."

[profile.coach]
instructions = "You coach. Chat type: {{{{chat_type}}}}."
chat_types = ["general"]
context_url = "{base}/context"
context_ttl_seconds = 60

[profile.coach_health]
instructions = "Health coach for goal {{{{goal_id}}}}."
chat_types = ["pillar_health"]
context_url = "{base}/context"
context_ttl_seconds = 60

[profile.budget]
instructions = "Brief."
history_messages = 50
history_tokens = 10

[profile.slow_context]
instructions = "Slow."
context_url = "{base}/slow"
context_timeout_seconds = 0.2

[profile.redirected]
instructions = "Redirected."
context_url = "{base}/redirect"

[profile.rescue]
instructions = "Rescue."
fallback = "simulated"

[profile.premium]
model = "smart-chat"
instructions = "Premium."
tiers = ["pro"]
"""


@pytest_asyncio.fixture(scope="module")
async def context_server() -> AsyncIterator[ContextServer]:
    server = ContextServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
def assistants_file(context_server: ContextServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("threads") / "assistants.toml"
    path.write_text(profiles_toml(context_server.port))
    return path


THREAD_SETTINGS: dict[str, Any] = {"thread_context_token": CONTEXT_TOKEN}


@pytest.fixture(scope="module")
def gateway_settings(assistants_file: Path) -> dict[str, Any]:
    """The module's gateways read the test profiles."""
    return {"assistants_file": assistants_file, **THREAD_SETTINGS}


@pytest.fixture
def gw(gateway: Gateway, context_server: ContextServer) -> Gateway:
    context_server.reset()
    return gateway


async def user(gateway: Gateway, tier: str = "pro") -> tuple[str, dict[str, str]]:
    key, user_id = await gateway.key(tier)
    return user_id, bearer(key)


async def new_thread(gateway: Gateway, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    response = await gateway.client.post("/v1/threads", json={"profile": "tutor", **body}, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


async def say(gateway: Gateway, headers: dict[str, str], thread_id: str, content: str, **extra: Any) -> httpx.Response:
    return await gateway.client.post(
        f"/v1/threads/{thread_id}/messages", json={"content": content, **extra}, headers=headers
    )


def parse_sse(body: str) -> list[tuple[str, Any]]:
    """(event, data) pairs in order; comment blocks (keep-alives) are skipped."""
    events = []
    for block in body.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        fields = dict(line.split(": ", 1) for line in lines)
        events.append((fields["event"], orjson.loads(fields["data"])))
    return events


async def stream_turn(
    gateway: Gateway, headers: dict[str, str], thread_id: str, content: str, **extra: Any
) -> tuple[httpx.Response, list[tuple[str, Any]]]:
    async with gateway.client.stream(
        "POST",
        f"/v1/threads/{thread_id}/messages",
        json={"content": content, "stream": True, **extra},
        headers=headers,
    ) as response:
        body = (await response.aread()).decode()
    return response, parse_sse(body) if response.status_code == 200 else []


async def stored(db: asyncpg.Pool, thread_id: str) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM thread_message WHERE thread_id = $1 ORDER BY seq", uuid.UUID(thread_id))


def gpt5_mini_cost(prompt: int, completion: int, cached: int = 0) -> float:
    return ((prompt - cached) * 0.25 + cached * 0.025 + completion * 2.0) / 1_000_000


# --- profiles -------------------------------------------------------------------------------


def test_shipped_profiles_load_beside_voice_presets() -> None:
    profiles = load_profiles(PACKAGE_DIR / "assistants.toml")
    assert {"teacher", "coach"} <= set(profiles.profiles)
    assert set(profiles.profiles["teacher"].shortcuts) == {"/ptm", "/lesson", "/progress"}
    assert profiles.for_chat_type("pillar_health").name == "coach_health"
    assert profiles.for_chat_type("journal_reflection").name == "coach_journal"


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ('[profile.a]\ninstructions = "x"\ntemperature = 5', "profile.a.temperature"),
        ('[profile.a]\ninstructions = "Hi {{nope}}"', "{{nope}}"),
        ('[profile.a]\ninstructions = "x"\n[profile.a.shortcuts]\n"/x" = "{{context}}"', "{{context}}"),
        ('[profile.a]\ninstructions = "x"\n[profile.a.shortcuts]\n"ptm" = "y"', "'ptm'"),
        (
            '[profile.a]\ninstructions = "x"\nchat_types = ["g"]\n[profile.b]\ninstructions = "y"\nchat_types = ["g"]',
            "'g'",
        ),
        ('[profile.a]\ninstructions = "x"\ncontext_url = "ftp://x"', "profile.a.context_url"),
        ('[profile.a]\ninstructions = "x"\nhistory_mesages = 3', "history_mesages"),
        ('[profile.Bad]\ninstructions = "x"', "'Bad'"),
        ("[voice_preset.a]\nanything = 1", "profile"),
        ("[profile.a\n", "ASSISTANTS_FILE"),
    ],
)
def test_a_bad_profiles_file_stops_start_up_naming_the_problem(tmp_path: Path, table: str, named: str) -> None:
    path = tmp_path / "assistants.toml"
    path.write_text(table)
    with pytest.raises(SystemExit) as stopped:
        load_profiles(path)
    message = str(stopped.value)
    assert message.startswith(f"invalid ASSISTANTS_FILE {path}")
    assert named in message, message


def test_only_the_profile_table_is_read(assistants_file: Path) -> None:
    profiles = load_profiles(assistants_file)
    assert set(profiles.profiles) == {
        "tutor",
        "coach",
        "coach_health",
        "budget",
        "slow_context",
        "redirected",
        "rescue",
        "premium",
    }
    assert profiles.max_history == 50


# --- the threads API --------------------------------------------------------------------------


async def test_create_get_update_delete(gw: Gateway, db: asyncpg.Pool) -> None:
    user_id, headers = await user(gw)
    created = await new_thread(gw, headers, title="Maths", metadata={"class": "5B"})
    assert created["object"] == "thread" and created["profile"] == "tutor"
    assert created["title"] == "Maths" and created["metadata"] == {"class": "5B"}
    thread_id = created["id"]
    assert (await gw.client.get(f"/v1/threads/{thread_id}", headers=headers)).json() == created

    patched = await gw.client.patch(f"/v1/threads/{thread_id}", json={"metadata": {"term": "2"}}, headers=headers)
    assert patched.status_code == 200
    assert patched.json()["title"] == "Maths" and patched.json()["metadata"] == {"term": "2"}
    assert patched.json()["updated_at"] > created["updated_at"]

    assert (await say(gw, headers, thread_id, "Hello")).status_code == 200
    deleted = await gw.client.delete(f"/v1/threads/{thread_id}", headers=headers)
    assert deleted.json() == {"id": thread_id, "object": "thread.deleted", "deleted": True}
    assert_error(await gw.client.get(f"/v1/threads/{thread_id}", headers=headers), 404, code="thread_not_found")
    assert await stored(db, thread_id) == []  # the messages went with it
    assert await db.fetchval("SELECT count(*) FROM thread WHERE user_id = $1", user_id) == 0


async def test_a_chat_type_names_the_profile(gw: Gateway) -> None:
    _, headers = await user(gw)
    response = await gw.client.post("/v1/threads", json={"chat_type": "pillar_health"}, headers=headers)
    assert response.status_code == 201 and response.json()["profile"] == "coach_health"


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"profile": "nobody"}, "profile", "unknown_profile"),
        ({}, "profile", None),
        ({"chat_type": "astrology"}, "chat_type", "unknown_chat_type"),
        ({"profile": "tutor", "chat_type": "general"}, "chat_type", None),
        ({"profile": "tutor", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", None),
        ({"profile": "tutor", "title": "x" * 201}, "title", None),
        ({"profile": "tutor", "colour": "red"}, "colour", None),
    ],
)
async def test_bad_thread_bodies(gw: Gateway, db: asyncpg.Pool, body: dict[str, Any], param: str, code: str) -> None:
    user_id, headers = await user(gw, "free")
    response = await gw.client.post("/v1/threads", json=body, headers=headers)
    assert_error(response, 400, param=param, code=code)
    assert await db.fetchval("SELECT count(*) FROM thread WHERE user_id = $1", user_id) == 0


async def test_get_or_create_returns_the_users_thread_for_a_profile(gw: Gateway, db: asyncpg.Pool) -> None:
    _, headers = await user(gw)
    first = await gw.client.post("/v1/threads/get-or-create", json={"profile": "coach"}, headers=headers)
    assert first.status_code == 201
    again = await gw.client.post("/v1/threads/get-or-create", json={"chat_type": "general"}, headers=headers)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    other = await gw.client.post("/v1/threads/get-or-create", json={"profile": "tutor"}, headers=headers)
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
    _, stranger = await user(gw)
    theirs = await gw.client.post("/v1/threads/get-or-create", json={"profile": "coach"}, headers=stranger)
    assert theirs.status_code == 201 and theirs.json()["id"] != first.json()["id"]

    # Concurrent first calls of a new user still make one thread.
    newcomer_id, newcomer = await user(gw)
    answers = await asyncio.gather(
        *[gw.client.post("/v1/threads/get-or-create", json={"profile": "coach"}, headers=newcomer) for _ in range(6)]
    )
    assert sorted(a.status_code for a in answers) == [200] * 5 + [201]
    assert len({a.json()["id"] for a in answers}) == 1
    assert await db.fetchval("SELECT count(*) FROM thread WHERE user_id = $1", newcomer_id) == 1


async def test_another_users_thread_is_a_404_everywhere(gw: Gateway, db: asyncpg.Pool, upstream: FakeUpstream) -> None:
    owner_id, owner = await user(gw)
    thread_id = (await new_thread(gw, owner, title="private"))["id"]
    assert (await say(gw, owner, thread_id, "secret")).status_code == 200
    _, stranger = await user(gw)
    missing = str(uuid.uuid4())
    for method, path, body in [
        ("GET", "", None),
        ("PATCH", "", {"title": "mine now"}),
        ("DELETE", "", None),
        ("GET", "/messages", None),
        ("POST", "/messages", {"content": "hi"}),
        ("POST", "/messages", {"content": "hi", "stream": True}),
    ]:
        theirs = await gw.client.request(method, f"/v1/threads/{thread_id}{path}", json=body, headers=stranger)
        nothing = await gw.client.request(method, f"/v1/threads/{missing}{path}", json=body, headers=stranger)
        error = assert_error(theirs, 404, code="thread_not_found", param="thread_id")
        # Word for word what a thread that does not exist gets: nothing confirms it is there.
        assert error["message"].replace(thread_id, "ID") == assert_error(nothing, 404)["message"].replace(missing, "ID")
    listed = await gw.client.get("/v1/threads", headers=stranger)
    assert listed.json()["data"] == []
    assert len(upstream.requests) == 1
    assert [r["content"] for r in await stored(db, thread_id)] == ["secret", CONTENT]
    assert (await gw.client.get(f"/v1/threads/{thread_id}", headers=owner)).json()["title"] == "private"
    # A JWT whose subject is the owner's id is another user (JWT_USER_PREFIX): it sees nothing.
    via_jwt = await gw.client.get(f"/v1/threads/{thread_id}", headers=bearer(make_jwt(owner_id)))
    assert_error(via_jwt, 404, code="thread_not_found")


async def test_threads_are_listed_newest_first_in_stable_pages(gw: Gateway) -> None:
    _, headers = await user(gw)
    ids = [(await new_thread(gw, headers, title=str(n)))["id"] for n in range(5)]
    await new_thread(gw, headers, profile="coach")
    first = (await gw.client.get("/v1/threads", params={"limit": 2, "profile": "tutor"}, headers=headers)).json()
    assert [t["id"] for t in first["data"]] == [ids[4], ids[3]] and first["has_more"] is True
    await new_thread(gw, headers, title="late")  # arrives between pages: no repeat, no skip
    second = await gw.client.get(
        "/v1/threads", params={"limit": 2, "profile": "tutor", "cursor": first["next_cursor"]}, headers=headers
    )
    assert [t["id"] for t in second.json()["data"]] == [ids[2], ids[1]]
    last = await gw.client.get(
        "/v1/threads", params={"limit": 2, "profile": "tutor", "cursor": second.json()["next_cursor"]}, headers=headers
    )
    assert [t["id"] for t in last.json()["data"]] == [ids[0]]
    assert last.json()["has_more"] is False and last.json()["next_cursor"] is None
    everything = (await gw.client.get("/v1/threads", params={"limit": 100}, headers=headers)).json()
    assert len(everything["data"]) == 7 and everything["data"][0]["title"] == "late"


async def test_messages_page_in_either_order(gw: Gateway) -> None:
    _, headers = await user(gw)
    thread_id = (await new_thread(gw, headers))["id"]
    for n in range(3):
        assert (await say(gw, headers, thread_id, f"question {n}")).status_code == 200
    path = f"/v1/threads/{thread_id}/messages"
    oldest = (await gw.client.get(path, params={"order": "asc", "limit": 4}, headers=headers)).json()
    assert [m["content"] for m in oldest["data"]] == ["question 0", CONTENT, "question 1", CONTENT]
    assert [m["role"] for m in oldest["data"]] == ["user", "assistant"] * 2
    rest = (
        await gw.client.get(path, params={"order": "asc", "limit": 4, "cursor": oldest["next_cursor"]}, headers=headers)
    ).json()
    assert [m["content"] for m in rest["data"]] == ["question 2", CONTENT] and rest["has_more"] is False

    newest = (await gw.client.get(path, params={"limit": 3}, headers=headers)).json()  # desc by default
    assert [m["content"] for m in newest["data"]] == [CONTENT, "question 2", CONTENT]
    assert (await say(gw, headers, thread_id, "question 3")).status_code == 200  # new messages: pages hold still
    older = (await gw.client.get(path, params={"limit": 3, "cursor": newest["next_cursor"]}, headers=headers)).json()
    assert [m["content"] for m in older["data"]] == ["question 1", CONTENT, "question 0"]
    assert older["has_more"] is False


@pytest.mark.parametrize(
    ("path", "params", "param"),
    [
        ("/v1/threads", {"cursor": "not-a-cursor"}, "cursor"),
        ("/v1/threads", {"cursor": "WyJtIiwzXQ"}, "cursor"),  # a message cursor
        ("/v1/threads", {"limit": 0}, "limit"),
        ("/v1/threads", {"limit": 101}, "limit"),
        ("/messages", {"cursor": "eyJhIjogMX0"}, "cursor"),
        ("/messages", {"order": "sideways"}, "order"),
    ],
)
async def test_bad_pagination_is_400(gw: Gateway, path: str, params: dict[str, Any], param: str) -> None:
    _, headers = await user(gw)
    if path == "/messages":
        path = f"/v1/threads/{(await new_thread(gw, headers))['id']}/messages"
    assert_error(await gw.client.get(path, params=params, headers=headers), 400, param=param)


async def test_unknown_and_malformed_thread_ids(gw: Gateway) -> None:
    _, headers = await user(gw)
    assert_error(await say(gw, headers, str(uuid.uuid4()), "hi"), 404, code="thread_not_found")
    assert_error(await gw.client.get("/v1/threads/not-a-uuid", headers=headers), 400, param="thread_id")
    assert_error(await gw.client.get("/v1/threads"), 401)


# --- turns ------------------------------------------------------------------------------------


async def test_a_conversation_sends_the_exact_prompt_and_stores_the_history(
    gw: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    user_id, headers = await user(gw)
    thread_id = (await new_thread(gw, headers))["id"]
    first = await say(gw, headers, thread_id, "What is a fraction?", context={"student": "Alex"}, goal_id="g-7")
    assert first.status_code == 200, first.text
    answer = first.json()
    assert answer["object"] == "thread.turn" and answer["thread_id"] == thread_id
    assert answer["message"]["role"] == "assistant" and answer["message"]["content"] == CONTENT
    assert answer["message"]["status"] == "completed" and answer["message"]["goal_id"] == "g-7"
    assert answer["message"]["usage"] == {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    assert answer["user_message"]["content"] == "What is a fraction?"
    assert answer["tokens_used"] == 18 and answer["model_used"] == "gpt-5-mini" and answer["simulated"] is False
    assert answer["cost_estimate"] == pytest.approx(gpt5_mini_cost(11, 7, 2))
    assert first.headers["x-ratelimit-limit-requests"] == "120"
    assert first.headers["x-upstream-request-id"] == "req_fake_1"
    assert upstream.requests[-1].json == {
        "model": "gpt-5-mini",
        "messages": [
            {"role": "system", "content": f"You tutor for {user_id}. Student: Alex."},
            {"role": "user", "content": "What is a fraction?"},
        ],
        "temperature": 0.5,
        "max_completion_tokens": 300,
    }

    second = await say(gw, headers, thread_id, "And a decimal?")
    assert second.status_code == 200
    assert upstream.requests[-1].json["messages"] == [
        {"role": "system", "content": f"You tutor for {user_id}. Student: ."},  # no context this time
        {"role": "user", "content": "What is a fraction?"},
        {"role": "assistant", "content": CONTENT},
        {"role": "user", "content": "And a decimal?"},
    ]
    rows = await stored(db, thread_id)
    assert [(r["role"], r["content"], r["status"]) for r in rows] == [
        ("user", "What is a fraction?", "completed"),
        ("assistant", CONTENT, "completed"),
        ("user", "And a decimal?", "completed"),
        ("assistant", CONTENT, "completed"),
    ]
    assert rows[1]["model"] == "gpt-5-mini" and rows[1]["prompt_tokens"] == 11 and rows[1]["cost_usd"] > 0
    assert rows[1]["id"] == uuid.UUID(answer["message"]["id"])
    usage = await usage_rows(db, count=2, user_id=user_id)
    assert [(u["route"], u["status"], u["thread_id"]) for u in usage] == [
        ("threads.messages", "ok", uuid.UUID(thread_id))
    ] * 2
    assert usage[0]["cost_usd"] == Decimal(str(round(gpt5_mini_cost(11, 7, 2), 8)))
    thread = (await gw.client.get(f"/v1/threads/{thread_id}", headers=headers)).json()
    assert thread["updated_at"] > answer["message"]["created_at"]


async def test_the_history_window_keeps_the_last_messages(gw: Gateway, upstream: FakeUpstream) -> None:
    user_id, headers = await user(gw)
    thread_id = (await new_thread(gw, headers))["id"]  # tutor: history_messages = 4
    for n in range(4):
        assert (await say(gw, headers, thread_id, f"turn {n}")).status_code == 200
    assert upstream.requests[-1].json["messages"] == [
        {"role": "system", "content": f"You tutor for {user_id}. Student: ."},
        {"role": "user", "content": "turn 1"},
        {"role": "assistant", "content": CONTENT},
        {"role": "user", "content": "turn 2"},
        {"role": "assistant", "content": CONTENT},
        {"role": "user", "content": "turn 3"},
    ]


async def test_the_history_window_keeps_to_its_token_budget(gw: Gateway, upstream: FakeUpstream) -> None:
    _, headers = await user(gw)
    thread_id = (await new_thread(gw, headers, profile="budget"))["id"]  # history_tokens = 10
    for text in ("x" * 20, "y" * 8):  # 5 and 2 tokens; each reply is 8 tokens
        assert (await say(gw, headers, thread_id, text)).status_code == 200
    # Newest first: the reply (8 tokens) fits, "x"*20 (5 more) would pass 10.
    assert upstream.requests[-1].json["messages"][1:] == [
        {"role": "assistant", "content": CONTENT},
        {"role": "user", "content": "y" * 8},
    ]
    assert (await say(gw, headers, thread_id, "z")).status_code == 200
    # The reply (8) and "y"*8 (2) make exactly 10; the reply before would pass it.
    assert upstream.requests[-1].json["messages"][1:] == [
        {"role": "user", "content": "y" * 8},
        {"role": "assistant", "content": CONTENT},
        {"role": "user", "content": "z"},
    ]


async def test_shortcuts_expand_upstream_but_are_stored_as_typed(
    gw: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    _, headers = await user(gw)
    thread_id = (await new_thread(gw, headers))["id"]
    answer = await say(gw, headers, thread_id, "/ptm Alex and his parents")
    assert upstream.requests[-1].json["messages"][-1] == {
        "role": "user",
        "content": "Prepare a parent-teacher meeting about Alex and his parents.",
    }
    assert answer.json()["user_message"]["content"] == "/ptm Alex and his parents"
    await say(gw, headers, thread_id, "/lesson fractions for year 5")
    assert upstream.requests[-1].json["messages"][-1]["content"] == "Plan a lesson.\n\nfractions for year 5"
    await say(gw, headers, thread_id, "/shrug not a shortcut")
    sent = upstream.requests[-1].json["messages"]
    assert sent[-1]["content"] == "/shrug not a shortcut"
    assert sent[1]["content"] == "Prepare a parent-teacher meeting about Alex and his parents."  # history: as sent
    rows = await stored(db, thread_id)
    assert [r["content"] for r in rows if r["role"] == "user"] == [
        "/ptm Alex and his parents",
        "/lesson fractions for year 5",
        "/shrug not a shortcut",
    ]


async def test_chat_type_switches_the_turns_profile_and_context(
    gw: Gateway, upstream: FakeUpstream, db: asyncpg.Pool, context_server: ContextServer
) -> None:
    user_id, headers = await user(gw)
    thread_id = (await gw.client.post("/v1/threads", json={"chat_type": "general"}, headers=headers)).json()["id"]
    context_server.contexts[user_id] = {"name": "Sam", "goals": ["sleep", "walk"], "streak": 4}
    await say(gw, headers, thread_id, "Hi", chat_type="general", context={"streak": 5, "today": "tired"})
    assert upstream.requests[-1].json["messages"] == [
        {"role": "system", "content": "You coach. Chat type: general."},
        {
            "role": "system",
            "content": "Context about the user, from the app:\n"
            'goals: ["sleep","walk"]\nname: Sam\nstreak: 5\ntoday: tired',
        },
        {"role": "user", "content": "Hi"},
    ]
    health = await say(gw, headers, thread_id, "Sleep tips?", chat_type="pillar_health", goal_id="sleep-8h")
    assert health.json()["message"]["chat_type"] == "pillar_health"
    sent = upstream.requests[-1].json["messages"]
    assert sent[0] == {"role": "system", "content": "Health coach for goal sleep-8h."}
    assert sent[1]["content"].endswith("name: Sam\nstreak: 4")  # the request's context was for that turn only
    assert sent[2:] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": CONTENT},
        {"role": "user", "content": "Sleep tips?"},
    ]
    assert [c["query"]["profile"] for c in context_server.calls] == ["coach", "coach_health"]
    rows = await stored(db, thread_id)
    assert [(r["chat_type"], r["goal_id"]) for r in rows] == [
        ("general", None),
        ("general", None),
        ("pillar_health", "sleep-8h"),
        ("pillar_health", "sleep-8h"),
    ]
    assert_error(await say(gw, headers, thread_id, "x", chat_type="astrology"), 400, param="chat_type")


async def test_bad_turns_are_refused_before_anything_is_stored(gw: Gateway, db: asyncpg.Pool, upstream) -> None:
    _, headers = await user(gw, "free")
    thread_id = (await new_thread(gw, headers))["id"]
    too_big = {"notes": "x" * 17_000}
    assert_error(
        await say(gw, headers, thread_id, "hi", context=too_big), 400, param="context", code="context_too_large"
    )
    assert_error(await say(gw, headers, thread_id, ""), 400, param="content")
    assert_error(await say(gw, headers, thread_id, "x" * 64_001), 400, param="content")  # the free tier's prompt cap
    assert_error(await say(gw, headers, thread_id, "hi", context=["a", "list"]), 400, param="context")
    assert_error(await say(gw, headers, thread_id, "hi", model="gpt-5"), 400, param="model")
    assert upstream.requests == [] and await stored(db, thread_id) == []
    assert (await say(gw, headers, thread_id, "fine")).status_code == 200  # and the thread is not left locked


async def test_the_tier_caps_the_window_not_the_user(gw: Gateway, upstream: FakeUpstream) -> None:
    _, headers = await user(gw, "free")  # max_prompt_chars 64000
    thread_id = (await new_thread(gw, headers))["id"]
    for text in ("a" * 40_000, "b" * 30_000):
        assert (await say(gw, headers, thread_id, text)).status_code == 200
    sent = upstream.requests[-1].json["messages"]
    assert [m["content"][:1] for m in sent[1:]] == ["H", "b"]  # the 40,000-character turn no longer fits
    assert sum(len(m["content"]) for m in sent) <= 64_000


async def test_a_failed_turn_leaves_no_trace(gw: Gateway, upstream: FakeUpstream, db: asyncpg.Pool) -> None:
    user_id, headers = await user(gw)
    thread_id = (await new_thread(gw, headers))["id"]  # tutor: fallback = never
    upstream.script(CHAT, *[Reply(status=500)] * 3)
    assert_error(await say(gw, headers, thread_id, "hello?"), 502, code="upstream_error")
    assert await stored(db, thread_id) == []
    [row] = await usage_rows(db, user_id=user_id)
    assert (row["status"], row["thread_id"], row["route"]) == ("error", uuid.UUID(thread_id), "threads.messages")
    assert (await say(gw, headers, thread_id, "hello again")).status_code == 200
    assert upstream.requests[-1].json["messages"][1:] == [{"role": "user", "content": "hello again"}]


async def test_limits_apply_to_turns(gw: Gateway, db: asyncpg.Pool, upstream: FakeUpstream) -> None:
    user_id, headers = await user(gw, "free")
    limits = {"limit_overrides": {"chat_requests_per_minute": 1}}
    assert (await gw.admin("PATCH", f"/admin/users/{user_id}", json=limits)).status_code == 200
    await asyncio.sleep(0.1)  # the NOTIFY reaches the principal cache
    thread_id = (await new_thread(gw, headers))["id"]
    assert (await say(gw, headers, thread_id, "one")).status_code == 200
    refused = await say(gw, headers, thread_id, "two")
    assert_error(refused, 429, code="rate_limit_exceeded")
    assert refused.headers["retry-after"]
    assert [r["content"] for r in await stored(db, thread_id)] == ["one", CONTENT]
    assert len(upstream.requests) == 1


async def test_profile_fallback_answers_simulated(gw: Gateway, upstream: FakeUpstream, db: asyncpg.Pool) -> None:
    user_id, headers = await user(gw)
    thread_id = (await new_thread(gw, headers, profile="rescue"))["id"]
    upstream.script(CHAT, *[Reply(status=503)] * 6)
    answer = await say(gw, headers, thread_id, "anyone there?")
    assert answer.status_code == 200
    assert answer.headers["x-gateway-fallback"] == "true" and answer.headers["x-gateway-simulated"] == "true"
    body = answer.json()
    assert body["simulated"] is True and body["cost_estimate"] == 0 and body["message"]["simulated"] is True
    response, events = await stream_turn(gw, headers, thread_id, "still there?")
    assert response.headers["x-gateway-fallback"] == "true"
    assert events[-2][0] == "message.completed" and events[-2][1]["simulated"] is True
    rows = await usage_rows(db, count=2, user_id=user_id)
    assert [r["status"] for r in rows] == ["fallback", "fallback"] and all(r["cost_usd"] == 0 for r in rows)
    assert [r["simulated"] for r in await stored(db, thread_id)] == [False, True, False, True]


async def test_simulated_mode_threads(gateway_with: GatewayFactory, assistants_file: Path, db: asyncpg.Pool) -> None:
    async with gateway_with(simulated=True, assistants_file=assistants_file) as sim:
        key, user_id = await sim.key("pro")
        headers = bearer(key)
        thread_id = (await new_thread(sim, headers))["id"]
        plain = (await say(sim, headers, thread_id, "Hi")).json()
        assert plain["simulated"] is True and plain["cost_estimate"] == 0 and plain["message"]["content"]
        _, events = await stream_turn(sim, headers, thread_id, "Hi")
        text = "".join(data["content"] for name, data in events if name == "message.delta")
        assert text == plain["message"]["content"]  # deterministic per last user message
        rows = await usage_rows(db, count=2, user_id=user_id)
        assert {r["status"] for r in rows} == {"simulated"}


# --- streamed turns ---------------------------------------------------------------------------


async def test_streamed_turn_events_in_order(gw: Gateway, upstream: FakeUpstream, db: asyncpg.Pool) -> None:
    user_id, headers = await user(gw)
    thread_id = (await new_thread(gw, headers))["id"]
    response, events = await stream_turn(gw, headers, thread_id, "/ptm Kim")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    names = [name for name, _ in events]
    assert names == ["message.created", "message.created", *["message.delta"] * 5, "message.completed", "done"]
    user_message, reply = events[0][1], events[1][1]
    assert (user_message["role"], user_message["content"], user_message["status"]) == ("user", "/ptm Kim", "completed")
    assert (reply["role"], reply["status"], reply["content"]) == ("assistant", "in_progress", "")
    deltas = [data for name, data in events if name == "message.delta"]
    assert tuple(d["content"] for d in deltas) == CONTENT_PIECES
    assert {d["id"] for d in deltas} == {reply["id"]} and {d["thread_id"] for d in deltas} == {thread_id}
    completed = events[-2][1]
    assert completed["message"]["id"] == reply["id"] and completed["message"]["content"] == CONTENT
    assert completed["message"]["status"] == "completed" and completed["tokens_used"] == 18
    assert completed["user_message"]["id"] == user_message["id"]
    assert events[-1][1] == {"status": "completed", "message_id": reply["id"]}

    sent = upstream.requests[-1].json
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["messages"][-1] == {"role": "user", "content": "Prepare a parent-teacher meeting about Kim."}
    rows = await stored(db, thread_id)
    assert [(str(r["id"]), r["content"], r["status"]) for r in rows] == [
        (user_message["id"], "/ptm Kim", "completed"),
        (reply["id"], CONTENT, "completed"),
    ]
    [usage] = await usage_rows(db, user_id=user_id)
    assert usage["stream"] is True and usage["status"] == "ok" and usage["thread_id"] == uuid.UUID(thread_id)
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (11, 7) and usage["ttft_ms"] is not None


async def test_an_upstream_failure_mid_stream(gw: Gateway, upstream: FakeUpstream, db: asyncpg.Pool) -> None:
    user_id, headers = await user(gw)
    thread_id = (await new_thread(gw, headers))["id"]
    upstream.script(CHAT, Reply(error_after=3))
    _, events = await stream_turn(gw, headers, thread_id, "go")
    names = [name for name, _ in events]
    assert names == ["message.created", "message.created", "message.delta", "message.delta", "error", "done"]
    error = events[-2][1]["error"]
    assert error["code"] == "upstream_error" and "upstream exploded" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert events[-1][1] == {"status": "incomplete", "message_id": events[1][1]["id"]}
    reply = (await stored(db, thread_id))[-1]
    assert (reply["content"], reply["status"], reply["incomplete_reason"]) == (
        "Hello from",
        "incomplete",
        "upstream_error",
    )
    [usage] = await usage_rows(db, user_id=user_id)
    assert usage["status"] == "error" and usage["tokens_estimated"] is True


async def test_a_failure_before_the_stream_is_an_http_error(gw: Gateway, upstream: FakeUpstream, db) -> None:
    _, headers = await user(gw)
    thread_id = (await new_thread(gw, headers))["id"]
    upstream.script(CHAT, *[Reply(status=500)] * 3)
    response, _ = await stream_turn(gw, headers, thread_id, "go")
    assert response.status_code == 502
    assert await stored(db, thread_id) == []


async def test_a_client_that_leaves_mid_stream_gets_the_partial_reply_stored(
    gw: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    user_id, headers = await user(gw)
    thread_id = (await new_thread(gw, headers))["id"]
    upstream.script(CHAT, Reply(chunk_delay=0.3))
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            f"{gw.url}/v1/threads/{thread_id}/messages", json={"content": "tell me", "stream": True}, headers=headers
        )
        seen = b""
        while b"event: message.delta" not in seen:
            seen += await response.content.readany()
        response.close()  # the phone went into a tunnel
    assert await upstream.wait_streams_closed(timeout=3), "the upstream stream was left open"

    async def partial() -> asyncpg.Record | None:
        rows = await stored(db, thread_id)
        return rows[-1] if len(rows) == 2 else None

    reply = await wait_for(partial)
    assert reply is not None and reply["role"] == "assistant"
    assert reply["status"] == "incomplete" and reply["incomplete_reason"] == "client_disconnected"
    assert reply["content"].startswith("Hello") and reply["content"] != CONTENT
    [usage] = await usage_rows(db, user_id=user_id)
    assert usage["status"] == "cancelled" and usage["thread_id"] == uuid.UUID(thread_id)
    # The lock is released, and the partial reply is part of the history.
    again = await say(gw, headers, thread_id, "go on")
    assert again.status_code == 200
    assert upstream.requests[-1].json["messages"][-2] == {"role": "assistant", "content": reply["content"]}
    listed = (await gw.client.get(f"/v1/threads/{thread_id}/messages", params={"order": "asc"}, headers=headers)).json()
    assert listed["data"][1]["status"] == "incomplete"


async def test_heartbeats_while_the_upstream_is_silent(
    gateway_with: GatewayFactory, upstream: FakeUpstream, assistants_file: Path
) -> None:
    upstream.reset()
    upstream.script(CHAT, Reply(chunk_delay=0.35))
    async with gateway_with(assistants_file=assistants_file, stream_heartbeat_seconds=0.1) as slow:
        key, _ = await slow.key("pro")
        thread_id = (await new_thread(slow, bearer(key)))["id"]
        async with slow.client.stream(
            "POST", f"/v1/threads/{thread_id}/messages", json={"content": "hi", "stream": True}, headers=bearer(key)
        ) as response:
            body = (await response.aread()).decode()
    assert ": keep-alive" in body
    assert [name for name, _ in parse_sse(body)][-2:] == ["message.completed", "done"]


async def test_a_turn_has_a_time_limit(
    gateway_with: GatewayFactory, upstream: FakeUpstream, assistants_file: Path, db: asyncpg.Pool
) -> None:
    upstream.reset()
    upstream.script(CHAT, Reply(chunk_delay=0.3), Reply(delay=2))
    async with gateway_with(assistants_file=assistants_file, thread_turn_timeout=0.7) as capped:
        key, _ = await capped.key("pro")
        thread_id = (await new_thread(capped, bearer(key)))["id"]
        _, events = await stream_turn(capped, bearer(key), thread_id, "long story")
        assert [name for name, _ in events][-2:] == ["error", "done"]
        assert events[-2][1]["error"]["code"] == "turn_timeout"
        reply = (await stored(db, thread_id))[-1]
        assert reply["status"] == "incomplete" and reply["incomplete_reason"] == "turn_timeout"
        assert_error(await say(capped, bearer(key), thread_id, "and now?"), 504, code="turn_timeout")


# --- concurrency ------------------------------------------------------------------------------


async def test_concurrent_turns_on_one_thread_never_interleave(
    gw: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    _, headers = await user(gw)
    thread_id = (await new_thread(gw, headers))["id"]
    upstream.script(CHAT, Reply(delay=0.4))
    answers = await asyncio.gather(*[say(gw, headers, thread_id, f"message {n}") for n in range(5)])
    codes = sorted(a.status_code for a in answers)
    assert codes == [200, 409, 409, 409, 409]
    busy = next(a for a in answers if a.status_code == 409)
    assert_error(busy, 409, code="thread_busy")
    assert busy.headers["retry-after"] == "1"
    winner = next(a for a in answers if a.status_code == 200).json()
    rows = await stored(db, thread_id)
    assert [(r["role"], r["content"]) for r in rows] == [
        ("user", winner["user_message"]["content"]),
        ("assistant", CONTENT),
    ]
    assert len(upstream.requests) == 1
    # Other threads of the same user are not held up.
    other = (await new_thread(gw, headers))["id"]
    upstream.script(CHAT, Reply(delay=0.3))
    both = await asyncio.gather(say(gw, headers, thread_id, "next"), say(gw, headers, other, "elsewhere"))
    assert [b.status_code for b in both] == [200, 200]


async def test_a_streamed_turn_holds_the_thread_until_it_ends(
    gw: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    _, headers = await user(gw)
    thread_id = (await new_thread(gw, headers))["id"]
    upstream.script(CHAT, Reply(chunk_delay=0.15))
    streaming = asyncio.create_task(stream_turn(gw, headers, thread_id, "first"))

    async def upstream_called() -> bool:
        return len(upstream.requests) == 1

    assert await wait_for(upstream_called)
    await asyncio.sleep(0.2)  # well into the stream
    assert_error(await say(gw, headers, thread_id, "second"), 409, code="thread_busy")
    _, events = await streaming
    assert events[-1][1]["status"] == "completed"
    assert (await say(gw, headers, thread_id, "third")).status_code == 200
    rows = await stored(db, thread_id)
    assert [r["content"] for r in rows if r["role"] == "user"] == ["first", "third"]
    assert [r["role"] for r in rows] == ["user", "assistant", "user", "assistant"]


async def test_a_dead_turns_lock_is_released_with_its_process(gw: Gateway, db: asyncpg.Pool) -> None:
    """A lock names its process: held while that process beats, free as soon as it stops."""
    _, headers = await user(gw)
    thread_id = uuid.UUID((await new_thread(gw, headers))["id"])
    alive = internals.runtime(gw.app).instance.id
    lock = "UPDATE thread SET running_since = now(), running_owner = $2 WHERE id = $1"
    await db.execute(lock, thread_id, alive)  # a turn running in this (live) gateway
    assert_error(await say(gw, headers, str(thread_id), "hello"), 409, code="thread_busy")
    dead = uuid.uuid4()  # a process that died mid-turn: it never beats again
    await db.execute("INSERT INTO gateway_instance (id, host, pid, heartbeat_at) VALUES ($1, 'gone', 1, now())", dead)
    await db.execute(lock, thread_id, dead)
    assert_error(await say(gw, headers, str(thread_id), "hello"), 409, code="thread_busy")  # within its lease
    await db.execute("UPDATE gateway_instance SET heartbeat_at = now() - interval '11 seconds' WHERE id = $1", dead)
    assert (await say(gw, headers, str(thread_id), "hello")).status_code == 200  # its lease (10 s) is over
    row = await db.fetchrow("SELECT running_since, running_owner FROM thread WHERE id = $1", thread_id)
    assert row["running_since"] is None and row["running_owner"] is None
    # A lock older than the turn limit (600 s) plus a margin is stale whoever holds it.
    await db.execute(
        "UPDATE thread SET running_since = now() - interval '11 minutes', running_owner = $2 WHERE id = $1",
        thread_id,
        alive,
    )
    assert (await say(gw, headers, str(thread_id), "hello")).status_code == 200


# --- context from the app ---------------------------------------------------------------------


async def test_context_url_is_called_with_the_user_and_cached(
    gw: Gateway, upstream: FakeUpstream, db: asyncpg.Pool, context_server: ContextServer
) -> None:
    user_id, headers = await user(gw)
    thread_id = (await new_thread(gw, headers, profile="coach"))["id"]
    context_server.contexts[user_id] = {"name": "Ana"}
    await say(gw, headers, thread_id, "one")
    assert context_server.calls == [
        {"path": "/context", "query": {"user_id": user_id, "profile": "coach"}, "auth": f"Bearer {CONTEXT_TOKEN}"}
    ]
    context_block = {"role": "system", "content": "Context about the user, from the app:\nname: Ana"}
    assert upstream.requests[-1].json["messages"][1] == context_block
    row = await db.fetchrow("SELECT * FROM user_context_cache WHERE user_id = $1", user_id)
    assert row["profile"] == "coach" and orjson.loads(row["context"]) == {"name": "Ana"}

    context_server.contexts[user_id] = {"name": "Ana B."}
    await say(gw, headers, thread_id, "two")  # within the profile's TTL (60 s): from the cache
    assert len(context_server.calls) == 1
    assert upstream.requests[-1].json["messages"][1] == context_block

    await db.execute("UPDATE user_context_cache SET fetched_at = now() - interval '61 seconds'")
    await say(gw, headers, thread_id, "three")  # expired: fetched again
    assert len(context_server.calls) == 2
    assert upstream.requests[-1].json["messages"][1]["content"].endswith("name: Ana B.")

    await db.execute("UPDATE user_context_cache SET fetched_at = now() - interval '1 day'")
    context_server.status = 500
    assert (await say(gw, headers, thread_id, "four")).status_code == 200  # a failing URL: the old context serves
    assert len(context_server.calls) == 3
    assert upstream.requests[-1].json["messages"][1]["content"].endswith("name: Ana B.")


async def test_a_slow_context_url_never_fails_the_turn(
    gw: Gateway, upstream: FakeUpstream, db: asyncpg.Pool, context_server: ContextServer
) -> None:
    user_id, headers = await user(gw)
    thread_id = (await new_thread(gw, headers, profile="slow_context"))["id"]
    started = time.monotonic()
    answer = await say(gw, headers, thread_id, "hi", context={"from": "app"})
    assert answer.status_code == 200 and time.monotonic() - started < 2
    assert len(context_server.calls) == 1
    assert upstream.requests[-1].json["messages"][:2] == [
        {"role": "system", "content": "Slow."},
        {"role": "system", "content": "Context about the user, from the app:\nfrom: app"},
    ]
    assert await db.fetchval("SELECT count(*) FROM user_context_cache WHERE user_id = $1", user_id) == 0


async def test_a_redirecting_context_url_is_not_followed(
    gw: Gateway, upstream: FakeUpstream, db: asyncpg.Pool, context_server: ContextServer
) -> None:
    elsewhere = ContextServer()  # another server, whose answer must never become the user's context
    await elsewhere.start()
    try:
        user_id, headers = await user(gw)
        elsewhere.contexts[user_id] = {"leaked": "from elsewhere"}
        context_server.redirect_to = f"http://127.0.0.1:{elsewhere.port}/context"
        thread_id = (await new_thread(gw, headers, profile="redirected"))["id"]
        answer = await say(gw, headers, thread_id, "hi")
        assert answer.status_code == 200, answer.text  # a failed fetch: the turn goes on without context
        assert [call["path"] for call in context_server.calls] == ["/redirect"]
        assert elsewhere.calls == []
        assert upstream.requests[-1].json["messages"] == [
            {"role": "system", "content": "Redirected."},
            {"role": "user", "content": "hi"},
        ]
        assert await db.fetchval("SELECT count(*) FROM user_context_cache WHERE user_id = $1", user_id) == 0
    finally:
        await elsewhere.stop()


async def test_the_user_id_reaches_the_context_url_intact(gw: Gateway, context_server: ContextServer) -> None:
    user_id = "ana&x=1 =é+ü/?#%20"
    key, _ = await gw.key("pro", user=user_id)
    thread_id = (await new_thread(gw, bearer(key), profile="coach"))["id"]
    assert (await say(gw, bearer(key), thread_id, "hi")).status_code == 200
    assert [call["query"] for call in context_server.calls] == [{"user_id": user_id, "profile": "coach"}]


async def test_allowed_context_hosts(
    gateway_with: GatewayFactory, assistants_file: Path, upstream: FakeUpstream, context_server: ContextServer
) -> None:
    context_server.reset()
    async with gateway_with(assistants_file=assistants_file, context_allowed_hosts="localhost, 127.0.0.1") as allowed:
        user_id, headers = await user(allowed)
        thread_id = (await new_thread(allowed, headers, profile="coach"))["id"]
        assert (await say(allowed, headers, thread_id, "hi")).status_code == 200
        assert [call["query"]["user_id"] for call in context_server.calls] == [user_id]

    # A host outside the list is refused at start-up (tests/test_config_checks.py); were such a
    # profile ever loaded, the fetch itself still refuses to call it.
    settings = make_settings("postgresql://127.0.0.1:9/unused", None, context_allowed_hosts="app.example.com")
    source = ContextSource(settings, writes=None)  # type: ignore[arg-type]
    await source.start()
    try:
        coach = load_profiles(assistants_file).get("coach")
        assert await source.for_turn("someone", coach, None, None, {"sent": "by the app"}) == {"sent": "by the app"}
    finally:
        await source.close()
    assert len(context_server.calls) == 1


# --- database round trips ---------------------------------------------------------------------


async def test_statements_of_a_turn(gw: Gateway) -> None:
    """Three statements a turn: one read (lock + history + cached context) and the two inserts it must make.

    Each runs alone on a short autocommit checkout: the user message is stored only after the
    turn's limits were taken, and no connection is held across the upstream call."""
    _, headers = await user(gw)
    thread_id = (await new_thread(gw, headers))["id"]
    coach_id = (await new_thread(gw, headers, profile="coach"))["id"]
    await say(gw, headers, thread_id, "warm up")  # the key is now cached: no auth lookups below
    engine = internals.sync_engine(gw.app)
    seen: list[str] = []

    def statement(conn, cursor, sql, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        seen.append(" ".join(sql.split()).split(" (")[0])

    def checkout(*args: Any) -> None:
        seen.append("CHECKOUT")

    listeners = [(engine, "before_cursor_execute", statement), (engine.pool, "checkout", checkout)]
    for target, name, listener in listeners:
        event.listen(target, name, listener)
    try:
        assert (await say(gw, headers, thread_id, "measured")).status_code == 200
        plain, seen[:] = list(seen), []
        _, events = await stream_turn(gw, headers, thread_id, "measured stream")
        assert events[-1][1]["status"] == "completed"
        streamed, seen[:] = list(seen), []
        assert (await say(gw, headers, coach_id, "with a context URL")).status_code == 200
        with_fetch = list(seen)
    finally:
        for target, name, listener in listeners:
            event.remove(target, name, listener)

    # Two connections, never one held across the upstream call.
    turn = ["CHECKOUT", "WITH locked AS", "CHECKOUT", "INSERT INTO thread_message", "CHECKOUT", "WITH touched AS"]
    assert plain == turn
    assert streamed == turn
    # A context URL called on a cache miss adds the cache write, before the user message is stored.
    assert with_fetch == [*turn[:2], "CHECKOUT", "INSERT INTO user_context_cache", *turn[2:]]


async def test_wire_round_trips_of_a_turn(
    gateway_with: GatewayFactory, database_url: str, assistants_file: Path, upstream: FakeUpstream
) -> None:
    """Every round trip to Postgres while a turn runs, whatever pool or client made it."""
    if not httpx.URL(database_url).host:
        pytest.skip("needs a TCP database (TEST_DATABASE_URL) to count round trips through a proxy")
    proxy = TcpProxy.for_database(database_url)
    await proxy.start()
    proxied = proxy.url_for(database_url)
    upstream.reset()
    # No background writes in the window: usage rows wait for shutdown, a JWT caller has no key to touch,
    # the batch runner looks for work once at start-up only (a poll landing in the window was a 7th trip).
    quiet = {"usage_flush_interval": 3600, "image_batch_poll_seconds": 3600}
    async with gateway_with(database_url=proxied, assistants_file=assistants_file, **quiet) as wired:
        headers = bearer(make_jwt(f"wire-{uuid.uuid4().hex[:8]}"))
        thread_id = (await new_thread(wired, headers))["id"]
        await say(wired, headers, thread_id, "warm up")  # statements prepared once per connection
        await stream_turn(wired, headers, thread_id, "warm up")
        counts = []
        for streamed in (False, True):
            proxy.start_counting()
            if streamed:
                assert (await stream_turn(wired, headers, thread_id, "measured"))[1][-1][1]["status"] == "completed"
            else:
                assert (await say(wired, headers, thread_id, "measured")).status_code == 200
            await asyncio.sleep(0.05)
            counts.append(proxy.stop_counting())
    await proxy.stop()
    for total, pings in counts:
        # The request rate (before any write); lock + read; the tokens and budget; the user message;
        # the reply. Each is one autocommit statement.
        assert total - pings == 5, proxy.writes
        assert pings == 0  # no pool_pre_ping (app/db.py): it cost three round trips per checkout
    print(f"\nround trips of a turn: {counts[0][0]} ({counts[0][1]} of them pool pre-pings)")


# --- retention --------------------------------------------------------------------------------


async def _idle_and_fresh_threads(gateway: Gateway, db: asyncpg.Pool) -> tuple[str, str, str]:
    user_id, headers = await user(gateway)
    idle = (await new_thread(gateway, headers, title="idle"))["id"]
    fresh = (await new_thread(gateway, headers, title="fresh"))["id"]
    for thread_id in (idle, fresh):
        assert (await say(gateway, headers, thread_id, "hi")).status_code == 200
    await db.execute("UPDATE thread SET updated_at = now() - interval '31 days' WHERE id = $1", uuid.UUID(idle))
    await db.execute(
        "INSERT INTO user_context_cache (user_id, profile, context, fetched_at)"
        " VALUES ($1, 'coach', '{}', now() - interval '40 days'), ($1, 'coach_health', '{}', now())",
        user_id,
    )
    return user_id, idle, fresh


async def test_retention_deletes_idle_threads_with_their_messages(gw: Gateway, db: asyncpg.Pool) -> None:
    user_id, idle, fresh = await _idle_and_fresh_threads(gw, db)
    blocker = await db.acquire()
    try:
        await blocker.execute("SELECT pg_advisory_lock($1)", RETENTION_LOCK)  # another replica is at it
        assert await prune_idle_threads(internals.sessionmaker(gw.app), days=30) is None
        assert await db.fetchval("SELECT count(*) FROM thread WHERE user_id = $1", user_id) == 2
    finally:
        await blocker.execute("SELECT pg_advisory_unlock($1)", RETENTION_LOCK)
        await db.release(blocker)

    assert await prune_idle_threads(internals.sessionmaker(gw.app), days=30, batch_size=1) == 1
    assert await db.fetchval("SELECT count(*) FROM thread WHERE id = $1", uuid.UUID(idle)) == 0
    assert await stored(db, idle) == []
    assert len(await stored(db, fresh)) == 2
    assert await db.fetchval("SELECT array_agg(profile) FROM user_context_cache WHERE user_id = $1", user_id) == [
        "coach_health"
    ]
    assert await prune_idle_threads(internals.sessionmaker(gw.app), days=30) == 0


def test_prune_threads_cli(database_url: str) -> None:
    async def prepare() -> tuple[str, str]:
        pool = await asyncpg.connect(database_url)
        try:
            idle, fresh = uuid.uuid4(), uuid.uuid4()
            await pool.execute(
                "INSERT INTO thread (id, user_id, profile, updated_at) VALUES"
                " ($1, 'cli-user', 'tutor', now() - interval '10 days'), ($2, 'cli-user', 'tutor', now())",
                idle,
                fresh,
            )
            await pool.execute(
                "INSERT INTO thread_message (id, thread_id, role, content) VALUES ($1, $2, 'user', 'old')",
                uuid.uuid4(),
                idle,
            )
            return str(idle), str(fresh)
        finally:
            await pool.close()

    idle, fresh = asyncio.run(prepare())
    env = {**os.environ, "DATABASE_URL": database_url, "THREAD_RETENTION_DAYS": "30"}
    kept = app_command("prune-threads", env=env, check=True)
    assert "threads idle for more than 30 days" in kept.stdout  # ours is 10 days idle: kept
    pruned = app_command("prune-threads", "--days", "7", env=env, check=True)
    assert "threads idle for more than 7 days" in pruned.stdout

    async def remaining() -> list[str]:
        connection = await asyncpg.connect(database_url)
        try:
            rows = await connection.fetch("SELECT id FROM thread WHERE user_id = 'cli-user'")
            messages = await connection.fetchval(
                "SELECT count(*) FROM thread_message WHERE thread_id = $1", uuid.UUID(idle)
            )
            assert messages == 0
            await connection.execute("DELETE FROM thread WHERE user_id = 'cli-user'")
            return [str(row["id"]) for row in rows]
        finally:
            await connection.close()

    assert asyncio.run(remaining()) == [fresh]


async def test_the_retention_job_runs_in_the_background(
    gateway_with: GatewayFactory, assistants_file: Path, db: asyncpg.Pool
) -> None:
    async with gateway_with(assistants_file=assistants_file, thread_retention_interval=0.1) as background:
        _, idle, fresh = await _idle_and_fresh_threads(background, db)

        async def pruned() -> bool:
            return await db.fetchval("SELECT count(*) FROM thread WHERE id = $1", uuid.UUID(idle)) == 0

        assert await wait_for(pruned)
        assert await db.fetchval("SELECT count(*) FROM thread WHERE id = $1", uuid.UUID(fresh)) == 1
