"""Uploads and deletions: the caps of the caller's tier, the stored bytes and the row kept in step.

Caps (app/catalog.toml, per tier): `file_bytes_max` for one file (413 `payload_too_large`),
`storage_bytes_max` and `files_max` for what a user keeps (403: waiting does not help, deleting
does). A tier without `file_bytes_max` still has the gateway's own cap, OpenAI's 512 MB.

An upload is refused as early as it can be: by its Content-Length, and by the user's totals,
before a byte of the body is read; then at the byte that passes a cap. It takes no database
session while its body streams. Once stored, the totals are checked again and the row added under
the user's lock (app/files/repository.py), so two uploads racing past a cap cannot both land; an
upload refused there, or whose row cannot be written, has its stored object deleted.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.requests import Request

from app.auth.principal import Principal
from app.errors import GatewayError
from app.files import repository
from app.files.errors import FileNotFound, FileTooLarge, StorageQuotaExceeded
from app.files.schemas import FILE
from app.files.upload import Received, receive_upload
from app.images.storage import ImageStorage
from app.models import StoredFile
from app.registry import Catalog, TierSpec
from app.threads.ids import parse_id, public_id

log = logging.getLogger("app.files")

# The gateway's own cap on one file, whatever the tier (OpenAI's: 512 MB); app/main.py gives
# POST /v1/files this (and MULTIPART_SLACK) as its body limit instead of MAX_BODY_BYTES.
HARD_FILE_BYTES = 512 * 1024 * 1024
# What a multipart body carries besides the file (boundaries, part headers, the small fields):
# a Content-Length past a cap by more than this is refused before its body is read.
MULTIPART_SLACK = 16 * 1024


@dataclass(frozen=True, slots=True)
class Caps:
    file_bytes: int
    storage_bytes: int | None
    files: int | None

    @classmethod
    def of(cls, tier: TierSpec) -> Caps:
        file_bytes = HARD_FILE_BYTES if tier.file_bytes_max is None else min(tier.file_bytes_max, HARD_FILE_BYTES)
        return cls(file_bytes, tier.storage_bytes_max, tier.files_max)

    def check_room(self, files: int, used: int, incoming: int) -> None:
        """Refuse a file of `incoming` bytes that the user's `files` and `used` bytes leave no room for."""
        if self.files is not None and files >= self.files:
            raise StorageQuotaExceeded(f"Your tier keeps at most {self.files} files, and you have {files}.")
        if self.storage_bytes is not None and used + incoming > self.storage_bytes:
            raise StorageQuotaExceeded(
                f"Your tier keeps at most {self.storage_bytes} bytes of files; you keep {used},"
                f" and this file has {incoming} more."
                if incoming
                else f"Your tier keeps at most {self.storage_bytes} bytes of files, and you keep {used}."
            )

    def stream_limit(self, used: int) -> tuple[int, GatewayError]:
        """The bytes a file may have given what the user keeps, and the refusal past them."""
        if self.storage_bytes is not None and self.storage_bytes - used < self.file_bytes:
            room = max(self.storage_bytes - used, 0)
            return room, StorageQuotaExceeded(
                f"Your tier keeps at most {self.storage_bytes} bytes of files; you keep {used},"
                f" which leaves {room} for this file."
            )
        return self.file_bytes, FileTooLarge(self.file_bytes)


def declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length", "")
    return int(value) if value.isascii() and value.isdigit() else None


def storage_key(file_id: uuid.UUID) -> str:
    return f"files/{datetime.now(UTC):%Y/%m/%d}/{file_id.hex}"


def file_uuid(file_id: str) -> uuid.UUID:
    """The row id of one of our file ids; anything else is a file that does not exist."""
    parsed = parse_id(FILE, file_id)
    if parsed is None:
        raise FileNotFound(file_id)
    return parsed


@dataclass(frozen=True, slots=True)
class FileService:
    sessionmaker: async_sessionmaker[AsyncSession]
    storage: ImageStorage
    catalog: Catalog

    async def upload(self, principal: Principal, request: Request) -> StoredFile:
        """Store the request's file for the caller, within their tier's caps."""
        caps = Caps.of(self.catalog.tier(principal.tier))
        declared = declared_length(request)
        incoming = max(declared - MULTIPART_SLACK, 0) if declared is not None else 0
        if incoming > caps.file_bytes:
            raise FileTooLarge(caps.file_bytes)
        async with self.sessionmaker() as session:
            files, used = await repository.totals(session, principal.user_id)
        caps.check_room(files, used, incoming)
        limit, over_limit = caps.stream_limit(used)

        file_id = uuid.uuid4()
        key = storage_key(file_id)
        received = await receive_upload(request, self.storage, key, limit=limit, over_limit=over_limit)
        try:
            return await self._add(principal.user_id, caps, file_id, key, received)
        except BaseException:
            await self._discard(file_id, key)
            raise

    async def _add(self, user_id: str, caps: Caps, file_id: uuid.UUID, key: str, received: Received) -> StoredFile:
        async with self.sessionmaker() as session, session.begin():
            await repository.lock_owner(session, user_id)
            files, used = await repository.totals(session, user_id)
            caps.check_room(files, used, received.size)
            return await repository.add_file(
                session,
                file_id=file_id,
                user_id=user_id,
                purpose=received.purpose,
                filename=received.filename,
                size=received.size,
                content_type=received.content_type,
                storage_key=key,
                sha256=received.sha256,
                expires_after=received.expires_after,
            )

    async def _discard(self, file_id: uuid.UUID, key: str) -> None:
        """Delete the bytes of an upload that was not kept, unless its row was written after all (a commit
        whose answer was lost); when that cannot be told, keep them: bytes without a row are only space."""
        try:
            async with self.sessionmaker() as session:
                kept = await session.get(StoredFile, file_id) is not None
            if not kept:
                await self.storage.delete(key)
        except Exception:
            log.warning("could not tell whether upload %s was kept; its bytes stay at %s", file_id, key)

    async def delete(self, principal: Principal, file_id: str) -> str:
        """Delete the caller's file, then its bytes (a failure there leaves bytes no row names, logged);
        the file's id."""
        row_id = file_uuid(file_id)
        async with self.sessionmaker() as session, session.begin():
            key = await repository.delete_file(session, row_id, principal.user_id)
        if key is None:
            raise FileNotFound(file_id)
        try:
            await self.storage.delete(key)
        except GatewayError:
            log.warning("deleted file %s, but not its bytes at %s", file_id, key)
        return public_id(FILE, row_id)
