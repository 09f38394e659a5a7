"""Open streams: one per-user cap over every kind of stream, and batch progress pushed rather than
polled, through the process's one LISTEN connection (replaced when its link goes silent)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import openai
import pytest
from sqlalchemy import event

from app.config import PACKAGE_DIR
from app.listener import Listener
from app.registry import load_catalog
from support import internals
from support.auth import bearer
from support.errors import assert_error
from support.fake_upstream import FakeUpstream, Reply
from support.gateway import Gateway, GatewayFactory
from support.tcp_proxy import TcpProxy
from support.waiting import usage_rows, wait_for

CHAT = "/v1/chat/completions"
BATCHES = "/v1/images/batches"
UPSTREAM_IMAGES = "/v1/images/generations"
MESSAGES = [{"role": "user", "content": "Say hello"}]
ITEMS_READ = "ORDER BY image_batch_item.index"  # the statement that reads a batch's items
FREE_CAP = load_catalog(PACKAGE_DIR / "catalog.toml").tier("free").max_concurrent_streams
# Far longer than any wait below: an event that arrives came by push, not by the safety re-read.
RECHECK_SECONDS = 60.0
LONG = Reply(pieces=400, chunk_delay=0.05)  # a chat stream that lasts 20 s unless the client leaves


@pytest.fixture(scope="module")
def gateway_settings() -> dict[str, Any]:
    return {
        "image_batch_events_recheck_seconds": RECHECK_SECONDS,
        "image_batch_items_per_minute": 6000,
        "stream_heartbeat_seconds": 0.5,
    }


def sdk(gateway: Gateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


async def open_chat_stream(client: openai.AsyncOpenAI) -> openai.AsyncStream[Any]:
    """A streamed completion, open: its first chunk has arrived."""
    stream = await client.chat.completions.create(model="default-chat", messages=MESSAGES, stream=True)
    await stream.__anext__()
    return stream


async def held(gateway: Gateway, user: str, count: int) -> None:
    async def reached() -> bool:
        return internals.open_streams(gateway.app, user) == count

    await wait_for(reached, what=f"{user} to hold {count} open streams")


async def paused_batch(gateway: Gateway, db: asyncpg.Pool, key: str, items: int = 1) -> str:
    """A batch whose items wait for the user's limits (batch_images_per_hour is 0) and will not be tried again."""
    body = {"model": "default-image", "items": [{"prompt": f"portrait {i}"} for i in range(items)]}
    created = await gateway.client.post(BATCHES, json=body, headers=bearer(key))
    assert created.status_code == 202, created.text
    batch_id = created.json()["id"]

    async def refused() -> bool:
        codes = await db.fetch("SELECT error_code FROM image_batch_item WHERE batch_id = $1", uuid.UUID(batch_id))
        return any(row["error_code"] == "rate_limit_exceeded" for row in codes)

    await wait_for(refused)
    await db.execute(
        "UPDATE image_batch SET next_run_at = now() + interval '1 hour' WHERE id = $1", uuid.UUID(batch_id)
    )
    return batch_id


async def events_of(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """Every event of an open batch stream until the server ends it."""
    events: list[tuple[str, dict[str, Any]]] = []
    name = ""
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
    return events


@contextlib.asynccontextmanager
async def batch_stream(gateway: Gateway, key: str, batch_id: str) -> AsyncIterator[httpx.Response]:
    async with gateway.client.stream("GET", f"{BATCHES}/{batch_id}/events", headers=bearer(key), timeout=30) as opened:
        assert opened.status_code == 200, await opened.aread()
        yield opened


async def test_a_user_past_their_streams_gets_429_and_others_do_not(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    assert FREE_CAP == 4
    upstream.set_default(CHAT, LONG)
    key, user = await gateway.key("free")
    client = sdk(gateway, key)
    streams = [await open_chat_stream(client) for _ in range(FREE_CAP)]
    assert internals.open_streams(gateway.app, user) == FREE_CAP

    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(model="default-chat", messages=MESSAGES, stream=True)
    error = refused.value
    assert error.status_code == 429 and error.code == "too_many_streams"
    assert int(error.response.headers["retry-after"]) > 0
    assert error.response.headers["content-type"] == "application/json"
    assert len(upstream.received()) == FREE_CAP  # the refused stream never reached the upstream

    # Another user is not affected.
    upstream.script(CHAT, Reply())
    other_key, _ = await gateway.key("free")
    async with sdk(gateway, other_key) as other_client:
        chunks = [
            chunk
            async for chunk in await other_client.chat.completions.create(
                model="default-chat", messages=MESSAGES, stream=True
            )
        ]
    assert chunks and chunks[-1].choices[0].finish_reason == "stop"

    # Once one stream ends, another is admitted.
    await streams.pop().close()
    await held(gateway, user, FREE_CAP - 1)
    upstream.script(CHAT, Reply())
    chunks = [
        c async for c in await client.chat.completions.create(model="default-chat", messages=MESSAGES, stream=True)
    ]
    assert chunks[-1].choices[0].finish_reason == "stop"
    await held(gateway, user, FREE_CAP - 1)  # the finished one gave its slot back
    for stream in streams:
        await stream.close()
    await held(gateway, user, 0)
    await client.close()

    # One usage row per stream that ran, none for the refused one, which is kept as a refusal.
    await usage_rows(db, FREE_CAP + 1, user_id=user)
    await internals.drain(gateway.app)
    rows = await db.fetch("SELECT stream, status FROM usage_event WHERE user_id = $1", user)
    assert len(rows) == FREE_CAP + 1 and all(row["stream"] for row in rows)
    refusals = await db.fetch("SELECT route, code FROM limit_refusal WHERE user_id = $1", user)
    assert [row["code"] for row in refusals] == ["too_many_streams"]


async def test_chat_turns_and_batch_events_share_one_cap(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    key, user = await gateway.key("free")
    overrides = {"max_concurrent_streams": 2, "batch_images_per_hour": 0}
    await gateway.admin("PATCH", f"/admin/users/{user}", json={"limit_overrides": overrides})
    upstream.script(CHAT, LONG)
    client = sdk(gateway, key)
    chat = await open_chat_stream(client)
    batch_id = await paused_batch(gateway, db, key)
    thread = await gateway.client.post("/v1/threads", json={}, headers=bearer(key))
    assert thread.status_code == 200, thread.text
    thread_id = thread.json()["id"]
    runs = f"/v1/threads/{thread_id}/runs"
    turn = {
        "assistant_id": "asst_teacher",
        "additional_messages": [{"role": "user", "content": "Plan a lesson"}],
        "stream": True,
    }

    async with batch_stream(gateway, key, batch_id) as progress:
        assert internals.open_streams(gateway.app, user) == 2
        refused = await gateway.client.post(runs, json=turn, headers=bearer(key))
        assert_error(refused, 429, code="too_many_streams")
        assert refused.headers["retry-after"]
        assert_error(await gateway.client.get(f"{BATCHES}/{batch_id}/events", headers=bearer(key)), 429)
        # The refused run stored nothing (neither its message nor itself) and called nothing.
        messages = await gateway.client.get(f"/v1/threads/{thread_id}/messages", headers=bearer(key))
        assert messages.status_code == 200 and messages.json()["data"] == []
        listed = await gateway.client.get(runs, headers=bearer(key))
        assert listed.status_code == 200 and listed.json()["data"] == []
        assert len(upstream.received()) == 1

        await chat.close()
        await held(gateway, user, 1)
        answered = await gateway.client.post(runs, json=turn, headers=bearer(key))
        assert answered.status_code == 200, answered.text
        assert "event: thread.run.completed" in answered.text and "event: done" in answered.text

        cancelled = await gateway.client.post(f"{BATCHES}/{batch_id}/cancel", headers=bearer(key))
        assert cancelled.status_code == 200
        async with asyncio.timeout(10):
            assert [name for name, _ in await events_of(progress)] == ["item.cancelled", "batch.cancelled"]
    await held(gateway, user, 0)
    await client.close()
    rows = await usage_rows(db, 2, user_id=user)
    await internals.drain(gateway.app)
    assert await db.fetchval("SELECT count(*) FROM usage_event WHERE user_id = $1", user) == len(rows) == 2


async def test_batch_events_arrive_in_order_as_items_finish(gateway: Gateway, upstream: FakeUpstream) -> None:
    upstream.script(UPSTREAM_IMAGES, *[Reply(delay=0.2 * i) for i in range(1, 4)])
    key, _ = await gateway.key("free")
    body = {"model": "default-image", "items": [{"prompt": f"portrait {i}"} for i in range(3)]}
    created = await gateway.client.post(BATCHES, json=body, headers=bearer(key))
    async with batch_stream(gateway, key, created.json()["id"]) as progress, asyncio.timeout(10):
        events = await events_of(progress)
    assert [name for name, _ in events] == ["item.completed"] * 3 + ["batch.completed"]
    assert [data["counts"]["completed"] for _, data in events] == [1, 2, 3, 3]
    assert events[-1][1]["status"] == "completed"


async def test_idle_batch_streams_do_not_query_and_wake_on_another_processs_change(
    gateway: Gateway, gateway_with: GatewayFactory, db: asyncpg.Pool
) -> None:
    streams = 10
    key, user = await gateway.key("free")
    overrides = {"max_concurrent_streams": streams, "batch_images_per_hour": 0}
    await gateway.admin("PATCH", f"/admin/users/{user}", json={"limit_overrides": overrides})
    batch_id = await paused_batch(gateway, db, key, items=2)
    seen: list[str] = []

    def statement(conn, cursor, sql, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        if "image_batch" in sql:
            seen.append(sql)

    engine = internals.sync_engine(gateway.app)
    event.listen(engine, "before_cursor_execute", statement)
    try:
        async with gateway_with() as other, contextlib.AsyncExitStack() as stack:
            opened = [await stack.enter_async_context(batch_stream(gateway, key, batch_id)) for _ in range(streams)]

            async def all_read() -> bool:  # streams opened together may have shared a read
                return (
                    internals.batch_streams_waiting(gateway.app) == streams
                    and internals.batch_reads_in_flight(gateway.app) == 0
                    and any(ITEMS_READ in sql for sql in seen)
                )

            await wait_for(all_read)
            before = len(seen)
            await asyncio.sleep(2.0)  # polling every half second would be 2 reads x 4 x 10 streams by now
            assert seen[before:] == []

            # Cancelled by another process: its NOTIFY wakes every stream here, long before a re-read would.
            cancelled = await other.client.post(f"{BATCHES}/{batch_id}/cancel", headers=bearer(key))
            assert cancelled.status_code == 200
            async with asyncio.timeout(10):
                results = await asyncio.gather(*(events_of(response) for response in opened))
            for events in results:
                assert [name for name, _ in events] == ["item.cancelled", "item.cancelled", "batch.cancelled"]
            # One change, one read of the batch (its state, then its items), shared by all ten streams.
            assert len(seen) - before == 2
            assert ITEMS_READ in seen[-1]
    finally:
        event.remove(engine, "before_cursor_execute", statement)
    await held(gateway, user, 0)


async def test_a_listen_connection_gone_silent_is_replaced_and_its_listeners_resynced(
    cuttable_database: TcpProxy, database_url: str, db: asyncpg.Pool
) -> None:
    heard: list[str] = []
    resyncs: list[str] = []
    url = cuttable_database.url_for(database_url)
    listener = Listener(url, retry_seconds=0.1, check_seconds=0.2, check_timeout=0.5)
    listener.on("gateway_test_liveness", heard.append, resync=lambda: resyncs.append("resync"))

    async def heard_all(*payloads: str) -> bool:
        return heard == list(payloads)

    async def resynced(times: int) -> bool:
        return len(resyncs) == times

    await listener.start()
    try:
        # Back from start only once connected and resynced: a resync (auth's clears its cache) never
        # races the first requests the process serves.
        assert resyncs == ["resync"]
        await db.execute("NOTIFY gateway_test_liveness, 'before'")
        await wait_for(lambda: heard_all("before"))
        # The link stays open and carries nothing, as when a NAT or firewall forgets it: no error
        # ever arrives, and notifications (a revocation, a batch's progress) would stop unheard.
        cuttable_database.blackhole()
        await asyncio.sleep(1.5)  # past a check and its deadline
        cuttable_database.restore()  # the old link would carry traffic again, had it been kept
        await wait_for(lambda: resynced(2), what="a new connection, and the missed notifications made up for")
        await db.execute("NOTIFY gateway_test_liveness, 'after'")
        await wait_for(lambda: heard_all("before", "after"))
    finally:
        await listener.stop()
