"""Every query the files API makes. Functions flush, never commit: the caller's session decides.

A user's totals are read and a file added under a transaction-scoped advisory lock on the user
(`lock_owner`), so two uploads racing past a tier's cap take turns and the second sees the first.
A file past its `expires_at` is gone for its owner (no read returns it, no total counts it)
until retention deletes it.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Literal

from sqlalchemy import ColumnElement, delete, func, insert, or_, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import StoredFile

Order = Literal["asc", "desc"]


def live() -> ColumnElement[bool]:
    return or_(StoredFile.expires_at.is_(None), StoredFile.expires_at > func.now())


async def get_file(session: AsyncSession, file_id: uuid.UUID, user_id: str) -> StoredFile | None:
    """The user's file; another user's, or an expired one, is the same as none."""
    return await session.scalar(
        select(StoredFile).where(StoredFile.id == file_id, StoredFile.user_id == user_id, live())
    )


async def lock_owner(session: AsyncSession, user_id: str) -> None:
    """Until the transaction ends, the only one adding a file for this user."""
    await session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(f"file:{user_id}", 0))))


async def totals(session: AsyncSession, user_id: str) -> tuple[int, int]:
    """(files, bytes) the user keeps."""
    row = (
        await session.execute(
            select(func.count(), func.coalesce(func.sum(StoredFile.bytes), 0)).where(
                StoredFile.user_id == user_id, live()
            )
        )
    ).one()
    return int(row[0]), int(row[1])


async def add_file(
    session: AsyncSession,
    *,
    file_id: uuid.UUID,
    user_id: str,
    purpose: str,
    filename: str,
    size: int,
    content_type: str,
    storage_key: str,
    sha256: str,
    expires_after: int | None,
) -> StoredFile:
    """The new row, with its `created_at` (and `expires_at`, that many seconds later) from the database's clock."""
    expires_at = func.now() + timedelta(seconds=expires_after) if expires_after is not None else None
    statement = (
        insert(StoredFile)
        .values(
            id=file_id,
            user_id=user_id,
            purpose=purpose,
            filename=filename,
            bytes=size,
            content_type=content_type,
            storage_key=storage_key,
            sha256=sha256,
            expires_at=expires_at,
        )
        .returning(StoredFile)
    )
    return (await session.scalars(statement)).one()


async def delete_file(session: AsyncSession, file_id: uuid.UUID, user_id: str) -> str | None:
    """Delete the user's file (its vector store entries and chunks go with it: ON DELETE CASCADE);
    its storage key, or None when there was no such file."""
    return await session.scalar(
        delete(StoredFile)
        .where(StoredFile.id == file_id, StoredFile.user_id == user_id, live())
        .returning(StoredFile.storage_key)
    )


async def page_files(
    session: AsyncSession,
    user_id: str,
    *,
    purpose: str | None,
    limit: int,
    order: Order,
    after: uuid.UUID | None,
) -> tuple[list[StoredFile], bool]:
    """One page of the user's files by (created_at, id), the order ix_file_user_id_created_at_id keeps,
    after the file `after` (an id not the user's gives an empty page), and whether more follow."""
    key = tuple_(StoredFile.created_at, StoredFile.id)
    query = select(StoredFile).where(StoredFile.user_id == user_id, live())
    if purpose is not None:
        query = query.where(StoredFile.purpose == purpose)
    if after is not None:
        cursor = (
            await session.execute(
                select(StoredFile.created_at, StoredFile.id).where(
                    StoredFile.id == after, StoredFile.user_id == user_id
                )
            )
        ).first()
        if cursor is None:
            return [], False
        query = query.where(key > tuple(cursor) if order == "asc" else key < tuple(cursor))
    ordering = (
        (StoredFile.created_at.asc(), StoredFile.id.asc())
        if order == "asc"
        else (StoredFile.created_at.desc(), StoredFile.id.desc())
    )
    rows = list(await session.scalars(query.order_by(*ordering).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
