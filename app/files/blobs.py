"""Uploaded files' bytes in the image storage (a local folder or S3), written and read in pieces.

The storage's own interface takes and gives whole byte strings, which suits images; a file may
be hundreds of megabytes, so this module streams to and from the same two backends:

- local: the bytes go to a hidden temporary file beside the final one (`.<random>.part`, which
  the image orphan sweep skips), written in 1 MiB pieces off the event loop, renamed into place
  on `commit`; the content is served by Starlette's `FileResponse`, read in chunks.
- S3: at most one 8 MiB part is held; a file of one part is a `put_object`, a larger one a
  multipart upload, invisible until `commit` completes it and discarded by `abort`.

A writer is `commit`ted or `abort`ed, never left: an aborted one leaves nothing stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol
from urllib.parse import quote

from starlette.responses import FileResponse, Response, StreamingResponse

from app.files.errors import FileContentMissing
from app.images.storage import ImageStorage, LocalStorage, S3Storage, storage_unavailable

if TYPE_CHECKING:
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

LOCAL_PIECE = 1024 * 1024
S3_PART = 8 * 1024 * 1024  # S3 wants every part but the last to be at least 5 MiB
READ_CHUNK = 64 * 1024


class BlobWriter(Protocol):
    async def write(self, data: bytes) -> None: ...
    async def commit(self) -> None: ...
    async def abort(self) -> None: ...


def open_writer(storage: ImageStorage, key: str, content_type: str) -> BlobWriter:
    if isinstance(storage, LocalStorage):
        return LocalWriter(storage, key)
    if isinstance(storage, S3Storage):
        return S3Writer(storage, key, content_type)
    return BufferedWriter(storage, key, content_type)


def local_path(storage: LocalStorage, key: str) -> Path:
    path = (storage.root / key).resolve()
    if not path.is_relative_to(storage.root):
        raise ValueError(f"storage key escapes the storage folder: {key!r}")
    return path


class LocalWriter:
    def __init__(self, storage: LocalStorage, key: str) -> None:
        self.path = local_path(storage, key)
        self._pending = bytearray()
        self._file: IO[bytes] | None = None
        self._temporary: Path | None = None
        # A cancelled request leaves its thread writing: `abort` waits for it, and it writes no more.
        self._lock = threading.Lock()
        self._aborted = False

    async def write(self, data: bytes) -> None:
        self._pending += data
        if len(self._pending) >= LOCAL_PIECE:
            await self._flush()

    async def _flush(self) -> None:
        piece, self._pending = bytes(self._pending), bytearray()
        try:
            await asyncio.to_thread(self._write, piece)
        except OSError as error:
            raise storage_unavailable(error) from error

    def _write(self, piece: bytes) -> None:
        with self._lock:
            if self._aborted:
                return
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                handle, name = tempfile.mkstemp(dir=self.path.parent, prefix=".", suffix=".part")
                self._temporary = Path(name)
                self._file = os.fdopen(handle, "wb")
            self._file.write(piece)

    async def commit(self) -> None:
        await self._flush()
        try:
            await asyncio.to_thread(self._rename)
        except OSError as error:
            raise storage_unavailable(error) from error

    def _rename(self) -> None:
        with self._lock:
            assert self._file is not None and self._temporary is not None, "nothing was written"
            self._file.close()
            os.replace(self._temporary, self.path)
            self._file = self._temporary = None

    async def abort(self) -> None:
        await asyncio.to_thread(self._discard)

    def _discard(self) -> None:
        with self._lock:
            self._aborted = True
            if self._file is not None:
                self._file.close()
            if self._temporary is not None:
                with contextlib.suppress(OSError):
                    self._temporary.unlink()
            self._file = self._temporary = None


class S3Writer:
    def __init__(self, storage: S3Storage, key: str, content_type: str) -> None:
        self.client, self.bucket, self.key, self.content_type = storage.client, storage.bucket, key, content_type
        self._pending = bytearray()
        self._upload_id: str | None = None
        self._parts: list[CompletedPartTypeDef] = []

    async def write(self, data: bytes) -> None:
        self._pending += data
        while len(self._pending) >= S3_PART:
            part = bytes(self._pending[:S3_PART])
            del self._pending[:S3_PART]
            await self._upload_part(part)

    async def _upload_part(self, part: bytes) -> None:
        try:
            if self._upload_id is None:
                created = await self.client.create_multipart_upload(
                    Bucket=self.bucket, Key=self.key, ContentType=self.content_type
                )
                self._upload_id = created["UploadId"]
            number = len(self._parts) + 1
            uploaded = await self.client.upload_part(
                Bucket=self.bucket, Key=self.key, UploadId=self._upload_id, PartNumber=number, Body=part
            )
            self._parts.append({"ETag": uploaded["ETag"], "PartNumber": number})
        except Exception as error:
            raise storage_unavailable(error) from error

    async def commit(self) -> None:
        if self._upload_id is None:
            try:
                body, self._pending = bytes(self._pending), bytearray()
                await self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, ContentType=self.content_type)
            except Exception as error:
                raise storage_unavailable(error) from error
            return
        if self._pending:  # the last part may be short
            part, self._pending = bytes(self._pending), bytearray()
            await self._upload_part(part)
        try:
            await self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=self.key, UploadId=self._upload_id, MultipartUpload={"Parts": self._parts}
            )
        except Exception as error:
            raise storage_unavailable(error) from error

    async def abort(self) -> None:
        self._pending = bytearray()
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            try:
                await self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=upload_id)
            except Exception as error:
                raise storage_unavailable(error) from error


class BufferedWriter:
    """Any other storage (a test's): the whole file in memory, stored at `commit`."""

    def __init__(self, storage: ImageStorage, key: str, content_type: str) -> None:
        self.storage, self.key, self.content_type = storage, key, content_type
        self._pending = bytearray()

    async def write(self, data: bytes) -> None:
        self._pending += data

    async def commit(self) -> None:
        await self.storage.put(self.key, bytes(self._pending), self.content_type)

    async def abort(self) -> None:
        self._pending = bytearray()


def attachment(filename: str) -> str:
    """A Content-Disposition naming the file, safe for any name (RFC 6266 with RFC 5987 for non-ASCII)."""
    quoted = quote(filename, safe="")
    if quoted == filename and '"' not in filename:
        return f'attachment; filename="{filename}"'
    return f"attachment; filename*=utf-8''{quoted}"


async def content_response(storage: ImageStorage, key: str, content_type: str, filename: str) -> Response:
    """The stored bytes as a response streamed in chunks; 404 when they are no longer stored."""
    headers = {"content-disposition": attachment(filename)}
    if isinstance(storage, LocalStorage):
        path = local_path(storage, key)
        try:
            stat = await asyncio.to_thread(path.stat)
        except FileNotFoundError as error:
            raise FileContentMissing() from error
        except OSError as error:
            raise storage_unavailable(error) from error
        return FileResponse(path, media_type=content_type, headers=headers, stat_result=stat)
    if isinstance(storage, S3Storage):
        try:
            stored = await storage.client.get_object(Bucket=storage.bucket, Key=key)
        except storage.client.exceptions.NoSuchKey as error:
            raise FileContentMissing() from error
        except Exception as error:
            raise storage_unavailable(error) from error
        body = stored["Body"]

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while chunk := await body.read(READ_CHUNK):
                    yield chunk
            finally:
                body.close()

        headers["content-length"] = str(stored["ContentLength"])
        return StreamingResponse(chunks(), media_type=content_type, headers=headers)
    return Response(await storage.get(key), media_type=content_type, headers=headers)
