"""A deterministic offline provider: the same answers for the same requests, no network.

It stands in for the upstream when no key is configured, for users switched off the
upstream, and as the fallback when the upstream fails. Everything it returns says so:
chat ids start with `sim-` and carry `system_fingerprint: "simulated"`, secrets start
with `ek_sim_`, images are PNG gradients with a "simulated" comment, embeddings are hashed
bags of words; the call pipeline
adds the `x-gateway-simulated` header and marks the usage row.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import re
import secrets
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from app.sse import Event
from app.tokens import embedding_inputs, embedding_tokens, estimate_prompt_tokens, estimate_tokens
from app.upstream import simulated_images
from app.upstream.png import dimensions, simulated_png
from app.upstream.provider import (
    GeneratedImage,
    Generation,
    ImageUpload,
    Moderation,
    RealtimeSecret,
    UpstreamReply,
)
from app.upstream.simulated_responses import (
    SimulatedResponses,
    input_messages,
    input_tokens,
    response_object,
)

FINGERPRINT = "simulated"
# Simulated embeddings: the words of a text, each adding +-1 at this many hashed places.
WORD = re.compile(r"\w+")
HASHES_PER_WORD = 4
REPLIES = (
    "That is a good question. Here is a simulated answer so you can build against the gateway offline.",
    "Simulated reply: the gateway is running without an upstream key, so this text is generated locally.",
    "Let's take it step by step. This is a deterministic simulated response for testing and demos.",
    "Here is a short simulated answer. Configure OPENAI_API_KEY to get real completions.",
)
MODERATION_MODEL = "simulated-moderation"
# The offline moderation check: deterministic, so the refusal path can be built and tested
# without a key. It is a stand-in, not a content policy.
FLAGGED_TERMS = ("forbidden", "gore", "nsfw")


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def reply_text(messages: list[dict[str, Any]]) -> str:
    digest = hashlib.sha256(_last_user_text(messages).encode()).digest()
    return REPLIES[digest[0] % len(REPLIES)]


def _usage(messages: list[dict[str, Any]], text: str) -> dict[str, int]:
    prompt, completion = estimate_prompt_tokens(messages), estimate_tokens(text)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_id(messages: list[dict[str, Any]]) -> str:
    return "sim-" + hashlib.sha256(orjson.dumps(messages)).hexdigest()[:24]


class SimulatedStream:
    """The same reply as `chat`, a word at a time, in Chat Completions' chunks."""

    request_id: str | None = None
    upstream: str | None = None
    attempts = 1

    def __init__(self, payload: dict[str, Any]) -> None:
        self.payload = payload

    async def events(self) -> AsyncIterator[Event]:
        messages = self.payload["messages"]
        text = reply_text(messages)
        base = {
            "id": _completion_id(messages),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.payload["model"],
            "system_fingerprint": FINGERPRINT,
        }
        words = text.split(" ")
        deltas: list[tuple[dict[str, Any], str | None]] = [({"role": "assistant", "content": ""}, None)]
        deltas += [({"content": piece}, None) for piece in [words[0], *(" " + word for word in words[1:])]]
        deltas.append(({}, "stop"))
        for delta, finish in deltas:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            yield Event(None, orjson.dumps({**base, "choices": [choice]}))
        if (self.payload.get("stream_options") or {}).get("include_usage"):
            yield Event(None, orjson.dumps({**base, "choices": [], "usage": _usage(messages, text)}))

    def close(self) -> None:
        return None


def embedding_vector(item: str | list[int], length: int) -> list[float]:
    """A unit vector from the words of `item` (or its tokens), feature-hashed: texts that share words
    get vectors with a higher cosine similarity, so similarity search behaves sensibly offline."""
    words = [str(token) for token in item] if isinstance(item, list) else WORD.findall(item.lower())
    vector = [0.0] * length
    for word in words or [repr(item)]:
        digest = hashlib.blake2b(word.encode(), digest_size=HASHES_PER_WORD * 4).digest()
        for at in range(0, len(digest), 4):
            slot = int.from_bytes(digest[at : at + 3], "little") % length
            vector[slot] += 1.0 if digest[at + 3] & 1 else -1.0
    norm = math.sqrt(sum(value * value for value in vector)) or 1.0
    return [value / norm for value in vector]


def _embeddings(items: list[str | list[int]], length: int, as_base64: bool) -> dict[str, Any]:
    data = []
    for index, item in enumerate(items):
        vector = embedding_vector(item, length)
        encoded: Any = base64.b64encode(struct.pack(f"<{length}f", *vector)).decode() if as_base64 else vector
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = sum(embedding_tokens(item) for item in items)
    return {"object": "list", "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


class SimulatedEvents:
    """Events made up front, handed out as a stream."""

    request_id = None
    upstream = None
    attempts = 1

    def __init__(self, events: list[Event]) -> None:
        self._events = events

    async def events(self) -> AsyncIterator[Event]:
        for event in self._events:
            yield event

    def close(self) -> None:
        return None


class SimulatedProvider:
    simulated = True

    def __init__(self) -> None:
        self.kept_responses = SimulatedResponses()

    def on(self, upstream: str | None) -> SimulatedProvider:
        return self

    async def chat(self, payload: dict[str, Any]) -> UpstreamReply:
        messages = payload["messages"]
        text = reply_text(messages)
        body = {
            "id": _completion_id(messages),
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
            "usage": _usage(messages, text),
            "system_fingerprint": FINGERPRINT,
        }
        return UpstreamReply(orjson.dumps(body), None)

    async def chat_stream(self, payload: dict[str, Any]) -> SimulatedStream:
        return SimulatedStream(payload)

    async def embeddings(self, payload: dict[str, Any], length: int) -> UpstreamReply:
        items = embedding_inputs(payload["input"])
        body = await asyncio.to_thread(_embeddings, items, length, payload.get("encoding_format") == "base64")
        return UpstreamReply(orjson.dumps({**body, "model": payload["model"]}), None)

    async def responses(self, payload: dict[str, Any]) -> UpstreamReply:
        response_id = self.kept_responses.new_id()
        text = reply_text(input_messages(payload))
        self.kept_responses.keep(response_object(payload, response_id, text, "completed"), payload, text)
        response = self.kept_responses.call("GET", f"/responses/{response_id}")
        return UpstreamReply(orjson.dumps(response), None)

    async def responses_stream(self, payload: dict[str, Any]) -> SimulatedEvents:
        response_id = self.kept_responses.new_id()
        text = reply_text(input_messages(payload))
        self.kept_responses.keep(response_object(payload, response_id, text, "completed"), payload, text)
        return SimulatedEvents(self.kept_responses.events(response_id))

    async def responses_resume(self, response_id: str, starting_after: int) -> SimulatedEvents:
        return SimulatedEvents(self.kept_responses.events(response_id)[starting_after + 1 :])

    async def responses_call(
        self, method: str, path: str, params: dict[str, str] | None = None, payload: dict[str, Any] | None = None
    ) -> UpstreamReply:
        if path == "/responses/input_tokens":
            counted = {"object": "response.input_tokens", "input_tokens": input_tokens(payload or {})}
            return UpstreamReply(orjson.dumps(counted), None)
        return UpstreamReply(orjson.dumps(self.kept_responses.call(method, path)), None)

    async def images(self, params: dict[str, Any]) -> Generation:
        """Real PNGs, the same for the same prompt. Only PNG can be drawn without an image
        library, so a request for jpeg or webp gets a PNG and says so in `output_format`."""
        prompt = str(params["prompt"])
        width, height = dimensions(params.get("size"))
        count = int(params.get("n") or 1)
        pngs = await asyncio.to_thread(lambda: [simulated_png(prompt, width, height, i) for i in range(count)])
        return Generation(
            images=[GeneratedImage(png) for png in pngs],
            output_format="png",
            size=f"{width}x{height}",
            quality=params.get("quality") or "auto",
            background=params.get("background") or "opaque",
            input_tokens=estimate_tokens(prompt),
            output_tokens=0,
        )

    async def images_stream(self, params: dict[str, Any]) -> SimulatedEvents:
        return SimulatedEvents(await simulated_images.events("image_generation", params, str(params["prompt"])))

    async def image_edit(self, params: dict[str, Any], uploads: list[ImageUpload]) -> Generation:
        return await simulated_images.generation(params, simulated_images.edit_seed(str(params["prompt"]), uploads))

    async def image_edit_stream(self, params: dict[str, Any], uploads: list[ImageUpload]) -> SimulatedEvents:
        seed = simulated_images.edit_seed(str(params["prompt"]), uploads)
        return SimulatedEvents(await simulated_images.events("image_edit", params, seed))

    async def moderate(self, texts: list[str], model: str) -> Moderation:
        flagged: list[list[str] | None] = []
        for text in texts:
            lowered = text.lower()
            flagged.append(["simulated"] if any(term in lowered for term in FLAGGED_TERMS) else None)
        return Moderation(flagged, MODERATION_MODEL)

    async def realtime_secret(self, body: dict[str, Any]) -> RealtimeSecret:
        """A secret of the right shape that no realtime server accepts: `ek_sim_...`."""
        session = {**body["session"], "id": "sess_sim_" + secrets.token_hex(8), "object": "realtime.session"}
        expires_at = int(time.time()) + int(body["expires_after"]["seconds"])
        return RealtimeSecret(
            {"value": "ek_sim_" + secrets.token_hex(16), "expires_at": expires_at, "session": session}
        )
