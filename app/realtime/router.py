"""`POST /v1/realtime/client_secrets`, and the `/v1/realtime` WebSocket relay (app/realtime/relay.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import JSONResponse

from app.deps import PrincipalDep, RealtimeServiceDep, app_runtime
from app.errors import error_responses, request_id_of
from app.realtime.schemas import ClientSecret, ClientSecretCreate

router = APIRouter(tags=["realtime"])


@router.post(
    "/realtime/client_secrets",
    response_model=ClientSecret,
    responses=error_responses(400, 401, 403, 429, 502, 504),
)
async def create_client_secret(
    body: ClientSecretCreate, principal: PrincipalDep, service: RealtimeServiceDep, request: Request
) -> JSONResponse:
    """Mint a short-lived realtime secret for the caller's role and language (OpenAI-compatible)."""
    secret, headers = await service.create_secret(principal, body, request_id_of(request))
    return JSONResponse(secret, headers=headers)


@router.websocket("/realtime")
async def realtime_relay(websocket: WebSocket) -> None:
    """Relay a realtime session (`client.realtime.connect()`) to the upstream with the caller's preset.

    Query: `model`, `role`, `language` (the SDK's `extra_query`). Refusals answer the handshake
    with an HTTP error in the API's shape; caps close the WebSocket with 1008 and the reason.
    """
    await app_runtime(websocket.app).relay.serve(websocket)
