"""`/v1/realtime` for server-side clients: admission, the upstream's WebSocket, then the session.

Admission happens before the WebSocket is accepted, and a refusal is an HTTP answer to the
handshake in the API's error shape (401 bad key, 400 unknown role or language or another
model, 403 a role or model the tier may not use, 429 rate or budget, 502/504 the upstream).
The official SDK raises it from `client.realtime.connect()` as websockets' `InvalidStatus`,
whose `response.status_code` and `response.body` carry it: a refused session never looks open.

The caller's preset is chosen as for client secrets (`role`, `language` query parameters; the
`model` query, which the SDK always sends, must name the preset's model or an alias of it). The
session's own call takes the tier's realtime request rate and reserves the session's cost cap
against the budget; the upstream (or the simulated peer) is opened next, given the preset's
`session.update`, and only then is the client's WebSocket accepted (app/realtime/session.py).
"""

from __future__ import annotations

import random
import re
from decimal import Decimal

from starlette.websockets import WebSocket

from app.auth.principal import Principal
from app.auth.service import Authenticator
from app.calls import Calls, Spent
from app.config import Settings
from app.errors import ErrorCode, GatewayError, InvalidRequest, Unauthenticated, error_response
from app.ratelimit.limiter import Limiter
from app.realtime.peers import Peer, SimulatedPeer, connect_upstream
from app.realtime.service import RealtimeService
from app.realtime.session import Choice, RelaySession

CONNECTION_ROUTE = "realtime.connection"  # the session's own row: its reservation, length and ending
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
MAX_ROLE, MAX_LANGUAGE, MAX_MODEL = 100, 35, 100


class RealtimeRelay:
    def __init__(
        self, *, settings: Settings, auth: Authenticator, service: RealtimeService, calls: Calls, limiter: Limiter
    ) -> None:
        self.settings = settings
        self.auth = auth
        self.service = service
        self.calls = calls
        self.limiter = limiter
        self.max_cost = Decimal(str(settings.realtime_session_max_cost_usd))
        self.sessions_open = 0

    async def serve(self, websocket: WebSocket) -> None:
        """Admit the caller and relay its session, or answer the handshake with the refusal."""
        asked = websocket.headers.get("x-request-id", "")
        request_id = asked if REQUEST_ID.match(asked) else f"req_{random.getrandbits(96):024x}"
        try:
            session = await self._admit(websocket, request_id)
        except GatewayError as error:
            await _refuse(websocket, error, request_id)
            return
        self.sessions_open += 1
        try:
            await session.run()
        finally:
            self.sessions_open -= 1

    async def _admit(self, websocket: WebSocket, request_id: str) -> RelaySession:
        principal = await self._principal(websocket)
        query = websocket.query_params
        role = _query(query.get("role"), "role", MAX_ROLE)
        if role is None:
            raise InvalidRequest("The 'role' query parameter is required.", param="role")
        language = _query(query.get("language"), "language", MAX_LANGUAGE) or "en"
        model = _query(query.get("model"), "model", MAX_MODEL)
        preset, instructions, spec = self.service.choose(principal, role, language)
        if model is not None and self.service.catalog.by_name.get(model) != spec:
            raise InvalidRequest(f"This role uses the model '{spec.id}'.", param="model")
        seconds = self.limiter.realtime_seconds(principal)
        buckets = self.limiter.realtime_buckets(principal, seconds, float(self.max_cost))
        call = await self.calls.open(
            principal,
            route=CONNECTION_ROUTE,
            spec=spec,
            request_id=request_id,
            buckets=buckets,
            reserved=Spent(cost_usd=float(self.max_cost)),
            stream=False,
        )
        peer: Peer
        try:
            if call.simulated:
                peer, upstream_model = SimulatedPeer(spec.id), spec.id
            else:
                peer, upstream_model = await connect_upstream(
                    call.lease,
                    spec,
                    open_timeout=self.settings.upstream_connect_timeout,
                    max_size=self.settings.realtime_max_message_bytes,
                )
        except GatewayError as error:
            call.fail(error)
            raise
        except BaseException:
            call.give_back()
            raise
        session = RelaySession(
            websocket=websocket,
            peer=peer,
            call=call,
            choice=Choice(preset, language, instructions, spec, upstream_model),
            limiter=self.limiter,
            usage=self.calls.usage,
            max_seconds=seconds,
            max_cost=self.max_cost,
        )
        try:
            await peer.send(session.preset_update())
            headers = [(name.encode(), value.encode()) for name, value in call.headers().items()]
            await websocket.accept(headers=[*headers, (b"x-request-id", request_id.encode())])
        except BaseException:
            await peer.close(1000, "")
            call.finish(Spent(), status="cancelled", http_status=499, detail={"ended": "handshake_failed"})
            raise
        return session

    async def _principal(self, websocket: WebSocket) -> Principal:
        scheme, _, token = websocket.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(
                "Missing bearer token: send 'Authorization: Bearer <key>'.", code=ErrorCode.MISSING_API_KEY
            )
        client = websocket.client.host if websocket.client else "unknown"
        principal = await self.auth.principal(token.strip(), client)
        self.service.catalog.tier(principal.tier)  # an unknown tier: 403, as on every route
        websocket.state.principal = principal
        return principal


def _query(value: str | None, name: str, longest: int) -> str | None:
    if value is None or value == "":
        return None
    if len(value) > longest:
        raise InvalidRequest(f"'{name}' is at most {longest} characters.", param=name)
    return value


async def _refuse(websocket: WebSocket, error: GatewayError, request_id: str) -> None:
    """The refusal as the handshake's HTTP answer; a server without that extension gets a close (403)."""
    try:
        await websocket.send_denial_response(error_response(error, request_id))
    except RuntimeError:
        await websocket.close(1008, error.message[:120])
