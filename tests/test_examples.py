"""The example backends in `examples/` run as their apps run them: processes driving a real gateway
through the official SDK, with the base URL and key from OPENAI_BASE_URL and OPENAI_API_KEY.

Each test checks what the script printed against what the gateway stored. The coach and the zoo
run against a simulated gateway (as `python -m app serve` runs with nothing configured), the
teacher panel against the fake upstream, which shows what reached the model.
"""

from __future__ import annotations

import os
import re

import asyncpg

from app.upstream.simulated import REPLIES
from support.fake_upstream import CONTENT, FakeUpstream
from support.gateway import ROOT, Gateway, GatewayFactory, python_async

EXAMPLES = ROOT / "examples"
SECONDS = 60.0


async def run_example(name: str, gateway: Gateway, key: str) -> str:
    """`python examples/<name>.py` against the gateway, without blocking the event loop; its stdout.

    Fails unless it exits 0. Its stderr (the SDK's warnings, say) is only shown on failure."""
    env = {**os.environ, "OPENAI_BASE_URL": gateway.url + "/v1", "OPENAI_API_KEY": key}
    code, stdout, stderr = await python_async(str(EXAMPLES / f"{name}.py"), env=env, seconds=SECONDS, stderr_apart=True)
    assert code == 0, f"examples/{name}.py exited {code}:\n{stdout}\n{stderr}"
    return stdout


def printed(stdout: str, prefix: str) -> list[str]:
    """What the script printed after `prefix` on each line that starts with it."""
    return [line.removeprefix(prefix) for line in stdout.splitlines() if line.startswith(prefix)]


async def test_the_coach_backend_polls_a_run_and_prints_the_reply(
    gateway_with: GatewayFactory, db: asyncpg.Pool
) -> None:
    async with gateway_with(simulated=True) as gateway:
        key, user_id = await gateway.key("pro")
        stdout = await run_example("coach", gateway, key)

    [status] = printed(stdout, "thread ")
    assert status.endswith(" completed"), stdout
    [reply] = printed(stdout, "coach: ")
    assert reply in REPLIES
    [run] = await db.fetch(
        "SELECT id, thread_id, assistant_id, status, additional_instructions, simulated FROM thread_run"
        " WHERE user_id = $1",
        user_id,
    )
    assert (run["assistant_id"], run["status"], run["simulated"]) == ("asst_coach", "completed", True)
    assert "Sam" in run["additional_instructions"]
    assert f"run_{run['id'].hex} completed" in status and f"thread_{run['thread_id'].hex}" in status
    stored = await db.fetch(
        "SELECT role, content FROM thread_message WHERE thread_id = $1 ORDER BY seq", run["thread_id"]
    )
    assert [(row["role"], row["content"]) for row in stored] == [
        ("user", "I slept badly again last night. What could I try this evening?"),
        ("assistant", reply),
    ]


async def test_the_zoo_backend_streams_each_animal_and_deletes_its_assistants(
    gateway_with: GatewayFactory, db: asyncpg.Pool
) -> None:
    async with gateway_with(simulated=True) as gateway:
        key, user_id = await gateway.key("pro")
        stdout = await run_example("zoo", gateway, key)

    created = dict(re.findall(r"^created (asst_\w+) \((.+)\)$", stdout, re.MULTILINE))
    assert sorted(created.values()) == ["Leo the lion", "Pip the penguin"]
    assert sorted(printed(stdout, "deleted ")) == sorted(created)
    assert await db.fetchval("SELECT count(*) FROM assistant WHERE id = ANY($1::text[])", list(created)) == 0
    assert printed(stdout, "run on ") and all(line.endswith(": completed") for line in printed(stdout, "run on "))

    runs = await db.fetch(
        "SELECT id, thread_id, assistant_id, status, simulated FROM thread_run WHERE user_id = $1 ORDER BY seq",
        user_id,
    )
    assert [(created[run["assistant_id"]], run["status"], run["simulated"]) for run in runs] == [
        ("Leo the lion", "completed", True),
        ("Pip the penguin", "completed", True),
    ]
    # Each answer was printed as its deltas arrived, and is what the thread keeps.
    answers = printed(stdout, "lion: ") + printed(stdout, "penguin: ")
    stored = [
        await db.fetchval(
            "SELECT content FROM thread_message WHERE run_id = $1 AND role = 'assistant' AND status = 'completed'",
            run["id"],
        )
        for run in runs
    ]
    assert answers == stored and all(answer in REPLIES for answer in answers)
    questions = await db.fetch(
        "SELECT m.content FROM thread_message m JOIN thread t ON t.id = m.thread_id"
        " WHERE t.user_id = $1 AND m.role = 'user' ORDER BY m.seq",
        user_id,
    )
    assert [row["content"] for row in questions] == ["How loud can you roar?", "Why can't you fly?"]


async def test_the_teacher_backend_keeps_the_typed_shortcut_and_sends_its_expansion(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    key, user_id = await gateway.key("pro")
    first = await run_example("teacher", gateway, key)
    again = await run_example("teacher", gateway, key)  # get-or-create: the same thread the second time

    for stdout in (first, again):
        assert printed(stdout, "assistant: ") == [CONTENT]
        assert printed(stdout, "stored as typed: ") == ["/ptm Maya, reading comprehension"]
        [expanded] = printed(stdout, "expanded to: ")
        assert expanded.startswith("Help me prepare for a parent-teacher meeting")
    [thread_line] = {line.split(" run ")[0] for line in printed(first, "thread ") + printed(again, "thread ")}

    [thread] = await db.fetch("SELECT id, assistant_id FROM thread WHERE user_id = $1", user_id)
    assert thread_line == f"thread_{thread['id'].hex}" and thread["assistant_id"] == "asst_teacher"
    runs = await db.fetch("SELECT status FROM thread_run WHERE thread_id = $1 ORDER BY seq", thread["id"])
    assert [run["status"] for run in runs] == ["completed", "completed"]
    users = await db.fetch(
        "SELECT content, prompt FROM thread_message WHERE thread_id = $1 AND role = 'user' ORDER BY seq", thread["id"]
    )
    assert [row["content"] for row in users] == ["/ptm Maya, reading comprehension"] * 2
    assert all(row["prompt"].startswith("Help me prepare for a parent-teacher meeting") for row in users)
    assert all(row["prompt"].endswith("Maya, reading comprehension") for row in users)

    # The model got the expansion, not the typed command, and the student's facts from `context`.
    sent = upstream.received()[-1].json
    assert sent is not None
    messages = sent["messages"]
    assert messages[-1] == {"role": "user", "content": users[-1]["prompt"]}
    assert not any("/ptm" in str(message["content"]) for message in messages)
    system = " ".join(str(message["content"]) for message in messages if message["role"] == "system")
    assert "Maya" in system and "5B" in system and "B+" in system
