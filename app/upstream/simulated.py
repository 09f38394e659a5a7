"""A deterministic offline provider: the same answers for the same requests, no network.

It stands in for the upstream when no key is configured, for users switched off the
upstream, and as the fallback when the upstream fails. Everything it returns says so:
ids start with `sim-`, `system_fingerprint` is `simulated`, and the gateway adds the
`x-gateway-simulated` header.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from app.upstream.http import UpstreamReply

FINGERPRINT = "simulated"
REPLIES = (
    "That is a good question. Here is a simulated answer so you can build against the gateway offline.",
    "Simulated reply: the gateway is running without an upstream key, so this text is generated locally.",
    "Let's take it step by step. This is a deterministic simulated response for testing and demos.",
    "Here is a short simulated answer. Configure OPENAI_API_KEY to get real completions.",
)


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def estimate_tokens(text: str) -> int:
    """About four characters a token: what we can say without the model's tokenizer."""
    return chars_to_tokens(len(text))


def chars_to_tokens(chars: int) -> int:
    return max(1, (chars + 3) // 4) if chars else 0


def prompt_chars(messages: list[dict[str, Any]]) -> int:
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(str(part.get("text", ""))) for part in content if isinstance(part, dict))
    return total


def estimate_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    return chars_to_tokens(prompt_chars(messages))


def reply_text(messages: list[dict[str, Any]]) -> str:
    digest = hashlib.sha256(_last_user_text(messages).encode()).digest()
    return REPLIES[digest[0] % len(REPLIES)]


def _pieces(text: str) -> list[str]:
    words = text.split(" ")
    return [words[0], *(" " + word for word in words[1:])]


class SimulatedChat:
    """Chat completions, plain and streamed, in OpenAI's wire format."""

    simulated = True

    async def complete(self, payload: dict[str, Any]) -> UpstreamReply:
        messages = payload["messages"]
        text = reply_text(messages)
        prompt, completion = estimate_prompt_tokens(messages), estimate_tokens(text)
        body = {
            "id": "sim-" + hashlib.sha256(orjson.dumps(messages)).hexdigest()[:24],
            "object": "chat.completion",
            "created": int(time.time()),
            "model": payload["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
            "system_fingerprint": FINGERPRINT,
        }
        return UpstreamReply(orjson.dumps(body), None, 1)

    async def open_stream(self, payload: dict[str, Any]) -> SimulatedStream:
        return SimulatedStream(payload)


class SimulatedStream:
    """The same reply as `complete`, a word at a time."""

    request_id = None
    attempts = 1

    def __init__(self, payload: dict[str, Any]) -> None:
        self.payload = payload

    async def events(self) -> AsyncIterator[bytes]:
        messages = self.payload["messages"]
        text = reply_text(messages)
        include_usage = bool((self.payload.get("stream_options") or {}).get("include_usage"))
        base = {
            "id": "sim-" + hashlib.sha256(orjson.dumps(messages)).hexdigest()[:24],
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.payload["model"],
            "system_fingerprint": FINGERPRINT,
        }
        deltas: list[tuple[dict[str, Any], str | None]] = [({"role": "assistant", "content": ""}, None)]
        deltas += [({"content": piece}, None) for piece in _pieces(text)]
        deltas.append(({}, "stop"))
        for delta, finish in deltas:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            yield orjson.dumps({**base, "choices": [choice]})
        if include_usage:
            prompt, completion = estimate_prompt_tokens(messages), estimate_tokens(text)
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
            yield orjson.dumps({**base, "choices": [], "usage": usage})

    def close(self) -> None:
        return None
