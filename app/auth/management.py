"""Creating and revoking keys and changing users: shared by the CLI and the admin API.

Functions flush, never commit: the caller's session (a request's, or the CLI's) decides.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import repository
from app.auth.keys import KeySigner, hash_key, visible_prefix
from app.errors import InvalidRequest, KeyNotFound
from app.models import ApiKey, AppUser
from app.registry import Catalog


def check_tier(catalog: Catalog, tier: str | None) -> None:
    if tier is not None and tier not in catalog.tiers:
        raise InvalidRequest(f"Unknown tier '{tier}'; known: {', '.join(catalog.tiers)}.", param="tier")


async def create_key(
    session: AsyncSession,
    catalog: Catalog,
    signer: KeySigner,
    *,
    user_id: str,
    tier: str | None,
    name: str | None,
    jwt_user_prefix: str,
) -> tuple[ApiKey, str]:
    """A new key for a user (created on first sight); returns the row and the only copy of the key.
    A JWT user's id (under `jwt_user_prefix`) gets no key: a key would make its holder that JWT user."""
    check_tier(catalog, tier)
    if jwt_user_prefix and user_id.startswith(jwt_user_prefix):
        raise InvalidRequest(
            f"User ids starting with '{jwt_user_prefix}' are JWT users (JWT_USER_PREFIX); keys are made for other ids.",
            param="user_id",
        )
    if tier is None:
        await repository.upsert_user(session, user_id)
    else:
        await repository.upsert_user(session, user_id, tier=tier)
        await repository.notify_changed(session, f"user:{user_id}")
    raw = signer.new_key()
    key = await repository.add_key(
        session, user_id=user_id, name=name, prefix=visible_prefix(raw), key_hash=hash_key(raw)
    )
    return key, raw


async def revoke_key(session: AsyncSession, key_id: uuid.UUID) -> ApiKey:
    key = await repository.revoke_key(session, key_id)
    if key is None:
        raise KeyNotFound(key_id)
    await repository.notify_changed(session, f"key:{key.key_hash}")
    return key


async def update_user(session: AsyncSession, catalog: Catalog, user_id: str, changes: dict[str, Any]) -> AppUser:
    check_tier(catalog, changes.get("tier"))
    user = await repository.upsert_user(session, user_id, **changes)
    await repository.notify_changed(session, f"user:{user_id}")
    return user
