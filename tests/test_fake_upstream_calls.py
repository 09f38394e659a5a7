"""The fake upstream's WebRTC calls (create, hang up) through the official SDK, and their sideband
WebSocket through `websockets`, as the gateway's call tests rely on them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from support.fake_upstream import CALLS_PATH, REALTIME_TEXT, REALTIME_USAGE, FakeUpstream, Reply, realtime_usage
from support.sdp import CHROME_OFFER

OFFER = CHROME_OFFER
SESSION = {"type": "realtime", "model": "gpt-realtime", "instructions": "x", "audio": {"output": {"voice": "marin"}}}


@pytest.fixture
def fake(upstream: FakeUpstream) -> FakeUpstream:
    """The session's fake upstream, reset (these tests need no gateway, so not `clean`)."""
    upstream.reset()
    return upstream


@pytest.fixture
async def client(fake: FakeUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(api_key=fake.api_key, base_url=fake.base_url, max_retries=0)
    yield sdk
    await sdk.close()


def sideband_url(fake: FakeUpstream, call_id: str) -> str:
    return fake.base_url.replace("http://", "ws://") + f"/realtime?call_id={call_id}"


def sideband(fake: FakeUpstream, call_id: str, key: str | None = None) -> Any:
    """`async with sideband(fake, call_id) as ws:` a sideband as the gateway opens it."""
    headers = {"Authorization": f"Bearer {key or fake.api_key}"}
    return connect(sideband_url(fake, call_id), additional_headers=headers)


async def receive(ws: ClientConnection) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(await ws.recv())
    return event


async def receive_until(ws: ClientConnection, kind: str) -> list[dict[str, Any]]:
    """Events up to and including the first of type `kind`."""
    seen = [await receive(ws)]
    while seen[-1]["type"] != kind:
        seen.append(await receive(ws))
    return seen


async def make_call(client: openai.AsyncOpenAI, session: dict[str, Any] | None = None) -> str:
    if session is None:
        raw = await client.realtime.calls.with_raw_response.create(sdp=OFFER)
    else:
        raw = await client.realtime.calls.with_raw_response.create(sdp=OFFER, session=session)  # type: ignore[arg-type]
    return str(raw.headers["location"]).removeprefix(CALLS_PATH + "/")


async def test_a_call_with_a_session_is_answered_with_sdp(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    raw = await client.realtime.calls.with_raw_response.create(sdp=OFFER, session=SESSION)  # type: ignore[arg-type]
    assert raw.status_code == 201
    assert raw.headers["content-type"].startswith("application/sdp")
    assert raw.headers["x-request-id"].startswith("req_fake_")
    call_id = fake.last_call_id()
    assert call_id is not None and call_id.startswith("rtc_fake_")
    assert raw.headers["location"] == f"/v1/realtime/calls/{call_id}"
    answer = raw.text
    assert answer.startswith("v=0\r\n")
    lines = answer.splitlines()
    assert [line.split()[0] for line in lines if line.startswith("m=")] == ["m=audio", "m=application"]
    assert "m=audio 9 UDP/TLS/RTP/SAVPF 111" in lines and "a=rtpmap:111 opus/48000/2" in lines
    assert "m=application 9 UDP/DTLS/SCTP webrtc-datachannel" in lines
    assert "a=group:BUNDLE 0 1" in lines and lines.count("a=setup:active") == 2
    assert [line for line in lines if line.startswith("a=mid:")] == ["a=mid:0", "a=mid:1"]
    assert sum(line.startswith("a=fingerprint:sha-256 ") for line in lines) == 2

    call = fake.call(call_id)
    assert call.session == SESSION and call.offer == OFFER and not call.ended
    assert call.headers["authorization"] == f"Bearer {fake.api_key}"
    [recorded] = fake.received(CALLS_PATH)
    assert recorded.json == {"sdp": OFFER, "session": SESSION} and recorded.files == []
    assert recorded.headers["content-type"].startswith("multipart/form-data")


async def test_a_call_without_a_session_sends_the_offer_raw(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    answer = await client.realtime.calls.create(sdp=OFFER)
    assert answer.text.startswith("v=0")
    call_id = fake.last_call_id()
    assert call_id is not None
    assert fake.call(call_id).session == {}
    [recorded] = fake.received(CALLS_PATH)
    assert recorded.headers["content-type"] == "application/sdp"
    assert recorded.json == {"sdp": OFFER}
    second = await make_call(client)
    assert int(second.removeprefix("rtc_fake_")) > int(call_id.removeprefix("rtc_fake_"))


async def test_bad_calls_are_refused_in_openais_shape(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        await client.realtime.calls.create(sdp="hello", session=SESSION)  # type: ignore[arg-type]
    assert bad.value.status_code == 400 and "v=0" in bad.value.message
    with pytest.raises(openai.BadRequestError):
        await client.realtime.calls.create(sdp="")
    stranger = openai.AsyncOpenAI(api_key="sk-wrong", base_url=fake.base_url, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await stranger.realtime.calls.create(sdp=OFFER)
    await stranger.close()
    fake.script(CALLS_PATH, Reply(status=500), Reply(status=400, body={"error": {"message": "no", "type": "x"}}))
    with pytest.raises(openai.InternalServerError):
        await client.realtime.calls.create(sdp=OFFER)
    with pytest.raises(openai.BadRequestError) as scripted:
        await client.realtime.calls.create(sdp=OFFER)
    assert scripted.value.body == {"message": "no", "type": "x"}
    assert fake.realtime_calls == {} and len(fake.received(CALLS_PATH)) == 5


async def test_hanging_up_ends_the_call_once(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    call_id = await make_call(client, SESSION)
    await client.realtime.calls.hangup(call_id)
    call = fake.call(call_id)
    assert call.ended and call.hung_up
    assert [recorded.path for recorded in fake.requests][-1] == f"{CALLS_PATH}/{call_id}/hangup"
    with pytest.raises(openai.NotFoundError):
        await client.realtime.calls.hangup(call_id)
    with pytest.raises(openai.NotFoundError):
        await client.realtime.calls.hangup("rtc_unknown")


async def test_a_sideband_follows_the_call_until_the_hang_up(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    call_id = await make_call(client, SESSION)
    async with sideband(fake, call_id) as first:
        created = await receive(first)
        assert created["type"] == "session.created"
        assert created["session"]["instructions"] == "x"
        assert created["session"]["object"] == "realtime.session"
        assert created["session"]["id"] == "sess_fake_call_" + call_id.removeprefix("rtc_fake_")
        assert await fake.wait_sidebands(call_id)

        usage = realtime_usage(text_in=10, audio_in=90, audio_out=40, cached_audio=30)
        await fake.call_respond(call_id, usage)
        answer = await receive_until(first, "response.done")
        assert [event["type"] for event in answer] == [
            "response.created",
            "response.output_text.delta",
            "response.done",
        ]
        assert answer[1]["delta"] == REALTIME_TEXT
        assert answer[-1]["response"]["usage"] == usage and usage["total_tokens"] == 140

        await fake.call_client_update(call_id, {"instructions": "y"})
        updated = await receive(first)
        assert updated["type"] == "session.updated"
        assert updated["session"]["instructions"] == "y" and updated["session"]["model"] == "gpt-realtime"

        async with sideband(fake, call_id) as second:  # a successor attaches; both hear everything
            assert (await receive(second))["session"]["instructions"] == "y"
            assert await fake.wait_sidebands(call_id, count=2)
            await first.send(json.dumps({"type": "session.update", "session": {"instructions": "z"}}))
            for ws in (first, second):
                assert (await receive(ws))["session"]["instructions"] == "z"
            await second.send(json.dumps({"type": "response.create"}))
            for ws in (first, second):
                done = (await receive_until(ws, "response.done"))[-1]
                assert done["response"]["usage"] == REALTIME_USAGE
            assert done["response"]["id"] != answer[-1]["response"]["id"]

            await client.realtime.calls.hangup(call_id)
            for ws in (first, second):
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
                assert ws.close_code == 1000

    call = fake.call(call_id)
    assert call.session["instructions"] == "z" and call.responses == 2
    assert [sideband.closed for sideband in call.sidebands] == [1000, 1000]
    assert [event["type"] for event in call.sidebands[0].events] == ["session.update"]
    assert [event["type"] for event in call.sidebands[1].events] == ["response.create"]
    assert call.sidebands[0].headers["authorization"] == f"Bearer {fake.api_key}"
    assert call.sidebands[0].query == {"call_id": call_id}
    with pytest.raises(InvalidStatus) as ended:
        async with sideband(fake, call_id):
            pass
    assert ended.value.response.status_code == 404


async def test_a_dropped_sideband_leaves_the_call_open(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    call_id = await make_call(client)
    async with sideband(fake, call_id) as ws:
        await receive(ws)
        assert await fake.wait_sidebands(call_id)
        await fake.call_drop_sidebands(call_id)
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1006
    call = fake.call(call_id)
    assert not call.ended and call.open_sidebands() == [] and call.sidebands[0].closed == 1006

    async with sideband(fake, call_id) as again:
        assert (await receive(again))["type"] == "session.created"
        assert await fake.wait_sidebands(call_id)
        await fake.call_end(call_id)
        with pytest.raises(ConnectionClosed):
            await again.recv()
        assert again.close_code == 1000
    assert call.ended and not call.hung_up
    assert not await fake.wait_sidebands(call_id, timeout=0.05)


async def test_a_sideband_needs_the_key_and_a_known_call(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    with pytest.raises(InvalidStatus) as unknown:
        async with sideband(fake, "rtc_unknown"):
            pass
    assert unknown.value.response.status_code == 404
    call_id = await make_call(client)
    with pytest.raises(InvalidStatus) as unauthorized:
        async with sideband(fake, call_id, key="sk-wrong"):
            pass
    assert unauthorized.value.response.status_code == 401
    assert fake.call(call_id).sidebands == []


async def test_scripted_delays_and_hangs_apply_to_calls(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    fake.script(CALLS_PATH, Reply(delay=0.05, headers={"x-extra": "1"}), Reply(hang=True))
    raw = await client.realtime.calls.with_raw_response.create(sdp=OFFER)
    assert raw.status_code == 201 and raw.headers["x-extra"] == "1"
    with pytest.raises(openai.APITimeoutError):
        await client.realtime.calls.create(sdp=OFFER, timeout=0.2)
    assert len(fake.realtime_calls) == 1
