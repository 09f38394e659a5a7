"""Removing knowledge that has run out or lost its owner: expired stores and files, a deleted user's.

- A store whose `expires_at` passed (its `expires_after` days since it was last used) is deleted with
  its index (files' entries, chunks, batches: ON DELETE CASCADE); the files themselves stay.
- A file whose `expires_at` passed (`expires_after` at upload) is deleted, then its bytes; it leaves
  every store it was in.
- A user deleted by the operator: every store and file of theirs, bytes too.

Rows go in pages of `PAGE`, each its own short transaction (`SKIP LOCKED`: replicas running the job
at once share it); the bytes are deleted after their rows, so a crash between the two leaves bytes
no row names, which the storage sweep removes (app/images/retention.py), never a row without bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg

from app.errors import GatewayError
from app.images.storage import ImageStorage

log = logging.getLogger("app.vector_stores.retention")

PAGE = 500
EXPIRED_STORES = """
DELETE FROM vector_store WHERE id IN (
    SELECT id FROM vector_store WHERE expires_at < now() LIMIT $1 FOR UPDATE SKIP LOCKED
)
"""
EXPIRED_FILES = """
DELETE FROM file WHERE id IN (
    SELECT id FROM file WHERE expires_at < now() LIMIT $1 FOR UPDATE SKIP LOCKED
)
RETURNING storage_key
"""
USER_STORES = """
DELETE FROM vector_store WHERE id IN (
    SELECT id FROM vector_store WHERE user_id = $2 LIMIT $1 FOR UPDATE SKIP LOCKED
)
"""
USER_FILES = """
DELETE FROM file WHERE id IN (
    SELECT id FROM file WHERE user_id = $2 LIMIT $1 FOR UPDATE SKIP LOCKED
)
RETURNING storage_key
"""


@dataclass(frozen=True, slots=True)
class Removed:
    vector_stores: int = 0
    files: int = 0

    def __bool__(self) -> bool:
        return bool(self.vector_stores or self.files)

    def __str__(self) -> str:
        return f"deleted {self.vector_stores} vector stores and {self.files} files"


class KnowledgeRetention:
    def __init__(self, pool: asyncpg.Pool, storage: ImageStorage) -> None:
        self.pool = pool
        self.storage = storage

    async def prune(self) -> Removed:
        """Delete the stores and files past their `expires_at` (what the job logs when there were any)."""
        stores = await self._delete_stores(EXPIRED_STORES)
        files = await self._delete_files(EXPIRED_FILES)
        return Removed(stores, files)

    async def forget_user(self, user_id: str) -> Removed:
        """Delete every vector store and file of the user, and the files' bytes."""
        stores = await self._delete_stores(USER_STORES, user_id)
        files = await self._delete_files(USER_FILES, user_id)
        if stores or files:
            log.info("deleted the knowledge of a user", extra={"user_id": user_id})
        return Removed(stores, files)

    async def _delete_stores(self, statement: str, *args: object) -> int:
        deleted = 0
        while True:
            done = int(str(await self.pool.execute(statement, PAGE, *args)).split()[-1])
            deleted += done
            if done < PAGE:
                return deleted

    async def _delete_files(self, statement: str, *args: object) -> int:
        deleted = 0
        while True:
            keys = [row["storage_key"] for row in await self.pool.fetch(statement, PAGE, *args)]
            for key in keys:
                try:
                    await self.storage.delete(key)
                except GatewayError:
                    log.warning("deleted a file's row, but not its bytes at %s", key)
            deleted += len(keys)
            if len(keys) < PAGE:
                return deleted
