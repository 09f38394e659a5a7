"""One relayed realtime session: events both ways, each response metered, the caps enforced.

Two tasks pump messages, one each way, and a third waits out the tier's session length; the first
to end ends the session, and the others are cancelled. Each send is awaited before the next
receive, so a slow side slows the other instead of filling a buffer.

- **Presets**: a client's `session.update` may not replace what the preset decides. Its
  `instructions` become the preset's (with the client's appended, where the preset allows
  appending); a `model` becomes the session's; a voice outside the preset's allowed voices
  becomes the preset's voice.
- **Metering**: each `response.done` from the upstream becomes one usage row (route
  `realtime.session`) priced exactly from the catalog (app/realtime/metering.py). It is recorded
  after the fact through a `Call` whose budget reservation is nought, so the writer charges its
  whole cost to the caller's budget when it settles: the upstream answered already, and the
  session's own reservation (its cost cap, taken at connect) is what kept the budget honest
  meanwhile. Responses the upstream starts by itself (server VAD) are metered the same way.
- **Caps**: the tier's `realtime_session_seconds` and REALTIME_SESSION_MAX_COST_USD. Either
  one sends the client an `error` event naming it, closes both sides (the client with 1008 and
  the reason) and is recorded on the session's own row (`error_code`, `detail.ended`). The cost
  is known only when a response is done, so a session may overrun its cost cap by that response.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from app.calls import Call, Spent
from app.ratelimit.limiter import Limiter
from app.realtime.metering import ResponseMeter
from app.realtime.peers import Peer, PeerClosed
from app.realtime.presets import VoicePreset
from app.realtime.rules import SessionRules
from app.registry import ModelSpec
from app.usage.writer import UsageWriter

log = logging.getLogger("app.realtime")

POLICY_VIOLATION = 1008
INTERNAL_ERROR = 1011
# Close codes a peer may receive but never send (RFC 6455 7.4.1): passed on as these instead.
UNSENDABLE = {1005: 1000, 1006: INTERNAL_ERROR, 1015: INTERNAL_ERROR}


@dataclass(frozen=True, slots=True)
class Ending:
    """Why a session ended, and how the client is told (its close code and reason)."""

    ended: str  # client_closed, upstream_closed, session_seconds_exceeded, session_cost_exceeded
    code: int = 1000
    reason: str = ""
    cap: bool = False  # a cap ended it: the client gets an `error` event first


@dataclass(frozen=True, slots=True)
class Choice:
    """What the preset decided for this session."""

    preset: VoicePreset
    language: str
    instructions: str
    spec: ModelSpec
    model: str  # the model's name at the upstream that serves the session


class RelaySession:
    def __init__(
        self,
        *,
        websocket: WebSocket,
        peer: Peer,
        call: Call,
        choice: Choice,
        limiter: Limiter,
        usage: UsageWriter,
        max_seconds: float | None,
        max_cost: Decimal,
    ) -> None:
        self.websocket = websocket
        self.peer = peer
        self.call = call  # the session's own call: its reservation, and its row when it ends
        self.choice = choice
        self.max_seconds = max_seconds
        self.max_cost = max_cost
        self.cost = Decimal(0)
        self.responses = 0
        self.upstream_session_id: str | None = None
        self.session_id = str(call.call_id)
        self.rules = SessionRules.of(choice.preset, choice.instructions, choice.preset.voice)
        self.meter = ResponseMeter(usage, limiter, call.principal, choice.spec, call.lease, call.request_id)

    def preset_update(self) -> str:
        """The `session.update` sent upstream before any client event."""
        preset = self.choice.preset
        session = {
            "type": "realtime",
            "model": self.choice.model,
            "instructions": self.choice.instructions,
            "audio": {"output": {"voice": preset.voice}},
        }
        return orjson.dumps({"type": "session.update", "session": session}).decode()

    async def run(self) -> None:
        """Relay until one side closes or a cap is reached; the session's row is left however it ends."""
        started = time.monotonic()
        ending = Ending("cancelled", 1001, "The gateway is shutting down.")
        tasks = [asyncio.create_task(self._from_client()), asyncio.create_task(self._from_peer())]
        if self.max_seconds is not None:
            tasks.append(asyncio.create_task(self._time_limit(self.max_seconds)))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            try:
                ending = next(iter(done)).result()
            except Exception:
                log.exception("realtime session %s failed", self.session_id)
                ending = Ending("gateway_error", INTERNAL_ERROR, "The gateway failed to relay this session.")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._close(ending)
            self._record_end(ending, time.monotonic() - started)

    async def _from_client(self) -> Ending:
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return Ending("client_closed", int(message.get("code") or 1000))
            text, data = message.get("text"), message.get("bytes")
            try:
                if text is not None:
                    await self.peer.send(self._guard(text))
                elif data is not None:
                    await self.peer.send(data)
            except PeerClosed as closed:
                return _upstream_closed(closed)

    async def _from_peer(self) -> Ending:
        while True:
            try:
                message = await self.peer.recv()
            except PeerClosed as closed:
                return _upstream_closed(closed)
            try:
                if isinstance(message, str):
                    await self.websocket.send_text(message)
                else:
                    await self.websocket.send_bytes(message)
            except (WebSocketDisconnect, RuntimeError, OSError):
                return Ending("client_closed")
            if isinstance(message, str):
                ending = self._observe(message)
                if ending is not None:
                    return ending

    async def _time_limit(self, seconds: float) -> Ending:
        await asyncio.sleep(seconds)
        return Ending(
            "session_seconds_exceeded",
            POLICY_VIOLATION,
            f"session_seconds_exceeded: realtime sessions last at most {seconds:g} s on your tier",
            cap=True,
        )

    def _guard(self, text: str) -> str:
        """A client's `session.update` with what the preset decides put back (app/realtime/rules.py)."""
        if '"session.update"' not in text:
            return text
        try:
            event = orjson.loads(text)
        except orjson.JSONDecodeError:
            return text  # the upstream answers it with an `error` event
        session = event.get("session") if isinstance(event, dict) and event.get("type") == "session.update" else None
        if not isinstance(session, dict):
            return text
        fixes = self.rules.corrections(session)
        if "instructions" in fixes:
            session["instructions"] = fixes["instructions"]
        if "audio" in fixes:
            session["audio"]["output"]["voice"] = fixes["audio"]["output"]["voice"]
        if "model" in session:
            session["model"] = self.choice.model
        return orjson.dumps(event).decode()

    def _observe(self, text: str) -> Ending | None:
        """Meter a `response.done`; note the upstream's session id. Other events are not parsed."""
        if '"response.done"' not in text and (self.upstream_session_id or '"session.created"' not in text):
            return None
        try:
            event = orjson.loads(text)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(event, dict):
            return None
        if event.get("type") == "session.created" and isinstance(event.get("session"), dict):
            self.upstream_session_id = str(event["session"].get("id"))
            return None
        if event.get("type") != "response.done" or not isinstance(event.get("response"), dict):
            return None
        self._meter(event["response"])
        if self.cost >= self.max_cost:
            return Ending(
                "session_cost_exceeded",
                POLICY_VIOLATION,
                f"session_cost_exceeded: this session reached its cost cap of ${self.max_cost}",
                cap=True,
            )
        return None

    def _meter(self, response: dict[str, Any]) -> None:
        self.cost += self.meter.record(response, self.peer.upstream, self._detail())
        self.responses += 1

    def _detail(self) -> dict[str, Any]:
        detail: dict[str, Any] = {
            "session_id": self.session_id,
            "role": self.choice.preset.role,
            "language": self.choice.language,
        }
        if self.upstream_session_id:
            detail["upstream_session_id"] = self.upstream_session_id
        return detail

    async def _close(self, ending: Ending) -> None:
        """Tell the client why (an `error` event for a cap), then close both sides."""
        if ending.ended != "client_closed":
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                if ending.cap:
                    code = ending.reason.partition(":")[0]
                    error = {"type": "invalid_request_error", "code": code, "message": ending.reason}
                    await self.websocket.send_text(orjson.dumps({"type": "error", "error": error}).decode())
                await self.websocket.close(ending.code, ending.reason[:120])
        if ending.ended != "upstream_closed":
            with contextlib.suppress(Exception):
                await self.peer.close(1000, "")

    def _record_end(self, ending: Ending, seconds: float) -> None:
        """The session's own row: no cost (its responses carry it), so its reservation is given back."""
        self.call.finish(
            Spent(),
            stream=True,
            upstream=self.peer.upstream,
            error_code=ending.ended if ending.cap else None,
            detail={
                **self._detail(),
                "ended": ending.ended,
                "close_code": ending.code,
                "seconds": round(seconds, 3),
                "responses": self.responses,
                "cost_usd": str(self.cost),
            },
        )


def _upstream_closed(closed: PeerClosed) -> Ending:
    code = UNSENDABLE.get(closed.code, closed.code)
    return Ending("upstream_closed", code, closed.reason or ("upstream connection lost" if code != 1000 else ""))
