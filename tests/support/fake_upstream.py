"""A scriptable fake OpenAI-compatible HTTP server that runs inside the test's event loop.

Besides well-behaved answers it can misbehave the ways real upstreams do (bench/faults.py
uses these): report any usage (huge, negative, not a number), answer bytes that are not
JSON, cut a body short, trickle a stream, put garbage in one. Like a real model, it never
reports more completion tokens than the request's `max_completion_tokens` / `max_tokens`.

Images: `/v1/images/generations` (plain, or streamed with `stream: true` as named
`image_generation.partial_image` / `image_generation.completed` events) and
`/v1/images/edits` (multipart `image` / `image[]` files, an optional `mask`; plain or
streamed as `image_edit.*` events). Streams honour `chunk_delay`, `drop_after` and
`error_after` (an `error` event) like chat streams.

Realtime: the WebSocket `/v1/realtime?model=...`, and WebRTC calls: `POST /v1/realtime/calls`
(an SDP offer in, an SDP answer out), `POST /v1/realtime/calls/{id}/hangup`, and the server's
"sideband" WebSocket `/v1/realtime?call_id=...`. The browser's side of a call is played by the
test through `call_respond`, `call_client_update`, `call_end` and `call_drop_sidebands`.
"""

from __future__ import annotations

import asyncio
import base64
import email.parser
import email.policy
import hashlib
import itertools
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

JSONDict = dict[str, Any]

CREATED = 1_700_000_000
CONTENT = "Hello from the fake upstream."
CONTENT_PIECES = ("Hello", " from", " the", " fake", " upstream.")
DEFAULT_MODEL = "gpt-4o-mini"
CHAT_PATH = "/v1/chat/completions"
RATE_LIMIT_HEADERS = {
    "x-ratelimit-limit-requests": "10000",
    "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-reset-requests": "6ms",
    "x-ratelimit-limit-tokens": "30000000",
    "x-ratelimit-remaining-tokens": "29999980",
    "x-ratelimit-reset-tokens": "0s",
}
STREAM_ERROR = {"error": {"message": "upstream exploded", "type": "server_error", "param": None, "code": None}}
SSE_DONE = b"data: [DONE]\n\n"


@dataclass
class Reply:
    """One scripted response for a path; the defaults mean "behave normally"."""

    status: int = 200
    body: JSONDict | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    chunks: list[JSONDict | str] | None = None
    chunk_delay: float = 0.0
    drop_after: int | None = None
    error_after: int | None = None
    hang: bool = False
    # Misbehaviours (all off by default).
    raw: bytes | None = None  # the body sent as these bytes, whatever they are (not JSON, an array, ...)
    truncate_at: int | None = None  # a plain body declared in full, cut after this many bytes
    usage: JSONDict | Callable[[JSONDict], JSONDict] | None = None  # a chat answer's usage (or from the request)
    pieces: int | None = None  # content pieces of a default stream (default: CONTENT_PIECES)
    garbage_after: int | None = None  # a `data:` line that is not JSON after this many stream events


@dataclass
class Recorded:
    """One request as the fake upstream received it."""

    method: str
    path: str
    headers: dict[str, str]
    json: JSONDict | None  # a JSON body, or a multipart body's text fields
    files: list[UploadedFile] = field(default_factory=list)  # a multipart body's files, in order
    query: dict[str, str] = field(default_factory=dict)


@dataclass
class UploadedFile:
    """One file of a multipart request as the fake upstream received it."""

    field: str
    filename: str | None
    content_type: str
    data: bytes


class FakeUpstream:
    """An aiohttp server on 127.0.0.1 that imitates the OpenAI API, with scriptable replies."""

    def __init__(self, api_key: str = "sk-fake-upstream") -> None:
        """Prepare an unstarted server that accepts only `api_key`."""
        self.api_key = api_key
        self.requests: list[Recorded] = []
        self.streams_open = 0
        self._scripts: dict[str, deque[Reply]] = {}
        self._defaults: dict[str, Reply] = {}
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._stopping = asyncio.Event()
        self.responses: dict[str, tuple[JSONDict, list[JSONDict]]] = {}  # the Responses API's kept responses
        self.background: dict[str, int] = {}  # background responses: reads left before they are done
        self.realtime_sessions: list[RealtimeSession] = []  # /v1/realtime WebSockets, oldest first
        self.realtime_usage: JSONDict = REALTIME_USAGE  # what each realtime `response.done` reports
        self.realtime_calls: dict[str, FakeCall] = {}  # WebRTC calls by id, oldest first
        self.sideband_refusal: int | None = None  # set: every sideband upgrade is answered with this status
        # Never reset: a gateway kept across tests must not meet an id it already knows.
        self._call_numbers = itertools.count(1)
        self._event_numbers = itertools.count(1)

    async def start(self) -> None:
        """Listen on an ephemeral loopback port."""
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation makes a client disconnect end hung or sleeping handlers at once.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Release hung handlers and shut the server down."""
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL, e.g. http://127.0.0.1:PORT/v1."""
        return f"http://127.0.0.1:{self._port}/v1"

    def script(self, path: str, *replies: Reply) -> None:
        """Queue replies for a path; they are used first in, first out."""
        self._scripts.setdefault(path, deque()).extend(replies)

    def set_default(self, path: str, reply: Reply | None) -> None:
        """The reply for a path once its script is used up (None: behave normally again)."""
        if reply is None:
            self._defaults.pop(path, None)
        else:
            self._defaults[path] = reply

    def received(self, path: str = CHAT_PATH) -> list[Recorded]:
        """The requests received on a path, oldest first."""
        return [recorded for recorded in self.requests if recorded.path == path]

    def reset(self) -> None:
        """Forget scripted replies, defaults and recorded requests."""
        self._scripts.clear()
        self._defaults.clear()
        self.requests.clear()
        self.responses.clear()
        self.background.clear()
        self.realtime_sessions.clear()
        self.realtime_usage = REALTIME_USAGE
        self.realtime_calls.clear()  # their open sidebands, if any, stay open but forgotten
        self.sideband_refusal = None

    # The timeout argument is the agreed test-facing API, so ASYNC109 is waived.
    async def wait_streams_closed(self, timeout: float = 5.0) -> bool:  # noqa: ASYNC109
        """Wait until no stream response is being written; False on timeout."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.streams_open:
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def call(self, call_id: str) -> FakeCall:
        """A WebRTC call by id (KeyError if the fake never made it, or forgot it in `reset`)."""
        return self.realtime_calls[call_id]

    def last_call_id(self) -> str | None:
        """The id of the newest WebRTC call, if any."""
        return next(reversed(self.realtime_calls), None)

    async def wait_sidebands(self, call_id: str, count: int = 1, timeout: float = 5.0) -> bool:  # noqa: ASYNC109
        """Wait until the call has at least `count` open sidebands (the gateway attached); False on timeout."""
        call = self.call(call_id)
        deadline = asyncio.get_running_loop().time() + timeout
        while len(call.open_sidebands()) < count:
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def call_respond(self, call_id: str, usage: JSONDict | None = None) -> None:
        """As if the browser's user spoke and the model answered: `response.created`, a text delta and
        `response.done` reporting `usage` (default `realtime_usage`), to every open sideband."""
        await self._call_response(self.call(call_id), self.realtime_usage if usage is None else usage)

    async def call_client_update(self, call_id: str, session: JSONDict) -> None:
        """As if the browser sent `session.update` on its data channel: merged into the call's
        session, the whole of which every open sideband receives as `session.updated`."""
        await self._call_update(self.call(call_id), session)

    async def call_end(self, call_id: str) -> None:
        """The browser hung up: the call ends (not `hung_up`) and its sidebands close with 1000."""
        call = self.call(call_id)
        call.ended = True
        await _close_sidebands(call)

    async def call_drop_sidebands(self, call_id: str) -> None:
        """Cut the call's sidebands as a network would, without a close frame (the other end sees
        1006); the call stays active and a new sideband may attach."""
        for sideband in self.call(call_id).open_sidebands():
            sideband.closed = 1006
            if sideband.request is not None and sideband.request.transport is not None:
                sideband.request.transport.close()
        await asyncio.sleep(0)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        """Record the request, then answer from the script or the default route."""
        if request.path == REALTIME_PATH and request.headers.get("upgrade", "").lower() == "websocket":
            if "call_id" in request.query:
                return await self._sideband(request)
            return await self._realtime(request)
        raw = await request.read()
        headers = {name.lower(): value for name, value in request.headers.items()}
        files: list[UploadedFile] = []
        payload: JSONDict | None
        content_type = headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            payload, files = _parse_multipart(content_type, raw)
            session = payload.get("session")
            if request.path == CALLS_PATH and isinstance(session, str):  # kept as text if not an object
                parsed = _parse_json(session.encode())
                payload["session"] = session if parsed is None else parsed
        elif content_type.startswith("application/sdp"):
            payload = {"sdp": raw.decode(errors="replace")}
        else:
            payload = _parse_json(raw)
        self.requests.append(Recorded(request.method, request.path, headers, payload, files, dict(request.query)))
        n = len(self.requests)
        out_headers = {"x-request-id": f"req_fake_{n}"}
        # The key as OpenAI takes it, or as Azure OpenAI does.
        if headers.get("authorization") != f"Bearer {self.api_key}" and headers.get("api-key") != self.api_key:
            return _json_response(401, _error_body(401), out_headers)
        if request.path == CHAT_PATH:
            out_headers.update(RATE_LIMIT_HEADERS)

        queue = self._scripts.get(request.path)
        reply = queue.popleft() if queue else self._defaults.get(request.path, Reply())
        out_headers.update(reply.headers)
        if reply.hang:
            await self._stopping.wait()
            return _json_response(503, _error_body(503), out_headers)
        if reply.delay:
            await asyncio.sleep(reply.delay)

        if reply.raw is not None:
            return await self._plain(request, reply, reply.raw, out_headers)
        if not 200 <= reply.status < 300 or reply.body is not None:
            body = reply.body if reply.body is not None else _error_body(reply.status)
            return await self._plain(request, reply, orjson.dumps(body), out_headers)
        wants_stream = payload is not None and payload.get("stream") in (True, "true")
        if request.path == EDITS_PATH and request.method == "POST":
            if not files or payload is None or not payload.get("prompt"):
                return _json_response(400, _error_body(400, "An image and a prompt are required."), out_headers)
            if wants_stream:
                return await self._image_stream(request, reply, out_headers, "image_edit", payload, files)
            return await self._plain(request, reply, orjson.dumps(_edit(payload, files)), out_headers)
        if request.path == IMAGES_PATH and wants_stream:
            return await self._image_stream(request, reply, out_headers, "image_generation", payload or {}, [])
        if request.path == CHAT_PATH and (wants_stream or reply.chunks is not None):
            return await self._stream(request, reply, out_headers, payload or {}, n)
        if request.path.startswith(RESPONSES_PATH):
            return await self._responses(request, reply, out_headers, payload or {}, n)
        if request.path == CALLS_PATH and request.method == "POST":
            return await self._create_call(request, reply, out_headers, payload or {}, files)
        if request.path.startswith(CALLS_PATH + "/") and request.path.endswith("/hangup") and request.method == "POST":
            return await self._hangup(request.path.removeprefix(CALLS_PATH + "/").removesuffix("/hangup"), out_headers)

        route = ROUTES.get((request.method, request.path))
        if route is None:
            message = f"Invalid URL ({request.method} {request.path})"
            return _json_response(404, _error_body(404, message), out_headers)
        if request.method == "POST" and payload is None:
            message = "We could not parse the JSON body of your request."
            return _json_response(400, _error_body(400, message), out_headers)
        answer = route(payload or {}, n)
        if request.path == CHAT_PATH:
            answer["usage"] = _reported_usage(reply, payload or {})
        return await self._plain(request, reply, orjson.dumps(answer), out_headers)

    async def _realtime(self, request: web.Request) -> web.StreamResponse:
        """The realtime WebSocket: `session.created` first; `session.updated` for each `session.update`;
        for each `response.create` a short text response ending in `response.done` with
        `realtime_usage`. Every client event is recorded on the session, in order."""
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return _json_response(401, _error_body(401), {})
        session = RealtimeSession(dict(request.query), {k.lower(): v for k, v in request.headers.items()})
        self.realtime_sessions.append(session)
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        state: JSONDict = {"id": f"sess_fake_{len(self.realtime_sessions)}", "model": request.query.get("model")}
        await socket.send_json({"type": "session.created", "event_id": "event_1", "session": state})
        async for message in socket:
            if message.type != web.WSMsgType.TEXT:
                continue
            event = orjson.loads(message.data)
            session.events.append(event)
            kind = event.get("type")
            if kind == "session.update":
                state.update(event.get("session") or {})
                await socket.send_json({"type": "session.updated", "event_id": "event_u", "session": state})
            elif kind == "response.create":
                for answer in _realtime_response(len(session.events), self.realtime_usage):
                    await socket.send_json(answer)
            elif kind == "close.please":  # not OpenAI's: lets a test see the upstream end a session
                await socket.close(code=1011, message=b"asked to close")
        session.closed = socket.close_code
        return socket

    async def _create_call(
        self, request: web.Request, reply: Reply, headers: dict[str, str], payload: JSONDict, files: list[UploadedFile]
    ) -> web.StreamResponse:
        """A WebRTC call: the offer (with the session, if any) in, 201 with an SDP answer and the
        call's `Location` out. The offer may come as a file part too, as some clients send it."""
        sdp = payload.get("sdp")
        if not isinstance(sdp, str):
            sdp = next((upload.data.decode(errors="replace") for upload in files if upload.field == "sdp"), None)
        if not sdp or not sdp.strip():
            return _json_response(400, _error_body(400, "Missing required parameter: 'sdp'."), headers)
        if not sdp.startswith("v=0"):
            return _json_response(400, _error_body(400, "Invalid SDP offer: it must start with 'v=0'."), headers)
        session = payload.get("session", {})
        if not isinstance(session, dict):
            return _json_response(400, _error_body(400, "Invalid 'session': expected a JSON object."), headers)
        received = {name.lower(): value for name, value in request.headers.items()}
        call = FakeCall(f"rtc_fake_{next(self._call_numbers)}", dict(session), sdp, received)
        self.realtime_calls[call.id] = call
        answer = _sdp_answer(sdp, call.id).encode()
        headers = {"Location": f"{CALLS_PATH}/{call.id}", **headers}
        return await self._plain(request, reply, answer, headers, status=201, content_type="application/sdp")

    async def _hangup(self, call_id: str, headers: dict[str, str]) -> web.StreamResponse:
        """End an active call through the API: its sidebands close with 1000; 404 for an unknown or ended call."""
        call = self.realtime_calls.get(call_id)
        if call is None or call.ended:
            return _json_response(404, _error_body(404, f"No active call found with id '{call_id}'."), headers)
        call.ended = call.hung_up = True
        await _close_sidebands(call)
        return _json_response(200, {}, headers)

    async def _sideband(self, request: web.Request) -> web.StreamResponse:
        """A call's sideband WebSocket: `session.created` with the call's session first; then, to every
        open sideband of the call, `session.updated` for a `session.update` and a short response for a
        `response.create`. Every client event is recorded on the sideband, in order."""
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return _json_response(401, _error_body(401), {})
        call_id = request.query["call_id"]
        call = self.realtime_calls.get(call_id)
        if self.sideband_refusal is not None:
            return _json_response(self.sideband_refusal, _error_body(self.sideband_refusal), {})
        if call is None or call.ended:
            return _json_response(404, _error_body(404, f"No active call found with id '{call_id}'."), {})
        sideband = Sideband(dict(request.query), {k.lower(): v for k, v in request.headers.items()})
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        sideband.socket, sideband.request = socket, request
        try:
            await socket.send_json({"type": "session.created", "event_id": self._event_id(), "session": call.state()})
            call.sidebands.append(sideband)  # only now: broadcasts come after `session.created`
            if call.ended:  # ended while `session.created` was being sent
                await _close_sidebands(call)
            async for message in socket:
                if message.type != web.WSMsgType.TEXT:
                    continue
                event = _parse_json(message.data.encode())
                if event is None:
                    error = {"type": "invalid_request_error", "code": "invalid_json", "message": "Invalid JSON."}
                    await socket.send_json({"type": "error", "event_id": self._event_id(), "error": error})
                    continue
                sideband.events.append(event)
                if event.get("type") == "session.update":
                    update = event.get("session")
                    await self._call_update(call, update if isinstance(update, dict) else {})
                elif event.get("type") == "response.create":
                    await self._call_response(call, self.realtime_usage)
            if sideband.closing is not None:  # closed by the fake: let the closing handshake finish
                await asyncio.wait({sideband.closing}, timeout=SIDEBAND_CLOSE_WAIT)
        finally:
            if sideband.closed is None:
                sideband.closed = socket.close_code if socket.close_code is not None else 1006
        return socket

    def _event_id(self) -> str:
        """A fresh server event id for a call's events."""
        return f"event_call_{next(self._event_numbers)}"

    async def _call_update(self, call: FakeCall, session: JSONDict) -> None:
        """Merge an update into the call's session (key by key) and tell every open sideband."""
        call.session.update(session)
        await _broadcast(call, [{"type": "session.updated", "event_id": self._event_id(), "session": call.state()}])

    async def _call_response(self, call: FakeCall, usage: JSONDict) -> None:
        """One response of the call, its events to every open sideband."""
        call.responses += 1
        label = f"call_{call.number}_"
        await _broadcast(call, _realtime_response(call.responses, usage, label))

    async def _plain(
        self,
        request: web.Request,
        reply: Reply,
        body: bytes,
        headers: dict[str, str],
        *,
        status: int | None = None,
        content_type: str = "application/json",
    ) -> web.StreamResponse:
        """A body (JSON unless told), with the reply's status unless told; with `truncate_at`,
        declared in full and cut short by a dropped connection."""
        status = reply.status if status is None else status
        if reply.truncate_at is None:
            return web.Response(status=status, body=body, headers=headers, content_type=content_type)
        response = web.StreamResponse(status=status, headers=headers)
        response.content_type = content_type
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: reply.truncate_at])
        response.force_close()
        if request.transport is not None:
            request.transport.close()
        return response

    async def _stream(
        self,
        request: web.Request,
        reply: Reply,
        headers: dict[str, str],
        payload: JSONDict,
        n: int,
    ) -> web.StreamResponse:
        """Write an SSE chat stream, honouring chunk_delay, drop_after and error_after."""
        if reply.chunks is not None:
            events = reply.chunks
        else:
            pieces = CONTENT_PIECES if reply.pieces is None else tuple(f" piece{i}" for i in range(reply.pieces))
            events = _chat_chunks(payload, n, pieces, _reported_usage(reply, payload))
        if reply.garbage_after is not None:
            events = [*events[: reply.garbage_after], "data: {not json at all\n\n", *events[reply.garbage_after :]]
        encoded = [_sse(event) for event in events]
        return await self._write_stream(request, reply, headers, encoded, _sse(STREAM_ERROR), end=SSE_DONE)

    async def _write_stream(
        self,
        request: web.Request,
        reply: Reply,
        headers: dict[str, str],
        events: list[bytes],
        error: bytes,
        *,
        end: bytes = b"",
    ) -> web.StreamResponse:
        """Write encoded events as the reply says: paced by `chunk_delay`, cut after `drop_after` (no
        terminating chunk: a truncated body), an `error` event after `error_after`; then `end`."""
        response = web.StreamResponse(status=reply.status, headers=headers)
        response.content_type = "text/event-stream"
        self.streams_open += 1
        try:
            await response.prepare(request)
            for sent in range(len(events) + 1):
                if sent and reply.chunk_delay:
                    await asyncio.sleep(reply.chunk_delay)
                if sent == reply.drop_after:
                    response.force_close()
                    if request.transport is not None:
                        request.transport.close()
                    return response
                if sent == reply.error_after:
                    await response.write(error)
                    await response.write_eof()
                    return response
                if sent == len(events):
                    break
                await response.write(events[sent])
            if end:
                await response.write(end)
            await response.write_eof()
        except ConnectionResetError:
            pass
        finally:
            self.streams_open -= 1
        return response

    async def _image_stream(
        self,
        request: web.Request,
        reply: Reply,
        headers: dict[str, str],
        kind: str,
        payload: JSONDict,
        files: list[UploadedFile],
    ) -> web.StreamResponse:
        """A streamed image: `partial_images` partial events, then the completed one; no `[DONE]`."""
        events = _image_events(kind, payload, files)
        encoded = [f"event: {name}\ndata: ".encode() + orjson.dumps(data) + b"\n\n" for name, data in events]
        error = b"event: error\ndata: " + orjson.dumps({"type": "error", **STREAM_ERROR}) + b"\n\n"
        return await self._write_stream(request, reply, headers, encoded, error)

    async def _responses(
        self, request: web.Request, reply: Reply, headers: dict[str, str], payload: JSONDict, n: int
    ) -> web.StreamResponse:
        """The Responses API: create (plain, or streamed as named events), and the calls on a kept response."""
        rest = request.path.removeprefix(RESPONSES_PATH).strip("/").split("/")
        if request.method == "POST" and rest == [""]:
            response_id = f"resp_fake_{n}"
            usage = reply.usage(payload) if callable(reply.usage) else reply.usage
            response = _response(payload, response_id, RESPONSE_USAGE if usage is None else usage)
            items = [{"id": f"msg_in_{n}", "type": "message", "role": "user", "content": payload.get("input")}]
            self.responses[response_id] = (response, items)
            if payload.get("background") is True:  # queued; done after BACKGROUND_POLLS reads of it
                self.background[response_id] = BACKGROUND_POLLS
                queued = {**response, "status": "queued", "output": [], "usage": None, "background": True}
                return await self._plain(request, reply, orjson.dumps(queued), headers)
            if payload.get("stream") is not True:
                return await self._plain(request, reply, orjson.dumps(response), headers)
            stream = web.StreamResponse(status=200, headers=headers)
            stream.content_type = "text/event-stream"
            await stream.prepare(request)
            for number, (name, data) in enumerate(_response_events(response)):
                if reply.chunk_delay:
                    await asyncio.sleep(reply.chunk_delay)
                await stream.write(
                    f"event: {name}\ndata: ".encode() + orjson.dumps({**data, "sequence_number": number}) + b"\n\n"
                )
            await stream.write_eof()
            return stream
        if rest == ["input_tokens"]:
            return _json_response(200, {"object": "response.input_tokens", "input_tokens": 7}, headers)
        kept = self.responses.get(rest[0])
        if kept is None:
            return _json_response(404, _error_body(404, f"No response found with id '{rest[0]}'."), headers)
        response, items = kept
        if request.method == "DELETE":
            del self.responses[rest[0]]
            return _json_response(200, {"id": rest[0], "object": "response", "deleted": True}, headers)
        if rest[1:] == ["cancel"]:
            if rest[0] not in self.background:
                return _json_response(400, _error_body(400, "Only background responses can be cancelled."), headers)
            cancelled = {**response, "status": "cancelled", "output": [], "usage": CANCELLED_USAGE}
            self.responses[rest[0]] = (cancelled, items)
            self.background[rest[0]] = 0
            return _json_response(200, cancelled, headers)
        if rest[1:] == ["input_items"]:
            page = {
                "object": "list",
                "data": items,
                "first_id": items[0]["id"],
                "last_id": items[-1]["id"],
                "has_more": False,
            }
            return _json_response(200, page, headers)
        if request.query.get("stream") == "true":  # a stream resumed: the events after `starting_after`
            after = int(request.query.get("starting_after", "-1"))
            stream = web.StreamResponse(status=200, headers=headers)
            stream.content_type = "text/event-stream"
            await stream.prepare(request)
            for number, (name, data) in enumerate(_response_events(response)):
                if number > after:
                    body = orjson.dumps({**data, "sequence_number": number})
                    await stream.write(f"event: {name}\ndata: ".encode() + body + b"\n\n")
            await stream.write_eof()
            return stream
        polls = self.background.get(rest[0])
        if polls:  # a background response still running
            self.background[rest[0]] = polls - 1
            return _json_response(200, {**response, "status": "in_progress", "output": [], "usage": None}, headers)
        return _json_response(200, response, headers)


RESPONSES_PATH = "/v1/responses"
REALTIME_PATH = "/v1/realtime"
REALTIME_TEXT = "Hello from the fake realtime upstream."
# What a realtime `response.done` reports by default: text and audio, some of it cached.
REALTIME_USAGE: JSONDict = {
    "total_tokens": 1650,
    "input_tokens": 1200,
    "output_tokens": 450,
    "input_token_details": {
        "text_tokens": 700,
        "audio_tokens": 500,
        "image_tokens": 0,
        "cached_tokens": 300,
        "cached_tokens_details": {"text_tokens": 200, "audio_tokens": 100, "image_tokens": 0},
    },
    "output_token_details": {"text_tokens": 50, "audio_tokens": 400},
}
CALLS_PATH = "/v1/realtime/calls"
SIDEBAND_CLOSE_WAIT = 1.0  # how long closing a sideband waits for the other end's close frame


def realtime_usage(
    *,
    text_in: int = 0,
    audio_in: int = 0,
    text_out: int = 0,
    audio_out: int = 0,
    cached_text: int = 0,
    cached_audio: int = 0,
) -> JSONDict:
    """A realtime `response.done` usage in OpenAI's shape from its parts, totals added up
    (e.g. for `call_respond`, or `realtime_usage` itself); cached tokens are part of the input."""
    inputs, outputs = text_in + audio_in, text_out + audio_out
    return {
        "total_tokens": inputs + outputs,
        "input_tokens": inputs,
        "output_tokens": outputs,
        "input_token_details": {
            "text_tokens": text_in,
            "audio_tokens": audio_in,
            "image_tokens": 0,
            "cached_tokens": cached_text + cached_audio,
            "cached_tokens_details": {"text_tokens": cached_text, "audio_tokens": cached_audio, "image_tokens": 0},
        },
        "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out},
    }


@dataclass
class RealtimeSession:
    """One realtime WebSocket as the fake upstream saw it: its query, headers and the client's events."""

    query: dict[str, str]
    headers: dict[str, str]
    events: list[JSONDict] = field(default_factory=list)
    closed: int | None = None  # the close code, once closed


@dataclass
class Sideband:
    """One sideband WebSocket of a call (`/v1/realtime?call_id=...`) as the fake upstream saw it."""

    query: dict[str, str]
    headers: dict[str, str]
    events: list[JSONDict] = field(default_factory=list)  # what the client sent, in order
    closed: int | None = None  # the close code, once closed (1006: dropped by `call_drop_sidebands`)
    # The live connection, for the fake's own use.
    socket: web.WebSocketResponse | None = field(default=None, repr=False)
    request: web.Request | None = field(default=None, repr=False)
    closing: asyncio.Task[bool] | None = field(default=None, repr=False)

    @property
    def is_open(self) -> bool:
        """Open, and not being closed."""
        return self.closed is None and self.socket is not None and not self.socket.closed


@dataclass
class FakeCall:
    """One WebRTC call (`POST /v1/realtime/calls`) and the sidebands that attached to it."""

    id: str
    session: JSONDict  # the offer's session part ({} without one), with every update merged in
    offer: str  # the SDP offer
    headers: dict[str, str]  # of the request that made the call
    ended: bool = False
    hung_up: bool = False  # ended through `POST .../hangup` (not by the browser: `call_end`)
    sidebands: list[Sideband] = field(default_factory=list)  # oldest first, closed ones too
    responses: int = 0  # responses the model gave on the call

    @property
    def number(self) -> str:
        """The n of `rtc_fake_<n>`."""
        return self.id.removeprefix("rtc_fake_")

    def state(self) -> JSONDict:
        """The session as the call's events carry it."""
        return {**self.session, "id": f"sess_fake_call_{self.number}", "object": "realtime.session"}

    def open_sidebands(self) -> list[Sideband]:
        """The sidebands open now."""
        return [sideband for sideband in self.sidebands if sideband.is_open]


async def _broadcast(call: FakeCall, events: list[JSONDict]) -> None:
    """Send events to every open sideband of a call (one that goes away meanwhile is skipped)."""
    for sideband in call.open_sidebands():
        assert sideband.socket is not None
        try:
            for event in events:
                await sideband.socket.send_json(event)
        except ConnectionResetError:
            continue


async def _close_sidebands(call: FakeCall, code: int = 1000) -> None:
    """Close every open sideband of a call with `code`, waiting a little for the closing handshakes
    (the closing goes on in the background if the other end is slow to answer)."""
    closings = []
    for sideband in call.open_sidebands():
        assert sideband.socket is not None
        sideband.closed = code
        sideband.closing = asyncio.ensure_future(sideband.socket.close(code=code))
        closings.append(sideband.closing)
    if closings:
        await asyncio.wait(closings, timeout=SIDEBAND_CLOSE_WAIT)


def _sdp_answer(offer: str, call_id: str) -> str:
    """A plausible SDP answer to an offer, as an ICE-lite server gives it: the offer's BUNDLE group,
    and for each of its m= lines an answer (opus for audio, the data channel for application) with
    the mid copied, this call's ICE credentials and DTLS fingerprint, `setup:active`; a rejected
    (port 0) m= line stays rejected."""
    digest = hashlib.sha256(call_id.encode()).digest()
    ufrag, password = digest[:4].hex(), digest[4:16].hex()
    fingerprint = ":".join(f"{byte:02X}" for byte in hashlib.sha256(b"certificate " + digest).digest())
    answer = ["v=0", f"o=- {int.from_bytes(digest[16:24], 'big') >> 1} 2 IN IP4 127.0.0.1", "s=-", "t=0 0"]
    sections: list[list[str]] = []
    for line in offer.replace("\r\n", "\n").split("\n"):
        if line.startswith("m="):
            sections.append([line])
        elif sections:
            sections[-1].append(line)
        elif line.startswith("a=group:"):
            answer.append(line)
    answer.append("a=ice-lite")
    for section in sections:
        kind, port, proto, *formats = section[0][2:].split()
        attributes = [line[2:] for line in section[1:] if line.startswith("a=")]
        mid = [f"a={attribute}" for attribute in attributes if attribute.startswith("mid:")][:1]
        if port == "0":
            answer += [f"m={kind} 0 {proto} {' '.join(formats)}", *mid]
            continue
        codec: list[str] = []
        if kind != "application":
            maps = {a.split()[0].removeprefix("rtpmap:"): a for a in attributes if a.startswith("rtpmap:")}
            chosen = next((pt for pt, a in maps.items() if "opus/" in a.lower()), formats[0] if formats else "0")
            formats = [chosen]
            codec = [f"a={a}" for a in attributes if a.startswith((f"rtpmap:{chosen} ", f"fmtp:{chosen} "))]
        answer += [f"m={kind} 9 {proto} {' '.join(formats)}", "c=IN IP4 0.0.0.0", *mid]
        answer += [f"a=ice-ufrag:{ufrag}", f"a=ice-pwd:{password}", f"a=fingerprint:sha-256 {fingerprint}"]
        answer.append("a=setup:active")
        if kind == "application":
            answer += ["a=sctp-port:5000", "a=max-message-size:1073741823"]
        else:
            offered = next((a for a in attributes if a in ANSWERED_DIRECTIONS), "sendrecv")
            answer += [f"a={ANSWERED_DIRECTIONS[offered]}", "a=rtcp-mux", *codec]
        answer += ["a=candidate:1 1 udp 2130706431 127.0.0.1 3478 typ host", "a=end-of-candidates"]
    return "\r\n".join(answer) + "\r\n"


ANSWERED_DIRECTIONS = {"sendrecv": "sendrecv", "sendonly": "recvonly", "recvonly": "sendonly", "inactive": "inactive"}


def _realtime_response(n: int, usage: JSONDict, label: str = "") -> list[JSONDict]:
    """A realtime response's events: `response.created`, a text delta, `response.done` with `usage`;
    the response is `resp_fake_<label><n>` (a label keeps calls' responses apart)."""
    response_id = f"resp_fake_{label}{n}"
    item = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": REALTIME_TEXT}]}
    base = {"id": response_id, "object": "realtime.response"}
    return [
        {
            "type": "response.created",
            "event_id": f"event_{label}{n}_1",
            "response": {**base, "status": "in_progress"},
        },
        {
            "type": "response.output_text.delta",
            "event_id": f"event_{label}{n}_2",
            "response_id": response_id,
            "delta": REALTIME_TEXT,
        },
        {
            "type": "response.done",
            "event_id": f"event_{label}{n}_3",
            "response": {**base, "status": "completed", "output": [item], "usage": usage},
        },
    ]


IMAGES_PATH = "/v1/images/generations"
EDITS_PATH = "/v1/images/edits"
BACKGROUND_POLLS = 2  # reads of a background response that find it still running
CANCELLED_USAGE: JSONDict = {"input_tokens": 20, "output_tokens": 3, "total_tokens": 23}
# What a default response reports: 5 of its 20 input tokens cached, 12 of its 30 output tokens reasoning.
RESPONSE_USAGE: JSONDict = {
    "input_tokens": 20,
    "input_tokens_details": {"cached_tokens": 5},
    "output_tokens": 30,
    "output_tokens_details": {"reasoning_tokens": 12},
    "total_tokens": 50,
}


def _response(payload: JSONDict, response_id: str, usage: JSONDict) -> JSONDict:
    message = {
        "type": "message",
        "id": "msg_" + response_id,
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": CONTENT, "annotations": []}],
    }
    return {
        "id": response_id,
        "object": "response",
        "created_at": CREATED,
        "status": "completed",
        "model": payload.get("model"),
        "output": [message],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "max_output_tokens": payload.get("max_output_tokens"),
        "previous_response_id": payload.get("previous_response_id"),
        "usage": usage,
    }


def _response_events(response: JSONDict) -> list[tuple[str, JSONDict]]:
    """A streamed response's events, in order, as the API names them."""
    started = {**response, "status": "in_progress", "output": [], "usage": None}
    message = response["output"][0]
    where = {"item_id": message["id"], "output_index": 0, "content_index": 0}
    part = {"type": "output_text", "text": "", "annotations": []}
    deltas = [CONTENT[i : i + 8] for i in range(0, len(CONTENT), 8)]
    return [
        ("response.created", {"type": "response.created", "response": started}),
        ("response.in_progress", {"type": "response.in_progress", "response": started}),
        (
            "response.output_item.added",
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {**message, "status": "in_progress", "content": []},
            },
        ),
        ("response.content_part.added", {"type": "response.content_part.added", **where, "part": part}),
        *(
            ("response.output_text.delta", {"type": "response.output_text.delta", **where, "delta": d, "logprobs": []})
            for d in deltas
        ),
        ("response.output_text.done", {"type": "response.output_text.done", **where, "text": CONTENT, "logprobs": []}),
        (
            "response.content_part.done",
            {"type": "response.content_part.done", **where, "part": {**part, "text": CONTENT}},
        ),
        ("response.output_item.done", {"type": "response.output_item.done", "output_index": 0, "item": message}),
        ("response.completed", {"type": "response.completed", "response": response}),
    ]


def _parse_json(raw: bytes) -> JSONDict | None:
    """Decode a JSON object body, or None if it is empty or not an object."""
    try:
        value = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _json_response(status: int, body: JSONDict, headers: dict[str, str]) -> web.Response:
    """A JSON response with the given status and headers."""
    return web.Response(status=status, body=orjson.dumps(body), headers=headers, content_type="application/json")


def _sse(event: JSONDict | str) -> bytes:
    """Encode one SSE event: dicts as a data line, strings as they are."""
    if isinstance(event, str):
        return event.encode()
    return b"data: " + orjson.dumps(event) + b"\n\n"


ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("Invalid request.", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    403: ("You are not allowed to access this resource.", "invalid_request_error", None),
    404: ("The requested resource was not found.", "invalid_request_error", None),
    429: ("Rate limit reached for requests.", "requests", "rate_limit_exceeded"),
    500: (
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
    ),
}


def _error_body(status: int, message: str | None = None) -> JSONDict:
    """OpenAI's error envelope for a status code."""
    default, kind, code = ERRORS.get(status) or ERRORS[500 if status >= 500 else 400]
    return {"error": {"message": message or default, "type": kind, "param": None, "code": code}}


def _usage() -> JSONDict:
    """The fixed token usage of every default chat answer."""
    return {
        "prompt_tokens": 11,
        "completion_tokens": 7,
        "total_tokens": 18,
        "prompt_tokens_details": {"cached_tokens": 2},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def _chat_completion(payload: JSONDict, n: int) -> JSONDict:
    """The default non-streaming chat.completion."""
    return {
        "id": f"chatcmpl-fake-{n}",
        "object": "chat.completion",
        "created": CREATED,
        "model": payload.get("model", DEFAULT_MODEL),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": CONTENT, "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": _usage(),
        "system_fingerprint": "fp_fake",
    }


def _reported_usage(reply: Reply, payload: JSONDict) -> JSONDict:
    """The usage a chat answer reports: the reply's (or the default), never more completion tokens
    than the request allowed, as a real model stops at its cap."""
    scripted = reply.usage(payload) if callable(reply.usage) else reply.usage
    usage = dict(scripted) if scripted is not None else _usage()
    cap = payload.get("max_completion_tokens") or payload.get("max_tokens")
    completion = usage.get("completion_tokens")
    if isinstance(cap, int) and isinstance(completion, int) and completion > cap:
        usage["completion_tokens"] = cap
        prompt = usage.get("prompt_tokens")
        if isinstance(prompt, int):
            usage["total_tokens"] = prompt + cap
    return usage


def _chat_chunks(
    payload: JSONDict, n: int, pieces: tuple[str, ...] = CONTENT_PIECES, usage: JSONDict | None = None
) -> list[JSONDict | str]:
    """The default chat.completion.chunk sequence, with a usage chunk if asked for."""
    options = payload.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    base: JSONDict = {
        "id": f"chatcmpl-fake-{n}",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": payload.get("model", DEFAULT_MODEL),
        "system_fingerprint": "fp_fake",
    }

    def chunk(delta: JSONDict, finish_reason: str | None = None) -> JSONDict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        extra = {"usage": None} if include_usage else {}
        return {**base, "choices": [choice], **extra}

    chunks: list[JSONDict | str] = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": piece}) for piece in pieces]
    chunks.append(chunk({}, "stop"))
    if include_usage:
        chunks.append({**base, "choices": [], "usage": usage if usage is not None else _usage()})
    return chunks


def _png(prompt: str) -> bytes:
    """An 8x8 solid-colour RGB PNG whose colour is derived from the prompt."""
    red, green, blue = hashlib.sha256(prompt.encode()).digest()[:3]
    row = b"\x00" + bytes((red, green, blue)) * 8

    def png_chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(row * 8))
        + png_chunk(b"IEND", b"")
    )


def _images(payload: JSONDict, n: int) -> JSONDict:
    """The default images.generate answer with n base64 PNGs."""
    count = payload.get("n") or 1
    image = base64.b64encode(_png(str(payload.get("prompt", "")))).decode()
    output_tokens = 1056 * count
    return {
        "created": CREATED,
        "data": [{"b64_json": image, "revised_prompt": None} for _ in range(count)],
        "background": "opaque",
        "output_format": "png",
        "quality": payload.get("quality") or "auto",
        "size": payload.get("size") or "1024x1024",
        "usage": {
            "input_tokens": 50,
            "output_tokens": output_tokens,
            "total_tokens": 50 + output_tokens,
            "input_tokens_details": {"image_tokens": 0, "text_tokens": 50},
        },
    }


IMAGE_INPUT_TOKENS = 300  # what the fake bills each uploaded image of an edit, as input


def _parse_multipart(content_type: str, raw: bytes) -> tuple[JSONDict, list[UploadedFile]]:
    """A multipart/form-data body's text fields and its files (a repeated text field keeps the last)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw
    )
    fields: JSONDict = {}
    files: list[UploadedFile] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        decoded = part.get_payload(decode=True)
        data = decoded if isinstance(decoded, bytes) else b""
        if part.get_filename() is not None:
            files.append(UploadedFile(str(name), part.get_filename(), part.get_content_type(), data))
        else:
            fields[str(name)] = data.decode()
    return fields, files


def edit_png(prompt: str, images: int) -> bytes:
    """The fake's edit of `images` uploaded images: an 8x8 PNG of its own colour."""
    return _png(f"edit {images}: {prompt}")


def _edit(fields: JSONDict, files: list[UploadedFile]) -> JSONDict:
    """The default images.edit answer: n PNGs, the uploaded images billed as input."""
    count = int(fields.get("n") or 1)
    images = sum(1 for upload in files if upload.field != "mask")
    image = base64.b64encode(edit_png(str(fields.get("prompt")), images)).decode()
    input_tokens = 50 + IMAGE_INPUT_TOKENS * images
    output_tokens = 1056 * count
    return {
        "created": CREATED,
        "data": [{"b64_json": image} for _ in range(count)],
        "background": "opaque",
        "output_format": "png",
        "quality": fields.get("quality") or "auto",
        "size": fields.get("size") or "1024x1024",
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
            "input_tokens_details": {"image_tokens": IMAGE_INPUT_TOKENS * images, "text_tokens": 50},
        },
    }


def partial_png(prompt: str, index: int) -> bytes:
    """The fake's partial image `index` of a streamed image."""
    return _png(f"partial {index}: {prompt}")


def _image_events(kind: str, payload: JSONDict, files: list[UploadedFile]) -> list[tuple[str, JSONDict]]:
    """A streamed generation's (or edit's) events: its partial images, then the image."""
    answer = _edit(payload, files) if kind == "image_edit" else _images({**payload, "n": 1}, 0)
    facts = {key: answer[key] for key in ("background", "output_format", "quality", "size")}
    prompt = str(payload.get("prompt", ""))
    events = [
        (
            f"{kind}.partial_image",
            {
                "type": f"{kind}.partial_image",
                "b64_json": base64.b64encode(partial_png(prompt, index)).decode(),
                "created_at": CREATED,
                "partial_image_index": index,
                **facts,
            },
        )
        for index in range(int(payload.get("partial_images") or 0))
    ]
    completed = {
        "type": f"{kind}.completed",
        "b64_json": answer["data"][0]["b64_json"],
        "created_at": CREATED,
        "usage": {**answer["usage"], "output_tokens": 1056, "total_tokens": answer["usage"]["input_tokens"] + 1056},
        **facts,
    }
    events.append((f"{kind}.completed", completed))
    return events


def images_answer(prompt: str, **changes: Any) -> JSONDict:
    """The default answer for one image of `prompt`, with fields changed (a misbehaving upstream)."""
    return {**_images({"prompt": prompt}, 1), **changes}


def _client_secret(payload: JSONDict, n: int) -> JSONDict:
    """The default realtime client secret, echoing the requested session."""
    expires_after = payload.get("expires_after")
    seconds = 600
    if isinstance(expires_after, dict) and isinstance(expires_after.get("seconds"), int):
        seconds = expires_after["seconds"]
    session = payload.get("session")
    session = session if isinstance(session, dict) else {}
    return {
        "value": f"ek_fake_{n}",
        "expires_at": int(time.time()) + seconds,
        "session": {**session, "id": f"sess_fake_{n}", "object": "realtime.session"},
    }


def _moderation(payload: JSONDict, n: int) -> JSONDict:
    """The default moderation: flagged when an input contains "forbidden"."""
    raw = payload.get("input", "")
    items = raw if isinstance(raw, list) else [raw]
    texts = [item.get("text", "") if isinstance(item, dict) else str(item) for item in items]
    results = []
    for text in texts:
        flagged = "forbidden" in text.lower()
        results.append(
            {
                "flagged": flagged,
                "categories": {"harassment": False, "violence": flagged},
                "category_scores": {"harassment": 0.0001, "violence": 0.97 if flagged else 0.0002},
            }
        )
    return {"id": f"modr-{n}", "model": "omni-moderation-latest", "results": results}


EMBEDDING_LENGTH = 8  # what the fake answers with, whatever the model (a request's `dimensions` wins)
EMBEDDING_TOKENS_PER_INPUT = 5  # the usage it reports: a fixed count per input, unlike any estimate


def _embeddings(payload: JSONDict, n: int) -> JSONDict:
    """One vector per input: floats, or base64 float32 when asked; usage a fixed count per input."""
    raw = payload.get("input")
    items = [raw] if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)) else raw
    length = payload.get("dimensions") or EMBEDDING_LENGTH
    data = []
    for index, _ in enumerate(items or []):
        vector = [round((index + 1) / (k + 2), 4) for k in range(length)]
        packed = base64.b64encode(struct.pack(f"<{length}f", *vector)).decode()
        encoded = packed if payload.get("encoding_format") == "base64" else vector
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = EMBEDDING_TOKENS_PER_INPUT * len(data)
    return {
        "object": "list",
        "data": data,
        "model": payload.get("model"),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _models(payload: JSONDict, n: int) -> JSONDict:
    """The default model list."""
    return {
        "object": "list",
        "data": [
            {"id": DEFAULT_MODEL, "object": "model", "created": CREATED, "owned_by": "system"},
            {"id": "gpt-image-1", "object": "model", "created": CREATED, "owned_by": "system"},
        ],
    }


ROUTES: dict[tuple[str, str], Callable[[JSONDict, int], JSONDict]] = {
    ("POST", CHAT_PATH): _chat_completion,
    ("POST", "/v1/images/generations"): _images,
    ("POST", "/v1/realtime/client_secrets"): _client_secret,
    ("POST", "/v1/moderations"): _moderation,
    ("POST", "/v1/embeddings"): _embeddings,
    ("GET", "/v1/models"): _models,
}
