"""Realtime: client secrets, WebRTC calls (set up, attached, looked at, hung up), and the `/v1/realtime`
WebSocket relay (app/realtime/relay.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Query, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.deps import PrincipalDep, RealtimeCallsDep, RealtimeServiceDep, app_runtime
from app.errors import InvalidRequest, error_responses, invalid_request, request_id_of
from app.realtime.schemas import CallAttach, ClientSecret, ClientSecretCreate, RealtimeCallObject, SessionChoices
from app.realtime.sdp import MAX_SDP_BYTES
from app.realtime.store import StoredCall
from app.validation import Text

router = APIRouter(tags=["realtime"])

CallId = Annotated[str, Path(max_length=100, description="The call's id (`rtc_...`).")]
SDP_FORMS = {"application/sdp", "multipart/form-data"}
CALL_REQUEST: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/sdp": {"schema": {"type": "string", "description": "The browser's SDP offer."}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["sdp"],
                    "properties": {
                        "sdp": {"type": "string", "description": "The SDP offer (part type application/sdp)."},
                        "session": {
                            "type": "string",
                            "description": "JSON of the session choices, as for client secrets (application/json).",
                        },
                    },
                },
                "encoding": {"sdp": {"contentType": "application/sdp"}, "session": {"contentType": "application/json"}},
            },
        },
    }
}


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


@router.post(
    "/realtime/calls",
    status_code=201,
    response_class=Response,
    openapi_extra=CALL_REQUEST,
    responses={
        201: {
            "description": "The upstream's SDP answer; `Location` names the call.",
            "content": {"application/sdp": {"schema": {"type": "string"}}},
            "headers": {"Location": {"schema": {"type": "string"}, "description": "/v1/realtime/calls/{id}"}},
        },
        **error_responses(400, 401, 403, 429, 502, 504),
    },
)
async def create_call(
    request: Request,
    principal: PrincipalDep,
    calls: RealtimeCallsDep,
    role: Annotated[Text, Query(max_length=100, description="The preset's role.")],
    language: Annotated[Text, Query(max_length=35, description="The preset's language.")] = "en",
) -> Response:
    """Set up a WebRTC call (`client.realtime.calls.create(sdp=..., session=...)` with `role` and
    `language` in `extra_query`): the caller's preset, forwarded upstream; answered with its SDP."""
    sdp, session = await _call_request(request)
    answer, call, headers = await calls.create(
        principal, sdp=sdp, session=session, role=role, language=language, request_id=request_id_of(request)
    )
    headers["location"] = f"/v1/realtime/calls/{call.id}"
    return Response(answer, status_code=201, media_type="application/sdp", headers=headers)


@router.get("/realtime/calls/{call_id}", response_model=RealtimeCallObject, responses=error_responses(401, 404))
async def get_call(call_id: CallId, principal: PrincipalDep, calls: RealtimeCallsDep) -> dict[str, Any]:
    """One of the caller's calls: its status, length, responses and cost so far."""
    return call_object(await calls.get(principal, call_id))


@router.post(
    "/realtime/calls/{call_id}/hangup", response_model=RealtimeCallObject, responses=error_responses(401, 404, 502)
)
async def hang_up_call(call_id: CallId, principal: PrincipalDep, calls: RealtimeCallsDep) -> dict[str, Any]:
    """End one of the caller's calls (`client.realtime.calls.hangup(id)`); the call once it has ended."""
    return call_object(await calls.hangup(principal, call_id))


@router.post(
    "/realtime/calls/{call_id}/attach",
    status_code=201,
    response_model=RealtimeCallObject,
    responses=error_responses(400, 401, 403, 404, 429),
)
async def attach_call(
    call_id: Annotated[str, Path(max_length=100, description="The upstream's call id (`rtc_...`).")],
    body: CallAttach,
    principal: PrincipalDep,
    calls: RealtimeCallsDep,
    request: Request,
) -> dict[str, Any]:
    """Meter and cap a call the client set up directly with a secret minted here (which this spends)."""
    return call_object(await calls.attach(principal, call_id, body.client_secret, request_id_of(request)))


@router.websocket("/realtime")
async def realtime_relay(websocket: WebSocket) -> None:
    """Relay a realtime session (`client.realtime.connect()`) to the upstream with the caller's preset.

    Query: `model`, `role`, `language` (the SDK's `extra_query`). Refusals answer the handshake
    with an HTTP error in the API's shape; caps close the WebSocket with 1008 and the reason.
    """
    await app_runtime(websocket.app).relay.serve(websocket)


async def _call_request(request: Request) -> tuple[str, SessionChoices]:
    """The offer and the session choices, from a raw `application/sdp` body or the SDK's multipart."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind not in SDP_FORMS:
        raise InvalidRequest(
            "POST /v1/realtime/calls takes the SDP offer as application/sdp, or as multipart/form-data with `sdp`."
        )
    if kind == "application/sdp":
        return _decoded(await request.body()), SessionChoices()
    try:
        form = await request.form(max_files=0, max_fields=4, max_part_size=MAX_SDP_BYTES)
    except StarletteHTTPException as error:
        raise InvalidRequest(f"The multipart body could not be read: {error.detail}") from error
    sdp, session = form.get("sdp"), form.get("session")
    if not isinstance(sdp, str) or isinstance(session, UploadFile):
        raise InvalidRequest("Missing 'sdp': the offer, as a multipart field.", param="sdp")
    if session is None:
        return sdp, SessionChoices()
    try:
        return sdp, SessionChoices.model_validate(orjson.loads(session))
    except orjson.JSONDecodeError:
        raise InvalidRequest("'session' must be a JSON object.", param="session") from None
    except ValidationError as error:
        raise invalid_request([{**item, "loc": ("session", *item["loc"])} for item in error.errors()]) from None


def _decoded(body: bytes) -> str:
    if len(body) > MAX_SDP_BYTES:
        raise InvalidRequest(f"The SDP offer is over {MAX_SDP_BYTES} bytes.", param="sdp")
    try:
        return body.decode()
    except UnicodeDecodeError:
        raise InvalidRequest("The SDP offer is not UTF-8 text.", param="sdp") from None


def call_object(call: StoredCall) -> dict[str, Any]:
    end = call.ended_at or datetime.now(UTC)
    return {
        "id": call.id,
        "object": "realtime.call",
        "status": call.status,
        "source": call.source,
        "role": call.role,
        "language": call.language,
        "model": call.model,
        "created_at": int(call.created_at.timestamp()),
        "expires_at": int(call.deadline.timestamp()) if call.deadline else None,
        "ended_at": int(call.ended_at.timestamp()) if call.ended_at else None,
        "ended_reason": call.ended_reason,
        "seconds": round((end - call.created_at).total_seconds(), 3),
        "responses": call.responses,
        "cost_usd": str(call.cost_usd.normalize()),
        "max_cost_usd": str(call.max_cost_usd.normalize()),
    }
