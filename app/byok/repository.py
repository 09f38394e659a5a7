"""Queries for users' own keys: ORM for the routes, one raw statement for the per-user client cache."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg
from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import affected_rows
from app.models import UserOpenAIKey

SEALED_KEY = "SELECT key_id, ciphertext FROM user_openai_key WHERE user_id = $1"
UNREADABLE_COUNT = "SELECT count(*) FROM user_openai_key WHERE NOT key_id = ANY($1::text[])"


async def get(session: AsyncSession, user_id: str) -> UserOpenAIKey | None:
    return await session.get(UserOpenAIKey, user_id)


async def put(
    session: AsyncSession, *, user_id: str, key_id: str, ciphertext: bytes, last4: str, validated_at: datetime
) -> UserOpenAIKey:
    """Store or replace the user's key; a replaced key counts as created now."""
    values = {"key_id": key_id, "ciphertext": ciphertext, "last4": last4, "validated_at": validated_at}
    statement = (
        insert(UserOpenAIKey)
        .values(user_id=user_id, **values)
        .on_conflict_do_update(index_elements=[UserOpenAIKey.user_id], set_={**values, "created_at": func.now()})
        .returning(UserOpenAIKey)
    )
    result = await session.execute(statement, execution_options={"populate_existing": True})
    return result.scalar_one()


async def remove(session: AsyncSession, user_id: str) -> bool:
    result = await session.execute(delete(UserOpenAIKey).where(UserOpenAIKey.user_id == user_id))
    return bool(affected_rows(result))


async def sealed_key(pool: asyncpg.Pool, user_id: str) -> asyncpg.Record | None:
    return await pool.fetchrow(SEALED_KEY, user_id)


async def count_unreadable(pool: asyncpg.Pool, key_ids: Sequence[str]) -> int:
    """Rows sealed under none of `key_ids`: this process cannot use them."""
    return int(await pool.fetchval(UNREADABLE_COUNT, list(key_ids)))


async def lock_rows_to_rotate(
    session: AsyncSession, *, primary_id: str, readable_ids: Sequence[str], skip_users: Sequence[str], limit: int
) -> list[UserOpenAIKey]:
    """Up to `limit` rows under a configured key other than the primary, locked until commit."""
    query = (
        select(UserOpenAIKey)
        .where(
            UserOpenAIKey.key_id != primary_id,
            UserOpenAIKey.key_id.in_(readable_ids),
            UserOpenAIKey.user_id.not_in(skip_users),
        )
        .order_by(UserOpenAIKey.user_id)
        .limit(limit)
        .with_for_update()
    )
    return list((await session.scalars(query)).all())


async def reseal(session: AsyncSession, user_id: str, *, key_id: str, ciphertext: bytes) -> None:
    await session.execute(
        update(UserOpenAIKey).where(UserOpenAIKey.user_id == user_id).values(key_id=key_id, ciphertext=ciphertext)
    )


async def users_not_under(session: AsyncSession, key_ids: Sequence[str]) -> list[str]:
    """Users whose key is sealed under none of `key_ids`."""
    query = select(UserOpenAIKey.user_id).where(UserOpenAIKey.key_id.not_in(key_ids)).order_by(UserOpenAIKey.user_id)
    return list((await session.scalars(query)).all())
