"""Every query the vector store routes make. Functions flush, never commit: the caller's session decides.

A store is its owner's: every read names the user, and another user's store is the same as none.
Lists page by (created_at, id), the order the tables' indexes keep; an `after`/`before` that is not
in the list gives an empty page. The indexer's own statements (claiming files under a lease) are in
app/vector_stores/work.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeVar

import asyncpg
from sqlalchemy import Select, delete, func, select, text, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.files.repository import live
from app.models import StoredFile, VectorStore, VectorStoreFile, VectorStoreFileBatch
from app.vector_stores.schemas import FileCounts

Order = Literal["asc", "desc"]
Row = TypeVar("Row")
Cursor = Select[datetime, uuid.UUID]  # a list item's (created_at, id): where a page starts
# NOTIFY on this channel (payload empty) wakes every process's indexer: new work is committed.
WORK_CHANNEL = "gateway_vector_store_work"

# A store used again within a minute is not written again: searches of a busy store would queue on its row.
TOUCH = text(
    "UPDATE vector_store SET last_active_at = now(),"
    " expires_at = CASE WHEN expires_after IS NULL THEN NULL"
    " ELSE now() + make_interval(days => (expires_after->>'days')::int) END"
    " WHERE id = ANY(:ids) AND last_active_at < now() - interval '1 minute'"
)


USE_STORES = """
WITH owned AS (
    SELECT id, expires_at IS NOT NULL AND expires_at <= now() AS expired
    FROM vector_store WHERE id = ANY($1::uuid[]) AND (user_id = $2 OR id = ANY($3::uuid[]))
), touched AS (
    UPDATE vector_store s SET last_active_at = now(),
        expires_at = CASE WHEN s.expires_after IS NULL THEN NULL
                          ELSE now() + make_interval(days => (s.expires_after->>'days')::int) END
    FROM owned
    WHERE s.id = owned.id AND NOT owned.expired AND s.last_active_at < now() - interval '1 minute'
)
SELECT id, expired FROM owned
"""


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file to attach: its strategy (resolved), and its attributes (None: keep those it has, else none)."""

    file_id: uuid.UUID
    chunking_strategy: dict[str, Any]
    attributes: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Totals:
    counts: FileCounts
    usage_bytes: int


async def get_store(session: AsyncSession, store_id: uuid.UUID, user_id: str | None) -> VectorStore | None:
    """The user's store (any user's with `user_id` None: the operator's); another user's is the same as none."""
    query = select(VectorStore).where(VectorStore.id == store_id)
    if user_id is not None:
        query = query.where(VectorStore.user_id == user_id)
    return await session.scalar(query)


async def add_store(session: AsyncSession, store: VectorStore) -> VectorStore:
    session.add(store)
    await session.flush()
    await session.refresh(store)  # created_at, last_active_at: the database's clock
    return store


async def page(
    session: AsyncSession,
    query: Select[Row],
    columns: tuple[Any, Any],
    cursors: tuple[Cursor | None, Cursor | None],
    *,
    limit: int,
    order: Order,
) -> tuple[list[Row], bool]:
    """One page of `query` by `columns` (created_at, id) in `order`, after and/or before the keys the
    `cursors` queries find (an id not in the list gives an empty page), and whether more follow."""
    key = tuple_(*columns)
    forward = order == "asc"
    keys = []
    for cursor in cursors:
        found = (await session.execute(cursor)).first() if cursor is not None else None
        if cursor is not None and found is None:
            return [], False
        keys.append(tuple_(*found) if found is not None else None)
    after, before = keys
    if after is not None:
        query = query.where(key > after if forward else key < after)
    if before is not None:
        query = query.where(key < before if forward else key > before)
    backwards = before is not None and after is None  # read backwards from `before`, then turned around
    ascending = forward != backwards
    ordering = [column.asc() if ascending else column.desc() for column in columns]
    rows = list(await session.scalars(query.order_by(*ordering).limit(limit + 1)))
    has_more = len(rows) > limit
    rows = rows[:limit]
    if backwards:
        rows.reverse()
    return rows, has_more


def store_cursor(store_id: uuid.UUID | None, user_id: str) -> Cursor | None:
    if store_id is None:
        return None
    return select(VectorStore.created_at, VectorStore.id).where(
        VectorStore.id == store_id, VectorStore.user_id == user_id
    )


def file_cursor(store_id: uuid.UUID, file_id: uuid.UUID | None) -> Cursor | None:
    if file_id is None:
        return None
    return select(VectorStoreFile.created_at, VectorStoreFile.file_id).where(
        VectorStoreFile.vector_store_id == store_id, VectorStoreFile.file_id == file_id
    )


async def page_stores(
    session: AsyncSession,
    user_id: str,
    *,
    limit: int,
    order: Order,
    after: uuid.UUID | None,
    before: uuid.UUID | None,
) -> tuple[list[VectorStore], bool]:
    query = select(VectorStore).where(VectorStore.user_id == user_id)
    cursors = (store_cursor(after, user_id), store_cursor(before, user_id))
    return await page(session, query, (VectorStore.created_at, VectorStore.id), cursors, limit=limit, order=order)


async def page_files(
    session: AsyncSession,
    store_id: uuid.UUID,
    *,
    batch_id: uuid.UUID | None = None,
    status: str | None,
    limit: int,
    order: Order,
    after: uuid.UUID | None,
    before: uuid.UUID | None,
) -> tuple[list[VectorStoreFile], bool]:
    query = select(VectorStoreFile).where(VectorStoreFile.vector_store_id == store_id)
    if batch_id is not None:
        query = query.where(VectorStoreFile.batch_id == batch_id)
    if status is not None:
        query = query.where(VectorStoreFile.status == status)
    columns = (VectorStoreFile.created_at, VectorStoreFile.file_id)
    cursors = (file_cursor(store_id, after), file_cursor(store_id, before))
    return await page(session, query, columns, cursors, limit=limit, order=order)


def _totals(rows: Sequence[Any]) -> Totals:
    counts = FileCounts()
    usage = 0
    for status, count, used in rows:
        setattr(counts, status, getattr(counts, status) + int(count))
        counts.total += int(count)
        usage += int(used or 0)
    return Totals(counts, usage)


async def store_totals(session: AsyncSession, store_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Totals]:
    """Each store's files by status and the bytes their text takes, in one query."""
    rows = await session.execute(
        select(
            VectorStoreFile.vector_store_id,
            VectorStoreFile.status,
            func.count(),
            func.sum(VectorStoreFile.usage_bytes),
        )
        .where(VectorStoreFile.vector_store_id.in_(store_ids))
        .group_by(VectorStoreFile.vector_store_id, VectorStoreFile.status)
    )
    grouped: dict[uuid.UUID, list[Any]] = {store_id: [] for store_id in store_ids}
    for store_id, status, count, used in rows:
        grouped[store_id].append((status, count, used))
    return {store_id: _totals(found) for store_id, found in grouped.items()}


async def batch_totals(session: AsyncSession, batch_id: uuid.UUID) -> Totals:
    rows = await session.execute(
        select(VectorStoreFile.status, func.count(), func.sum(VectorStoreFile.usage_bytes))
        .where(VectorStoreFile.batch_id == batch_id)
        .group_by(VectorStoreFile.status)
    )
    return _totals(list(rows))


async def touch(session: AsyncSession, store_ids: Sequence[uuid.UUID]) -> None:
    """The stores were used: `last_active_at` is now (to the minute), and `expires_at` as `expires_after`
    counts from it."""
    if store_ids:
        await session.execute(TOUCH, {"ids": list(store_ids)})


async def delete_store(session: AsyncSession, store_id: uuid.UUID, user_id: str) -> bool:
    """Delete the store with its files' entries, chunks and batches (ON DELETE CASCADE); the files stay."""
    deleted = await session.scalar(
        delete(VectorStore).where(VectorStore.id == store_id, VectorStore.user_id == user_id).returning(VectorStore.id)
    )
    return deleted is not None


async def owned_files(session: AsyncSession, user_id: str, file_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """Which of `file_ids` are the user's live files."""
    if not file_ids:
        return set()
    found = await session.scalars(
        select(StoredFile.id).where(StoredFile.id.in_(list(file_ids)), StoredFile.user_id == user_id, live())
    )
    return set(found)


async def attach(
    session: AsyncSession,
    store_id: uuid.UUID,
    user_id: str,
    attachments: Sequence[Attachment],
    *,
    batch_id: uuid.UUID | None = None,
    again: bool = True,
) -> None:
    """Add files to the store, `in_progress`. A file already in it stays as it is (`again` False), or
    takes the new attributes and batch, and is indexed again if it had failed or was cancelled."""
    ids = [attachment.file_id for attachment in attachments]
    existing = {
        row.file_id: row
        for row in await session.scalars(
            select(VectorStoreFile)
            .where(VectorStoreFile.vector_store_id == store_id, VectorStoreFile.file_id.in_(ids))
            .with_for_update()
        )
    }
    new = [
        {
            "vector_store_id": store_id,
            "file_id": attachment.file_id,
            "user_id": user_id,
            "batch_id": batch_id,
            "status": "in_progress",
            "chunking_strategy": attachment.chunking_strategy,
            "attributes": attachment.attributes or {},
        }
        for attachment in attachments
        if attachment.file_id not in existing
    ]
    if new:
        await session.execute(insert(VectorStoreFile).values(new).on_conflict_do_nothing())
    if not again:
        return
    for attachment in attachments:
        row = existing.get(attachment.file_id)
        if row is None:
            continue
        if attachment.attributes is not None:
            row.attributes = attachment.attributes
        if batch_id is not None:
            row.batch_id = batch_id
        if row.status in ("failed", "cancelled"):
            row.status, row.last_error = "in_progress", None
            row.chunking_strategy = attachment.chunking_strategy
            row.lease_owner = row.lease_until = None
    await session.flush()


async def get_file(session: AsyncSession, store_id: uuid.UUID, file_id: uuid.UUID) -> VectorStoreFile | None:
    return await session.scalar(
        select(VectorStoreFile).where(VectorStoreFile.vector_store_id == store_id, VectorStoreFile.file_id == file_id)
    )


async def detach(session: AsyncSession, store_id: uuid.UUID, file_id: uuid.UUID) -> bool:
    """Remove the file from the store, its chunks with it (the file itself stays)."""
    deleted = await session.scalar(
        delete(VectorStoreFile)
        .where(VectorStoreFile.vector_store_id == store_id, VectorStoreFile.file_id == file_id)
        .returning(VectorStoreFile.file_id)
    )
    return deleted is not None


async def chunk_texts(session: AsyncSession, store_id: uuid.UUID, file_id: uuid.UUID) -> list[str]:
    rows = await session.scalars(
        text(
            "SELECT text FROM knowledge_chunk WHERE vector_store_id = :store AND file_id = :file ORDER BY ordinal"
        ).bindparams(store=store_id, file=file_id)
    )
    return list(rows)


async def add_batch(session: AsyncSession, store_id: uuid.UUID, user_id: str) -> VectorStoreFileBatch:
    batch = VectorStoreFileBatch(vector_store_id=store_id, user_id=user_id, status="in_progress")
    session.add(batch)
    await session.flush()
    await session.refresh(batch)
    return batch


async def get_batch(session: AsyncSession, store_id: uuid.UUID, batch_id: uuid.UUID) -> VectorStoreFileBatch | None:
    return await session.scalar(
        select(VectorStoreFileBatch).where(
            VectorStoreFileBatch.id == batch_id, VectorStoreFileBatch.vector_store_id == store_id
        )
    )


async def cancel_batch(session: AsyncSession, batch_id: uuid.UUID) -> None:
    """The batch's files still in progress are cancelled (an indexer working on one lets it go: its
    lease is gone), and so is the batch, unless none was left in progress."""
    cancelled = await session.execute(
        update(VectorStoreFile)
        .where(VectorStoreFile.batch_id == batch_id, VectorStoreFile.status == "in_progress")
        .values(status="cancelled", lease_owner=None, lease_until=None)
        .returning(VectorStoreFile.file_id)
    )
    if cancelled.first() is not None:
        await session.execute(
            update(VectorStoreFileBatch).where(VectorStoreFileBatch.id == batch_id).values(status="cancelled")
        )


async def pending_count(session: AsyncSession, store_ids: Sequence[uuid.UUID]) -> int:
    if not store_ids:
        return 0
    count = await session.scalar(
        select(func.count()).where(
            VectorStoreFile.vector_store_id.in_(list(store_ids)), VectorStoreFile.status == "in_progress"
        )
    )
    return int(count or 0)


async def use_stores(
    pool: asyncpg.Pool, user_id: str, store_ids: Sequence[uuid.UUID], shared: Sequence[uuid.UUID] = ()
) -> dict[uuid.UUID, bool]:
    """Which of the stores the user owns (or are `shared` with them: a shared assistant's), each with
    whether it has expired; those that have not are touched (as `touch`), in the same statement: one
    round trip before a search."""
    if not store_ids:
        return {}
    rows = await pool.fetch(USE_STORES, list(store_ids), user_id, list(shared))
    return {row["id"]: row["expired"] for row in rows}


async def announce_work(session: AsyncSession) -> None:
    """Wake every process's indexer once this transaction commits."""
    await session.execute(select(func.pg_notify(WORK_CHANNEL, "")))


async def lock_user_stores(session: AsyncSession, user_id: str) -> None:
    """Until the transaction ends, the only one making a store for this user (their count is checked)."""
    await session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(f"vector_store:{user_id}", 0))))


async def count_stores(session: AsyncSession, user_id: str) -> int:
    return int(
        await session.scalar(select(func.count()).select_from(VectorStore).where(VectorStore.user_id == user_id)) or 0
    )
