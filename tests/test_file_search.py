"""file_search in runs, through the official SDK: assistants and threads name vector stores, runs search them
before answering, and replies cite the files they used (plain, streamed, simulated; attachments)."""

from __future__ import annotations

import uuid
from typing import Any

import openai
import pytest
from openai import AsyncAssistantEventHandler
from openai.types.beta.threads import Message
from typing_extensions import override

from app.threads.file_search import Citations, Passage, Searched
from support.auth import bearer
from support.errors import assert_error
from support.fake_upstream import FakeUpstream, Reply
from support.gateway import Gateway, GatewayFactory
from support.waiting import usage_rows, wait_for

pytestmark = [
    pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The Assistants API is deprecated:DeprecationWarning"),
]

CHAT = "/v1/chat/completions"
LIONS = (
    "Lions sleep between 16 and 20 hours a day, resting in the shade through the hottest hours. "
    "A lion's roar can be heard eight kilometres away. Lions live in groups called prides."
)
PENGUINS = (
    "Emperor penguins huddle together to survive the Antarctic winter. "
    "A penguin can drink sea water because a gland above its eyes removes the salt."
)
QUESTION = "How many hours a day do lions sleep?"
INCLUDE = "step_details.tool_calls[*].file_search.results[*].content"


def sdk(gateway: Gateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=key, base_url=f"{gateway.url}/v1", max_retries=0)


async def zoo_store(client: openai.AsyncOpenAI) -> tuple[str, str, str]:
    """The lion and penguin fact sheets in one vector store, indexed: (lions id, penguins id, store id)."""
    lions = await client.files.create(file=("lions.txt", LIONS.encode()), purpose="assistants")
    penguins = await client.files.create(file=("penguins.md", PENGUINS.encode()), purpose="assistants")
    store = await client.vector_stores.create(name="zoo", file_ids=[lions.id, penguins.id])

    async def indexed() -> bool:
        counts = (await client.vector_stores.retrieve(store.id)).file_counts
        return counts.completed == 2

    await wait_for(indexed)
    return lions.id, penguins.id, store.id


async def keeper(client: openai.AsyncOpenAI, store_id: str | None, **file_search: Any) -> str:
    tool: dict[str, Any] = {"type": "file_search", **({"file_search": file_search} if file_search else {})}
    resources = {"file_search": {"vector_store_ids": [store_id]}} if store_id else None
    assistant = await client.beta.assistants.create(
        model="gpt-5-mini", instructions="Answer from the zoo's fact sheets.", tools=[tool], tool_resources=resources
    )
    return assistant.id


def cited_reply(*pieces: str) -> Reply:
    """A streamed answer in these pieces (a marker may be cut between two)."""
    base = {"id": "chatcmpl-cite", "object": "chat.completion.chunk", "created": 1, "model": "gpt-5-mini"}
    chunks: list[dict[str, Any] | str] = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    ]
    chunks += [
        {**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]} for piece in pieces
    ]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    chunks.append({**base, "choices": [], "usage": {"prompt_tokens": 90, "completion_tokens": 12, "total_tokens": 102}})
    return Reply(chunks=chunks)


REPLY = ("Lions sleep 16 to 20 hours a day ", "【0†so", "urce】.")
MARKER = "【0†source】"


def assert_cites(message: Message, file_id: str) -> None:
    [part] = message.content
    assert part.type == "text"
    text = part.text
    [annotation] = text.annotations
    assert annotation.type == "file_citation"
    assert annotation.file_citation.file_id == file_id
    assert text.value[annotation.start_index : annotation.end_index] == annotation.text == MARKER


async def test_a_run_searches_the_store_and_its_reply_cites_the_file(
    gateway: Gateway, upstream: FakeUpstream, db
) -> None:
    key, user_id = await gateway.key("pro")
    client = sdk(gateway, key)
    lions, _, store = await zoo_store(client)
    assistant = await keeper(client, store)
    upstream.script(CHAT, cited_reply(*REPLY))
    run = await client.beta.threads.create_and_run_poll(
        assistant_id=assistant, thread={"messages": [{"role": "user", "content": QUESTION}]}
    )
    assert run.status == "completed", run.last_error
    [reply, _] = (await client.beta.threads.messages.list(run.thread_id)).data
    assert reply.content[0].text.value == "".join(REPLY)  # type: ignore[union-attr]
    assert_cites(reply, lions)

    # The model was given the passages, the lion's first, under their markers.
    [sent] = upstream.received(CHAT)
    sources = next(m["content"] for m in sent.json["messages"] if "file_search" in str(m["content"]))
    assert f"{MARKER} (file: lions.txt)\n{LIONS[:40]}" in sources

    # The file_search step: before the message, its results ranked; their text only when asked for.
    steps = (await client.beta.threads.runs.steps.list(run.id, thread_id=run.thread_id, order="asc")).data
    assert [step.type for step in steps] == ["tool_calls", "message_creation"]
    [search] = steps[0].step_details.tool_calls  # type: ignore[union-attr]
    assert search.type == "file_search"
    results = search.file_search.results
    assert results is not None and results[0].file_id == lions and results[0].file_name == "lions.txt"
    assert results[0].content is None
    detailed = await client.beta.threads.runs.steps.retrieve(
        steps[0].id, thread_id=run.thread_id, run_id=run.id, include=[INCLUDE]
    )
    [found] = detailed.step_details.tool_calls[0].file_search.results[:1]  # type: ignore[union-attr]
    assert found.content is not None and LIONS[:40] in found.content[0].text
    steps_path = f"/v1/threads/{run.thread_id}/runs/{run.id}/steps"
    for path in (steps_path, f"{steps_path}/{steps[0].id}"):
        unknown = await gateway.client.get(path, params={"include[]": "step_details.secrets"}, headers=bearer(key))
        assert_error(unknown, 400, param="include[].0")
    # Full-text search here (no pgvector): the run's call is the only one, the query needs no embedding.
    rows = await usage_rows(db, user_id=user_id)
    assert [row["route"] for row in rows] == ["threads.runs"]


class Deltas(AsyncAssistantEventHandler):
    def __init__(self) -> None:
        super().__init__()
        self.annotations: list[Any] = []

    @override
    async def on_message_delta(self, delta: Any, snapshot: Message) -> None:
        for part in delta.content or ():
            self.annotations += part.text.annotations or []


async def test_a_streamed_run_carries_the_citation_in_its_deltas(gateway: Gateway, upstream: FakeUpstream) -> None:
    key, _ = await gateway.key("pro")
    client = sdk(gateway, key)
    lions, _, store = await zoo_store(client)
    assistant = await keeper(client, store)
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": QUESTION}])
    upstream.script(CHAT, cited_reply(*REPLY))
    handler = Deltas()
    async with client.beta.threads.runs.stream(
        thread_id=thread.id, assistant_id=assistant, event_handler=handler
    ) as stream:
        await stream.until_done()
        final = await stream.get_final_messages()
    [annotation] = handler.annotations
    assert annotation.file_citation.file_id == lions
    assert (annotation.start_index, annotation.end_index) == (len(REPLY[0]), len(REPLY[0]) + len(MARKER))
    assert_cites(final[0], lions)


async def test_simulated_mode_answers_from_the_best_passage_and_cites_it(gateway_with: GatewayFactory) -> None:
    async with gateway_with(simulated=True) as gateway:
        key, _ = await gateway.key("pro")
        client = sdk(gateway, key)
        lions, penguins, store = await zoo_store(client)
        assistant = await keeper(client, store)
        run = await client.beta.threads.create_and_run_poll(
            assistant_id=assistant, thread={"messages": [{"role": "user", "content": QUESTION}]}
        )
        assert run.status == "completed", run.last_error
        [reply, _] = (await client.beta.threads.messages.list(run.thread_id)).data
        assert "20 hours" in reply.content[0].text.value  # type: ignore[union-attr]
        assert_cites(reply, lions)

        # A penguin question finds the other sheet.
        run = await client.beta.threads.create_and_run_poll(
            assistant_id=assistant,
            thread={"messages": [{"role": "user", "content": "Why can penguins drink sea water?"}]},
        )
        [reply, _] = (await client.beta.threads.messages.list(run.thread_id)).data
        assert_cites(reply, penguins)


async def test_attachments_go_into_the_threads_store_and_are_searched(gateway_with: GatewayFactory) -> None:
    async with gateway_with(simulated=True) as gateway:
        key, _ = await gateway.key("pro")
        client = sdk(gateway, key)
        penguins = await client.files.create(file=("penguins.md", PENGUINS.encode()), purpose="assistants")
        assistant = await keeper(client, None)  # the tool, and no store of its own
        thread = await client.beta.threads.create(
            messages=[
                {
                    "role": "user",
                    "content": "Why can penguins drink sea water?",
                    "attachments": [{"file_id": penguins.id, "tools": [{"type": "file_search"}]}],
                }
            ]
        )
        [store_id] = thread.tool_resources.file_search.vector_store_ids  # type: ignore[union-attr]
        store = await client.vector_stores.retrieve(store_id)
        assert store.expires_after is not None and store.expires_after.days == 7
        # The run waits for the file to be indexed, then cites it.
        run = await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant)
        assert run.status == "completed", run.last_error
        [reply, _] = (await client.beta.threads.messages.list(thread.id)).data
        assert_cites(reply, penguins.id)

        # A second attachment joins the same store.
        lions = await client.files.create(file=("lions.txt", LIONS.encode()), purpose="assistants")
        await client.beta.threads.messages.create(
            thread.id,
            role="user",
            content="And lions?",
            attachments=[{"file_id": lions.id, "tools": [{"type": "file_search"}]}],
        )
        listed = await client.vector_stores.files.list(store_id)
        assert {item.id for item in listed.data} == {penguins.id, lions.id}


async def test_max_num_results_and_the_score_threshold_are_honoured(gateway_with: GatewayFactory) -> None:
    async with gateway_with(simulated=True) as gateway:
        key, _ = await gateway.key("pro")
        client = sdk(gateway, key)
        _, _, store = await zoo_store(client)
        for options, most in (({"max_num_results": 1}, 1), ({"ranking_options": {"score_threshold": 1.0}}, 0)):
            assistant = await keeper(client, store, **options)
            run = await client.beta.threads.create_and_run_poll(
                assistant_id=assistant, thread={"messages": [{"role": "user", "content": QUESTION}]}
            )
            steps = (await client.beta.threads.runs.steps.list(run.id, thread_id=run.thread_id, order="asc")).data
            results = steps[0].step_details.tool_calls[0].file_search.results  # type: ignore[union-attr]
            assert results is not None and len(results) <= most
            if most:
                assert len(results) == 1


async def test_stores_and_files_of_others_cannot_be_named(gateway: Gateway) -> None:
    owner_key, _ = await gateway.key("pro")
    _, penguins, store = await zoo_store(sdk(gateway, owner_key))
    key, _ = await gateway.key("pro")
    body = {
        "model": "gpt-5-mini",
        "tools": [{"type": "file_search"}],
        "tool_resources": {"file_search": {"vector_store_ids": [store]}},
    }
    response = await gateway.client.post("/v1/assistants", json=body, headers=bearer(key))
    assert_error(response, 400, code="not_found", param="tool_resources.file_search.vector_store_ids.0")
    response = await gateway.client.post(
        "/v1/threads", json={"tool_resources": body["tool_resources"]}, headers=bearer(key)
    )
    assert_error(response, 400, code="not_found", param="tool_resources.file_search.vector_store_ids.0")
    message = {
        "role": "user",
        "content": "hi",
        "attachments": [{"file_id": penguins, "tools": [{"type": "file_search"}]}],
    }
    response = await gateway.client.post("/v1/threads", json={"messages": [message]}, headers=bearer(key))
    assert_error(response, 404)
    code = {**message, "attachments": [{"file_id": penguins, "tools": [{"type": "code_interpreter"}]}]}
    response = await gateway.client.post("/v1/threads", json={"messages": [code]}, headers=bearer(owner_key))
    assert_error(response, 400, code="unsupported_tool", param="attachments.0.tools")


def result(n: int) -> Passage:
    return Passage(uuid.uuid4(), f"f{n}.txt", f"passage {n}", 0.5)


def test_citations_are_found_however_the_reply_is_cut() -> None:
    searched = Searched(query="q", ranking_options={}, results=[result(0), result(1)])
    text = "A 【1†source】 and B【0†source】, not 【7†source】 nor 【x†source】; OpenAI's 【4:0†source】."
    for size in (1, 2, 3, 5, len(text)):
        citations = Citations(searched)
        made = [a for start in range(0, len(text), size) for a in citations.feed(text[start : start + size])]
        assert [a["index"] for a in made] == [0, 1, 2]
        files = [a["file_citation"]["file_id"] for a in made]
        assert files == [f"file-{searched.results[n].file_id.hex}" for n in (1, 0, 0)]
        for annotation in made:
            assert text[annotation["start_index"] : annotation["end_index"]] == annotation["text"]


async def test_a_shared_assistant_searches_the_staffs_store_for_every_visitor(gateway_with: GatewayFactory) -> None:
    """The zoo's keepers upload the fact sheets; the operator's shared assistant names their store; any
    visitor's run searches it (a store named by a user's own thread or assistant stays the user's)."""
    async with gateway_with(simulated=True) as gateway:
        staff_key, _ = await gateway.key("pro")
        lions, _, store = await zoo_store(sdk(gateway, staff_key))
        body = {
            "model": "gpt-5-mini",
            "slug": "zoo_keeper",
            "tools": [{"type": "file_search"}],
            "tool_resources": {"file_search": {"vector_store_ids": [store]}},
        }
        made = await gateway.admin("POST", "/admin/assistants", json=body)
        assert made.status_code == 201, made.text
        visitor_key, _ = await gateway.key("pro")
        visitor = sdk(gateway, visitor_key)
        run = await visitor.beta.threads.create_and_run_poll(
            assistant_id="asst_zoo_keeper", thread={"messages": [{"role": "user", "content": QUESTION}]}
        )
        [reply, _] = (await visitor.beta.threads.messages.list(run.thread_id)).data
        assert_cites(reply, lions)
        # The store itself stays the staff's.
        with pytest.raises(openai.NotFoundError):
            await visitor.vector_stores.retrieve(store)


async def test_the_passages_stay_with_the_run_through_its_tool_calls(gateway: Gateway, upstream: FakeUpstream) -> None:
    """A run that calls a function first answers in a later round: it still has the passages, and cites them."""
    key, _ = await gateway.key("pro")
    client = sdk(gateway, key)
    lions, _, store = await zoo_store(client)
    weather = {"type": "function", "function": {"name": "enclosure_weather", "parameters": {"type": "object"}}}
    assistant = await client.beta.assistants.create(
        model="gpt-5-mini",
        tools=[{"type": "file_search"}, weather],
        tool_resources={"file_search": {"vector_store_ids": [store]}},
    )
    base = {"id": "chatcmpl-tool", "object": "chat.completion.chunk", "created": 1, "model": "gpt-5-mini"}
    call = {
        "index": 0,
        "id": "call_w",
        "type": "function",
        "function": {"name": "enclosure_weather", "arguments": "{}"},
    }
    asks = [
        {
            **base,
            "choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [call]}, "finish_reason": None}],
        },
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    ]
    upstream.script(CHAT, Reply(chunks=asks), cited_reply(*REPLY))
    run = await client.beta.threads.create_and_run_poll(
        assistant_id=assistant.id, thread={"messages": [{"role": "user", "content": QUESTION}]}
    )
    assert run.status == "requires_action"
    run = await client.beta.threads.runs.submit_tool_outputs_and_poll(
        run_id=run.id, thread_id=run.thread_id, tool_outputs=[{"tool_call_id": "call_w", "output": "sunny"}]
    )
    assert run.status == "completed", run.last_error
    first, second = upstream.received(CHAT)
    for sent in (first, second):
        assert any(f"{MARKER} (file: lions.txt)" in str(m["content"]) for m in sent.json["messages"])
    [reply, _] = (await client.beta.threads.messages.list(run.thread_id)).data
    assert_cites(reply, lions)
    steps = (await client.beta.threads.runs.steps.list(run.id, thread_id=run.thread_id, order="asc")).data
    kinds = [step.step_details.tool_calls[0].type if step.type == "tool_calls" else step.type for step in steps]  # type: ignore[union-attr]
    assert kinds == ["file_search", "function", "message_creation"]  # one search, made once
