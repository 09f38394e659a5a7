"""The chat body, read twice: validated by pydantic's parser, forwarded as orjson reads it.

The two parsers (and the standard library's) disagree at the edges: pydantic's takes NaN and
numbers beyond a double, which orjson refuses; both refuse a lone surrogate escape
(`"\\ud800"`), which the standard library takes. Whatever either refuses is the client's 400,
never a 500 on the way to the upstream, and it names the part at fault when the standard
library can read the body and find it. Only failures pay for that search.

The chat route stores nothing of the body, so text is not held to `app.validation.Text`: a NUL
in a message goes to the upstream as sent, like any other character.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from pydantic import ValidationError

from app.chat.schemas import ChatCompletionRequest
from app.errors import InvalidRequest, invalid_request
from app.validation import encoding_problem, json_problem

# As deep as pydantic's parser reads a body; past that the standard library's is not asked.
SEARCH_DEPTH = 256


def parse_chat_request(raw: bytes) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate_json(raw)
    except ValidationError as error:
        errors = error.errors()
        if errors and errors[0]["type"] == "json_invalid":
            located = _located(raw)
            if located is not None:
                raise located from None
        raise invalid_request(errors) from None


def chat_payload(raw: bytes) -> dict[str, Any]:
    """The body as it is forwarded (a validated request's bytes: a JSON object)."""
    try:
        payload: dict[str, Any] = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise _located(raw) or InvalidRequest(f"The request body cannot be sent on as JSON: {error}.") from None
    return payload


def _located(raw: bytes) -> InvalidRequest | None:
    """The first part of the body that one parser refuses, as a 400 naming it; None if not found."""
    try:
        found = json_problem(json.loads(raw), SEARCH_DEPTH, text=encoding_problem)
    except (ValueError, RecursionError):
        return None
    if found is None or not found[0]:
        return None
    path, problem = found
    return InvalidRequest(f"Invalid value for '{path}': {problem}.", param=path)
