"""The simulated provider's Responses API: response objects and their streamed events, offline.

A response is one output message with the simulated reply text; streamed, it is the event
sequence the SDK parses (`response.created` ... `response.output_text.delta` ...
`response.completed`). Responses are kept in memory (this process only, the last
`KEPT` of them) so that retrieve, delete, cancel and input items answer as they would.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from typing import Any

import orjson

from app.errors import InvalidRequest, NotFound
from app.sse import Event
from app.tokens import chars_to_tokens

KEPT = 1_000
PIECES = 8  # deltas a streamed reply is cut into


def input_messages(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's `input` as chat-like messages (a string is one user message)."""
    raw = payload.get("input")
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    messages = []
    for item in raw if isinstance(raw, list) else []:
        if isinstance(item, dict) and item.get("role"):
            content = item.get("content")
            if isinstance(content, list):  # input_text parts
                content = " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
            messages.append({"role": item["role"], "content": content if isinstance(content, str) else ""})
    return messages


def input_tokens(payload: dict[str, Any]) -> int:
    """The simulated count of a request's input: its messages and instructions, four characters a token."""
    chars = sum(len(message["content"]) for message in input_messages(payload))
    return chars_to_tokens(chars + len(str(payload.get("instructions") or "")))


def response_object(payload: dict[str, Any], response_id: str, text: str, status: str) -> dict[str, Any]:
    message_id = "msg_sim_" + response_id.removeprefix("resp_sim_")
    done = status == "completed"
    prompt, output_tokens = input_tokens(payload), chars_to_tokens(len(text)) if done else 0
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": payload["model"],
        "instructions": payload.get("instructions"),
        "previous_response_id": payload.get("previous_response_id"),
        "max_output_tokens": payload.get("max_output_tokens"),
        "metadata": payload.get("metadata") or {},
        "temperature": payload.get("temperature"),
        "top_p": payload.get("top_p"),
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "error": None,
        "incomplete_details": None,
        "output": [_message(message_id, text, "completed")] if done else [],
        "usage": {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + output_tokens,
        }
        if done
        else None,
    }


def _message(message_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": []}] if text or status == "completed" else []
    return {"type": "message", "id": message_id, "status": status, "role": "assistant", "content": content}


def stream_events(payload: dict[str, Any], response_id: str, text: str) -> list[Event]:
    """The events of one streamed response, in order, each with its `sequence_number`."""
    item_id = "msg_sim_" + response_id.removeprefix("resp_sim_")
    started = response_object(payload, response_id, "", "in_progress")
    part = {"type": "output_text", "text": "", "annotations": []}
    step = max(1, -(-len(text) // PIECES))
    deltas = [text[i : i + step] for i in range(0, len(text), step)]
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    bodies: list[dict[str, Any]] = [
        {"type": "response.created", "response": started},
        {"type": "response.in_progress", "response": started},
        {"type": "response.output_item.added", "output_index": 0, "item": _message(item_id, "", "in_progress")},
        {"type": "response.content_part.added", **where, "part": part},
        *({"type": "response.output_text.delta", **where, "delta": delta, "logprobs": []} for delta in deltas),
        {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": {**part, "text": text}},
        {"type": "response.output_item.done", "output_index": 0, "item": _message(item_id, text, "completed")},
        {"type": "response.completed", "response": response_object(payload, response_id, text, "completed")},
    ]
    return [
        Event(body["type"], orjson.dumps({**body, "sequence_number": number})) for number, body in enumerate(bodies)
    ]


class SimulatedResponses:
    """The responses this process made, for retrieve, delete, cancel and input items."""

    def __init__(self) -> None:
        # id -> the response, its input items, its events
        self._kept: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]], list[Event]]] = OrderedDict()

    def new_id(self) -> str:
        return "resp_sim_" + secrets.token_hex(12)

    def keep(self, response: dict[str, Any], payload: dict[str, Any], text: str) -> None:
        items = [
            {"id": f"msg_in_{index}", "type": "message", "status": "completed", **message}
            for index, message in enumerate(input_messages(payload))
        ]
        self._kept[response["id"]] = (response, items, stream_events(payload, response["id"], text))
        while len(self._kept) > KEPT:
            self._kept.popitem(last=False)

    def events(self, response_id: str) -> list[Event]:
        return self._get(response_id)[2]

    def _get(self, response_id: str) -> tuple[dict[str, Any], list[dict[str, Any]], list[Event]]:
        kept = self._kept.get(response_id)
        if kept is None:
            raise NotFound(f"No response found with id '{response_id}'.", param="response_id")
        return kept

    def call(self, method: str, path: str) -> dict[str, Any]:
        """`GET /responses/{id}`, `DELETE` it, `POST .../cancel`, `GET .../input_items`."""
        parts = path.strip("/").split("/")  # responses, id[, cancel | input_items]
        response_id = parts[1] if len(parts) > 1 else ""
        response, items, _ = self._get(response_id)
        if method == "DELETE":
            del self._kept[response_id]
            return {"id": response_id, "object": "response", "deleted": True}
        if parts[2:] == ["cancel"]:
            raise InvalidRequest("Only responses created with background: true can be cancelled.", param="response_id")
        if parts[2:] == ["input_items"]:
            first, last = (items[0]["id"], items[-1]["id"]) if items else (None, None)
            return {"object": "list", "data": items, "first_id": first, "last_id": last, "has_more": False}
        return response
