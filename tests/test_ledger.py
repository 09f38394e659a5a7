"""The usage ledger: every call settled exactly once, whatever the writer, the database or the process goes through.

A call is written into `usage_pending` with its limit check and settled into `usage_event` by
the writer's one statement, which charges limit corrections only for the calls it settled:
a flush written twice (an ambiguous commit, a spool read twice) settles and charges nothing
again. What the database refuses is quarantined; what it cannot take goes to the spool and
is written when it answers. What a dead process held (pending calls, idempotency keys, batch
items) is released once its lease (10 s) is over.

The budget bucket (`monthly_budget_usd:<user>:<month>`) is where charges show: it holds a
call's reserved cost until the call settles, then what it really cost.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest

from app.auth.principal import Principal
from app.images.idempotency import request_hash
from app.images.options import resolve_options
from app.ratelimit.buckets import Decision
from app.usage.ledger import PendingRow, new_call_id
from app.usage.record import UsageRecord
from app.usage.spool import Spool
from app.usage.writer import Settlement
from support import internals
from support.auth import bearer
from support.errors import assert_error
from support.fake_upstream import FakeUpstream, Reply
from support.gateway import Gateway, GatewayFactory
from support.rollups import rollup_mismatches
from support.spend import bucket_value, budget_key, dead_instance, insert_pending, spool_files
from support.tcp_proxy import TcpProxy
from support.waiting import usage_rows, wait_for

CHAT = "/v1/chat/completions"
GENERATIONS = "/v1/images/generations"
MESSAGES = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def gateway_settings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Spool and images in a folder of this module's own; beats (and the sweeps that follow them) every 0.2 s;
    batch items taken as soon as they are due."""
    return {
        "data_dir": tmp_path_factory.mktemp("ledger-data"),
        "instance_beat_seconds": 0.2,
        "image_batch_poll_seconds": 0.05,
        "image_batch_items_per_minute": 6000,
    }


def new_user() -> str:
    return f"ledger-{uuid.uuid4().hex[:8]}"


async def reserve(gateway: Gateway, user: str, tokens: int, cost: float) -> tuple[PendingRow, Decision]:
    """Take a chat call's limits for a free user as the pipeline does: its tokens and its worst-case cost,
    with its pending row written in the same statement (owned by this gateway's process)."""
    limiter = internals.limiter(gateway.app)
    pending = PendingRow(
        call_id=new_call_id(),
        created_at=datetime.now(UTC),
        request_id="req_ledger",
        user_id=user,
        api_key_id=None,
        route="chat.completions",
        model="gpt-5-mini",
        stream=False,
        prompt_tokens=tokens // 2,
        completion_tokens=tokens - tokens // 2,
        images=0,
        cost_usd=cost,
        thread_id=None,
    )
    decision = await limiter.take(limiter.token_buckets(Principal(user_id=user, tier="free"), tokens, cost), pending)
    return pending, decision


def answered(pending: PendingRow, decision: Decision, **values: Any) -> UsageRecord:
    """The usage row of a reserved call that the upstream answered."""
    return UsageRecord(
        call_id=pending.call_id,
        created_at=pending.created_at,
        request_id=pending.request_id,
        user_id=pending.user_id,
        api_key_id=None,
        route=pending.route,
        model=pending.model,
        status="ok",
        http_status=200,
        decision=decision,
        **values,
    )


async def pending_calls(db: asyncpg.Pool, user: str) -> list[uuid.UUID]:
    return [row["call_id"] for row in await db.fetch("SELECT call_id FROM usage_pending WHERE user_id = $1", user)]


async def events_of(db: asyncpg.Pool, call_id: uuid.UUID) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM usage_event WHERE call_id = $1", call_id)


async def chat(gateway: Gateway, key: str) -> httpx.Response:
    body = {"model": "default-chat", "messages": MESSAGES, "max_tokens": 16}
    return await gateway.client.post(CHAT, json=body, headers=bearer(key))


def sdk(gateway: Gateway, key: str, **options: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, **options)


# Exactly once.


async def test_a_row_written_twice_is_settled_and_charged_once(gateway: Gateway, db: asyncpg.Pool) -> None:
    user = new_user()
    pending, decision = await reserve(gateway, user, 1000, 0.01)
    assert await bucket_value(db, budget_key(user)) == pytest.approx(0.01)
    owner = await db.fetchval("SELECT owner FROM usage_pending WHERE call_id = $1", pending.call_id)
    assert owner == internals.instance_id(gateway.app)  # written by the limit check, as this process's

    writer = internals.usage_writer(gateway.app)
    row = answered(pending, decision, prompt_tokens=100, completion_tokens=200, cost_usd=0.004)
    await writer.write([row])
    await writer.write([row])  # a replayed flush: the same entry again
    [event] = await events_of(db, pending.call_id)
    assert (event["status"], event["prompt_tokens"], event["completion_tokens"]) == ("ok", 100, 200)
    assert await pending_calls(db, user) == []
    # Reserved $0.01, cost $0.004: the $0.006 correction was charged once (twice would leave $0 or less).
    assert await bucket_value(db, budget_key(user)) == pytest.approx(0.004)
    assert await rollup_mismatches(db) == {}  # and summed once


async def test_a_give_back_written_twice_refunds_once(gateway: Gateway, db: asyncpg.Pool) -> None:
    user = new_user()
    refused_on_the_way, decision = await reserve(gateway, user, 1000, 0.01)
    under_way, _ = await reserve(gateway, user, 1000, 0.02)
    assert await bucket_value(db, budget_key(user)) == pytest.approx(0.03)

    writer = internals.usage_writer(gateway.app)
    give_back = Settlement(refused_on_the_way.call_id, decision)
    await writer.write([give_back])
    await writer.write([give_back])
    assert await bucket_value(db, budget_key(user)) == pytest.approx(0.02)  # not $0.01: refunded once
    assert await pending_calls(db, user) == [under_way.call_id]
    assert await events_of(db, refused_on_the_way.call_id) == []  # given back: no row


async def test_a_call_whose_check_a_database_crash_lost_is_charged_in_full(gateway: Gateway, db: asyncpg.Pool) -> None:
    """Limit checks commit without waiting for the WAL flush: a database crash can lose one, its reservation and
    pending row together, after the gateway was told it passed. The call settles all the same, charged its
    real cost in full (not its cost minus a reservation that is no longer there)."""
    user = new_user()
    pending, decision = await reserve(gateway, user, 1000, 0.01)
    async with db.acquire() as connection, connection.transaction():  # what the crash took back
        await connection.execute("DELETE FROM usage_pending WHERE call_id = $1", pending.call_id)
        await connection.execute("DELETE FROM rate_limit_bucket WHERE key LIKE '%' || $1 || '%'", user)

    writer = internals.usage_writer(gateway.app)
    await writer.write([answered(pending, decision, prompt_tokens=100, completion_tokens=200, cost_usd=0.004)])
    [event] = await events_of(db, pending.call_id)
    assert event["status"] == "ok"
    assert await bucket_value(db, budget_key(user)) == pytest.approx(0.004)


async def test_a_flush_whose_commit_went_unanswered_is_replayed_once(
    gateway_with: GatewayFactory, cuttable_database: TcpProxy, database_url: str, db: asyncpg.Pool, tmp_path: Path
) -> None:
    """The writer's commit reaches Postgres but its answer never comes back: the writer cannot tell, spools the
    batch, and the replay writes it again. It settles nothing the second time, so nothing is charged twice."""
    spool = tmp_path / "spool"
    proxied = cuttable_database.url_for(database_url)
    async with gateway_with(database_url=proxied, usage_spool_dir=spool, usage_replay_interval=3600) as gw:
        key, user = await gw.key("free")
        cuttable_database.cut_after_commit(re.compile(rb"INSERT INTO usage_event AS u"))  # the writer's SETTLE
        assert (await chat(gw, key)).status_code == 200
        [event] = await usage_rows(db, user_id=user)  # committed

        async def spooled() -> list[Path]:
            return spool_files(spool)

        [spooled_file] = await wait_for(spooled, what="the unanswered batch in the spool")
        assert cuttable_database.commits_cut == 1
        assert [entry["call_id"] for entry in Spool.read(spooled_file)] == [str(event["call_id"])]
        charged = await bucket_value(db, budget_key(user))
        assert charged == pytest.approx(float(event["cost_usd"]))  # the reservation, corrected to the real cost

        assert await internals.usage_writer(gw.app).replay() == 1
        assert spool_files(spool) == []
        assert len(await events_of(db, event["call_id"])) == 1
        assert await bucket_value(db, budget_key(user)) == pytest.approx(charged)


# Supervision.


@pytest.mark.parametrize(
    ("poison", "refusal"),
    [({"prompt_tokens": 2**31}, "int32"), ({"error_code": "x" * 500}, "too long")],
    ids=["the_encoder_refuses", "the_database_refuses"],
)
async def test_a_refused_row_is_quarantined_and_the_writer_goes_on(
    gateway: Gateway, db: asyncpg.Pool, poison: dict[str, Any], refusal: str
) -> None:
    def row(user: str, **values: Any) -> UsageRecord:
        return UsageRecord(
            call_id=new_call_id(),
            request_id="req_supervised",
            user_id=user,
            api_key_id=None,
            route="chat.completions",
            model="gpt-5-mini",
            status="ok",
            http_status=200,
            **values,
        )

    healthy, poisoned = new_user(), new_user()
    writer = internals.usage_writer(gateway.app)
    bad = row(poisoned, **poison)
    for entry in (row(healthy, prompt_tokens=1), bad, row(healthy, prompt_tokens=2)):  # one batch
        writer.record(entry)
    rows = await usage_rows(db, 2, user_id=healthy)
    assert sorted(r["prompt_tokens"] for r in rows) == [1, 2]
    quarantined = await db.fetchrow(
        "SELECT call_id, error, entry FROM usage_quarantine WHERE call_id = $1", bad.call_id
    )
    assert quarantined is not None and refusal in quarantined["error"]
    assert json.loads(quarantined["entry"])["user_id"] == poisoned  # kept whole, for an operator
    assert await db.fetchval("SELECT count(*) FROM usage_event WHERE user_id = $1", poisoned) == 0

    # The writer's task is still the one running, and later rows are written by it.
    assert internals.usage_writer_running(gateway.app)
    writer.record(row(healthy, prompt_tokens=3))
    await usage_rows(db, 3, user_id=healthy)
    assert internals.usage_writer_running(gateway.app) and writer.queue_depth == 0
    assert await db.fetchval("SELECT count(*) FROM usage_quarantine") == 1


# A dead process's leases.


async def test_a_dead_processs_pending_call_is_settled_as_interrupted(gateway: Gateway, db: asyncpg.Pool) -> None:
    user = new_user()
    dead = await dead_instance(db)
    reserved = {"prompt_tokens": 120, "completion_tokens": 2048, "cost_usd": Decimal("0.00412600"), "stream": True}
    orphan = await insert_pending(db, dead, user, request_id="req_dead", **reserved)
    alive = await insert_pending(db, internals.instance_id(gateway.app), user, request_id="req_alive", **reserved)

    [event] = await usage_rows(db, call_id=orphan)
    assert (event["status"], event["error_code"], event["http_status"]) == ("interrupted", "gateway_interrupted", 0)
    assert (event["prompt_tokens"], event["completion_tokens"], event["cost_usd"]) == (120, 2048, Decimal("0.004126"))
    assert event["tokens_estimated"] is True and event["stream"] is True and event["user_id"] == user
    # The live gateway's call is its own to settle: the same sweep left it pending.
    assert await pending_calls(db, user) == [alive]
    assert await events_of(db, alive) == []


async def test_the_real_row_of_a_process_only_slow_to_beat_replaces_its_interrupted_one(
    gateway: Gateway, db: asyncpg.Pool
) -> None:
    user = new_user()
    pending, decision = await reserve(gateway, user, 1000, 0.01)
    await db.execute("UPDATE usage_pending SET owner = $1 WHERE call_id = $2", await dead_instance(db), pending.call_id)
    [event] = await usage_rows(db, call_id=pending.call_id)
    assert event["status"] == "interrupted" and float(event["cost_usd"]) == pytest.approx(0.01)
    assert await bucket_value(db, budget_key(user)) == pytest.approx(0.01)  # the reservation stands as the charge

    writer = internals.usage_writer(gateway.app)
    real = answered(pending, decision, prompt_tokens=100, completion_tokens=200, cost_usd=0.004)
    await writer.write([real])
    await writer.write([real])
    [event] = await events_of(db, pending.call_id)
    assert (event["status"], event["error_code"], event["prompt_tokens"]) == ("ok", None, 100)
    assert await bucket_value(db, budget_key(user)) == pytest.approx(0.004)
    # The rollups took the interrupted row's sums back and the real row's in.
    assert await rollup_mismatches(db) == {}
    assert await db.fetchval("SELECT array_agg(status) FROM usage_user_daily WHERE user_id = $1", user) == ["ok"]


async def test_a_give_back_of_a_call_swept_as_interrupted_removes_its_row_and_refunds(
    gateway: Gateway, db: asyncpg.Pool
) -> None:
    """The process seemed dead (the database was away longer than its lease), so a replica settled its
    call as interrupted; the call had in fact been refused on the way and never reached the upstream."""
    user = new_user()
    pending, decision = await reserve(gateway, user, 1000, 0.01)
    await db.execute("UPDATE usage_pending SET owner = $1 WHERE call_id = $2", await dead_instance(db), pending.call_id)
    [event] = await usage_rows(db, call_id=pending.call_id)
    assert event["status"] == "interrupted"
    assert await bucket_value(db, budget_key(user)) == pytest.approx(0.01)

    await internals.usage_writer(gateway.app).write([Settlement(pending.call_id, decision)])
    assert await events_of(db, pending.call_id) == []  # never reached the upstream: no row
    assert await bucket_value(db, budget_key(user)) == pytest.approx(0.0)
    assert await rollup_mismatches(db) == {}  # nor a rollup row left at zero calls
    assert await db.fetchval("SELECT count(*) FROM usage_daily WHERE user_id = $1", user) == 0


async def test_a_dead_processs_idempotency_key_can_be_claimed_again(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    key, user = await gateway.key("free")
    body = {"model": "default-image", "prompt": "a lighthouse at dusk"}
    fingerprint = request_hash("POST", GENERATIONS, body)
    claim = (
        "INSERT INTO idempotency_key (user_id, key, request_hash, state, expires_at, owner)"
        " VALUES ($1, $2, $3, 'pending', now() + interval '1 day', $4)"
    )
    await db.execute(claim, user, "held-by-the-dead", fingerprint, await dead_instance(db))
    await db.execute(claim, user, "held-by-the-living", fingerprint, internals.instance_id(gateway.app))

    async with sdk(gateway, key, max_retries=0) as client:
        with pytest.raises(openai.ConflictError) as caught:
            await client.images.generate(**body, extra_headers={"Idempotency-Key": "held-by-the-living"})
        assert_error(caught.value.response, 409, code="idempotency_key_in_use")
        assert upstream.received(GENERATIONS) == []

        taken = await client.images.with_raw_response.generate(
            **body, extra_headers={"Idempotency-Key": "held-by-the-dead"}
        )
        assert taken.status_code == 200 and "idempotent-replayed" not in taken.headers
        assert len(upstream.received(GENERATIONS)) == 1
        stored = await db.fetchrow("SELECT state, owner FROM idempotency_key WHERE key = 'held-by-the-dead'")
        assert (stored["state"], stored["owner"]) == ("done", None)

        again = await client.images.with_raw_response.generate(
            **body, extra_headers={"Idempotency-Key": "held-by-the-dead"}
        )
        assert again.headers["idempotent-replayed"] == "true"
        assert again.parse().data[0].url.split("?")[0] == taken.parse().data[0].url.split("?")[0]
    assert len(upstream.received(GENERATIONS)) == 1


async def test_a_dead_processs_batch_item_is_taken_over(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    _, user = await gateway.key("free")
    catalog = internals.runtime(gateway.app).catalog
    options = resolve_options(catalog, "free", {"model": "default-image", "quality": "low"})
    batch_id = uuid.uuid4()
    async with db.acquire() as connection, connection.transaction():
        await connection.execute(
            "INSERT INTO image_batch (id, user_id, request_id, status, model, options, interval_seconds,"
            " next_run_at, estimated_cost_usd)"
            " VALUES ($1, $2, 'req_batch', 'running', $3, $4::jsonb, 0.01, now(), 0.02)",
            batch_id,
            user,
            options.spec.id,
            json.dumps(options.stored()),
        )
        item = (
            "INSERT INTO image_batch_item (id, batch_id, index, prompt, status, claimed_by)"
            " VALUES ($1, $2, $3, $4, 'running', $5)"
        )
        mine, orphan = uuid.uuid4(), uuid.uuid4()
        await connection.execute(item, mine, batch_id, 0, "a kept lease", internals.instance_id(gateway.app))
        await connection.execute(item, orphan, batch_id, 1, "a lost lease", await dead_instance(connection))

    async def completed() -> asyncpg.Record | None:
        row = await db.fetchrow("SELECT status, claimed_by, image_ids FROM image_batch_item WHERE id = $1", orphan)
        return row if row["status"] == "completed" else None

    done = await wait_for(completed, 10, what="the dead process's item to be taken over and completed")
    assert done["claimed_by"] is None and len(json.loads(done["image_ids"])) == 1
    [prompt] = [r.json["prompt"] for r in upstream.received(GENERATIONS)]
    assert prompt == "a lost lease"  # the item still leased by a live process was left to it
    kept = await db.fetchrow("SELECT status, claimed_by FROM image_batch_item WHERE id = $1", mine)
    assert (kept["status"], kept["claimed_by"]) == ("running", internals.instance_id(gateway.app))
    assert await db.fetchval("SELECT count(*) FROM image WHERE batch_id = $1", batch_id) == 1
    [event] = await usage_rows(db, user_id=user)
    assert (event["route"], event["status"], event["images"]) == ("images.batches", "ok", 1)


# The spool.


async def test_rows_the_database_cannot_take_are_spooled_and_written_once_it_answers(
    gateway_with: GatewayFactory,
    cuttable_database: TcpProxy,
    database_url: str,
    upstream: FakeUpstream,
    db: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    proxied = cuttable_database.url_for(database_url)
    settings = {"usage_spool_dir": spool, "usage_replay_interval": 0.1, "ratelimit_timeout": 0.5}
    async with gateway_with(database_url=proxied, **settings) as gw:
        key, user = await gw.key("free")
        upstream.script(CHAT, Reply(delay=0.5))
        async with sdk(gw, key) as client:
            call = asyncio.create_task(client.chat.completions.create(model="default-chat", messages=MESSAGES))

            async def at_the_upstream() -> bool:
                return bool(upstream.received())

            await wait_for(at_the_upstream, what="the call to pass its limit check")
            cuttable_database.cut()  # its limits are taken and its pending row committed; its row is not written
            await call  # the answer does not wait for the database

        async def spooled() -> list[Path]:
            return spool_files(spool)

        [spooled_file] = await wait_for(spooled, what="the call's row in the spool")
        [entry] = Spool.read(spooled_file)
        assert (entry["user_id"], entry["status"], entry["prompt_tokens"]) == (user, "ok", 11)
        call_id = uuid.UUID(entry["call_id"])
        assert await pending_calls(db, user) == [call_id]  # the database still holds it, at its reservation
        assert await events_of(db, call_id) == []
        saved = spooled_file.read_bytes()

        cuttable_database.restore()
        [event] = await usage_rows(db, call_id=call_id)

        async def replayed() -> bool:
            return spool_files(spool) == []

        await wait_for(replayed, what="the spool file to be removed once written")
        assert await pending_calls(db, user) == []
        charged = await bucket_value(db, budget_key(user))
        assert charged == pytest.approx(float(event["cost_usd"]))  # reservation corrected to the real cost, once

        # The same file read again (another process replayed it too, or a crash came before the unlink).
        (spool / spooled_file.name.replace("-", "-again-", 1)).write_bytes(saved)
        await wait_for(replayed, what="the copy to be replayed")
        assert len(await events_of(db, call_id)) == 1
        assert await bucket_value(db, budget_key(user)) == pytest.approx(charged)


async def test_what_a_shutdown_could_not_write_is_spooled_then_replayed(gateway: Gateway, db: asyncpg.Pool) -> None:
    user = new_user()
    refused, refused_decision = await reserve(gateway, user, 1000, 0.01)
    answered_call, answered_decision = await reserve(gateway, user, 1000, 0.02)
    entries = [
        Settlement(refused.call_id, refused_decision),
        answered(answered_call, answered_decision, prompt_tokens=100, completion_tokens=200, cost_usd=0.005),
    ]
    writer = internals.usage_writer(gateway.app)
    await writer.leftover(entries)
    [spooled_file] = spool_files(writer.spool.directory)
    assert [entry.get("call_id", entry.get("settlement")) for entry in Spool.read(spooled_file)] == [
        str(refused.call_id),
        str(answered_call.call_id),
    ]

    [event] = await usage_rows(db, call_id=answered_call.call_id)  # the replay job, once a second

    async def replayed() -> bool:
        return spool_files(writer.spool.directory) == []

    await wait_for(replayed, what="the spool file to be removed once written")
    assert event["status"] == "ok" and await events_of(db, refused.call_id) == []
    assert await pending_calls(db, user) == []
    assert await bucket_value(db, budget_key(user)) == pytest.approx(0.005)  # $0.01 given back, $0.02 corrected


async def test_another_processs_spool_is_written_at_start_up(
    gateway_with: GatewayFactory, db: asyncpg.Pool, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    left = UsageRecord(
        call_id=new_call_id(),
        request_id="req_left",
        user_id=new_user(),
        api_key_id=None,
        route="chat.completions",
        model="gpt-5-mini",
        status="ok",
        http_status=200,
        prompt_tokens=11,
        completion_tokens=7,
    )
    Spool(spool, uuid.uuid4()).write([left.to_json()])  # a process that is gone
    async with gateway_with(usage_spool_dir=spool, usage_replay_interval=3600):  # replays at start only
        [event] = await usage_rows(db, call_id=left.call_id)

        async def replayed() -> bool:
            return spool_files(spool) == []

        await wait_for(replayed, what="the spool file to be removed once written")
    assert (event["prompt_tokens"], event["completion_tokens"]) == (11, 7)


# Limit checks whose answer was lost.


@pytest.mark.parametrize("given_back", ["while running", "at shutdown"])
async def test_a_limit_check_whose_answer_was_lost_is_not_charged(
    gateway: Gateway,
    gateway_with: GatewayFactory,
    cuttable_database: TcpProxy,
    database_url: str,
    upstream: FakeUpstream,
    db: asyncpg.Pool,
    given_back: str,
) -> None:
    """Postgres commits a call's limit check (its reservation and pending row), and the answer is lost on the way
    back. The gateway cannot tell whether the check counted and refuses the call (503, fail closed): the
    upstream never hears of it, so nothing of it may be charged. The reservation is given back once the
    database's statement timeout has ended the check either way (2 s here), or when the gateway stops first.
    The module's gateway (`gateway`) is a live replica: it would settle what the stopped one left pending."""
    proxied = cuttable_database.url_for(database_url)
    timeout = 1.0 if given_back == "while running" else 60.0
    async with gateway_with(database_url=proxied, ratelimit_timeout=0.5, db_statement_timeout=timeout) as gw:
        key, user = await gw.key("free")
        assert (await chat(gw, key)).status_code == 200
        [first] = await usage_rows(db, user_id=user)
        spent = await bucket_value(db, budget_key(user))
        cuttable_database.cut_after_commit(re.compile(rb"ratelimit_take"))
        assert_error(await chat(gw, key), 503, code="limits_unavailable")
        assert cuttable_database.commits_cut == 1 and len(upstream.received()) == 1
        assert await bucket_value(db, budget_key(user)) > spent  # the lost check did reserve
        if given_back == "while running":
            await wait_for(lambda: _nothing_pending(db, user), what="the lost check's reservation given back")
            assert await bucket_value(db, budget_key(user)) == pytest.approx(spent)

    await wait_for(lambda: _nothing_pending(db, user), what="nothing of the user's left pending")
    rows = await db.fetch("SELECT status, cost_usd FROM usage_event WHERE user_id = $1", user)
    assert [(r["status"], r["cost_usd"]) for r in rows] == [("ok", first["cost_usd"])]  # not also "interrupted"
    assert await bucket_value(db, budget_key(user)) == pytest.approx(spent)


async def test_a_call_let_through_locally_whose_check_had_counted_is_charged_once(
    gateway_with: GatewayFactory, cuttable_database: TcpProxy, database_url: str, db: asyncpg.Pool
) -> None:
    """Budgets configured to fail open: a check whose answer is lost lets the call through on this process's
    own count. Postgres had counted the check all the same (reserved its worst case, written it pending), so
    the settled row corrects that reservation instead of charging its cost on top of it."""
    proxied = cuttable_database.url_for(database_url)
    async with gateway_with(database_url=proxied, ratelimit_timeout=0.5, ratelimit_fail_open_budgets=True) as gw:
        key, user = await gw.key("free")
        assert (await chat(gw, key)).status_code == 200
        cuttable_database.cut_after_commit(re.compile(rb"ratelimit_take"))
        assert (await chat(gw, key)).status_code == 200
        assert cuttable_database.commits_cut == 1

        async def both_settled() -> list[asyncpg.Record]:
            rows = await usage_rows(db, user_id=user)
            return rows if len(rows) == 2 and not await pending_calls(db, user) else []

        rows = await wait_for(both_settled, what="both calls settled")
        assert await bucket_value(db, budget_key(user)) == pytest.approx(float(sum(row["cost_usd"] for row in rows)))


async def _nothing_pending(db: asyncpg.Pool, user: str) -> bool:
    return await pending_calls(db, user) == []
