"""The Responses API through the official SDK: plain and streamed, priced from the final usage, each
response its creator's alone; against the fake upstream and simulated."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import asyncpg
import openai
import pytest

from support import internals
from support.auth import bearer
from support.errors import assert_error
from support.fake_upstream import CONTENT, RESPONSE_USAGE, FakeUpstream, Reply
from support.gateway import Gateway, GatewayFactory
from support.waiting import usage_rows

RESPONSES = "/v1/responses"
FREE_CAP = 2048  # the free tier's max_completion_tokens (app/catalog.toml)
# gpt-5-mini: $0.25 per 1M input tokens, $0.025 cached, $2.00 output (reasoning included, priced once).
DEFAULT_COST = Decimal(15 * 0.25 + 5 * 0.025 + 30 * 2.0) / 1_000_000


@pytest.fixture(scope="module")
def gateway_settings() -> dict[str, Any]:
    return {"responses_poll_seconds": 0.1}  # background responses are read often, so they settle quickly


def sdk(gateway: Gateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


async def test_a_response_is_relayed_reserved_and_priced_from_its_usage(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    key, user = await gateway.key("free")
    raw = await sdk(gateway, key).responses.with_raw_response.create(model="default-chat", input="Say hello")
    response = raw.parse()
    assert response.output_text == CONTENT and response.id.startswith("resp_fake_")
    assert raw.headers["x-gateway-max-output-tokens"] == str(FREE_CAP)
    [sent] = upstream.received(RESPONSES)
    assert sent.json == {"model": "gpt-5-mini", "input": "Say hello", "max_output_tokens": FREE_CAP}
    [row] = await usage_rows(db, user_id=user, route="responses")
    assert (row["status"], row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == ("ok", 20, 5, 30)
    assert row["cost_usd"] == pytest.approx(DEFAULT_COST, abs=Decimal("1e-8"))


async def test_a_streamed_response_relays_its_events_in_order(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    key, user = await gateway.key("free")
    stream = await sdk(gateway, key).responses.create(model="default-chat", input="Say hello", stream=True)
    events = [event async for event in stream]
    names = [event.type for event in events]
    assert names[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert names[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == CONTENT and [event.sequence_number for event in events] == list(range(len(events)))
    [row] = await usage_rows(db, user_id=user, route="responses")
    assert (row["status"], row["stream"], row["prompt_tokens"], row["completion_tokens"]) == ("ok", True, 20, 30)
    assert row["cost_usd"] == pytest.approx(DEFAULT_COST, abs=Decimal("1e-8"))
    response_id = events[0].response.id  # type: ignore[union-attr]
    kept = await sdk(gateway, key).responses.retrieve(response_id)  # recorded as this user's from its first event
    assert kept.id == response_id


async def test_another_users_response_is_a_404_on_every_route(gateway: Gateway, upstream: FakeUpstream) -> None:
    owner_key, _ = await gateway.key("free")
    other_key, _ = await gateway.key("free")
    owner, other = sdk(gateway, owner_key), sdk(gateway, other_key)
    made = await owner.responses.create(model="default-chat", input="my secret plans")
    calls_before = len(upstream.requests)
    for attempt in (
        other.responses.retrieve(made.id),
        other.responses.delete(made.id),
        other.responses.cancel(made.id),
        other.responses.input_items.list(made.id),
        other.responses.create(model="default-chat", input="go on", previous_response_id=made.id),
        other.responses.input_tokens.count(model="default-chat", input="x", previous_response_id=made.id),
    ):
        with pytest.raises(openai.NotFoundError) as refused:
            await attempt
        assert refused.value.code == "response_not_found"
    assert len(upstream.requests) == calls_before  # refused before any upstream call

    assert (await owner.responses.retrieve(made.id)).output_text == CONTENT
    items = await owner.responses.input_items.list(made.id)
    assert [item.content for item in items.data] == ["my secret plans"]  # type: ignore[union-attr]
    follow = await owner.responses.create(model="default-chat", input="go on", previous_response_id=made.id)
    assert follow.previous_response_id == made.id
    assert (await owner.responses.input_tokens.count(model="default-chat", input="x")).input_tokens == 7
    await owner.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        await owner.responses.retrieve(made.id)


async def test_a_follow_up_reserves_the_tokens_of_the_response_it_continues(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    key, user = await gateway.key("free")
    limits = {"chat_tokens_per_minute": 200_000}
    await gateway.admin("PATCH", f"/admin/users/{user}", json={"limit_overrides": limits})
    client = sdk(gateway, key)
    upstream.script(RESPONSES, Reply(usage={**RESPONSE_USAGE, "input_tokens": 150_000, "total_tokens": 150_030}))
    long = await client.responses.create(model="default-chat", input="a long conversation")
    await usage_rows(db, user_id=user)  # settled: 150,030 of the minute's 200,000 tokens are spent
    # The follow-up resends those 150,030 tokens as input: reserved, they cannot fit; refused before the call.
    # (Reserving only its own short input and cap, about 2,060 tokens, it would have fitted.)
    with pytest.raises(openai.RateLimitError) as refused:
        await client.responses.create(model="default-chat", input="and then?", previous_response_id=long.id)
    assert refused.value.code == "rate_limit_exceeded"
    assert len(upstream.received(RESPONSES)) == 1


async def test_a_background_response_is_reserved_until_it_finishes_then_settled(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    key, user = await gateway.key("free")
    client = sdk(gateway, key)
    queued = await client.responses.create(model="default-chat", input="Think it over", background=True)
    assert queued.status == "queued"
    assert await db.fetchval("SELECT count(*) FROM usage_pending WHERE user_id = $1", user) == 1  # still reserved
    [row] = await usage_rows(db, user_id=user, route="responses")  # read until done, then settled
    assert (row["status"], row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == ("ok", 20, 5, 30)
    assert row["cost_usd"] == pytest.approx(DEFAULT_COST, abs=Decimal("1e-8"))
    assert (await client.responses.retrieve(queued.id)).status == "completed"

    # Its events again, after the fourth: a client resuming a stream it lost.
    resumed = await client.responses.retrieve(queued.id, stream=True, starting_after=3)
    events = [event async for event in resumed]
    assert events[0].sequence_number == 4 and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == CONTENT


async def test_a_cancelled_background_response_is_charged_what_it_used(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    key, user = await gateway.key("free")
    client = sdk(gateway, key)
    queued = await client.responses.create(model="default-chat", input="Think it over", background=True)
    cancelled = await client.responses.cancel(queued.id)
    assert cancelled.status == "cancelled"
    rows = await usage_rows(db, 2, user_id=user)
    by_route = {row["route"]: row for row in rows}
    assert (by_route["responses"]["status"], by_route["responses"]["completion_tokens"]) == ("cancelled", 3)
    assert by_route["responses.cancel"]["cost_usd"] == 0


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"stream": 0}, "stream"),
        ({"background": True, "stream": True}, "stream"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"max_output_tokens": 100_000}, "max_output_tokens"),
        ({"model": "gpt-5"}, "model"),  # not the free tier's
        ({"input": "hello\u0000"}, "input"),
        ({"text": {"format": {"type": "text", "name": "x\u0000"}}}, "body"),
        ({"previous_response_id": "resp_never_made"}, "previous_response_id"),
    ],
)
async def test_bad_requests_are_refused_before_any_upstream_call(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool, change: dict[str, Any], param: str
) -> None:
    key, _ = await gateway.key("free")
    body = {"model": "default-chat", "input": "hello", **change}
    response = await gateway.client.post(RESPONSES, json=body, headers=bearer(key))
    assert response.status_code in (400, 404)
    error = assert_error(response, response.status_code)
    assert (error["param"] or "body").startswith(param)
    assert upstream.received(RESPONSES) == []
    assert await db.fetchval("SELECT count(*) FROM usage_event") == 0


async def test_simulated_responses_answer_every_route(gateway_with: GatewayFactory, upstream: FakeUpstream) -> None:
    async with gateway_with(simulated=True) as gw:
        key, _ = await gw.key("free")
        client = sdk(gw, key)
        made = await client.responses.create(model="default-chat", input="Say hello", instructions="Be brief.")
        assert made.id.startswith("resp_sim_") and made.output_text and made.usage is not None
        stream = await client.responses.create(model="default-chat", input="Say hello", stream=True)
        events = [event async for event in stream]
        assert events[0].type == "response.created" and events[-1].type == "response.completed"
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == made.output_text
        assert (await client.responses.retrieve(made.id)).output_text == made.output_text
        items = await client.responses.input_items.list(made.id)
        assert len(items.data) == 1
        assert (await client.responses.input_tokens.count(model="default-chat", input="x" * 40)).input_tokens == 10
        await client.responses.delete(made.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(made.id)
    assert upstream.received(RESPONSES) == []


async def test_who_made_an_old_response_is_forgotten_after_the_retention_age(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    key, _ = await gateway.key("free")
    client = sdk(gateway, key)
    old = await client.responses.create(model="default-chat", input="long ago")
    recent = await client.responses.create(model="default-chat", input="just now")
    await db.execute("UPDATE response_owner SET created_at = now() - interval '31 days' WHERE id = $1", old.id)
    assert await internals.runtime(gateway.app).responses.prune_owners() == 1
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(old.id)
    assert (await client.responses.retrieve(recent.id)).id == recent.id
