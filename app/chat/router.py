"""Routes for chat completions."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from app.auth.dependencies import CurrentPrincipal
from app.chat.schemas import ChatCompletion, ChatCompletionRequest
from app.chat.service import ChatService
from app.errors import error_responses, request_id_of

router = APIRouter(tags=["chat"])


def get_chat_service(request: Request) -> ChatService:
    return request.app.state.chat


ChatServiceDep = Annotated[ChatService, Depends(get_chat_service)]


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={
        200: {
            "description": "The completion, or with `stream: true` a stream of `chat.completion.chunk` events.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **error_responses(400, 401, 413, 429, 502, 503, 504),
    },
)
async def create_chat_completion(
    body: ChatCompletionRequest,
    principal: CurrentPrincipal,
    service: ChatServiceDep,
    request: Request,
) -> Response:
    """Create a chat completion (OpenAI-compatible); `stream: true` answers server-sent events."""
    return await service.create(principal, body, request_id_of(request) or "")
