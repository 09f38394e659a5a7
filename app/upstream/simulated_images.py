"""The simulated provider's edits and streamed images: deterministic PNGs (app/upstream/png.py), no network.

An edit is drawn from its prompt and the digests of its uploaded files, so the same edit of
the same images gives the same PNG and another image gives another. A stream sends
`partial_images` partial PNGs (each its own gradient) and then the image itself, in the
upstream's event shapes (`image_generation.*`, or `image_edit.*` for edits).
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import orjson

from app.sse import Event
from app.tokens import estimate_tokens
from app.upstream.png import dimensions, simulated_png
from app.upstream.provider import GeneratedImage, Generation, ImageUpload


def edit_seed(prompt: str, uploads: list[ImageUpload]) -> str:
    """What an edit's PNG is drawn from: its prompt and the files it was given."""
    return prompt + "|" + ",".join(f"{upload.field}:{upload.sha256}" for upload in uploads)


def _facts(params: dict[str, Any], width: int, height: int) -> dict[str, Any]:
    return {
        "size": f"{width}x{height}",
        "quality": params.get("quality") or "auto",
        "background": params.get("background") or "opaque",
        "output_format": "png",  # only PNG can be drawn without an image library
    }


async def generation(params: dict[str, Any], seed: str) -> Generation:
    """`n` PNGs of the requested size, the same for the same seed."""
    width, height = dimensions(params.get("size"))
    count = int(params.get("n") or 1)
    pngs = await asyncio.to_thread(lambda: [simulated_png(seed, width, height, i) for i in range(count)])
    facts = _facts(params, width, height)
    return Generation(
        images=[GeneratedImage(png) for png in pngs],
        output_format=facts["output_format"],
        size=facts["size"],
        quality=facts["quality"],
        background=facts["background"],
        input_tokens=estimate_tokens(str(params["prompt"])),
        output_tokens=0,
    )


def _events(kind: str, params: dict[str, Any], seed: str) -> list[Event]:
    width, height = dimensions(params.get("size"))
    facts = _facts(params, width, height)
    created = int(time.time())
    events = []
    for index in range(int(params.get("partial_images") or 0)):
        partial = simulated_png(f"partial {index}|{seed}", width, height)
        data = {
            "type": f"{kind}.partial_image",
            "b64_json": base64.b64encode(partial).decode(),
            "created_at": created,
            "partial_image_index": index,
            **facts,
        }
        events.append(Event(data["type"], orjson.dumps(data)))
    tokens = estimate_tokens(str(params["prompt"]))
    usage = {
        "input_tokens": tokens,
        "input_tokens_details": {"image_tokens": 0, "text_tokens": tokens},
        "output_tokens": 0,
        "total_tokens": tokens,
    }
    final = {
        "type": f"{kind}.completed",
        "b64_json": base64.b64encode(simulated_png(seed, width, height)).decode(),
        "created_at": created,
        "usage": usage,
        **facts,
    }
    events.append(Event(final["type"], orjson.dumps(final)))
    return events


async def events(kind: str, params: dict[str, Any], seed: str) -> list[Event]:
    """A streamed image's events, made up front (off the event loop)."""
    return await asyncio.to_thread(_events, kind, params, seed)
