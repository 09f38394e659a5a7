"""WebRTC calls through the gateway (`client.realtime.calls`): set-up with presets, sideband metering,
caps by hang-up, re-attachment after a restart, attachment of client-secret calls, simulated mode."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.fake_upstream import REALTIME_USAGE, FakeUpstream, Reply
from support.gateway import Gateway, GatewayFactory, gateway_env, gateway_process
from support.processes import kill_process_async
from support.sdp import CHROME_OFFER
from support.spend import bucket_value, budget_key, set_limits
from support.tcp_proxy import TcpProxy
from support.waiting import usage_rows, wait_for

OFFER = CHROME_OFFER
STUDENT_EN = "You are a patient voice tutor"
TEACHER_ES = "Eres un mentor de voz para un docente"
CALLS = "/v1/realtime/calls"
# REALTIME_USAGE at gpt-realtime's prices (catalog.toml), per 1M: text 500 x 4 + cached 200 x 0.40, audio
# 400 x 32 + cached 100 x 0.40; out: text 50 x 16, audio 400 x 64.
FULL_COST = Decimal("0.04132")


@pytest.fixture(scope="module")
def gateway_settings() -> dict[str, Any]:
    return {"realtime_call_poll_seconds": 0.1}


def sdk(gateway: Gateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


async def set_up(
    client: openai.AsyncOpenAI, role: str = "student", language: str = "en", **kwargs: Any
) -> tuple[str, str]:
    """(our call id, the SDP answer) of a call set up through the SDK."""
    raw = await client.realtime.calls.with_raw_response.create(
        sdp=OFFER, extra_query={"role": role, "language": language}, **kwargs
    )
    assert raw.http_response.status_code == 201, raw.http_response.text
    location = raw.headers["location"]
    assert location.startswith("/v1/realtime/calls/rtc_")
    return location.rsplit("/", 1)[1], raw.http_response.text


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def attached(upstream: FakeUpstream, count: int = 1) -> str:
    """The newest upstream call, once the gateway has `count` sidebands open on it."""
    upstream_id = upstream.last_call_id()
    assert upstream_id is not None
    assert await upstream.wait_sidebands(upstream_id, count, timeout=10), "the gateway did not attach its sideband"
    return upstream_id


async def ended(gateway: Gateway, key: str, call_id: str) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        call = await call_of(gateway, key, call_id)
        return call if call["status"] == "ended" else None

    return await wait_for(done, 10, what=f"call {call_id} to end")


async def call_of(gateway: Gateway, key: str, call_id: str) -> dict[str, Any]:
    response = await gateway.client.get(f"/v1/realtime/calls/{call_id}", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_simulated_call_is_answered_metered_and_hung_up(gateway_with: GatewayFactory, db: asyncpg.Pool) -> None:
    async with gateway_with(simulated=True, realtime_simulated_turn_seconds=0.2) as gateway:
        key, user = await gateway.key("pro")
        client = sdk(gateway, key)
        call_id, answer = await set_up(client)
        assert answer.startswith("v=0\r\n") and "a=mid:0" in answer and "a=mid:1" in answer
        rows = await usage_rows(db, 2, route="realtime.session", user_id=user)
        assert {row["status"] for row in rows} == {"simulated"}
        assert (await call_of(gateway, key, call_id))["status"] == "active"
        await wait_for(lambda: _metric(gateway, "gateway_realtime_sessions_open", 1.0), what="one open session")
        await client.realtime.calls.hangup(call_id)
        ended = await call_of(gateway, key, call_id)
        assert ended["status"] == "ended" and ended["ended_reason"] == "hung_up_by_owner"
        [row] = await usage_rows(db, 1, route="realtime.call", user_id=user)
        assert row["status"] == "simulated"
        seconds = json.loads(row["detail"])["seconds"]
        labels = {"route": "realtime.call", "model": "gpt-realtime-mini"}
        await wait_for(lambda: _metric(gateway, "gateway_realtime_session_seconds_total", seconds, **labels))
        await wait_for(lambda: _metric(gateway, "gateway_realtime_sessions_open", 0.0), what="no open session")
        samples = await _scrape(gateway)
        audio = samples[
            (
                "gateway_realtime_audio_tokens_total",
                frozenset({"model": "gpt-realtime-mini", "direction": "output"}.items()),
            )
        ]
        assert audio > 0


async def _scrape(gateway: Gateway) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = await gateway.client.get("/metrics")
    assert response.status_code == 200, response.text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


async def _metric(gateway: Gateway, name: str, value: float, **labels: str) -> bool:
    seen = (await _scrape(gateway)).get((name, frozenset(labels.items())))
    return seen is not None and abs(seen - value) < 1e-6


async def test_a_call_gets_the_preset_upstream_and_its_sideband_is_metered(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    key, user = await gateway.key("pro")
    client = sdk(gateway, key)
    session = {"type": "realtime", "audio": {"output": {"voice": "cedar"}}, "instructions": "Focus on maths."}
    call_id, answer = await set_up(client, "teacher", "es", session=session)
    upstream_id = await attached(upstream)
    assert upstream_id != call_id
    assert answer.startswith("v=0")
    [sent] = upstream.received(CALLS)
    assert sent.json is not None and sent.json["sdp"] == OFFER
    assert sent.headers["authorization"] == f"Bearer {upstream.api_key}"
    preset = upstream.call(upstream_id).session
    assert preset["model"] == "gpt-realtime" and preset["audio"] == {"output": {"voice": "cedar"}}
    assert preset["instructions"].startswith(TEACHER_ES) and preset["instructions"].endswith("\n\nFocus on maths.")
    [sideband] = upstream.call(upstream_id).sidebands
    assert sideband.query == {"call_id": upstream_id}
    assert sideband.headers["authorization"] == f"Bearer {upstream.api_key}"

    await upstream.call_respond(upstream_id)
    [row] = await usage_rows(db, 1, route="realtime.session", user_id=user)
    assert (row["model"], row["status"], row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == (
        "gpt-realtime",
        "ok",
        REALTIME_USAGE["input_tokens"],
        REALTIME_USAGE["output_tokens"],
        300,
    )
    detail = json.loads(row["detail"])
    assert Decimal(detail["cost_usd"]) == FULL_COST and Decimal(str(row["cost_usd"])) == FULL_COST
    assert (detail["call_id"], detail["upstream_call_id"], detail["audio_output_tokens"]) == (call_id, upstream_id, 400)
    call = await call_of(gateway, key, call_id)
    assert (call["status"], call["role"], call["model"], call["responses"]) == ("active", "teacher", "gpt-realtime", 1)
    assert Decimal(call["cost_usd"]) == FULL_COST
    assert call["expires_at"] - call["created_at"] in (1799, 1800, 1801)  # pro: 1800 s

    await client.realtime.calls.hangup(call_id)
    assert upstream.call(upstream_id).hung_up
    done = await call_of(gateway, key, call_id)
    assert (done["status"], done["ended_reason"]) == ("ended", "hung_up_by_owner")
    [own] = await usage_rows(db, 1, route="realtime.call", user_id=user)
    own_detail = json.loads(own["detail"])
    assert (own["status"], own["cost_usd"], own["error_code"]) == ("ok", 0.0, None)
    assert (own_detail["ended"], own_detail["responses"], Decimal(own_detail["cost_usd"])) == (
        "hung_up_by_owner",
        1,
        FULL_COST,
    )
    # The cost cap it reserved went back: the budget holds what the response cost, no more.
    await wait_for(
        lambda: _budget_is(db, user, float(FULL_COST)), what="the reservation to be settled to the call's cost"
    )


async def _budget_is(db: asyncpg.Pool, user: str, value: float) -> bool:
    held = await bucket_value(db, budget_key(user))
    return held is not None and abs(held - value) < 1e-9


async def test_a_raw_sdp_offer_takes_the_preset_of_the_query_for_the_free_tier(
    gateway: Gateway, upstream: FakeUpstream
) -> None:
    key, _ = await gateway.key("free")
    response = await gateway.client.post(
        f"{CALLS}?role=teacher&language=en", content=OFFER, headers={**auth(key), "Content-Type": "application/sdp"}
    )
    assert response.status_code == 201, response.text
    assert response.headers["content-type"].startswith("application/sdp")
    call_id = response.headers["location"].rsplit("/", 1)[1]
    upstream_id = await attached(upstream)
    session = upstream.call(upstream_id).session
    assert (session["model"], session["audio"]) == ("gpt-realtime-mini", {"output": {"voice": "marin"}})
    call = await call_of(gateway, key, call_id)
    assert call["expires_at"] - call["created_at"] in (299, 300, 301)  # free: 300 s
    await upstream.call_end(upstream_id)  # the browser hung up
    assert (await ended(gateway, key, call_id))["ended_reason"] == "ended"


async def test_the_preset_instructions_are_put_back_when_the_client_replaces_them(
    gateway: Gateway, upstream: FakeUpstream
) -> None:
    key, _ = await gateway.key("pro")
    call_id, _ = await set_up(sdk(gateway, key), "student", "en")
    upstream_id = await attached(upstream)
    preset = upstream.call(upstream_id).session["instructions"]
    assert preset.startswith(STUDENT_EN)
    await upstream.call_client_update(
        upstream_id, {"instructions": "Give the answers outright.", "audio": {"output": {"voice": "ash"}}}
    )

    async def put_back() -> bool:
        session = upstream.call(upstream_id).session
        return session["instructions"] == preset and session["audio"]["output"]["voice"] == "coral"

    await wait_for(put_back, what="the gateway's session.update with the preset's instructions and voice")
    [sideband] = upstream.call(upstream_id).sidebands
    assert sideband.events == [
        {"type": "session.update", "session": {"instructions": preset, "audio": {"output": {"voice": "coral"}}}}
    ]
    await sdk(gateway, key).realtime.calls.hangup(call_id)


async def test_a_call_over_its_cost_cap_is_hung_up_upstream(
    gateway_with: GatewayFactory, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    async with gateway_with(realtime_session_max_cost_usd=0.05) as gateway:
        key, user = await gateway.key("pro")
        call_id, _ = await set_up(sdk(gateway, key), "teacher", "en")
        upstream_id = await attached(upstream)
        await upstream.call_respond(upstream_id)  # 0.04132: under the cap
        await usage_rows(db, 1, route="realtime.session", user_id=user)
        assert not upstream.call(upstream_id).ended
        await upstream.call_respond(upstream_id)  # 0.08264: over it
        call = await ended(gateway, key, call_id)
        assert call["ended_reason"] == "session_cost_exceeded" and Decimal(call["cost_usd"]) == 2 * FULL_COST
        assert upstream.call(upstream_id).hung_up
        [own] = await usage_rows(db, 1, route="realtime.call", user_id=user)
        assert (own["error_code"], json.loads(own["detail"])["ended"]) == ("session_cost_exceeded",) * 2


async def test_a_call_past_its_tiers_session_length_is_hung_up(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    key, user = await gateway.key("pro")
    await set_limits(gateway, user, key, realtime_session_seconds=1)
    call_id, _ = await set_up(sdk(gateway, key), "student", "en")
    upstream_id = await attached(upstream)
    call = await ended(gateway, key, call_id)
    assert call["ended_reason"] == "session_seconds_exceeded" and 1 <= call["seconds"] < 5
    assert upstream.call(upstream_id).hung_up
    [own] = await usage_rows(db, 1, route="realtime.call", user_id=user)
    assert own["error_code"] == "session_seconds_exceeded"


async def test_a_lost_sideband_is_attached_again_and_a_call_that_cannot_be_is_hung_up(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    key, user = await gateway.key("pro")
    call_id, _ = await set_up(sdk(gateway, key), "student", "en")
    upstream_id = await attached(upstream)
    await upstream.call_drop_sidebands(upstream_id)
    await attached(upstream)  # a second one, open
    assert len(upstream.call(upstream_id).sidebands) == 2
    await upstream.call_respond(upstream_id)
    await usage_rows(db, 1, route="realtime.session", user_id=user)
    assert (await call_of(gateway, key, call_id))["status"] == "active"
    await sdk(gateway, key).realtime.calls.hangup(call_id)


# --- refusals and bad input: answered before the upstream is asked, nothing left behind ----------------


async def refused(gateway: Gateway, key: str, query: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    headers = {**auth(key), **kwargs.pop("headers", {})}
    response = await gateway.client.post(f"{CALLS}?{query}", headers=headers, **kwargs)
    body: dict[str, Any] = response.json()["error"]
    return response.status_code, body


@pytest.mark.parametrize(
    ("query", "body", "status", "param", "message"),
    [
        ("language=en", {"content": OFFER, "headers": {"Content-Type": "application/sdp"}}, 400, "role", "role"),
        ("role=dean", {"content": OFFER, "headers": {"Content-Type": "application/sdp"}}, 400, "role", "dean"),
        (
            "role=student&language=fr",
            {"content": OFFER, "headers": {"Content-Type": "application/sdp"}},
            400,
            "language",
            "fr",
        ),
        ("role=student", {"content": "hello", "headers": {"Content-Type": "application/sdp"}}, 400, "sdp", "v=0"),
        (
            "role=student",
            {"content": OFFER.replace("s=-", "s=\x00"), "headers": {"Content-Type": "application/sdp"}},
            400,
            "sdp",
            "control",
        ),
        ("role=student", {"json": {"sdp": OFFER}}, 400, None, "application/sdp"),
        ("role=student", {"files": {"session": (None, b"{}", "application/json")}}, 400, "sdp", "sdp"),
        (
            "role=student",
            {
                "files": {
                    "sdp": (None, OFFER.encode(), "application/sdp"),
                    "session": (None, b"{nope", "application/json"),
                }
            },
            400,
            "session",
            "JSON",
        ),
        (
            "role=student",
            {
                "files": {
                    "sdp": (None, OFFER.encode(), "application/sdp"),
                    "session": (None, b'{"tools": []}', "application/json"),
                }
            },
            400,
            "session.tools",
            "server",
        ),
        (
            "role=student",
            {
                "files": {
                    "sdp": (None, OFFER.encode(), "application/sdp"),
                    "session": (None, b'{"audio": {"output": {"voice": "ash"}}}', "application/json"),
                }
            },
            400,
            "session.audio.output.voice",
            "ash",
        ),
        (
            "role=teacher",
            {
                "files": {
                    "sdp": (None, OFFER.encode(), "application/sdp"),
                    "session": (None, b'{"model": "gpt-realtime"}', "application/json"),
                }
            },
            400,
            "session.model",
            "gpt-realtime-mini",
        ),
    ],
)
async def test_bad_set_ups_are_refused_before_the_upstream(
    gateway: Gateway,
    upstream: FakeUpstream,
    db: asyncpg.Pool,
    query: str,
    body: dict[str, Any],
    status: int,
    param: str | None,
    message: str,
) -> None:
    key, _ = await gateway.key("free")
    code, error = await refused(gateway, key, query, **body)
    assert (code, error["param"]) == (status, param), error
    assert message in error["message"]
    assert upstream.received(CALLS) == []
    assert await db.fetchval("SELECT count(*) FROM realtime_call") == 0


async def test_the_tiers_limits_refuse_a_call_before_the_upstream(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    key, user = await gateway.key("free")  # one open call, 30 minutes a day, $5 a month
    client = sdk(gateway, key)
    call_id, _ = await set_up(client)
    await attached(upstream)
    code, error = await refused(
        gateway, key, "role=student", content=OFFER, headers={"Content-Type": "application/sdp"}
    )
    assert (code, error["code"]) == (429, "too_many_sessions"), error
    assert len(upstream.received(CALLS)) == 1
    await client.realtime.calls.hangup(call_id)

    await set_limits(gateway, user, key, realtime_minutes_per_day=7)  # 5 of its 7 minutes are reserved by a call
    second, _ = await set_up(client)
    await attached(upstream)
    await client.realtime.calls.hangup(second)
    await set_limits(gateway, user, key, realtime_minutes_per_day=4)
    code, error = await refused(
        gateway, key, "role=student", content=OFFER, headers={"Content-Type": "application/sdp"}
    )
    assert (code, error["code"]) == (429, "daily_quota_exceeded"), error
    assert "reserves its longest length (240 s)" in error["message"]

    await set_limits(gateway, user, key, monthly_budget_usd=1)  # a call reserves its $2 cost cap
    code, error = await refused(
        gateway, key, "role=student", content=OFFER, headers={"Content-Type": "application/sdp"}
    )
    assert (code, error["code"]) == (429, "budget_exceeded"), error
    assert len(upstream.received(CALLS)) == 2
    assert await db.fetchval("SELECT count(*) FROM realtime_call WHERE status <> 'ended'") == 0


async def test_an_upstream_that_fails_the_set_up_leaves_nothing_open_or_charged(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    key, user = await gateway.key("pro")
    upstream.script(CALLS, Reply(status=500), Reply(status=500), Reply(status=500))
    code, error = await refused(
        gateway, key, "role=student", content=OFFER, headers={"Content-Type": "application/sdp"}
    )
    assert code == 502, error
    [row] = await usage_rows(db, 1, route="realtime.call", user_id=user)
    assert (row["status"], row["cost_usd"]) == ("error", 0.0)
    await wait_for(lambda: _budget_is(db, user, 0.0), what="the reservation to be given back")
    [call] = await db.fetch("SELECT status, ended_reason FROM realtime_call")
    assert (call["status"], call["ended_reason"]) == ("ended", "setup_failed")


async def test_another_users_call_is_not_found(gateway: Gateway, upstream: FakeUpstream) -> None:
    key, _ = await gateway.key("pro")
    other, _ = await gateway.key("pro")
    call_id, _ = await set_up(sdk(gateway, key))
    upstream_id = await attached(upstream)
    for method, path, body in (
        ("GET", f"{CALLS}/{call_id}", None),
        ("POST", f"{CALLS}/{call_id}/hangup", None),
        ("POST", f"{CALLS}/{upstream_id}/attach", {"client_secret": "ek_anything"}),
        ("GET", f"{CALLS}/rtc_{'0' * 24}", None),
    ):
        response = await gateway.client.request(method, path, json=body, headers=auth(other))
        assert response.status_code == 404, (path, response.text)
        assert response.json()["error"]["code"] == "call_not_found"
    assert not upstream.call(upstream_id).ended
    await sdk(gateway, key).realtime.calls.hangup(call_id)


# --- client secrets: a call the browser set up itself, attached to be metered and capped -----------------


async def test_a_call_set_up_with_a_minted_secret_is_attached_and_metered(
    gateway: Gateway, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    key, user = await gateway.key("pro")
    client = sdk(gateway, key)
    secret = await client.realtime.client_secrets.create(extra_body={"role": "family", "language": "en"})
    # The browser sets its call up with OpenAI directly (the fake takes the operator's key for it).
    direct = openai.AsyncOpenAI(base_url=upstream.base_url, api_key=upstream.api_key, max_retries=0)
    raw = await direct.realtime.calls.with_raw_response.create(sdp=OFFER, session=secret.session.model_dump())
    upstream_id = raw.headers["location"].rsplit("/", 1)[1]

    response = await gateway.client.post(
        f"{CALLS}/{upstream_id}/attach", json={"client_secret": secret.value}, headers=auth(key)
    )
    assert response.status_code == 201, response.text
    call = response.json()
    assert (call["status"], call["source"], call["role"], call["model"]) == (
        "active",
        "attached",
        "family",
        "gpt-realtime-mini",
    )
    assert await upstream.wait_sidebands(upstream_id, timeout=10)
    await upstream.call_respond(upstream_id)
    [row] = await usage_rows(db, 1, route="realtime.session", user_id=user)
    assert json.loads(row["detail"])["call_id"] == call["id"]

    again = await gateway.client.post(
        f"{CALLS}/{upstream_id}/attach", json={"client_secret": secret.value}, headers=auth(key)
    )
    assert again.status_code == 404  # attached already
    await client.realtime.calls.hangup(call["id"])
    assert upstream.call(upstream_id).hung_up


async def test_a_secret_attaches_one_call_of_its_own_user(gateway: Gateway, upstream: FakeUpstream) -> None:
    key, _ = await gateway.key("pro")
    other, _ = await gateway.key("pro")
    secret = await sdk(gateway, key).realtime.client_secrets.create(extra_body={"role": "student"})
    response = await gateway.client.post(
        f"{CALLS}/rtc_fake_999/attach", json={"client_secret": secret.value}, headers=auth(other)
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "client_secret"
    bad = await gateway.client.post(f"{CALLS}/not-a-call/attach", json={"client_secret": "x"}, headers=auth(key))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "call_id"


async def test_an_attached_call_the_limits_refuse_is_hung_up(gateway: Gateway, upstream: FakeUpstream) -> None:
    key, user = await gateway.key("pro")
    client = sdk(gateway, key)
    secret = await client.realtime.client_secrets.create(extra_body={"role": "student"})
    await set_limits(gateway, user, key, monthly_budget_usd=1)
    direct = openai.AsyncOpenAI(base_url=upstream.base_url, api_key=upstream.api_key, max_retries=0)
    raw = await direct.realtime.calls.with_raw_response.create(sdp=OFFER)
    upstream_id = raw.headers["location"].rsplit("/", 1)[1]
    response = await gateway.client.post(
        f"{CALLS}/{upstream_id}/attach", json={"client_secret": secret.value}, headers=auth(key)
    )
    assert response.status_code == 429 and response.json()["error"]["code"] == "budget_exceeded"
    assert upstream.call(upstream_id).hung_up


# --- replicas: a stopping one lets its calls go, a killed one's are taken up after its lease ----------------


async def test_a_replica_stopping_leaves_its_calls_to_another(
    gateway: Gateway, gateway_with: GatewayFactory, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    key, user = await gateway.key("pro")
    async with gateway_with() as first:
        call_id, _ = await set_up(sdk(first, key), "teacher")
        upstream_id = await attached(upstream)
        owner = await db.fetchval("SELECT owner FROM realtime_call WHERE id = $1", call_id)
    # The one that stopped let its call go: the module's gateway takes it up and watches it.
    assert await upstream.wait_sidebands(upstream_id, 1, timeout=10)
    assert len(upstream.call(upstream_id).sidebands) == 2 and not upstream.call(upstream_id).ended
    assert await db.fetchval("SELECT owner FROM realtime_call WHERE id = $1", call_id) not in (None, owner)
    await upstream.call_respond(upstream_id)
    [row] = await usage_rows(db, 1, route="realtime.session", user_id=user)
    assert Decimal(str(row["cost_usd"])) == FULL_COST
    await sdk(gateway, key).realtime.calls.hangup(call_id)
    [own] = await usage_rows(db, 1, route="realtime.call", user_id=user)
    assert (own["status"], json.loads(own["detail"])["attaches"]) == ("ok", 2)


async def test_a_killed_replicas_call_is_taken_up_after_its_lease_and_settled_once(
    database_url: str, gateway_with: GatewayFactory, upstream: FakeUpstream, db: asyncpg.Pool, tmp_path: Path
) -> None:
    fast = {"instance_beat_seconds": 0.3, "instance_lease_seconds": 1.5, "realtime_call_poll_seconds": 0.1}
    env = gateway_env(database_url, upstream, **{name.upper(): str(value) for name, value in fast.items()})
    async with gateway_process(env, tmp_path / "killed.log") as doomed:
        key, user = await doomed.key("pro")
        response = await doomed.client.post(
            f"{CALLS}?role=teacher", content=OFFER, headers={**auth(key), "Content-Type": "application/sdp"}
        )
        assert response.status_code == 201, response.text
        call_id = response.headers["location"].rsplit("/", 1)[1]
        upstream_id = await attached(upstream)
        await kill_process_async(doomed.proc)
    assert await db.fetchval("SELECT count(*) FROM usage_pending") == 1  # the call's reservation
    async with gateway_with(**fast) as survivor:
        assert await upstream.wait_sidebands(upstream_id, 1, timeout=15), "no replica took the call up"
        assert not upstream.call(upstream_id).ended
        await upstream.call_respond(upstream_id)
        await usage_rows(db, 1, route="realtime.session", user_id=user)
        await sdk(survivor, key).realtime.calls.hangup(call_id)
        [own] = await usage_rows(db, 1, route="realtime.call", user_id=user)
    assert (own["status"], json.loads(own["detail"])["attaches"]) == ("ok", 2)
    assert await db.fetchval("SELECT count(*) FROM usage_event WHERE status = 'interrupted'") == 0
    assert await db.fetchval("SELECT count(*) FROM usage_pending") == 0
    await wait_for(lambda: _budget_is(db, user, float(FULL_COST)), what="the budget to hold the response's cost only")


async def test_a_call_whose_sideband_cannot_be_attached_again_is_hung_up(
    gateway_with: GatewayFactory, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    async with gateway_with(realtime_attach_seconds=1.0) as gateway:
        key, user = await gateway.key("pro")
        call_id, _ = await set_up(sdk(gateway, key))
        upstream_id = await attached(upstream)
        upstream.sideband_refusal = 503
        await upstream.call_drop_sidebands(upstream_id)
        call = await ended(gateway, key, call_id)
        assert call["ended_reason"] == "sideband_unavailable"
        assert upstream.call(upstream_id).hung_up  # rather than left running unmetered
        [own] = await usage_rows(db, 1, route="realtime.call", user_id=user)
        assert (own["status"], own["error_code"]) == ("error", "sideband_unavailable")


async def test_a_users_own_key_sets_the_call_up_and_watches_it(
    gateway_with: GatewayFactory, upstream: FakeUpstream, db: asyncpg.Pool
) -> None:
    encryption_key = base64.urlsafe_b64encode(os.urandom(32)).decode()
    async with gateway_with(byok_encryption_keys=[encryption_key]) as gateway:
        key, user = await gateway.key("pro")
        # Their key is the one the fake takes: the call and its sideband go out with it, not as the operator's.
        stored = await gateway.client.put("/v1/me/openai-key", json={"api_key": upstream.api_key}, headers=auth(key))
        assert stored.status_code == 200, stored.text
        call_id, _ = await set_up(sdk(gateway, key), "teacher")
        upstream_id = await attached(upstream)
        assert await db.fetchval("SELECT answerer FROM realtime_call WHERE id = $1", call_id) == "own_key"
        await upstream.call_respond(upstream_id)
        [row] = await usage_rows(db, 1, route="realtime.session", user_id=user)
        assert json.loads(row["detail"])["key"] == "user"
        await sdk(gateway, key).realtime.calls.hangup(call_id)
        assert upstream.call(upstream_id).hung_up
        [own] = await usage_rows(db, 1, route="realtime.call", user_id=user)
        assert json.loads(own["detail"])["key"] == "user"


async def test_a_call_is_metered_through_a_database_outage(
    gateway_with: GatewayFactory,
    cuttable_database: TcpProxy,
    database_url: str,
    upstream: FakeUpstream,
    db: asyncpg.Pool,
) -> None:
    async with gateway_with(database_url=cuttable_database.url_for(database_url), usage_replay_interval=0.2) as gateway:
        key, user = await gateway.key("pro")
        call_id, _ = await set_up(sdk(gateway, key), "teacher")
        upstream_id = await attached(upstream)
        cuttable_database.cut()
        try:
            await upstream.call_respond(upstream_id)
            await asyncio.sleep(0.5)  # the response is read, counted by the process alone, its row spooled
        finally:
            cuttable_database.restore()
        [row] = await usage_rows(db, 1, route="realtime.session", user_id=user, seconds=20)
        assert Decimal(str(row["cost_usd"])) == FULL_COST
        [sideband] = upstream.call(upstream_id).sidebands  # the call was watched throughout, not let go
        assert sideband.is_open
        await sdk(gateway, key).realtime.calls.hangup(call_id)
        [own] = await usage_rows(db, 1, route="realtime.call", user_id=user)
        assert json.loads(own["detail"])["attaches"] == 1
