"""Image generation and prompt moderation: the SDK for a real upstream, PNGs made offline otherwise.

The SDK is asked for the raw response: an image answer is megabytes of base64, and
parsing it into the SDK's models only to dump it again would copy it twice. We read
the bytes, decode them off the event loop, and map SDK errors to ours exactly as the
HTTP pass-through maps statuses (app/upstream/errors.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import orjson
from openai import AsyncOpenAI

from app.config import Settings
from app.errors import UpstreamError
from app.upstream.retry import RetryPolicy
from app.upstream.simulated import estimate_tokens

if TYPE_CHECKING:
    pass

log = logging.getLogger("app.upstream.images")

T = TypeVar("T")

SIMULATED_MODERATION_MODEL = "simulated-moderation"
# The offline moderation check: deterministic, so the refusal path can be built and
# tested without a key. It is a stand-in, not a content policy.
SIMULATED_FLAGGED_TERMS = ("forbidden", "gore", "nsfw")
DEFAULT_SIZE = (1024, 1024)


@dataclass(slots=True)
class GeneratedImage:
    data: bytes
    revised_prompt: str | None = None


@dataclass(slots=True)
class Generation:
    """One generation call's images and what the upstream said about them."""

    images: list[GeneratedImage]
    output_format: str
    size: str | None = None
    quality: str | None = None
    background: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    request_id: str | None = None
    simulated: bool = False


@dataclass(slots=True)
class Moderation:
    """Per input, whether it was flagged and under which categories."""

    flagged: list[list[str] | None]  # None: not flagged
    model: str
    request_id: str | None = None
    simulated: bool = False


class ImageBackend(Protocol):
    simulated: bool

    async def generate(self, params: dict[str, Any]) -> Generation: ...
    async def moderate(self, texts: list[str]) -> Moderation: ...


class OpenAIImages:
    """Images and moderation through the `openai` SDK, retried by the policy every upstream call shares."""

    simulated = False

    def __init__(self, sdk: AsyncOpenAI, settings: Settings) -> None:
        self.client = sdk
        self.settings = settings
        self.retry = RetryPolicy(settings)

    async def generate(self, params: dict[str, Any]) -> Generation:
        raw = await self.retry.run(lambda _: self.client.images.with_raw_response.generate(**params))
        return await asyncio.to_thread(parse_generation, raw.http_response.content, raw.request_id)

    async def moderate(self, texts: list[str]) -> Moderation:
        model = self.settings.image_moderation_model
        result = await self.retry.run(
            lambda _: self.client.moderations.with_raw_response.create(input=texts, model=model)
        )
        body = orjson.loads(result.http_response.content)
        flagged: list[list[str] | None] = []
        for item in body.get("results") or []:
            categories = [name for name, hit in (item.get("categories") or {}).items() if hit]
            flagged.append((categories or ["unspecified"]) if item.get("flagged") else None)
        if len(flagged) != len(texts):
            raise UpstreamError("The upstream moderation answer did not cover every input.")
        return Moderation(flagged, str(body.get("model") or model), result.request_id)


def parse_generation(body: bytes, request_id: str | None) -> Generation:
    """Decode an images answer (CPU work: run it in a thread)."""
    try:
        parsed = orjson.loads(body)
        images = [
            GeneratedImage(base64.b64decode(item["b64_json"], validate=True), item.get("revised_prompt"))
            for item in parsed["data"]
        ]
    except (orjson.JSONDecodeError, KeyError, TypeError, binascii.Error) as error:
        raise UpstreamError("The upstream's image answer could not be read (no base64 image data).") from error
    if not images:
        raise UpstreamError("The upstream answered without any image.")
    usage = parsed.get("usage") or {}
    return Generation(
        images=images,
        output_format=str(parsed.get("output_format") or "png"),
        size=parsed.get("size"),
        quality=parsed.get("quality"),
        background=parsed.get("background"),
        input_tokens=usage.get("input_tokens"),
        output_tokens=usage.get("output_tokens"),
        request_id=request_id,
    )


class SimulatedImages:
    """Real, valid PNGs made offline, the same for the same prompt; marked as simulated.

    Only PNG can be made without an image library, so a request for jpeg or webp gets a
    PNG and says so in `output_format` and the content type.
    """

    simulated = True

    async def generate(self, params: dict[str, Any]) -> Generation:
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
            simulated=True,
        )

    async def moderate(self, texts: list[str]) -> Moderation:
        flagged: list[list[str] | None] = []
        for text in texts:
            lowered = text.lower()
            hits = [term for term in SIMULATED_FLAGGED_TERMS if term in lowered]
            flagged.append(["simulated"] if hits else None)
        return Moderation(flagged, SIMULATED_MODERATION_MODEL, simulated=True)


def dimensions(size: object) -> tuple[int, int]:
    """`"1536x1024"` -> (1536, 1024); `auto` or anything unparsable -> 1024x1024."""
    if isinstance(size, str) and "x" in size:
        width, _, height = size.partition("x")
        if width.isdigit() and height.isdigit() and 0 < int(width) <= 4096 and 0 < int(height) <= 4096:
            return int(width), int(height)
    return DEFAULT_SIZE


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def simulated_png(prompt: str, width: int, height: int, index: int = 0) -> bytes:
    """A vertical two-colour gradient chosen by the prompt: an RGB PNG of the requested size."""
    digest = hashlib.sha256(f"{index}:{prompt}".encode()).digest()
    top, bottom = digest[0:3], digest[3:6]
    rows = []
    for y in range(height):
        t = y / max(height - 1, 1)
        pixel = bytes(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
        rows.append(b"\x00" + pixel * width)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    comment = f"simulated by openai-gateway; prompt sha256 {hashlib.sha256(prompt.encode()).hexdigest()}"
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"tEXt", b"Software\x00openai-gateway (simulated)"),
            _png_chunk(b"tEXt", b"Comment\x00" + comment.encode()),
            _png_chunk(b"IDAT", zlib.compress(b"".join(rows), 6)),
            _png_chunk(b"IEND", b""),
        )
    )
