"""Where image bytes live: a local folder by default, or any S3-compatible bucket.

Both keep keys as given (`2026/11/22/<uuid>.png`); neither blocks the event loop: the
local backend does its file work in a thread, the S3 backend is aiobotocore (aiohttp,
which the gateway already uses for the upstream).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from app.config import Settings
from app.errors import ErrorCode, NotFound, Unavailable

if TYPE_CHECKING:  # stubs only (types-aiobotocore-s3): aiobotocore itself is imported when S3 is configured
    from types_aiobotocore_s3 import S3Client

log = logging.getLogger("app.images.storage")

LIST_PAGE = 1000


class StoredImageMissing(NotFound):
    code = ErrorCode.IMAGE_CONTENT_MISSING


def storage_unavailable(error: BaseException) -> Unavailable:
    log.error("image storage failed: %r", error)
    return Unavailable(
        "Image storage is unavailable right now; try again shortly.",
        code=ErrorCode.STORAGE_UNAVAILABLE,
        headers={"retry-after": "5"},
    )


class ImageStorage(Protocol):
    async def put(self, key: str, data: bytes, content_type: str) -> None: ...
    async def get(self, key: str) -> bytes: ...
    async def delete(self, key: str) -> None: ...
    def keys_before(self, cutoff: datetime) -> AsyncIterator[list[str]]: ...
    async def close(self) -> None: ...


class LocalStorage:
    """Files under one folder, written atomically (a temporary file, then a rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"storage key escapes the storage folder: {key!r}")
        return path

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        try:
            await asyncio.to_thread(self._write, self._path(key), data)
        except OSError as error:
            raise storage_unavailable(error) from error

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".part")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    async def get(self, key: str) -> bytes:
        try:
            return await asyncio.to_thread(self._path(key).read_bytes)
        except FileNotFoundError as error:
            raise StoredImageMissing("The image's content is no longer stored.") from error
        except OSError as error:
            raise storage_unavailable(error) from error

    async def delete(self, key: str) -> None:
        try:
            await asyncio.to_thread(self._path(key).unlink, True)
        except OSError as error:
            raise storage_unavailable(error) from error

    async def keys_before(self, cutoff: datetime) -> AsyncIterator[list[str]]:
        """Keys of the files last written before `cutoff`, in pages."""
        paths = await asyncio.to_thread(self._files_before, cutoff.timestamp())
        for start in range(0, len(paths), LIST_PAGE):
            yield paths[start : start + LIST_PAGE]

    def _files_before(self, cutoff: float) -> list[str]:
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.rglob("*"):
            if path.is_file() and not path.name.startswith(".") and path.stat().st_mtime < cutoff:
                found.append(path.relative_to(self.root).as_posix())
        return found

    async def close(self) -> None:
        return None


class S3Storage:
    """Objects in one bucket of an S3-compatible server (AWS, MinIO, R2, moto)."""

    def __init__(self, client: S3Client, bucket: str, stack: contextlib.AsyncExitStack) -> None:
        self.client = client
        self.bucket = bucket
        self._stack = stack

    @classmethod
    async def connect(cls, settings: Settings) -> S3Storage:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        assert settings.image_s3_bucket is not None
        stack = contextlib.AsyncExitStack()
        client = await stack.enter_async_context(
            get_session().create_client(
                "s3",
                endpoint_url=settings.image_s3_endpoint_url,
                region_name=settings.image_s3_region,
                # None falls back to the standard chain (AWS_* variables, instance roles).
                aws_access_key_id=settings.image_s3_access_key_id,
                aws_secret_access_key=settings.image_s3_secret_access_key,
                config=AioConfig(
                    connect_timeout=settings.upstream_connect_timeout,
                    read_timeout=30,
                    retries={"max_attempts": 3, "mode": "standard"},
                    max_pool_connections=32,
                ),
            )
        )
        return cls(client, settings.image_s3_bucket, stack)

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        try:
            await self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        except Exception as error:
            raise storage_unavailable(error) from error

    async def get(self, key: str) -> bytes:
        try:
            response = await self.client.get_object(Bucket=self.bucket, Key=key)
            async with response["Body"] as body:
                return await body.read()
        except self.client.exceptions.NoSuchKey as error:
            raise StoredImageMissing("The image's content is no longer stored.") from error
        except Exception as error:
            raise storage_unavailable(error) from error

    async def delete(self, key: str) -> None:
        try:
            await self.client.delete_object(Bucket=self.bucket, Key=key)  # absent keys are not an error in S3
        except Exception as error:
            raise storage_unavailable(error) from error

    async def keys_before(self, cutoff: datetime) -> AsyncIterator[list[str]]:
        """Keys of the objects last written before `cutoff`, in pages."""
        paginator = self.client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, PaginationConfig={"PageSize": LIST_PAGE}):
            keys = [item["Key"] for item in page.get("Contents", []) if item["LastModified"] < cutoff]
            if keys:
                yield keys

    async def close(self) -> None:
        await self._stack.aclose()


async def open_storage(settings: Settings) -> ImageStorage:
    if settings.image_storage == "s3":
        return await S3Storage.connect(settings)
    return LocalStorage(settings.image_storage_dir)
