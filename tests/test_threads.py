"""Threads as apps written for the Assistants API (v2) drive them, through the official SDK's `client.beta`.

A gateway for this module runs with its own assistants file (profiles made for the tests,
shared as `asst_<name>`) and a small aiohttp server that plays the app's context URL.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import openai
import orjson
import pytest
import pytest_asyncio
from aiohttp import web
from openai import AsyncAssistantEventHandler
from openai.types.beta.threads import Message, Run, Text, TextDelta
from sqlalchemy import event
from typing_extensions import override

from app.threads.retention import RETENTION_LOCK, prune_idle_threads
from support import internals
from support.auth import bearer
from support.errors import assert_error
from support.fake_upstream import CONTENT, CONTENT_PIECES, FakeUpstream, Reply
from support.gateway import Gateway, GatewayFactory, app_command_async, gateway_env, gateway_process
from support.processes import kill_process_async
from support.waiting import usage_rows, wait_for

# The SDK marks the Assistants API deprecated; these apps call it all the same, and so do the tests.
pytestmark = [
    pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The Assistants API is deprecated:DeprecationWarning"),
]

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


async def user(gateway: Gateway, tier: str = "pro") -> tuple[str, openai.AsyncOpenAI]:
    key, user_id = await gateway.key(tier)
    return user_id, openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


def texts(messages: list[Message]) -> list[tuple[str, str]]:
    return [(m.role, "".join(part.text.value for part in m.content if part.type == "text")) for m in messages]


async def thread_texts(client: openai.AsyncOpenAI, thread_id: str) -> list[tuple[str, str]]:
    return texts([m async for m in client.beta.threads.messages.list(thread_id, order="asc")])


# --- runs --------------------------------------------------------------------------------------


async def test_the_coach_flow_polls_a_run_to_completion(gw: Gateway, upstream: FakeUpstream, db: asyncpg.Pool) -> None:
    user_id, client = await user(gw)
    thread = await client.beta.threads.create(metadata={"app": "coach"})
    assert thread.id.startswith("thread_") and thread.metadata == {"app": "coach"}
    sent = await client.beta.threads.messages.create(thread.id, role="user", content="What is a fraction?")
    assert sent.id.startswith("msg_") and sent.status == "completed"
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id,
        assistant_id="asst_tutor",
        additional_instructions="The student is Alex, year 5.",
        poll_interval_ms=50,
    )
    assert run.status == "completed", run.last_error
    assert run.id.startswith("run_") and run.assistant_id == "asst_tutor" and run.thread_id == thread.id
    assert run.usage is not None and (run.usage.prompt_tokens, run.usage.completion_tokens) == (11, 7)
    assert run.model == "default-chat" and run.completed_at is not None and run.started_at is not None
    assert upstream.received()[-1].json is not None
    assert upstream.received()[-1].json["messages"] == [
        # OpenAI's wording: additional instructions are appended to the assistant's.
        {"role": "system", "content": f"You tutor for {user_id}. Student: .\n\nThe student is Alex, year 5."},
        {"role": "user", "content": "What is a fraction?"},
    ]
    assert await thread_texts(client, thread.id) == [("user", "What is a fraction?"), ("assistant", CONTENT)]
    [reply] = [m async for m in client.beta.threads.messages.list(thread.id, run_id=run.id)]
    assert reply.assistant_id == "asst_tutor" and reply.run_id == run.id and reply.status == "completed"
    [usage] = await usage_rows(db, user_id=user_id)
    assert (usage["route"], usage["status"], usage["thread_id"]) == ("threads.runs", "ok", uuid.UUID(thread.id[7:]))
    assert orjson.loads(usage["detail"]) == {"run_id": run.id, "assistant_id": "asst_tutor"}


class Collector(AsyncAssistantEventHandler):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.deltas: list[str] = []

    @override
    async def on_event(self, event: Any) -> None:
        self.names.append(event.event)

    @override
    async def on_text_delta(self, delta: TextDelta, snapshot: Text) -> None:
        self.deltas.append(delta.value or "")


async def test_a_streamed_run_relays_the_assistants_events(
    gw: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    user_id, client = await user(gw)
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "Tell me about lions."}])
    handler = Collector()
    async with client.beta.threads.runs.stream(
        thread_id=thread.id, assistant_id="asst_tutor", event_handler=handler
    ) as stream:
        await stream.until_done()
        final = await stream.get_final_run()
        messages = await stream.get_final_messages()
    assert handler.names == [
        "thread.run.created",
        "thread.run.queued",
        "thread.run.in_progress",
        "thread.run.step.created",
        "thread.run.step.in_progress",
        "thread.message.created",
        "thread.message.in_progress",
        *["thread.message.delta"] * len(CONTENT_PIECES),
        "thread.message.completed",
        "thread.run.step.completed",
        "thread.run.completed",
    ]
    assert "".join(handler.deltas) == CONTENT
    assert final.status == "completed"
    assert texts(messages) == [("assistant", CONTENT)]
    assert await thread_texts(client, thread.id) == [("user", "Tell me about lions."), ("assistant", CONTENT)]
    request = upstream.received()[-1].json
    assert request is not None and request["stream"] is True
    [usage] = await usage_rows(db, user_id=user_id)
    assert usage["stream"] is True and usage["status"] == "ok"


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-tools",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-5-mini",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


USAGE_CHUNK = {
    "id": "chatcmpl-tools",
    "object": "chat.completion.chunk",
    "created": 1,
    "model": "gpt-5-mini",
    "choices": [],
    "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29},
}


def tool_call_reply(*calls: tuple[str, str, str]) -> Reply:
    """A streamed answer that asks for these function calls (id, name, arguments), the arguments in two pieces."""
    chunks: list[dict[str, Any] | str] = [chunk({"role": "assistant", "content": None})]
    for index, (call_id, name, arguments) in enumerate(calls):
        half = len(arguments) // 2
        first = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        chunks.append(chunk({"tool_calls": [first]}))
        for piece in (arguments[:half], arguments[half:]):
            chunks.append(chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}))
    chunks += [chunk({}, "tool_calls"), USAGE_CHUNK]
    return Reply(chunks=chunks)


WEATHER = {
    "type": "function",
    "function": {
        "name": "enclosure_weather",
        "description": "The weather at an enclosure.",
        "parameters": {"type": "object", "properties": {"enclosure": {"type": "string"}}},
    },
}


async def test_a_function_tool_run_takes_two_rounds(gw: Gateway, upstream: FakeUpstream, db: asyncpg.Pool) -> None:
    user_id, client = await user(gw)
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "Weather at the lions and seals?"}])
    upstream.script(
        CHAT,
        tool_call_reply(("call_a", "enclosure_weather", '{"enclosure": "lions"}')),
        tool_call_reply(
            ("call_b", "enclosure_weather", '{"enclosure": "seals"}'), ("call_c", "enclosure_weather", "{}")
        ),
    )
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id,
        assistant_id="asst_tutor",
        tools=[WEATHER],
        poll_interval_ms=50,  # type: ignore[list-item]
    )
    assert run.status == "requires_action" and run.required_action is not None
    [asked] = run.required_action.submit_tool_outputs.tool_calls
    assert (asked.id, asked.function.name, asked.function.arguments) == (
        "call_a",
        "enclosure_weather",
        '{"enclosure": "lions"}',
    )
    assert run.expires_at is not None
    sent = upstream.received()[-1].json
    assert sent is not None and sent["tools"] == [WEATHER]

    # Round two, streamed: the model asks for two more calls.
    handler = Collector()
    async with client.beta.threads.runs.submit_tool_outputs_stream(
        thread_id=thread.id,
        run_id=run.id,
        tool_outputs=[{"tool_call_id": "call_a", "output": "sunny"}],
        event_handler=handler,
    ) as stream:
        await stream.until_done()
        second = await stream.get_final_run()
    assert second.status == "requires_action" and second.required_action is not None
    assert [c.id for c in second.required_action.submit_tool_outputs.tool_calls] == ["call_b", "call_c"]
    assert handler.names[0] == "thread.run.queued" and handler.names[-1] == "thread.run.requires_action"
    assert "thread.run.step.delta" in handler.names
    assert upstream.received()[-1].json["messages"][-2:] == [  # type: ignore[index]
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "enclosure_weather", "arguments": '{"enclosure": "lions"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
    ]

    # A wrong set of outputs is refused; the run still waits.
    wrong = await gw.client.post(
        f"/v1/threads/{thread.id}/runs/{run.id}/submit_tool_outputs",
        json={"tool_outputs": [{"tool_call_id": "call_b", "output": "x"}]},
        headers={"authorization": f"Bearer {client.api_key}"},
    )
    assert_error(wrong, 400, param="tool_outputs")

    # Round three, plain: the answer.
    third = await client.beta.threads.runs.submit_tool_outputs_and_poll(
        thread_id=thread.id,
        run_id=run.id,
        tool_outputs=[{"tool_call_id": "call_b", "output": "rain"}, {"tool_call_id": "call_c", "output": "fog"}],
        poll_interval_ms=50,
    )
    assert third.status == "completed"
    assert third.usage is not None and third.usage.prompt_tokens == 20 + 20 + 11
    assert upstream.received()[-1].json["messages"][-2:] == [  # type: ignore[index]
        {"role": "tool", "tool_call_id": "call_b", "content": "rain"},
        {"role": "tool", "tool_call_id": "call_c", "content": "fog"},
    ]
    steps = [step async for step in client.beta.threads.runs.steps.list(run.id, thread_id=thread.id, order="asc")]
    assert [step.type for step in steps] == ["tool_calls", "tool_calls", "message_creation"]
    assert [step.status for step in steps] == ["completed"] * 3
    first_calls = steps[0].step_details.tool_calls  # type: ignore[union-attr]
    assert first_calls[0].function.output == "sunny"  # type: ignore[union-attr]
    one = await client.beta.threads.runs.steps.retrieve(steps[2].id, thread_id=thread.id, run_id=run.id)
    assert one.step_details.message_creation.message_id  # type: ignore[union-attr]
    assert await thread_texts(client, thread.id) == [
        ("user", "Weather at the lions and seals?"),
        ("assistant", CONTENT),
    ]
    rows = await usage_rows(db, count=3, user_id=user_id)
    assert [r["route"] for r in rows] == ["threads.runs"] * 3
    assert len({r["call_id"] for r in rows}) == 3

    # Once the run is over, outputs are refused.
    late = await gw.client.post(
        f"/v1/threads/{thread.id}/runs/{run.id}/submit_tool_outputs",
        json={"tool_outputs": [{"tool_call_id": "call_b", "output": "x"}]},
        headers={"authorization": f"Bearer {client.api_key}"},
    )
    assert_error(late, 400, code="run_not_active")


async def test_code_interpreter_is_refused_by_name(gw: Gateway, upstream: FakeUpstream, db: asyncpg.Pool) -> None:
    _, client = await user(gw)
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "Plot it."}])
    with pytest.raises(openai.BadRequestError) as refused:
        await client.beta.threads.runs.create(
            thread_id=thread.id, assistant_id="asst_tutor", tools=[{"type": "code_interpreter"}]
        )
    assert "code_interpreter" in str(refused.value) and refused.value.code == "unsupported_tool"
    assert upstream.requests == [] and await db.fetchval("SELECT count(*) FROM thread_run") == 0


async def test_cancelling_a_run_stops_the_upstream_and_keeps_the_partial_reply(
    gw: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    user_id, client = await user(gw)
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "Tell me a long story."}])
    upstream.script(CHAT, Reply(chunk_delay=0.3))
    run = await client.beta.threads.runs.create(thread_id=thread.id, assistant_id="asst_tutor")
    assert run.status == "queued"

    async def replying() -> bool:
        return bool(await db.fetchval("SELECT count(*) FROM thread_message WHERE role = 'assistant'"))

    await wait_for(replying)
    cancelling = await client.beta.threads.runs.cancel(run.id, thread_id=thread.id)
    assert cancelling.status in ("cancelling", "cancelled")
    ended = await client.beta.threads.runs.poll(run.id, thread_id=thread.id, poll_interval_ms=50)
    assert ended.status == "cancelled" and ended.cancelled_at is not None
    [reply] = [m async for m in client.beta.threads.messages.list(thread.id, run_id=run.id)]
    assert reply.status == "incomplete" and reply.incomplete_details is not None
    assert reply.incomplete_details.reason == "run_cancelled"
    assert CONTENT.startswith(texts([reply])[0][1]) and texts([reply])[0][1] != CONTENT
    assert await upstream.wait_streams_closed()
    [row] = await usage_rows(db, user_id=user_id)
    assert row["status"] == "cancelled"
    with pytest.raises(openai.BadRequestError):
        await client.beta.threads.runs.cancel(run.id, thread_id=thread.id)  # over: nothing to cancel
    # The thread takes a new run at once.
    again = await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id="asst_tutor", poll_interval_ms=50
    )
    assert again.status == "completed"


async def test_a_client_that_leaves_mid_stream_leaves_the_partial_reply_stored(
    gw: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    user_id, client = await user(gw)
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "Go on."}])
    upstream.script(CHAT, Reply(chunk_delay=0.3))
    deltas = 0
    async with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id="asst_tutor") as stream:
        async for event in stream:
            if event.event == "thread.message.delta":
                deltas += 1
                if deltas == 2:
                    break  # the app's user closed the screen
    assert await upstream.wait_streams_closed()

    async def ended() -> asyncpg.Record | None:
        row = await db.fetchrow("SELECT status FROM thread_run WHERE thread_id = $1", uuid.UUID(thread.id[7:]))
        return row if row and row["status"] == "cancelled" else None

    await wait_for(ended)
    [reply] = await db.fetch("SELECT content, status, incomplete_reason FROM thread_message WHERE role = 'assistant'")
    assert (reply["status"], reply["incomplete_reason"]) == ("incomplete", "run_cancelled")
    assert reply["content"] == "".join(CONTENT_PIECES[:2])
    [row] = await usage_rows(db, user_id=user_id)
    assert row["status"] == "cancelled" and row["stream"] is True


async def test_another_users_ids_are_404_everywhere(gw: Gateway, upstream: FakeUpstream) -> None:
    _, owner = await user(gw)
    thread = await owner.beta.threads.create(messages=[{"role": "user", "content": "secret"}])
    run = await owner.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id="asst_tutor", poll_interval_ms=50
    )
    [message, _] = [m async for m in owner.beta.threads.messages.list(thread.id)]
    [step] = [s async for s in owner.beta.threads.runs.steps.list(run.id, thread_id=thread.id)]
    _, stranger = await user(gw)
    calls = [
        stranger.beta.threads.retrieve(thread.id),
        stranger.beta.threads.update(thread.id, metadata={"x": "y"}),
        stranger.beta.threads.delete(thread.id),
        stranger.beta.threads.messages.list(thread.id),
        stranger.beta.threads.messages.create(thread.id, role="user", content="hi"),
        stranger.beta.threads.messages.retrieve(message.id, thread_id=thread.id),
        stranger.beta.threads.messages.update(message.id, thread_id=thread.id, metadata={"x": "y"}),
        stranger.beta.threads.messages.delete(message.id, thread_id=thread.id),
        stranger.beta.threads.runs.create(thread_id=thread.id, assistant_id="asst_tutor"),
        stranger.beta.threads.runs.create(thread_id=thread.id, assistant_id="asst_tutor", stream=True),
        stranger.beta.threads.runs.list(thread.id),
        stranger.beta.threads.runs.retrieve(run.id, thread_id=thread.id),
        stranger.beta.threads.runs.update(run.id, thread_id=thread.id, metadata={"x": "y"}),
        stranger.beta.threads.runs.cancel(run.id, thread_id=thread.id),
        stranger.beta.threads.runs.submit_tool_outputs(
            run.id, thread_id=thread.id, tool_outputs=[{"tool_call_id": "call_a", "output": "x"}]
        ),
        stranger.beta.threads.runs.steps.list(run.id, thread_id=thread.id),
        stranger.beta.threads.runs.steps.retrieve(step.id, thread_id=thread.id, run_id=run.id),
    ]
    requests = len(upstream.requests)
    for call in calls:
        with pytest.raises(openai.NotFoundError) as missing:
            await call
        assert missing.value.code in ("thread_not_found", "run_not_found", "message_not_found", "step_not_found")
    assert len(upstream.requests) == requests
    listed = await stranger.get("/threads", cast_to=dict)  # type: ignore[type-var]
    assert listed["data"] == []
    assert await thread_texts(owner, thread.id) == [("user", "secret"), ("assistant", CONTENT)]
    # Another user's run id on the caller's own thread is a 404 too.
    mine = await stranger.beta.threads.create()
    with pytest.raises(openai.NotFoundError):
        await stranger.beta.threads.runs.retrieve(run.id, thread_id=mine.id)


async def test_a_run_whose_process_is_killed_fails_within_seconds(
    gw: Gateway,
    gateway_with: GatewayFactory,
    upstream: FakeUpstream,
    db: asyncpg.Pool,
    database_url: str,
    assistants_file: Path,
    tmp_path: Path,
) -> None:
    fast = {"INSTANCE_BEAT_SECONDS": "0.2", "INSTANCE_LEASE_SECONDS": "1", "RUN_SWEEP_INTERVAL": "0.2"}
    env = gateway_env(database_url, upstream, ASSISTANTS_FILE=str(assistants_file), **fast)
    upstream.set_default(CHAT, Reply(chunk_delay=1.0))
    key, user_id = await gw.key("pro")
    async with gateway_process(env, tmp_path / "killed.log") as doomed:
        client = openai.AsyncOpenAI(base_url=doomed.url + "/v1", api_key=key, max_retries=0)
        thread = await client.beta.threads.create(messages=[{"role": "user", "content": "Still there?"}])
        run = await client.beta.threads.runs.create(thread_id=thread.id, assistant_id="asst_tutor")

        async def replying() -> bool:
            return bool(await db.fetchval("SELECT count(*) FROM thread_message WHERE status = 'in_progress'"))

        await wait_for(replying)
        await kill_process_async(doomed.proc)
    upstream.set_default(CHAT, None)
    async with gateway_with(
        assistants_file=assistants_file, instance_beat_seconds=0.2, instance_lease_seconds=1, run_sweep_interval=0.2
    ) as survivor:
        client = openai.AsyncOpenAI(base_url=survivor.url + "/v1", api_key=key, max_retries=0)
        started = asyncio.get_running_loop().time()
        ended = await client.beta.threads.runs.poll(run.id, thread_id=thread.id, poll_interval_ms=100)
        assert asyncio.get_running_loop().time() - started < 10
        assert ended.status == "failed" and ended.last_error is not None
        assert ended.last_error.code == "server_error" and "stopped" in ended.last_error.message
        [reply] = [m async for m in client.beta.threads.messages.list(thread.id, run_id=run.id)]
        assert reply.status == "incomplete" and reply.incomplete_details.reason == "run_failed"  # type: ignore[union-attr]
        steps = [s async for s in client.beta.threads.runs.steps.list(run.id, thread_id=thread.id)]
        assert [s.status for s in steps] == ["failed"]
        # The killed process's upstream call still gets its one row, and the thread takes a new run.
        [row] = await usage_rows(db, user_id=user_id)
        assert row["route"] == "threads.runs"
        again = await client.beta.threads.runs.create_and_poll(
            thread_id=thread.id, assistant_id="asst_tutor", poll_interval_ms=50
        )
        assert again.status == "completed"


async def test_a_second_run_on_a_busy_thread_is_a_409(gw: Gateway, upstream: FakeUpstream, db: asyncpg.Pool) -> None:
    user_id, client = await user(gw)
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "One at a time."}])
    upstream.script(CHAT, Reply(chunk_delay=0.2))
    first = await client.beta.threads.runs.create(thread_id=thread.id, assistant_id="asst_tutor")
    with pytest.raises(openai.ConflictError) as busy:
        await client.beta.threads.runs.create(thread_id=thread.id, assistant_id="asst_tutor")
    assert f"already has an active run {first.id}" in busy.value.message
    assert busy.value.response.headers["retry-after"] == "1"
    with pytest.raises(openai.BadRequestError) as adding:
        await client.beta.threads.messages.create(thread.id, role="user", content="and another")
    assert "while a run" in adding.value.message
    # Concurrent starts on an idle thread: exactly one run.
    await client.beta.threads.runs.poll(first.id, thread_id=thread.id, poll_interval_ms=50)
    tries = await asyncio.gather(
        *[client.beta.threads.runs.create(thread_id=thread.id, assistant_id="asst_tutor") for _ in range(5)],
        return_exceptions=True,
    )
    started = [t for t in tries if isinstance(t, Run)]
    assert len(started) == 1 and all(isinstance(t, openai.ConflictError) for t in tries if t not in started)
    await client.beta.threads.runs.poll(started[0].id, thread_id=thread.id, poll_interval_ms=50)
    assert await db.fetchval("SELECT count(*) FROM thread_run") == 2
    # The refused starts reserved nothing that stayed: two calls, two rows.
    assert len(await usage_rows(db, count=2, user_id=user_id)) == 2
    assert len(upstream.received()) == 2


# --- what the threads did before, in Assistants terms ------------------------------------------


async def test_the_teacher_flow_expands_shortcuts_and_sends_context(
    gw: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    user_id, client = await user(gw)
    thread = await client.beta.threads.create()
    typed = await client.beta.threads.messages.create(thread.id, role="user", content="/ptm Alex and his parents")
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id="asst_tutor", extra_body={"context": {"student": "Alex"}}, poll_interval_ms=50
    )
    assert run.status == "completed"
    assert upstream.received()[-1].json["messages"] == [  # type: ignore[index]
        {"role": "system", "content": f"You tutor for {user_id}. Student: Alex."},
        {"role": "user", "content": "Prepare a parent-teacher meeting about Alex and his parents."},
    ]
    stored = await client.beta.threads.messages.retrieve(typed.id, thread_id=thread.id)
    assert texts([stored]) == [("user", "/ptm Alex and his parents")]  # kept as typed
    assert stored.model_extra is not None
    assert stored.model_extra["expanded_content"] == "Prepare a parent-teacher meeting about Alex and his parents."

    await client.beta.threads.messages.create(thread.id, role="user", content="/lesson fractions for year 5")
    await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id="asst_tutor", poll_interval_ms=50)
    sent = upstream.received()[-1].json["messages"]  # type: ignore[index]
    assert sent[0] == {"role": "system", "content": f"You tutor for {user_id}. Student: ."}  # context was per run
    assert sent[1]["content"] == "Prepare a parent-teacher meeting about Alex and his parents."  # history: as sent
    assert sent[-1] == {"role": "user", "content": "Plan a lesson.\n\nfractions for year 5"}
    await client.beta.threads.messages.create(thread.id, role="user", content="/shrug not a shortcut")
    await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id="asst_tutor", poll_interval_ms=50)
    assert upstream.received()[-1].json["messages"][-1]["content"] == "/shrug not a shortcut"  # type: ignore[index]


async def test_chat_type_in_message_metadata_steers_the_shared_assistant(
    gw: Gateway, upstream: FakeUpstream, context_server: ContextServer
) -> None:
    user_id, client = await user(gw)
    context_server.contexts[user_id] = {"name": "Sam", "goals": ["sleep", "walk"], "streak": 4}
    thread = await client.beta.threads.create()
    await client.beta.threads.messages.create(thread.id, role="user", content="Hi", metadata={"chat_type": "general"})
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id="asst_coach", extra_body={"context": {"streak": 5}}, poll_interval_ms=50
    )
    assert run.assistant_id == "asst_coach"
    assert upstream.received()[-1].json["messages"] == [  # type: ignore[index]
        {"role": "system", "content": "You coach. Chat type: general."},
        {
            "role": "system",
            "content": 'Context about the user, from the app:\ngoals: ["sleep","walk"]\nname: Sam\nstreak: 5',
        },
        {"role": "user", "content": "Hi"},
    ]
    await client.beta.threads.messages.create(
        thread.id, role="user", content="Sleep tips?", metadata={"chat_type": "pillar_health", "goal_id": "sleep-8h"}
    )
    health = await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id="asst_coach", poll_interval_ms=50
    )
    assert health.assistant_id == "asst_coach_health"  # the chat type's assistant answered
    sent = upstream.received()[-1].json["messages"]  # type: ignore[index]
    assert sent[0] == {"role": "system", "content": "Health coach for goal sleep-8h."}
    assert sent[1]["content"].endswith("name: Sam\nstreak: 4")
    assert [c["query"]["profile"] for c in context_server.calls] == ["coach", "coach_health"]
    assert [c["auth"] for c in context_server.calls] == [f"Bearer {CONTEXT_TOKEN}"] * 2
    # Fetched contexts are cached per profile: the next run does not call the app again.
    await client.beta.threads.messages.create(thread.id, role="user", content="More?")
    await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id="asst_coach", poll_interval_ms=50)
    assert len(context_server.calls) == 2


async def test_the_history_window_and_truncation_strategy(gw: Gateway, upstream: FakeUpstream) -> None:
    _, client = await user(gw)
    thread = await client.beta.threads.create()
    for n in range(3):
        await client.beta.threads.messages.create(thread.id, role="user", content=f"turn {n}")
        await client.beta.threads.runs.create_and_poll(
            thread_id=thread.id, assistant_id="asst_tutor", poll_interval_ms=50
        )
    # tutor: history_messages = 4, the newest four (OpenAI's `last_messages` counts the new one too).
    assert upstream.received()[-1].json["messages"][1:] == [  # type: ignore[index]
        {"role": "assistant", "content": CONTENT},
        {"role": "user", "content": "turn 1"},
        {"role": "assistant", "content": CONTENT},
        {"role": "user", "content": "turn 2"},
    ]
    await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id,
        assistant_id="asst_tutor",
        truncation_strategy={"type": "last_messages", "last_messages": 2},
        additional_messages=[{"role": "user", "content": "turn 3"}],
        poll_interval_ms=50,
    )
    assert upstream.received()[-1].json["messages"][1:] == [  # type: ignore[index]
        {"role": "assistant", "content": CONTENT},
        {"role": "user", "content": "turn 3"},
    ]
    assert len(await thread_texts(client, thread.id)) == 8


async def test_run_parameters_reach_the_upstream(gw: Gateway, upstream: FakeUpstream) -> None:
    _, client = await user(gw)
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "JSON please"}])
    schema = {"name": "fact", "schema": {"type": "object", "properties": {"fact": {"type": "string"}}}}
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id,
        assistant_id="asst_tutor",
        model="gpt-5-nano",
        instructions="Only JSON.",
        temperature=0.2,
        top_p=0.5,
        max_completion_tokens=100,
        response_format={"type": "json_schema", "json_schema": schema},  # type: ignore[typeddict-item]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        parallel_tool_calls=False,
        metadata={"screen": "facts"},
        poll_interval_ms=50,
    )
    assert run.status == "completed" and run.model == "gpt-5-nano" and run.metadata == {"screen": "facts"}
    assert (run.temperature, run.top_p, run.max_completion_tokens) == (0.2, 0.5, 100)
    sent = upstream.received()[-1].json
    assert sent is not None
    assert {name: sent[name] for name in sent if name not in ("messages", "stream", "stream_options")} == {
        "model": "gpt-5-nano",
        "temperature": 0.2,
        "top_p": 0.5,
        "max_completion_tokens": 100,
        "response_format": {"type": "json_schema", "json_schema": schema},
        "tools": [WEATHER],
        "tool_choice": "none",
        "parallel_tool_calls": False,
    }
    assert sent["messages"][0] == {"role": "system", "content": "Only JSON."}  # replaced, not templated
    changed = await client.beta.threads.runs.update(run.id, thread_id=thread.id, metadata={"screen": "home"})
    assert changed.metadata == {"screen": "home"}
    listed = [r.id async for r in client.beta.threads.runs.list(thread.id)]
    assert listed == [run.id]


async def test_a_reply_cut_by_max_completion_tokens_is_incomplete(gw: Gateway, upstream: FakeUpstream) -> None:
    _, client = await user(gw)
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "Ramble."}])
    pieces = [chunk({"content": "so "}), chunk({"content": "much"}), chunk({}, "length"), USAGE_CHUNK]
    upstream.script(CHAT, Reply(chunks=pieces))  # type: ignore[arg-type]
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id="asst_tutor", max_completion_tokens=16, poll_interval_ms=50
    )
    assert run.status == "incomplete" and run.incomplete_details is not None
    assert run.incomplete_details.reason == "max_completion_tokens"
    [reply] = [m async for m in client.beta.threads.messages.list(thread.id, run_id=run.id)]
    assert reply.status == "incomplete" and texts([reply]) == [("assistant", "so much")]


async def test_an_upstream_failure_fails_the_run(gw: Gateway, upstream: FakeUpstream, db: asyncpg.Pool) -> None:
    user_id, client = await user(gw)
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "hello?"}])
    upstream.script(CHAT, *[Reply(status=500)] * 3)  # tutor: fallback = never
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id="asst_tutor", poll_interval_ms=50
    )
    assert run.status == "failed" and run.last_error is not None and run.last_error.code == "server_error"
    assert run.failed_at is not None
    assert await thread_texts(client, thread.id) == [("user", "hello?")]
    [row] = await usage_rows(db, user_id=user_id)
    assert (row["status"], row["route"]) == ("error", "threads.runs")

    # Streamed: the failure mid-stream ends with `thread.run.failed`, the partial reply stored.
    upstream.script(CHAT, Reply(error_after=2))
    names = []
    async with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id="asst_tutor") as stream:
        async for event in stream:
            names.append(event.event)
    assert names[-2:] == ["thread.run.step.failed", "thread.run.failed"]
    assert names.count("thread.message.incomplete") == 1
    replies = [m async for m in client.beta.threads.messages.list(thread.id) if m.role == "assistant"]
    assert [m.status for m in replies] == ["incomplete"]


async def test_limits_apply_to_runs(gw: Gateway, db: asyncpg.Pool, upstream: FakeUpstream) -> None:
    user_id, client = await user(gw, "free")
    limits = {"limit_overrides": {"chat_requests_per_minute": 1}}
    assert (await gw.admin("PATCH", f"/admin/users/{user_id}", json=limits)).status_code == 200
    await asyncio.sleep(0.1)  # the NOTIFY reaches the principal cache
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "one"}])
    first = await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id="asst_tutor", poll_interval_ms=50
    )
    assert first.status == "completed"
    with pytest.raises(openai.RateLimitError) as refused:
        await client.beta.threads.runs.create(
            thread_id=thread.id, assistant_id="asst_tutor", additional_messages=[{"role": "user", "content": "two"}]
        )
    assert refused.value.code == "rate_limit_exceeded" and refused.value.response.headers["retry-after"]
    assert await thread_texts(client, thread.id) == [("user", "one"), ("assistant", CONTENT)]  # nothing written
    assert await db.fetchval("SELECT count(*) FROM thread_run") == 1 and len(upstream.requests) == 1


async def test_bad_runs_are_refused_before_anything_is_stored(
    gw: Gateway, db: asyncpg.Pool, upstream: FakeUpstream
) -> None:
    _, client = await user(gw, "free")
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "hi"}])
    bad: list[tuple[dict[str, Any], str]] = [
        ({"assistant_id": "asst_nobody"}, "assistant_id"),
        ({"assistant_id": "asst_premium"}, "assistant_id"),  # not for the free tier
        ({"assistant_id": "asst_tutor", "model": "gpt-5"}, "model"),
        ({"assistant_id": "asst_tutor", "extra_body": {"context": {"notes": "x" * 17_000}}}, "context"),
        ({"assistant_id": "asst_tutor", "extra_body": {"context": ["a", "list"]}}, "context"),
        ({"assistant_id": "asst_tutor", "temperature": 3}, "temperature"),
        ({"assistant_id": "asst_tutor", "extra_body": {"colour": "red"}}, "colour"),
        (
            {"assistant_id": "asst_tutor", "additional_messages": [{"role": "user", "content": ""}]},
            "additional_messages.0.content",
        ),
    ]
    for params, param in bad:
        with pytest.raises(openai.APIStatusError) as refused:
            await client.beta.threads.runs.create(thread_id=thread.id, **params)
        assert refused.value.status_code in (400, 403, 404), (params, refused.value)
        body = refused.value.body
        assert isinstance(body, dict) and body.get("param") == param, (params, body)
    assert upstream.requests == [] and await db.fetchval("SELECT count(*) FROM thread_run") == 0
    assert await db.fetchval("SELECT count(*) FROM thread_message") == 1
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id="asst_tutor", poll_interval_ms=50
    )
    assert run.status == "completed"  # and the thread is not left busy


async def test_a_streamed_run_sends_heartbeats_and_has_a_time_limit(
    gateway_with: GatewayFactory, upstream: FakeUpstream, assistants_file: Path, db: asyncpg.Pool
) -> None:
    upstream.reset()
    upstream.script(CHAT, Reply(chunk_delay=0.15), Reply(chunk_delay=0.4))
    async with gateway_with(assistants_file=assistants_file, stream_heartbeat_seconds=0.1, run_timeout=1.5) as slow:
        key, _ = await slow.key("pro")
        _, client = await user(slow)
        client = client.with_options(api_key=key)
        thread = await client.beta.threads.create(messages=[{"role": "user", "content": "hi"}])
        headers = {**bearer(key), "openai-beta": "assistants=v2"}
        async with slow.client.stream(
            "POST",
            f"/v1/threads/{thread.id}/runs",
            json={"assistant_id": "asst_tutor", "stream": True},
            headers=headers,
        ) as response:
            body = (await response.aread()).decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert ": keep-alive" in body  # the upstream was silent for longer than the heartbeat
        assert body.endswith("event: done\ndata: [DONE]\n\n")
        assert "event: thread.run.completed" in body

        # 0.4 s a piece, six pieces: past the 1.5 s limit. The run fails, its partial reply kept.
        run = await client.beta.threads.runs.create_and_poll(
            thread_id=thread.id, assistant_id="asst_tutor", poll_interval_ms=50
        )
        assert run.status == "failed" and run.last_error is not None
        assert "time limit" in run.last_error.message
        reply = await db.fetchrow("SELECT status, incomplete_reason FROM thread_message ORDER BY seq DESC LIMIT 1")
        assert (reply["status"], reply["incomplete_reason"]) == ("incomplete", "run_failed")


async def test_create_and_run_makes_the_thread_and_streams_it_first(gw: Gateway, upstream: FakeUpstream) -> None:
    _, client = await user(gw)
    handler = Collector()
    async with client.beta.threads.create_and_run_stream(
        assistant_id="asst_tutor",
        thread={"messages": [{"role": "user", "content": "A fresh start."}], "metadata": {"from": "home"}},
        event_handler=handler,
    ) as stream:
        await stream.until_done()
        run = await stream.get_final_run()
    assert handler.names[:3] == ["thread.created", "thread.run.created", "thread.run.queued"]
    assert handler.names[-1] == "thread.run.completed" and "".join(handler.deltas) == CONTENT
    thread = await client.beta.threads.retrieve(run.thread_id)
    assert thread.metadata == {"from": "home"}
    assert await thread_texts(client, thread.id) == [("user", "A fresh start."), ("assistant", CONTENT)]

    polled = await client.beta.threads.create_and_run_poll(
        assistant_id="asst_tutor", thread={"messages": [{"role": "user", "content": "Again."}]}, poll_interval_ms=50
    )
    assert polled.status == "completed" and polled.thread_id != thread.id
    assert await thread_texts(client, polled.thread_id) == [("user", "Again."), ("assistant", CONTENT)]


async def test_image_url_parts_reach_a_vision_model(gw: Gateway, upstream: FakeUpstream) -> None:
    _, client = await user(gw)
    image = {"url": "https://zoo.example/lion.jpg", "detail": "low"}
    thread = await client.beta.threads.create()
    message = await client.beta.threads.messages.create(
        thread.id,
        role="user",
        content=[{"type": "text", "text": "Who is this?"}, {"type": "image_url", "image_url": image}],  # type: ignore[list-item]
    )
    assert [part.type for part in message.content] == ["text", "image_url"]
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id="asst_tutor", poll_interval_ms=50
    )
    assert run.status == "completed"
    assert upstream.received()[-1].json["messages"][-1] == {  # type: ignore[index]
        "role": "user",
        "content": [{"type": "text", "text": "Who is this?"}, {"type": "image_url", "image_url": image}],
    }
    with pytest.raises(openai.BadRequestError) as refused:
        await client.beta.threads.messages.create(
            thread.id, role="user", content=[{"type": "image_file", "image_file": {"file_id": "file-abc"}}]
        )
    assert refused.value.body["param"] == "content.0.type"  # type: ignore[index]


async def test_messages_keep_their_order_and_page_both_ways(gw: Gateway) -> None:
    _, client = await user(gw)
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": f"m{n}"} for n in range(3)])
    ids = [(await client.beta.threads.messages.create(thread.id, role="user", content=f"m{n}")).id for n in range(3, 7)]
    # All made within the same second: the order is creation order all the same.
    oldest = await client.beta.threads.messages.list(thread.id, order="asc", limit=3)
    assert [texts([m])[0][1] for m in oldest.data] == ["m0", "m1", "m2"] and oldest.has_more
    assert oldest.first_id == oldest.data[0].id and oldest.last_id == oldest.data[-1].id
    every = [texts([m])[0][1] async for m in client.beta.threads.messages.list(thread.id, order="asc", limit=2)]
    assert every == [f"m{n}" for n in range(7)]
    newest = [texts([m])[0][1] async for m in client.beta.threads.messages.list(thread.id, limit=3)]
    assert newest == [f"m{n}" for n in range(6, -1, -1)]
    before = await client.beta.threads.messages.list(thread.id, order="asc", before=ids[1], limit=2)
    assert [texts([m])[0][1] for m in before.data] == ["m2", "m3"] and before.has_more
    after = await client.beta.threads.messages.list(thread.id, order="desc", after=ids[1], limit=10)
    assert [texts([m])[0][1] for m in after.data] == ["m3", "m2", "m1", "m0"] and not after.has_more

    changed = await client.beta.threads.messages.update(ids[0], thread_id=thread.id, metadata={"seen": "yes"})
    assert changed.metadata == {"seen": "yes"}
    deleted = await client.beta.threads.messages.delete(ids[0], thread_id=thread.id)
    assert deleted.deleted and deleted.id == ids[0]
    with pytest.raises(openai.NotFoundError):
        await client.beta.threads.messages.retrieve(ids[0], thread_id=thread.id)
    for bad in ("not-an-id", "thread_" + uuid.uuid4().hex):
        with pytest.raises(openai.BadRequestError) as refused:
            await client.beta.threads.messages.list(thread.id, after=bad)
        assert refused.value.body["param"] == "after"  # type: ignore[index]


async def test_threads_round_trip_and_list_as_our_extension(gw: Gateway, db: asyncpg.Pool) -> None:
    user_id, client = await user(gw)
    made = await client.beta.threads.create(metadata={"class": "5B"})
    assert made.object == "thread" and isinstance(made.created_at, int)
    assert (await client.beta.threads.retrieve(made.id)).model_dump() == made.model_dump()
    changed = await client.beta.threads.update(made.id, metadata={"term": "2"})
    assert changed.metadata == {"term": "2"}
    others = [await client.beta.threads.create(metadata={"class": str(n)}) for n in range(3)]
    listed = await client.get("/threads", cast_to=dict, options={"params": {"limit": 2}})  # type: ignore[type-var]
    assert [t["id"] for t in listed["data"]] == [others[2].id, others[1].id] and listed["has_more"] is True
    rest = await client.get(
        "/threads",
        cast_to=dict,
        options={"params": {"limit": 5, "after": listed["last_id"]}},  # type: ignore[type-var]
    )
    assert [t["id"] for t in rest["data"]] == [others[0].id, made.id] and rest["has_more"] is False
    filtered = await client.get(
        "/threads",
        cast_to=dict,
        options={"params": {"metadata_key": "class", "metadata_value": "1"}},  # type: ignore[type-var]
    )
    assert [t["id"] for t in filtered["data"]] == [others[1].id]
    deleted = await client.beta.threads.delete(made.id)
    assert deleted.deleted and deleted.id == made.id
    with pytest.raises(openai.NotFoundError) as gone:
        await client.beta.threads.retrieve(made.id)
    assert gone.value.code == "thread_not_found"
    assert await db.fetchval("SELECT count(*) FROM thread WHERE user_id = $1", user_id) == 3


async def test_get_or_create_finds_the_users_thread_of_an_assistant(gw: Gateway, db: asyncpg.Pool) -> None:
    _, client = await user(gw)

    async def lookup(assistant_id: str, **body: Any) -> dict[str, Any]:
        return await client.post(f"/assistants/{assistant_id}/thread", body=body, cast_to=dict)  # type: ignore[type-var]

    first = await lookup("asst_coach", chat_type="general")
    assert first["created"] is True and first["assistant_id"] == "asst_coach"
    again = await lookup("asst_coach", chat_type="general")
    assert again["created"] is False and again["id"] == first["id"]
    other = await lookup("asst_tutor")
    assert other["created"] is True and other["id"] != first["id"]
    with pytest.raises(openai.BadRequestError) as wrong:
        await lookup("asst_tutor", chat_type="pillar_health")  # that chat type is asst_coach_health's
    assert wrong.value.body["param"] == "chat_type"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        await lookup("asst_nobody")
    filtered = await client.get("/threads", cast_to=dict, options={"params": {"assistant_id": "asst_coach"}})  # type: ignore[type-var]
    assert [t["id"] for t in filtered["data"]] == [first["id"]]

    # Concurrent first calls of a new user still make one thread.
    newcomer_id, newcomer = await user(gw)
    answers = await asyncio.gather(
        *[newcomer.post("/assistants/asst_coach/thread", body={}, cast_to=dict) for _ in range(6)]  # type: ignore[type-var]
    )
    assert sorted(a["created"] for a in answers) == [False] * 5 + [True]
    assert len({a["id"] for a in answers}) == 1
    assert await db.fetchval("SELECT count(*) FROM thread WHERE user_id = $1", newcomer_id) == 1


async def test_assistant_fallback_answers_simulated_and_says_so(
    gw: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    user_id, client = await user(gw)
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "anyone there?"}])
    upstream.script(CHAT, *[Reply(status=503)] * 6)
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id="asst_rescue", poll_interval_ms=50
    )
    assert run.status == "completed" and run.model_extra is not None
    assert run.model_extra["simulated"] is True and run.model_extra["cost_usd"] == 0
    [reply] = [m async for m in client.beta.threads.messages.list(thread.id, run_id=run.id)]
    assert reply.model_extra is not None and reply.model_extra["simulated"] is True and texts([reply])[0][1]
    [row] = await usage_rows(db, user_id=user_id)
    assert row["status"] == "fallback" and row["cost_usd"] == 0


async def test_simulated_mode_answers_runs_offline(
    gateway_with: GatewayFactory, assistants_file: Path, db: asyncpg.Pool
) -> None:
    async with gateway_with(simulated=True, assistants_file=assistants_file) as sim:
        user_id, client = await user(sim)
        thread = await client.beta.threads.create(messages=[{"role": "user", "content": "Hi"}])
        queued = await client.beta.threads.runs.create(thread_id=thread.id, assistant_id="asst_tutor")
        assert queued.model_extra is not None and queued.model_extra["simulated"] is True  # known from the start
        plain = await client.beta.threads.runs.poll(queued.id, thread_id=thread.id, poll_interval_ms=50)
        assert plain.status == "completed" and plain.model_extra is not None and plain.model_extra["simulated"]
        [reply] = [m async for m in client.beta.threads.messages.list(thread.id, run_id=plain.id)]
        handler = Collector()
        async with client.beta.threads.create_and_run_stream(
            assistant_id="asst_tutor", thread={"messages": [{"role": "user", "content": "Hi"}]}, event_handler=handler
        ) as stream:
            await stream.until_done()
        assert "".join(handler.deltas) == texts([reply])[0][1]  # deterministic per last user message
        rows = await usage_rows(db, count=2, user_id=user_id)
        assert {r["status"] for r in rows} == {"simulated"}


# --- context from the app ---------------------------------------------------------------------


async def run_once(client: openai.AsyncOpenAI, assistant_id: str, content: str = "hi", **extra: Any) -> Run:
    run = await client.beta.threads.create_and_run_poll(
        assistant_id=assistant_id,
        thread={"messages": [{"role": "user", "content": content}]},
        poll_interval_ms=50,
        **extra,
    )
    assert run.status == "completed", run.last_error
    return run


async def test_a_slow_context_url_never_fails_the_run(
    gw: Gateway, upstream: FakeUpstream, db: asyncpg.Pool, context_server: ContextServer
) -> None:
    user_id, client = await user(gw)
    await run_once(client, "asst_slow_context", extra_body={"context": {"from": "app"}})
    assert len(context_server.calls) == 1
    assert upstream.received()[-1].json["messages"][:2] == [  # type: ignore[index]
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
        user_id, client = await user(gw)
        elsewhere.contexts[user_id] = {"leaked": "from elsewhere"}
        context_server.redirect_to = f"http://127.0.0.1:{elsewhere.port}/context"
        await run_once(client, "asst_redirected")  # a failed fetch: the run goes on without context
        assert [call["path"] for call in context_server.calls] == ["/redirect"]
        assert elsewhere.calls == []
        assert upstream.received()[-1].json["messages"] == [  # type: ignore[index]
            {"role": "system", "content": "Redirected."},
            {"role": "user", "content": "hi"},
        ]
        assert await db.fetchval("SELECT count(*) FROM user_context_cache WHERE user_id = $1", user_id) == 0
    finally:
        await elsewhere.stop()


async def test_the_user_id_reaches_the_context_url_intact(gw: Gateway, context_server: ContextServer) -> None:
    user_id = "ana&x=1 =é+ü/?#%20"
    key, _ = await gw.key("pro", user=user_id)
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    await run_once(client, "asst_coach")
    assert [call["query"] for call in context_server.calls] == [{"user_id": user_id, "profile": "coach"}]


async def test_an_expired_or_failing_context_is_refetched_or_kept(
    gw: Gateway, upstream: FakeUpstream, db: asyncpg.Pool, context_server: ContextServer
) -> None:
    user_id, client = await user(gw)
    context_server.contexts[user_id] = {"name": "Ana"}
    await run_once(client, "asst_coach")
    row = await db.fetchrow("SELECT * FROM user_context_cache WHERE user_id = $1", user_id)
    assert row["profile"] == "coach"
    context_server.contexts[user_id] = {"name": "Ana B."}
    await db.execute("UPDATE user_context_cache SET fetched_at = now() - interval '61 seconds'")
    await run_once(client, "asst_coach")  # past the profile's TTL (60 s): fetched again
    assert len(context_server.calls) == 2
    assert upstream.received()[-1].json["messages"][1]["content"].endswith("name: Ana B.")  # type: ignore[index]
    await db.execute("UPDATE user_context_cache SET fetched_at = now() - interval '1 day'")
    context_server.status = 500
    await run_once(client, "asst_coach")  # a failing URL: the old context serves
    assert len(context_server.calls) == 3
    assert upstream.received()[-1].json["messages"][1]["content"].endswith("name: Ana B.")  # type: ignore[index]


# --- retention --------------------------------------------------------------------------------


async def _idle_and_fresh_threads(gateway: Gateway, db: asyncpg.Pool) -> tuple[str, uuid.UUID, uuid.UUID]:
    user_id, client = await user(gateway)
    idle = (await run_once(client, "asst_tutor")).thread_id
    fresh = (await run_once(client, "asst_tutor")).thread_id
    idle_id, fresh_id = uuid.UUID(idle.removeprefix("thread_")), uuid.UUID(fresh.removeprefix("thread_"))
    await db.execute("UPDATE thread SET updated_at = now() - interval '31 days' WHERE id = $1", idle_id)
    await db.execute(
        "INSERT INTO user_context_cache (user_id, profile, context, fetched_at)"
        " VALUES ($1, 'coach', '{}', now() - interval '40 days'), ($1, 'coach_health', '{}', now())",
        user_id,
    )
    return user_id, idle_id, fresh_id


async def rows_of(db: asyncpg.Pool, thread_id: uuid.UUID) -> tuple[int, int, int, int]:
    counts = await db.fetchrow(
        "SELECT (SELECT count(*) FROM thread WHERE id = $1),"
        " (SELECT count(*) FROM thread_message WHERE thread_id = $1),"
        " (SELECT count(*) FROM thread_run WHERE thread_id = $1),"
        " (SELECT count(*) FROM run_step WHERE thread_id = $1)",
        thread_id,
    )
    return tuple(counts)  # type: ignore[return-value]


async def test_retention_deletes_idle_threads_with_their_messages_runs_and_steps(gw: Gateway, db: asyncpg.Pool) -> None:
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
    assert await rows_of(db, idle) == (0, 0, 0, 0)
    assert await rows_of(db, fresh) == (1, 2, 1, 1)
    assert await db.fetchval("SELECT array_agg(profile) FROM user_context_cache WHERE user_id = $1", user_id) == [
        "coach_health"
    ]
    assert await prune_idle_threads(internals.sessionmaker(gw.app), days=30) == 0


async def test_prune_threads_cli(gw: Gateway, db: asyncpg.Pool, database_url: str) -> None:
    _, idle, fresh = await _idle_and_fresh_threads(gw, db)
    await db.execute("UPDATE thread SET updated_at = now() - interval '10 days' WHERE id = $1", idle)
    env = {**os.environ, "DATABASE_URL": database_url, "THREAD_RETENTION_DAYS": "30"}
    code, output = await app_command_async("prune-threads", env=env)
    assert code == 0 and "threads idle for more than 30 days" in output  # ours is 10 days idle: kept
    assert (await rows_of(db, idle))[0] == 1
    code, output = await app_command_async("prune-threads", "--days", "7", env=env)
    assert code == 0 and "threads idle for more than 7 days" in output
    assert await rows_of(db, idle) == (0, 0, 0, 0)
    assert (await rows_of(db, fresh))[0] == 1


async def test_the_retention_job_runs_in_the_background(
    gateway_with: GatewayFactory, assistants_file: Path, db: asyncpg.Pool
) -> None:
    async with gateway_with(assistants_file=assistants_file, thread_retention_interval=0.1) as background:
        _, idle, fresh = await _idle_and_fresh_threads(background, db)

        async def pruned() -> bool:
            return (await rows_of(db, idle))[0] == 0

        assert await wait_for(pruned)
        assert (await rows_of(db, fresh))[0] == 1


async def test_a_run_left_waiting_for_tool_outputs_expires(
    gateway_with: GatewayFactory, upstream: FakeUpstream, assistants_file: Path, db: asyncpg.Pool
) -> None:
    upstream.reset()
    upstream.script(CHAT, tool_call_reply(("call_a", "enclosure_weather", "{}")))
    async with gateway_with(assistants_file=assistants_file, run_action_timeout=0.5, run_sweep_interval=0.1) as quick:
        _, client = await user(quick)
        thread = await client.beta.threads.create(messages=[{"role": "user", "content": "Weather?"}])
        run = await client.beta.threads.runs.create_and_poll(
            thread_id=thread.id,
            assistant_id="asst_tutor",
            tools=[WEATHER],  # type: ignore[list-item]
            poll_interval_ms=50,
        )
        assert run.status == "requires_action"

        async def expired() -> Run | None:
            polled = await client.beta.threads.runs.retrieve(run.id, thread_id=thread.id)
            return polled if polled.status != "requires_action" else None

        ended = await wait_for(expired)
        assert ended.status == "expired" and ended.required_action is None
        [step] = [s async for s in client.beta.threads.runs.steps.list(run.id, thread_id=thread.id)]
        assert step.status == "expired"
        with pytest.raises(openai.BadRequestError) as late:
            await client.beta.threads.runs.submit_tool_outputs(
                run.id, thread_id=thread.id, tool_outputs=[{"tool_call_id": "call_a", "output": "sun"}]
            )
        assert late.value.code == "run_not_active"
        again = await client.beta.threads.runs.create_and_poll(
            thread_id=thread.id, assistant_id="asst_tutor", poll_interval_ms=50
        )
        assert again.status == "completed"


# --- database round trips ---------------------------------------------------------------------


def statement_kind(sql: str) -> str:
    """`SELECT a, b FROM thread_run ...` -> `SELECT thread_run`; `UPDATE thread SET ...` -> `UPDATE thread`."""
    words = sql.split()
    if words[0] == "SELECT":
        return "SELECT " + next(b for a, b in itertools.pairwise(words) if a == "FROM" and b.isidentifier())
    return f"{words[0]} {words[2] if words[0] == 'INSERT' else words[1]}"


async def test_statements_of_a_streamed_run(gw: Gateway) -> None:
    """The reads and writes of a run, each phase on its own short checkout: none is held across the
    upstream call (the checkouts between the run's start and its end are the reply's own writes)."""
    _, client = await user(gw)
    thread = await client.beta.threads.create()
    await run_once(client, "asst_tutor", "warm up")  # the key is now cached: no auth lookups below
    await client.beta.threads.messages.create(thread.id, role="user", content="measured")
    engine = internals.sync_engine(gw.app)
    seen: list[str] = []

    def statement(conn, cursor, sql, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        seen.append(statement_kind(sql))

    def checkout(*args: Any) -> None:
        seen.append("CHECKOUT")

    listeners = [(engine, "before_cursor_execute", statement), (engine.pool, "checkout", checkout)]
    for target, name, listener in listeners:
        event.listen(target, name, listener)
    try:
        async with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id="asst_tutor") as stream:
            await stream.until_done()
    finally:
        for target, name, listener in listeners:
            event.remove(target, name, listener)
    assert seen == [
        # The request: the thread is the caller's, the assistant, the newest chat type.
        *["CHECKOUT", "SELECT thread", "SELECT assistant", "SELECT thread_message"],
        # The plan: the history window and the cached context.
        *["CHECKOUT", "SELECT thread_message", "SELECT user_context_cache"],
        # The run, queued, in one transaction.
        *["CHECKOUT", "INSERT thread_run", "UPDATE thread"],
        # The round: in progress; the first text makes the step and the message; the end.
        *["CHECKOUT", "UPDATE thread_run"],
        *["CHECKOUT", "INSERT run_step", "INSERT thread_message"],
        *["CHECKOUT", "UPDATE thread_message", "UPDATE run_step", "UPDATE thread_run"],
    ]


async def test_two_submissions_of_the_same_outputs_take_the_run_once(
    gw: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    _, client = await user(gw)
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "Weather?"}])
    upstream.script(CHAT, tool_call_reply(("call_a", "enclosure_weather", "{}")))
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id,
        assistant_id="asst_tutor",
        tools=[WEATHER],  # type: ignore[list-item]
        poll_interval_ms=50,
    )
    assert run.status == "requires_action"
    upstream.set_default(CHAT, Reply(delay=0.2))
    answers = await asyncio.gather(
        *[
            client.beta.threads.runs.submit_tool_outputs(
                run.id, thread_id=thread.id, tool_outputs=[{"tool_call_id": "call_a", "output": output}]
            )
            for output in ("FIRST", "SECOND")
        ],
        return_exceptions=True,
    )
    taken = [answer for answer in answers if isinstance(answer, Run)]
    refused = [answer for answer in answers if isinstance(answer, openai.BadRequestError)]
    assert len(taken) == 1 and len(refused) == 1 and refused[0].code == "run_not_active"
    await client.beta.threads.runs.poll(run.id, thread_id=thread.id, poll_interval_ms=50)
    [step] = [
        s async for s in client.beta.threads.runs.steps.list(run.id, thread_id=thread.id) if s.type == "tool_calls"
    ]
    sent = upstream.received()[-1].json["messages"][-1]["content"]  # type: ignore[index]
    assert step.step_details.tool_calls[0].function.output == sent  # type: ignore[union-attr]
    upstream.set_default(CHAT, None)
