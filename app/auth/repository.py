"""Queries for users and keys."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import ApiKey, AppUser

AUTH_CHANNEL = "gateway_auth"

# `has_own_key` (app/byok) comes in the same statement: no extra round trip per request.
KEY_LOOKUP = """
SELECT k.id, k.user_id, k.revoked_at, u.tier, u.use_upstream, u.limit_overrides,
       EXISTS (SELECT 1 FROM user_openai_key o WHERE o.user_id = k.user_id) AS has_own_key
FROM api_key k JOIN app_user u ON u.id = k.user_id
WHERE k.key_hash = $1
"""
# Always one row: a JWT user may have stored a key without having an `app_user` row (tier NULL then).
USER_LOOKUP = """
SELECT u.tier, u.use_upstream, u.limit_overrides,
       EXISTS (SELECT 1 FROM user_openai_key o WHERE o.user_id = $1) AS has_own_key
FROM (VALUES (1)) AS one (n) LEFT JOIN app_user u ON u.id = $1
"""
TOUCH_KEYS = """
UPDATE api_key SET last_used_at = t.used_at
FROM unnest($1::uuid[], $2::timestamptz[]) AS t(id, used_at)
WHERE api_key.id = t.id AND (api_key.last_used_at IS NULL OR api_key.last_used_at < t.used_at)
"""


async def find_key(pool: asyncpg.Pool, key_hash: str) -> asyncpg.Record | None:
    return await pool.fetchrow(KEY_LOOKUP, key_hash)


async def find_user(pool: asyncpg.Pool, user_id: str) -> asyncpg.Record | None:
    return await pool.fetchrow(USER_LOOKUP, user_id)


async def touch_keys(pool: asyncpg.Pool, used: Iterable[tuple[uuid.UUID, datetime]]) -> None:
    ids, times = zip(*used, strict=True)
    await pool.execute(TOUCH_KEYS, list(ids), list(times))


async def notify_changed(session: AsyncSession, what: str) -> None:
    """Tell every process to drop its cached view of a key or user (sent at commit)."""
    await session.execute(select(func.pg_notify(AUTH_CHANNEL, what)))


async def upsert_user(session: AsyncSession, user_id: str, **values: Any) -> AppUser:
    statement = insert(AppUser).values(id=user_id, **values)
    if values:
        statement = statement.on_conflict_do_update(
            index_elements=[AppUser.id], set_={**values, "updated_at": func.now()}
        )
    else:
        statement = statement.on_conflict_do_nothing(index_elements=[AppUser.id])
    await session.execute(statement)
    user = await session.get(AppUser, user_id, populate_existing=True)
    assert user is not None
    return user


async def add_key(session: AsyncSession, *, user_id: str, name: str | None, prefix: str, key_hash: str) -> ApiKey:
    key = ApiKey(user_id=user_id, name=name, prefix=prefix, key_hash=key_hash)
    session.add(key)
    await session.flush()
    return key


async def revoke_key(session: AsyncSession, key_id: uuid.UUID) -> ApiKey | None:
    result = await session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=func.now())
        .returning(ApiKey)
    )
    return result.scalar_one_or_none()


async def list_keys(session: AsyncSession, user_id: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at.desc())
    if user_id is not None:
        query = query.where(ApiKey.user_id == user_id)
    return list((await session.scalars(query)).all())
