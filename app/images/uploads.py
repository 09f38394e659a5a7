"""`POST /v1/images/edits` bodies: multipart fields, the images and the mask, checked before any call.

Nothing of an upload is held whole in memory: the body is capped by the edge
(IMAGE_EDIT_MAX_BYTES, 413 past it), Starlette's parser spools each file to disk past 1 MiB,
and each file is then copied in chunks, off the event loop, to a temporary file of ours
(hashed and measured on the way), from which the upstream request reads it again in chunks.
Every temporary file is removed when the request is over (`EditForm.close`).

Each bad body is a 400 naming its field, before any limit is taken or any upstream is called:
not multipart, an unknown or repeated field, no image, too many images, a file too large,
a file that is not a PNG, JPEG or WebP image, a mask that is not a PNG with an alpha
channel, or a mask whose size differs from the first image's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from app.errors import ErrorCode, InvalidRequest, invalid_request
from app.images.schemas import ImageEditRequest
from app.upstream.provider import ImageUpload

CHUNK = 64 * 1024
HEAD = 64 * 1024  # what is kept of each file to tell its format (and a PNG's size and alpha)
MASK_MAX_BYTES = 4 * 1024 * 1024  # OpenAI's limit for a mask
MAX_FIELD_BYTES = 256 * 1024  # a text field: the longest prompt (32,000 characters) with room
FILE_FIELDS = ("image", "image[]", "mask")
PNG = b"\x89PNG\r\n\x1a\n"
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@dataclass(slots=True)
class EditForm:
    """An edit's fields and its files on disk; `close()` removes the files."""

    fields: ImageEditRequest
    uploads: list[ImageUpload] = field(default_factory=list)
    # Every temporary file made for it, registered before a thread writes it: a request cancelled
    # while the copy runs still removes the file the thread goes on to finish.
    temporary: list[Path] = field(default_factory=list)

    @property
    def images(self) -> list[ImageUpload]:
        return [upload for upload in self.uploads if upload.field == "image"]

    def fingerprint(self) -> dict[str, Any]:
        """The request as idempotency compares it: its fields and its files' digests."""
        return {
            **self.fields.model_dump(exclude_unset=True, mode="json"),
            "files": [f"{upload.field}:{upload.sha256}" for upload in self.uploads],
        }

    def new_file(self) -> tuple[int, Path]:
        handle, name = tempfile.mkstemp(prefix="gateway-upload-")
        self.temporary.append(Path(name))
        return handle, Path(name)

    async def close(self) -> None:
        paths = [*self.temporary, *(upload.path for upload in self.uploads if upload.path not in self.temporary)]
        self.uploads, self.temporary = [], []
        await asyncio.to_thread(_remove, paths)


def _remove(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


def image_format(head: bytes) -> str | None:
    if head.startswith(PNG):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def png_facts(head: bytes) -> tuple[int, int, bool] | None:
    """(width, height, has alpha) of a PNG from its first bytes: an alpha colour type, or a `tRNS`
    chunk before the pixel data. None when the header cannot be read."""
    if not head.startswith(PNG) or head[12:16] != b"IHDR" or len(head) < 33:
        return None
    width, height, _, colour = struct.unpack(">IIBB", head[16:26])
    alpha = colour in (4, 6)
    offset = 33
    while not alpha and offset + 8 <= len(head):
        length, kind = struct.unpack(">I4s", head[offset : offset + 8])
        if kind in (b"IDAT", b"IEND"):
            break
        alpha = kind == b"tRNS"
        offset += 12 + length
    return width, height, alpha


@dataclass(slots=True)
class _Spooled:
    path: Path
    size: int
    sha256: str
    head: bytes


def _spool(source: IO[bytes], limit: int, handle: int, path: Path) -> _Spooled | None:
    """Copy an upload to a temporary file of ours (`handle`, open at `path`) in chunks; None (and nothing
    left) past `limit` bytes."""
    source.seek(0)
    digest = hashlib.sha256()
    head = b""
    size = 0
    try:
        with os.fdopen(handle, "wb") as target:
            while chunk := source.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise OverflowError
                if len(head) < HEAD:
                    head += chunk[: HEAD - len(head)]
                digest.update(chunk)
                target.write(chunk)
    except OverflowError:
        _remove([path])
        return None
    except BaseException:
        _remove([path])
        raise
    return _Spooled(path, size, digest.hexdigest(), head)


def _too_large(param: str, limit: int) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid file for '{param}': larger than {limit} bytes.", param=param, code=ErrorCode.IMAGE_TOO_LARGE
    )


def _invalid(param: str, reason: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid file for '{param}': {reason}.", param=param, code=ErrorCode.INVALID_IMAGE)


async def read_edit_form(request: Request, *, max_images: int, max_image_bytes: int) -> EditForm:
    """The edit's fields and files, checked; the caller closes it (its files are on disk)."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise InvalidRequest(
            "POST /v1/images/edits takes multipart/form-data: the fields, `image` (or `image[]`) files "
            "and an optional `mask` file."
        )
    try:
        form = await request.form(max_files=max_images + 2, max_fields=50, max_part_size=MAX_FIELD_BYTES)
    except StarletteHTTPException as error:
        raise InvalidRequest(f"The multipart body could not be read: {error.detail}") from error
    try:
        fields: dict[str, str] = {}
        images: list[UploadFile] = []
        masks: list[UploadFile] = []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name not in FILE_FIELDS:
                    raise InvalidRequest(f"Unexpected file field '{name}': files go in `image` and `mask`.", param=name)
                (masks if name == "mask" else images).append(value)
            elif name in FILE_FIELDS:
                raise InvalidRequest(f"Invalid value for '{name}': it must be a file.", param=name)
            elif name in fields:
                raise InvalidRequest(f"Invalid value for '{name}': sent more than once.", param=name)
            else:
                fields[name] = value
        try:
            body = ImageEditRequest.model_validate(fields)
        except ValidationError as error:
            raise invalid_request(error.errors()) from error
        if not images:
            reason = "a mask applies to an image" if masks else "at least one image is required"
            raise InvalidRequest(f"Missing file 'image': {reason}.", param="image")
        if len(images) > max_images:
            raise InvalidRequest(
                f"Invalid value for 'image': {len(images)} images; at most {max_images} per edit.",
                param="image",
                code=ErrorCode.UNSUPPORTED_VALUE,
            )
        if len(masks) > 1:
            raise InvalidRequest("Invalid value for 'mask': one mask per edit.", param="mask")
        edit = EditForm(body)
        try:
            await _add_files(edit, images, masks, max_image_bytes)
        except BaseException:
            await edit.close()
            raise
        return edit
    finally:
        await form.close()


async def _add_files(edit: EditForm, images: list[UploadFile], masks: list[UploadFile], max_bytes: int) -> None:
    first: tuple[int, int, bool] | None = None
    for index, upload in enumerate(images):
        spooled = await asyncio.to_thread(_spool, upload.file, max_bytes, *edit.new_file())
        if spooled is None:
            raise _too_large("image", max_bytes)
        kind = image_format(spooled.head)
        edit.uploads.append(_upload("image", f"image-{index}", kind, spooled))
        if kind is None:
            raise _invalid("image", f"file {index} is not a PNG, JPEG or WebP image")
        if index == 0 and kind == "png":
            first = png_facts(spooled.head)
    for upload in masks:
        limit = min(MASK_MAX_BYTES, max_bytes)
        spooled = await asyncio.to_thread(_spool, upload.file, limit, *edit.new_file())
        if spooled is None:
            raise _too_large("mask", limit)
        facts = png_facts(spooled.head)
        edit.uploads.append(_upload("mask", "mask", "png" if facts else None, spooled))
        if facts is None:
            raise _invalid("mask", "it must be a PNG image")
        if not facts[2]:
            raise _invalid("mask", "it has no alpha channel (its transparent areas say where to edit)")
        if first is not None and facts[:2] != first[:2]:
            raise _invalid(
                "mask", f"it is {facts[0]}x{facts[1]}, the first image {first[0]}x{first[1]}; they must match"
            )


def _upload(field_name: str, stem: str, kind: str | None, spooled: _Spooled) -> ImageUpload:
    """Our own file name and type (never the client's) for the upstream request."""
    extension = kind or "bin"
    return ImageUpload(
        field=field_name,
        path=spooled.path,
        filename=f"{stem}.{extension}",
        content_type=CONTENT_TYPES.get(extension, "application/octet-stream"),
        size=spooled.size,
        sha256=spooled.sha256,
    )
