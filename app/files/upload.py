"""An upload's body, received straight into storage: fields checked as they arrive, the file sniffed,
hashed, measured and written chunk by chunk.

The file's first bytes are held until they tell its type (app/files/sniff.py), so the stored
object is written with it; from then on each chunk goes on to storage. The file stops at the byte
that passes `limit`, or at the first byte that shows a type not accepted. Whatever fails, the
object being written is discarded: an upload that does not end in `Received` leaves nothing stored.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass

from starlette.requests import Request

from app.errors import ErrorCode, GatewayError, InvalidRequest
from app.files.blobs import BlobWriter, open_writer
from app.files.multipart import Field, FileChunk, FileStart, form_events
from app.files.schemas import EXPIRES_MAX_SECONDS, EXPIRES_MIN_SECONDS, PURPOSES
from app.files.sniff import Sniffer
from app.images.storage import ImageStorage
from app.validation import text_problem

log = logging.getLogger("app.files")

FIELDS = ("purpose", "expires_after[anchor]", "expires_after[seconds]")
USAGE = "a `file` and its `purpose`, optionally `expires_after[anchor]` and `expires_after[seconds]`"
FILENAME_MAX = 512  # the column's width
DEFAULT_FILENAME = "upload"


@dataclass(frozen=True, slots=True)
class Received:
    """An upload stored under its key: its fields, checked, and what its bytes are."""

    purpose: str
    expires_after: int | None
    filename: str
    size: int
    sha256: str
    content_type: str


def check_field(name: str, value: str) -> None:
    """A field's own value, checked as soon as it arrives (before the file, as the SDKs send it)."""
    if name == "purpose" and value not in PURPOSES:
        accepted = " or ".join(f"'{purpose}'" for purpose in PURPOSES)
        raise InvalidRequest(
            f"Invalid value for 'purpose': '{value}' is not kept by this gateway; use {accepted}.",
            param="purpose",
            code=ErrorCode.UNSUPPORTED_VALUE,
        )
    if name == "expires_after[anchor]" and value != "created_at":
        raise InvalidRequest(
            "Invalid value for 'expires_after[anchor]': the only anchor is 'created_at'.", param="expires_after.anchor"
        )
    if name == "expires_after[seconds]" and not (
        value.isascii() and value.isdigit() and EXPIRES_MIN_SECONDS <= int(value) <= EXPIRES_MAX_SECONDS
    ):
        raise InvalidRequest(
            f"Invalid value for 'expires_after[seconds]': a whole number from {EXPIRES_MIN_SECONDS}"
            f" to {EXPIRES_MAX_SECONDS}.",
            param="expires_after.seconds",
        )


def expires_after(fields: dict[str, str]) -> int | None:
    anchor, seconds = fields.get("expires_after[anchor]"), fields.get("expires_after[seconds]")
    if (anchor is None) != (seconds is None):
        raise InvalidRequest(
            "Send 'expires_after[anchor]' and 'expires_after[seconds]' together.", param="expires_after"
        )
    return int(seconds) if seconds is not None else None


def clean_filename(raw: str) -> str:
    """The name without any folder a client sent with it (`C:\\docs\\a.pdf` is `a.pdf`)."""
    name = raw.replace("\\", "/").rsplit("/", 1)[-1].strip() or DEFAULT_FILENAME
    problem = text_problem(name)
    if problem is not None:
        raise InvalidRequest(f"Invalid file name: it {problem}.", param="file")
    if len(name) > FILENAME_MAX:
        raise InvalidRequest(f"Invalid file name: longer than {FILENAME_MAX} characters.", param="file")
    return name


class _Incoming:
    """The file part: counted, hashed and sniffed; written once its type is known."""

    def __init__(self, filename: str, open_blob: Callable[[str], BlobWriter], limit: int, over: GatewayError) -> None:
        self.filename = filename
        self.sniffer = Sniffer(filename)
        self.digest = hashlib.sha256()
        self.size = 0
        self._open_blob, self._limit, self._over = open_blob, limit, over
        self._held = bytearray()
        self.writer: BlobWriter | None = None

    async def add(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self._limit:
            raise self._over
        self.digest.update(data)
        self.sniffer.feed(data)
        if self.writer is not None:
            await self.writer.write(data)
            return
        self._held += data
        if self.sniffer.decided:
            await self._start()

    async def _start(self) -> None:
        self.writer = self._open_blob(self.sniffer.content_type)
        held, self._held = bytes(self._held), bytearray()
        await self.writer.write(held)

    async def commit(self) -> str:
        content_type = self.sniffer.finish()
        if self.writer is None:
            await self._start()
        assert self.writer is not None
        await self.writer.commit()
        return content_type


def add_field(fields: dict[str, str], event: Field) -> None:
    if event.name == "file":
        raise InvalidRequest("Invalid value for 'file': it must be a file.", param="file")
    if event.name not in FIELDS:
        raise InvalidRequest(f"Unexpected field '{event.name}'; the fields: {USAGE}.", param=event.name)
    if event.name in fields:
        raise InvalidRequest(f"Invalid value for '{event.name}': sent more than once.", param=event.name)
    check_field(event.name, event.value)
    fields[event.name] = event.value


async def receive_upload(
    request: Request, storage: ImageStorage, key: str, *, limit: int, over_limit: GatewayError
) -> Received:
    """The upload's fields and its file, stored under `key`; `over_limit` is raised past `limit` bytes."""
    fields: dict[str, str] = {}
    incoming: _Incoming | None = None

    def open_blob(content_type: str) -> BlobWriter:
        return open_writer(storage, key, content_type)

    try:
        async with aclosing(form_events(request, USAGE)) as events:
            async for event in events:
                if isinstance(event, FileChunk) and incoming is not None:
                    await incoming.add(event.data)
                elif isinstance(event, Field):
                    add_field(fields, event)
                elif isinstance(event, FileStart):
                    if event.name != "file":
                        raise InvalidRequest(f"Unexpected file field '{event.name}': the file goes in `file`.")
                    if incoming is not None:
                        raise InvalidRequest("Invalid value for 'file': one file per upload.", param="file")
                    incoming = _Incoming(clean_filename(event.filename), open_blob, limit, over_limit)
        if incoming is None:
            raise InvalidRequest("Missing file 'file': the file to upload.", param="file")
        if "purpose" not in fields:
            raise InvalidRequest("Missing field 'purpose': what the file is for ('assistants').", param="purpose")
        expires = expires_after(fields)
        content_type = await incoming.commit()
    except BaseException:
        if incoming is not None and incoming.writer is not None:
            try:
                await incoming.writer.abort()
            except Exception:  # the upload's own failure is the one to answer
                log.warning("could not discard the partial upload at %s", key)
        raise
    return Received(
        purpose=fields["purpose"],
        expires_after=expires,
        filename=incoming.filename,
        size=incoming.size,
        sha256=incoming.digest.hexdigest(),
        content_type=content_type,
    )
