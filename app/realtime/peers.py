"""The relay's other end: the upstream's realtime WebSocket, or a simulated one answering by itself.

Both take and give messages as text (JSON events) or bytes, and say how they closed with
`PeerClosed`. The upstream is the one the lease names: the user's own key on OPENAI_BASE_URL, or
the operator's deployments of the model in their failover order (the first that accepts the
WebSocket serves the whole session).
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any, Protocol

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from app.calls import OWN_KEY_REJECTED
from app.errors import ErrorCode, GatewayError, InvalidRequest, UpstreamError, UpstreamTimeout
from app.registry import ModelSpec
from app.tokens import chars_to_tokens
from app.upstream.failover import FailoverProvider
from app.upstream.hub import Lease
from app.upstream.remote import RemoteProvider
from app.upstream.targets import Target

Message = str | bytes
SIMULATED_TEXT = "This is a simulated realtime reply."


class PeerClosed(Exception):
    """The peer closed (or was lost): its close code and reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


class Peer(Protocol):
    upstream: str | None  # the operator's upstream that serves the session (None: simulated)

    async def send(self, message: Message) -> None: ...

    async def recv(self) -> Message: ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...


class UpstreamPeer:
    def __init__(self, connection: ClientConnection, upstream: str) -> None:
        self.connection = connection
        self.upstream: str | None = upstream

    async def send(self, message: Message) -> None:
        try:
            await self.connection.send(message)
        except ConnectionClosed as closed:
            raise _closed(closed) from closed

    async def recv(self) -> Message:
        try:
            return await self.connection.recv()
        except ConnectionClosed as closed:
            raise _closed(closed) from closed

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.connection.close(code, reason)


def _closed(closed: ConnectionClosed) -> PeerClosed:
    frame = closed.rcvd
    return PeerClosed(frame.code, frame.reason) if frame is not None else PeerClosed(1006, "upstream connection lost")


def targets(lease: Lease, spec: ModelSpec) -> list[tuple[Target, str]]:
    """Where the session may go, in order: (upstream, the model's name there)."""
    provider = lease.provider
    if isinstance(provider, RemoteProvider):
        return [(provider.target, spec.id)]
    if isinstance(provider, FailoverProvider):
        ranked = [deployment for _, deployment in provider.routes.get(spec.id, [])]
        ranked.sort(key=lambda deployment: provider.breaker.cooling(deployment.upstream))  # stable: healthy first
        return [
            (provider.remotes[d.upstream].target, d.model or spec.id) for d in ranked if d.upstream in provider.remotes
        ]
    raise UpstreamError("No upstream can serve realtime sessions.")


async def connect_upstream(
    lease: Lease, spec: ModelSpec, *, open_timeout: float, max_size: int
) -> tuple[UpstreamPeer, str]:
    """The first deployment that accepts the WebSocket, and the model's name there. A refused key is a
    400 for a user's own key (they must fix it) and a 502 for the operator's; a 4xx other than 401 is
    not retried elsewhere."""
    failure: GatewayError = UpstreamError("No upstream serves this model.")
    for target, model in targets(lease, spec):
        try:
            return await _open(target, f"model={model}", open_timeout, max_size), model
        except InvalidStatus as refused:
            status = refused.response.status_code
            if status == 401 and lease.answerer == "own_key":
                raise InvalidRequest(OWN_KEY_REJECTED, code=ErrorCode.OPENAI_KEY_REJECTED) from refused
            failure = UpstreamError(f"The upstream refused the realtime session (HTTP {status}).")
            if 400 <= status < 500 and status not in (401, 429):
                raise failure from refused
        except TimeoutError:
            failure = UpstreamTimeout("The upstream did not open the realtime session in time.")
        except (OSError, InvalidHandshake) as error:
            failure = UpstreamError(f"The upstream's realtime WebSocket could not be opened: {error}.")
    raise failure


class CallGone(Exception):
    """The upstream does not know the call (any more): it ended."""


async def connect_sideband(target: Target, call_id: str, *, open_timeout: float, max_size: int) -> UpstreamPeer:
    """A WebRTC call's server-side WebSocket (`/realtime?call_id=`), with the key that set the call up.
    Raises CallGone when the upstream answers 404 (the call ended); other failures as they come."""
    try:
        return await _open(target, f"call_id={call_id}", open_timeout, max_size)
    except InvalidStatus as refused:
        if refused.response.status_code == 404:
            raise CallGone(call_id) from refused
        raise


async def _open(target: Target, query: str, open_timeout: float, max_size: int) -> UpstreamPeer:
    base = target.base_url.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
    connection = await connect(
        f"{base}/realtime?{query}",
        additional_headers={**target.auth_headers},
        open_timeout=open_timeout,
        max_size=max_size,
        compression=None,
        user_agent_header=None,
    )
    return UpstreamPeer(connection, target.name)


class SimulatedPeer:
    """Answers as a realtime server would, offline: `session.created`, `session.updated` for each
    `session.update`, and for each `response.create` a short text response ending in `response.done`
    with usage estimated from the characters of the conversation and the reply."""

    upstream: str | None = None

    def __init__(self, model: str) -> None:
        self.session: dict[str, Any] = {
            "id": "sess_sim_" + secrets.token_hex(8),
            "object": "realtime.session",
            "type": "realtime",
            "model": model,
        }
        self.outbox: asyncio.Queue[Message | PeerClosed] = asyncio.Queue()
        self.heard = 0  # characters of conversation text so far
        self._event("session.created", session=self.session)

    def _event(self, kind: str, **fields: Any) -> None:
        event = {"type": kind, "event_id": "event_sim_" + secrets.token_hex(6), **fields}
        self.outbox.put_nowait(orjson.dumps(event).decode())

    async def send(self, message: Message) -> None:
        try:
            event = orjson.loads(message)
        except orjson.JSONDecodeError:
            self._error("invalid_json", "The event is not JSON.")
            return
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "session.update":
            self.session.update(event.get("session") or {})
            self._event("session.updated", session=self.session)
        elif kind == "conversation.item.create":
            item = event.get("item") or {}
            self.heard += len(orjson.dumps(item.get("content", [])))
            self._event("conversation.item.created", item={"id": "item_sim_" + secrets.token_hex(6), **item})
        elif kind == "response.create":
            self._respond()

    def _respond(self) -> None:
        response_id = "resp_sim_" + secrets.token_hex(6)
        response: dict[str, Any] = {"id": response_id, "object": "realtime.response", "status": "in_progress"}
        self._event("response.created", response={**response, "output": []})
        self._event("response.output_text.delta", response_id=response_id, delta=SIMULATED_TEXT)
        self._event("response.output_text.done", response_id=response_id, text=SIMULATED_TEXT)
        prompt = chars_to_tokens(self.heard + len(str(self.session.get("instructions", ""))))
        completion = chars_to_tokens(len(SIMULATED_TEXT))
        usage = {
            "total_tokens": prompt + completion,
            "input_tokens": prompt,
            "output_tokens": completion,
            "input_token_details": {"text_tokens": prompt, "audio_tokens": 0, "cached_tokens": 0},
            "output_token_details": {"text_tokens": completion, "audio_tokens": 0},
        }
        item = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": SIMULATED_TEXT}]}
        done = {**response, "status": "completed", "output": [item], "usage": usage}
        self._event("response.done", response=done)
        self.heard += len(SIMULATED_TEXT)

    def _error(self, code: str, message: str) -> None:
        self._event("error", error={"type": "invalid_request_error", "code": code, "message": message})

    async def recv(self) -> Message:
        message = await self.outbox.get()
        if isinstance(message, PeerClosed):
            self.outbox.put_nowait(message)
            raise message
        return message

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.outbox.put_nowait(PeerClosed(code, reason))


class SimulatedSideband:
    """A simulated WebRTC call's sideband, offline: `session.created`, `session.updated` for each
    `session.update`, and every `turn_seconds` a spoken exchange's `response.done` (audio in and out,
    the conversation so far as input), until the call is hung up (`close`)."""

    upstream: str | None = None

    def __init__(self, session: dict[str, Any], turn_seconds: float) -> None:
        self.session = {**session, "id": "sess_sim_" + secrets.token_hex(8), "object": "realtime.session"}
        self.turn_seconds = turn_seconds
        self.outbox: asyncio.Queue[Message | PeerClosed] = asyncio.Queue()
        self.heard_audio = 0  # audio tokens of the conversation so far
        self.turns = 0
        self._event("session.created", session=self.session)

    def _event(self, kind: str, **fields: Any) -> None:
        event = {"type": kind, "event_id": "event_sim_" + secrets.token_hex(6), **fields}
        self.outbox.put_nowait(orjson.dumps(event).decode())

    async def send(self, message: Message) -> None:
        event = orjson.loads(message)
        if isinstance(event, dict) and event.get("type") == "session.update":
            self.session.update(event.get("session") or {})
            self._event("session.updated", session=self.session)

    async def recv(self) -> Message:
        while True:
            try:
                message = await asyncio.wait_for(self.outbox.get(), self.turn_seconds)
            except TimeoutError:
                self._turn()
                continue
            if isinstance(message, PeerClosed):
                self.outbox.put_nowait(message)
                raise message
            return message

    def _turn(self) -> None:
        """Half a turn of the caller speaking (about 10 audio tokens a second), half of the model."""
        self.turns += 1
        spoken = max(int(self.turn_seconds * 5), 1)
        answered = max(int(self.turn_seconds * 10), 1)
        self.heard_audio += spoken
        text = chars_to_tokens(len(str(self.session.get("instructions", ""))))
        usage = {
            "total_tokens": text + self.heard_audio + answered,
            "input_tokens": text + self.heard_audio,
            "output_tokens": answered,
            "input_token_details": {"text_tokens": text, "audio_tokens": self.heard_audio, "cached_tokens": 0},
            "output_token_details": {"text_tokens": 0, "audio_tokens": answered},
        }
        self.heard_audio += answered
        response = {"id": f"resp_sim_{self.turns}", "object": "realtime.response", "status": "completed"}
        self._event("response.done", response={**response, "output": [], "usage": usage})

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.outbox.put_nowait(PeerClosed(code, reason))
