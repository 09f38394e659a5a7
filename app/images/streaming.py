"""Streamed image generations and edits (`stream: true`): the upstream's events relayed as they come.

`image_generation.partial_image` (or `image_edit.partial_image`) events pass through untouched;
the `...completed` event's image is stored like any generation's before the event is sent
on, with our `id`, signed `url` and `url_expires_at` added to it. The call leaves one usage
row however the stream ends: the completed event's usage when the image came, else its
reservation (the upstream took the request and may bill it), as `error` when the upstream
failed or `cancelled` when the client left. Heartbeats (`: keep-alive`) keep a slow upstream's
connection open; a stream past STREAM_MAX_SECONDS or cut by a restart ends with an `error`
event, which the SDKs raise.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from sqlalchemy.exc import SQLAlchemyError
from starlette.responses import Response

from app.auth.principal import Principal
from app.calls import Call, Spent
from app.config import Settings
from app.db import DB_ERRORS, Database
from app.errors import ErrorCode, GatewayError, UpstreamError
from app.images.generation import ImageGenerator, image_spend
from app.images.history import ImageHistory
from app.images.options import ImageOptions
from app.images.signing import Links
from app.sse import HEARTBEAT, ByteStream, Stopping, encode, event_type, paced
from app.upstream.provider import EventStream, GeneratedImage, Generation, ImageUpload
from app.usage.record import Status

log = logging.getLogger("app.images")

COMPLETED = ("image_generation.completed", "image_edit.completed")


def _overtime() -> UpstreamError:
    return UpstreamError("The stream exceeded its maximum duration.", code=ErrorCode.STREAM_TIMEOUT)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def completed_generation(data: dict[str, Any], request_id: str | None) -> Generation:
    """The image of a `...completed` event and what it reports (CPU work: run it in a thread)."""
    try:
        image = base64.b64decode(data["b64_json"], validate=True)
    except (KeyError, TypeError, binascii.Error) as error:
        raise UpstreamError("The upstream's completed image could not be read.", billed=True) from error
    reported = data.get("usage")
    usage: dict[str, Any] = reported if isinstance(reported, dict) else {}
    return Generation(
        images=[GeneratedImage(image, _text(data.get("revised_prompt")))],
        output_format=_text(data.get("output_format")) or "png",
        size=_text(data.get("size")),
        quality=_text(data.get("quality")),
        background=_text(data.get("background")),
        input_tokens=usage.get("input_tokens"),
        output_tokens=usage.get("output_tokens"),
        request_id=request_id,
    )


class ImageStreamer:
    def __init__(
        self,
        settings: Settings,
        database: Database,
        generator: ImageGenerator,
        history: ImageHistory,
        stopping: Stopping | None,
    ) -> None:
        self.settings = settings
        self.database = database
        self.generator = generator
        self.history = history
        self.stopping = stopping

    async def stream(
        self,
        principal: Principal,
        request_id: str,
        prompt: str,
        options: ImageOptions,
        links: Links,
        uploads: list[ImageUpload] | None = None,
    ) -> Response:
        """Reserve, open the upstream's stream, and answer with the relay of its events."""
        call, stream = await self.generator.open_stream(principal, request_id, prompt, options, uploads)

        async def gone() -> None:  # the client left before the relay began: the upstream may bill it
            call.finish(call.reserved, status="cancelled", http_status=499, stream=True)

        relay = self._relay(call, stream, principal, request_id, prompt, options, links, edited=bool(uploads))
        return ByteStream(relay, headers=call.headers(stream.request_id), on_close=gone, slot=call.take_slot())

    async def _relay(
        self,
        call: Call,
        stream: EventStream,
        principal: Principal,
        request_id: str,
        prompt: str,
        options: ImageOptions,
        links: Links,
        *,
        edited: bool,
    ) -> AsyncIterator[bytes]:
        spent: Spent | None = None
        outcome: Status = "cancelled"
        error: GatewayError | None = None
        first_at: float | None = None
        try:
            async for event in paced(
                stream.events(),
                heartbeat=self.settings.stream_heartbeat_seconds,
                deadline=time.monotonic() + self.settings.stream_max_seconds,
                overtime=_overtime,
                stopping=self.stopping,
            ):
                if event is None:
                    yield HEARTBEAT
                    continue
                first_at = first_at or time.perf_counter()
                name = event_type(event) or "message"
                if name not in COMPLETED:
                    yield encode(name, event.data)
                    continue
                data = await asyncio.to_thread(orjson.loads, event.data)
                generation = await asyncio.to_thread(completed_generation, data, stream.request_id)
                spent = image_spend(options, generation)
                stored = await self._store(call, principal, request_id, prompt, options, generation, spent, edited)
                if stored is not None:
                    url, expires = links.sign(stored)
                    data = {**data, "id": str(stored), "url": url, "url_expires_at": expires}
                yield encode(name, await asyncio.to_thread(orjson.dumps, data))
            outcome = call.answered_status
        except GatewayError as failure:
            error, outcome = failure, "error"
            yield encode("error", {"type": "error", "error": failure.body()["error"]})
        finally:
            call.finish(
                spent or call.reserved,
                status=outcome,
                http_status=error.status_code if error else 200 if spent is not None else 499,
                stream=True,
                ttft_ms=(first_at - call.started) * 1000 if first_at else None,
                upstream_request_id=stream.request_id,
                error_code=error.code if error else None,
            )

    async def _store(
        self,
        call: Call,
        principal: Principal,
        request_id: str,
        prompt: str,
        options: ImageOptions,
        generation: Generation,
        spent: Spent,
        edited: bool,
    ) -> uuid.UUID | None:
        """The image's bytes and row; its id, or None when it could not be kept (the client still gets
        its bytes in the event, and the orphan sweep takes stored bytes without a row)."""
        images = await self.history.save(
            principal,
            request_id,
            prompt,
            options,
            generation,
            simulated=call.simulated,
            cost=0.0 if call.simulated else spent.cost_usd,
            batch_id=None,
            regenerated_from=None,
            edited=edited,
        )
        try:
            async with self.database.sessionmaker.begin() as session:
                session.add_all(images)
        except (SQLAlchemyError, *DB_ERRORS) as failure:
            log.error("could not store the streamed image of request %s: %r", request_id, failure)
            return None
        return images[0].id
