"""Image generation responses: OpenAI's `ImagesResponse` with our signed URLs, built from stored images.

What an idempotent request stores is what the response is rebuilt from: image ids and the
generation's facts, never signed URLs (they expire).
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from starlette.responses import Response

from app.images.generation import Produced
from app.images.schemas import ImageData, ImagesResponse, ImageUsage
from app.images.signing import Links
from app.images.storage import ImageStorage
from app.models import Image


def stored_result(produced: Produced) -> dict[str, Any]:
    """The facts of a generation a replay needs (JSON), besides its images."""
    generation, spent = produced.generation, produced.spent
    first = produced.images[0]
    usage = None
    reported = generation.input_tokens is not None and generation.output_tokens is not None
    if reported and "malformed" not in spent.flags:  # as counted and charged: clamped
        usage = ImageUsage(
            input_tokens=spent.prompt_tokens,
            output_tokens=spent.completion_tokens,
            total_tokens=spent.prompt_tokens + spent.completion_tokens,
        ).model_dump()
    return {
        "created": int(first.created_at.timestamp()),
        "image_ids": [str(image.id) for image in produced.images],
        "background": first.background,
        "output_format": first.output_format,
        "quality": first.quality,
        "size": first.size,
        "usage": usage,
        "simulated": produced.call.simulated,
    }


async def images_response(
    images: list[Image],
    result: dict[str, Any],
    response_format: str | None,
    links: Links,
    storage: ImageStorage,
    contents: list[bytes] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """The response for `images` (in the order generated); `b64_json` inline when asked for."""
    encoded: list[str | None] = [None] * len(images)
    if response_format == "b64_json":
        if contents is None:
            contents = list(await asyncio.gather(*(storage.get(image.storage_key) for image in images)))
        encoded = list(await asyncio.to_thread(lambda: [base64.b64encode(data).decode() for data in contents]))
    data = []
    for image, inline in zip(images, encoded, strict=True):
        url, expires = links.sign(image.id)
        data.append(
            ImageData(
                id=image.id, url=url, url_expires_at=expires, b64_json=inline, revised_prompt=image.revised_prompt
            )
        )
    body = ImagesResponse(
        created=result["created"],
        data=data,
        background=result.get("background"),
        output_format=result.get("output_format"),
        quality=result.get("quality"),
        size=result.get("size"),
        usage=result.get("usage"),
    )
    return Response(body.model_dump_json().encode(), media_type="application/json", headers=headers)
