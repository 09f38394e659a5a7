"""`/v1/responses`, as the SDK's `client.responses` calls it; every response id is its creator's alone."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from starlette.responses import Response

from app.deps import PrincipalDep, ResponsesServiceDep
from app.errors import error_responses, request_id_of
from app.responses.schemas import RESPONSE_ID_MAX, InputTokensRequest, ResponseCreate
from app.validation import Text

router = APIRouter(tags=["responses"], responses=error_responses(401, 403))

ResponseId = Annotated[Text, Path(max_length=RESPONSE_ID_MAX, description="`resp_...`, one of yours.")]
RESPONSE = {
    "description": "OpenAI's Response object; with `stream: true`, its `response.*` events (text/event-stream).",
    "content": {
        "application/json": {"schema": {"type": "object"}},
        "text/event-stream": {"schema": {"type": "string"}},
    },
}
OBJECT = {
    "description": "The upstream's answer, as it sent it.",
    "content": {"application/json": {"schema": {"type": "object"}}},
}


@router.post(
    "/responses", response_class=Response, responses={200: RESPONSE, **error_responses(400, 404, 429, 502, 503, 504)}
)
async def create_response(
    body: ResponseCreate, request: Request, principal: PrincipalDep, service: ResponsesServiceDep
) -> Response:
    """Create a response (plain, or streamed as its events); reserved and recorded like a chat completion."""
    return await service.create(principal, body, request_id_of(request))


@router.post(
    "/responses/input_tokens", response_class=Response, responses={200: OBJECT, **error_responses(400, 404, 429, 502)}
)
async def count_input_tokens(
    body: InputTokensRequest, request: Request, principal: PrincipalDep, service: ResponsesServiceDep
) -> Response:
    """How many input tokens a create request with this input would use (the upstream counts them)."""
    return await service.input_tokens(principal, body, request_id_of(request))


@router.get(
    "/responses/{response_id}", response_class=Response, responses={200: OBJECT, **error_responses(400, 404, 429, 502)}
)
async def get_response(
    response_id: ResponseId,
    request: Request,
    principal: PrincipalDep,
    service: ResponsesServiceDep,
    stream: Annotated[bool, Query(description="Stream its events again (a background response's).")] = False,
    starting_after: Annotated[int, Query(ge=-1, le=10**9, description="With `stream`: events after this one.")] = -1,
) -> Response:
    """One of your responses; with `stream=true`, its events after `starting_after` (to resume a stream)."""
    if stream:
        return await service.resume(principal, response_id, starting_after, request_id_of(request))
    return await service.on_response(
        principal, response_id, request_id_of(request), route="responses.retrieve", method="GET"
    )


@router.delete(
    "/responses/{response_id}", response_class=Response, responses={200: OBJECT, **error_responses(400, 404, 429, 502)}
)
async def delete_response(
    response_id: ResponseId, request: Request, principal: PrincipalDep, service: ResponsesServiceDep
) -> Response:
    """Delete one of your responses (upstream, and the gateway's record of it)."""
    return await service.on_response(
        principal, response_id, request_id_of(request), route="responses.delete", method="DELETE"
    )


@router.post(
    "/responses/{response_id}/cancel",
    response_class=Response,
    responses={200: OBJECT, **error_responses(400, 404, 429, 502)},
)
async def cancel_response(
    response_id: ResponseId, request: Request, principal: PrincipalDep, service: ResponsesServiceDep
) -> Response:
    """Cancel one of your background responses."""
    return await service.on_response(
        principal, response_id, request_id_of(request), route="responses.cancel", method="POST", suffix="/cancel"
    )


@router.get(
    "/responses/{response_id}/input_items",
    response_class=Response,
    responses={200: OBJECT, **error_responses(400, 404, 429, 502)},
)
async def list_input_items(
    response_id: ResponseId,
    request: Request,
    principal: PrincipalDep,
    service: ResponsesServiceDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
    after: Annotated[Text | None, Query(max_length=RESPONSE_ID_MAX)] = None,
) -> Response:
    """The input items of one of your responses."""
    params = {"limit": str(limit), "order": order, **({"after": after} if after else {})}
    return await service.on_response(
        principal,
        response_id,
        request_id_of(request),
        route="responses.input_items",
        method="GET",
        suffix="/input_items",
        params=params,
    )
