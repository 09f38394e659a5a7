"""The caller's stored images: history pages, one image, deletion, and the signed content route."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response

from app.auth.principal import Principal
from app.errors import ImageNotFound, InvalidRequest
from app.images import repository
from app.images.options import CONTENT_TYPES, ImageOptions
from app.images.schemas import ImageDeleted, ImageList, ImagePublic
from app.images.signing import Links, UrlSigner
from app.images.storage import ImageStorage
from app.models import Image
from app.upstream.provider import Generation
from app.validation import utc_instant

log = logging.getLogger("app.images.history")


def public(image: Image, links: Links) -> ImagePublic:
    url, expires = links.sign(image.id)
    return ImagePublic(
        id=image.id,
        created_at=image.created_at,
        model=image.model,
        prompt=image.prompt,
        revised_prompt=image.revised_prompt,
        size=image.size,
        quality=image.quality,
        output_format=image.output_format,
        background=image.background,
        style=image.style,
        edited=image.edited,
        content_type=image.content_type,
        bytes=image.bytes,
        cost_usd=float(image.cost_usd),
        simulated=image.simulated,
        batch_id=image.batch_id,
        regenerated_from=image.regenerated_from,
        url=url,
        url_expires_at=expires,
    )


def encode_cursor(image: Image) -> str:
    return base64.urlsafe_b64encode(f"{image.created_at.isoformat()}|{image.id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, _, image_id = raw.partition("|")
        # Ours carry UTC: an instant at another offset (year 1 at +14:00) may not even exist in UTC.
        return utc_instant(created), uuid.UUID(image_id)
    except ValueError as error:
        raise InvalidRequest("Invalid value for 'after': not a cursor from this API.", param="after") from error


class ImageHistory:
    def __init__(self, storage: ImageStorage, signer: UrlSigner) -> None:
        self.storage = storage
        self.signer = signer

    async def save(
        self,
        principal: Principal,
        request_id: str,
        prompt: str,
        options: ImageOptions,
        generation: Generation,
        *,
        simulated: bool,
        cost: float,
        batch_id: uuid.UUID | None,
        regenerated_from: uuid.UUID | None,
        edited: bool = False,
    ) -> list[Image]:
        """Put every image's bytes in storage (all or none) and return its rows, for the caller to add."""
        now = datetime.now(UTC)
        extension = generation.output_format if generation.output_format in CONTENT_TYPES else "bin"
        content_type = CONTENT_TYPES.get(extension, "application/octet-stream")
        generation_id = uuid.uuid4()
        unit_cost = Decimal(str(round(cost / len(generation.images), 8)))
        rows = []
        for made in generation.images:
            image_id = uuid.uuid4()
            rows.append(
                Image(
                    id=image_id,
                    user_id=principal.user_id,
                    api_key_id=principal.api_key_id,
                    request_id=request_id,
                    generation_id=generation_id,
                    batch_id=batch_id,
                    regenerated_from=regenerated_from,
                    prompt=prompt,
                    revised_prompt=made.revised_prompt,
                    model=options.spec.id,
                    size=generation.size or options.size or "auto",
                    quality=generation.quality or options.quality or "auto",
                    output_format=extension,
                    background=generation.background or options.background,
                    style=options.style,
                    edited=edited,
                    content_type=content_type,
                    storage_key=f"{now:%Y/%m/%d}/{image_id}.{extension}",
                    bytes=len(made.data),
                    cost_usd=unit_cost,
                    simulated=simulated,
                    created_at=now,
                )
            )
        puts = [
            self.storage.put(row.storage_key, made.data, content_type)
            for row, made in zip(rows, generation.images, strict=True)
        ]
        outcomes = await asyncio.gather(*puts, return_exceptions=True)
        failure = next((outcome for outcome in outcomes if isinstance(outcome, BaseException)), None)
        if failure is not None:
            for row, outcome in zip(rows, outcomes, strict=True):
                if not isinstance(outcome, BaseException):
                    with contextlib.suppress(Exception):
                        await self.storage.delete(row.storage_key)
            raise failure
        return rows

    async def list(
        self,
        session: AsyncSession,
        principal: Principal,
        links: Links,
        limit: int,
        after: str | None,
        batch_id: uuid.UUID | None,
    ) -> ImageList:
        rows = await repository.list_images(
            session, principal.user_id, limit, decode_cursor(after) if after else None, batch_id
        )
        page, has_more = rows[:limit], len(rows) > limit
        return ImageList(
            data=[public(image, links) for image in page],
            has_more=has_more,
            next_cursor=encode_cursor(page[-1]) if has_more else None,
        )

    async def discard(self, images: Sequence[Image]) -> None:
        """Delete the stored bytes of images that will not be kept (their rows were never added)."""
        for image in images:
            try:
                await self.storage.delete(image.storage_key)
            except Exception as error:  # the orphan sweep finds it later
                log.warning("could not delete the bytes of discarded image %s: %s", image.id, error)

    async def delete(self, session: AsyncSession, image: Image) -> ImageDeleted:
        """The row goes first (flushed, not committed): if the bytes cannot be deleted, the row stays too."""
        await repository.delete_images(session, [image.id])
        await session.flush()
        await self.storage.delete(image.storage_key)
        return ImageDeleted(id=image.id)

    async def content(self, session: AsyncSession, image_id: uuid.UUID, expires: int, signature: str) -> Response:
        self.signer.verify(image_id, expires, signature)
        image = await repository.get_image(session, image_id)
        if image is None:
            raise ImageNotFound(image_id)
        data = await self.storage.get(image.storage_key)
        headers = {
            "cache-control": f"private, max-age={max(int(expires - time.time()), 0)}, immutable",
            "etag": f'"{image.id}"',
            "content-disposition": f'inline; filename="{image.id}.{image.output_format}"',
            "x-content-type-options": "nosniff",
        }
        if image.simulated:
            headers["x-gateway-simulated"] = "true"
        return Response(data, media_type=image.content_type, headers=headers)
