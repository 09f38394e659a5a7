"""A deterministic offline provider: the same answers for the same requests, no network.

It stands in for the upstream when no key is configured, for users switched off the
upstream, and as the fallback when the upstream fails. Everything it returns says so:
chat ids start with `sim-` and carry `system_fingerprint: "simulated"`, secrets start
with `ek_sim_`, images are PNG gradients with a "simulated" comment, embeddings hash words,
their character 3-grams and word pairs; the call pipeline adds the `x-gateway-simulated`
header and marks the usage row.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import itertools
import math
import re
import secrets
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from app.realtime.sdp import simulated_answer
from app.sse import Event
from app.tokens import embedding_inputs, embedding_tokens, estimate_prompt_tokens, estimate_tokens
from app.upstream import simulated_images
from app.upstream.png import dimensions, simulated_png
from app.upstream.provider import (
    GeneratedImage,
    Generation,
    ImageUpload,
    Moderation,
    RealtimeCallAnswer,
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
# Simulated embeddings: feature hashing (see `embedding_vector`). Function words weigh little and
# make no n-grams, so two texts are alike by what they are about, not by their "the" and "of".
WORD = re.compile(r"\w+")
WORD_WEIGHT = 1.0
TRIGRAM_WEIGHT = 0.35  # a word of n letters has n 3-grams: together about as heavy as the word
BIGRAM_WEIGHT = 0.5
STOP_WORD_WEIGHT = 0.1
STEMS = (("ies", "y"), ("ing", ""), ("ed", ""), ("s", ""))
STOP_WORD_LIST = """
a an and are as at be been but by can could did do does for from had has have how i if in into is it
its me my no not of on or our so than that the their them then there these they this to was we were
what when where which who whom whose why will with would you your
"""
STOP_WORDS = frozenset(STOP_WORD_LIST.split())
REPLIES = (
    "That is a good question. Here is a simulated answer so you can build against the gateway offline.",
    "Simulated reply: the gateway is running without an upstream key, so this text is generated locally.",
    "Let's take it step by step. This is a deterministic simulated response for testing and demos.",
    "Here is a short simulated answer. Configure OPENAI_API_KEY to get real completions.",
)
# The best of the passages a file_search round puts in its prompt (app/threads/file_search.py), its file and text.
BEST_PASSAGE = re.compile(
    r"^【0†source】 \(file: (?P<file>[^)\n]*)\)\n(?P<text>.+?)(?=\n\n【\d+†source】 |\Z)", re.MULTILINE | re.DOTALL
)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
PASSAGE_ANSWER_CHARS = 400
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
    """One of REPLIES, chosen by the last user message; with file_search passages in the prompt, the best
    passage's first sentences, cited (so a file_search run works offline)."""
    for message in messages:
        content = message.get("content")
        found = BEST_PASSAGE.search(content) if message.get("role") == "system" and isinstance(content, str) else None
        if found is not None:
            sentences = SENTENCE_END.split(found["text"].strip())
            answer = " ".join(sentences[:2])[:PASSAGE_ANSWER_CHARS].rstrip()
            return f"From {found['file']}: {answer} 【0†source】"
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
    """A unit vector of `length` from the text (or token ids) of `item`, by signed feature hashing.

    Features: each lowercased word, its commonest English ending dropped (`lions` is `lion`,
    `sleeping` is `sleep`); each content word's character 3-grams (with its edges: `<li`, `lio`,
    `ion`, `on>`), so that a misspelt or otherwise inflected word still shares most of its own; and
    each pair of adjacent content words. A feature adds +-weight (its sign hashed too, so unrelated
    features cancel out on average) at one place chosen by blake2b, the same in every process.
    A feature counts once however often it occurs: a passage that names its subject three times is
    not nearer a question about it than one that names it once and answers it. Texts about the same
    things therefore get a high cosine similarity, which keeps similarity search meaningful offline.
    Token ids count as words, without 3-grams.
    """
    if isinstance(item, list):
        words = [str(token) for token in item]
        content = words
    else:
        words = [_stem(word) for word in WORD.findall(item.lower())]
        content = [word for word in words if word not in STOP_WORDS]
    # Dicts, not sets: the order features are added in is the text's, so the sums are the same in
    # every process whatever its hash seed.
    features: dict[str, float] = {}
    for word in dict.fromkeys(words):
        features["w" + word] = STOP_WORD_WEIGHT if word in STOP_WORDS else WORD_WEIGHT
    if isinstance(item, str):
        for word in dict.fromkeys(content):
            edged = f"<{word}>"
            for at in range(len(edged) - 2):
                features["c" + edged[at : at + 3]] = TRIGRAM_WEIGHT
    for first, second in itertools.pairwise(content):
        features[f"b{first} {second}"] = BIGRAM_WEIGHT
    vector = [0.0] * length
    for feature, weight in (features or {"w" + repr(item): 1.0}).items():
        place = _feature_place(feature, length)
        if place >= 0:
            vector[place] += weight
        else:
            vector[~place] -= weight
    norm = math.sqrt(math.fsum(value * value for value in vector)) or 1.0
    return [value / norm for value in vector]


def _stem(word: str) -> str:
    """A word without the commonest English endings (`lions`, `sleeping`, `trained`, `stories`), so that
    forms of one word make one feature; crude, but the same on both sides of a comparison."""
    for suffix, replacement in STEMS:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not word.endswith("ss"):
            return word[: -len(suffix)] + replacement
    return word


@functools.lru_cache(maxsize=1 << 18)
def _feature_place(feature: str, length: int) -> int:
    """Where a feature lands in a vector of `length`: the index, or its complement (`~index`) for a minus sign.
    Cached: a corpus repeats the same few ten thousand words and 3-grams."""
    digest = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
    place = (digest >> 1) % length
    return ~place if digest & 1 else place


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

    async def realtime_call(self, sdp: str, session: dict[str, Any]) -> RealtimeCallAnswer:
        """A valid SDP answer no media ever reaches (app/realtime/sdp.py); the call's sideband is simulated
        by the gateway (app/realtime/peers.py)."""
        return RealtimeCallAnswer(simulated_answer(sdp), "rtc_sim_" + secrets.token_hex(12))

    async def realtime_hangup(self, call_id: str) -> None:
        return None
