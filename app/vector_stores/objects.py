"""Rows as OpenAI's objects: a store with its file counts and status, a store's file, a batch, search results."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from app.files.schemas import FILE
from app.knowledge.search import SearchResult
from app.models import VectorStore, VectorStoreFile, VectorStoreFileBatch
from app.threads.ids import public_id
from app.vector_stores.repository import Totals
from app.vector_stores.schemas import (
    VS,
    VSFB,
    BatchObject,
    ChunkingStrategyObject,
    ContentText,
    FileLastError,
    SearchResultObject,
    StoreExpiresAfter,
    StoreStatus,
    VectorStoreFileObject,
    VectorStoreObject,
)


def _seconds(when: datetime | None) -> int | None:
    return int(when.timestamp()) if when is not None else None


def store_status(store: VectorStore, totals: Totals) -> StoreStatus:
    """`expired` once past `expires_at`; `in_progress` while any file is; else `completed`."""
    if store.expires_at is not None and store.expires_at <= datetime.now(UTC):
        return "expired"
    return "in_progress" if totals.counts.in_progress else "completed"


def store_object(store: VectorStore, totals: Totals) -> VectorStoreObject:
    return VectorStoreObject(
        id=public_id(VS, store.id),
        created_at=int(store.created_at.timestamp()),
        name=store.name or "",  # the SDK types it `str`: an unnamed store reads ""
        usage_bytes=totals.usage_bytes,
        file_counts=totals.counts,
        status=store_status(store, totals),
        expires_after=StoreExpiresAfter.model_validate(store.expires_after) if store.expires_after else None,
        expires_at=_seconds(store.expires_at),
        last_active_at=_seconds(store.last_active_at),
        metadata=dict(store.meta or {}),
    )


def file_object(row: VectorStoreFile) -> VectorStoreFileObject:
    return VectorStoreFileObject(
        id=public_id(FILE, row.file_id),
        created_at=int(row.created_at.timestamp()),
        usage_bytes=row.usage_bytes,
        vector_store_id=public_id(VS, row.vector_store_id),
        status=row.status,
        last_error=FileLastError.model_validate(row.last_error) if row.last_error else None,
        chunking_strategy=ChunkingStrategyObject.model_validate(row.chunking_strategy),
        attributes=dict(row.attributes or {}),
    )


def batch_object(batch: VectorStoreFileBatch, totals: Totals) -> BatchObject:
    """A cancelled batch stays `cancelled`; otherwise it is `in_progress` while any of its files is."""
    if batch.status == "cancelled":
        status: Any = "cancelled"
    else:
        status = "in_progress" if totals.counts.in_progress else "completed"
    return BatchObject(
        id=public_id(VSFB, batch.id),
        created_at=int(batch.created_at.timestamp()),
        vector_store_id=public_id(VS, batch.vector_store_id),
        status=status,
        file_counts=totals.counts,
    )


def result_object(result: SearchResult) -> SearchResultObject:
    return SearchResultObject(
        file_id=public_id(FILE, result.file_id),
        filename=result.filename,
        score=result.score,
        attributes=result.attributes,
        content=[ContentText(text=result.text)],
    )
