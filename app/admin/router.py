"""Admin routes: keys and users."""

from __future__ import annotations

import uuid
from typing import Annotated

from annotated_types import Ge
from fastapi import APIRouter, Path, Query

from app.admin.schemas import KeyCreate, KeyCreated, KeyList, KeyPublic, UserPublic, UserUpdate
from app.auth import management, repository
from app.deps import AdminGuard, CatalogDep, RuntimeDep, SessionDep
from app.errors import InvalidRequest, error_responses
from app.registry import TierSpec
from app.validation import UserId

LIMIT_NAMES = set(TierSpec.model_fields) - {"models"}


# Each limit's least value as the catalog's tiers take it: 0 for rates and budgets, 1 for the caps.
def _floor(name: str) -> float:
    bounds = [c.ge for c in TierSpec.model_fields[name].metadata if isinstance(c, Ge)]
    return float(bounds[0]) if bounds and isinstance(bounds[0], int | float) else 0.0


LIMIT_FLOORS = {name: _floor(name) for name in LIMIT_NAMES}

router = APIRouter(tags=["admin"], dependencies=[AdminGuard], responses=error_responses(401, 403))


@router.post("/keys", status_code=201, responses=error_responses(400))
async def create_key(body: KeyCreate, session: SessionDep, catalog: CatalogDep, runtime: RuntimeDep) -> KeyCreated:
    """Create a gateway key for a user; the response is the only time the key is shown."""
    key, raw = await management.create_key(
        session,
        catalog,
        runtime.auth.signer,
        user_id=body.user_id,
        tier=body.tier,
        name=body.name,
        jwt_user_prefix=runtime.settings.jwt_user_prefix,
    )
    return KeyCreated(**KeyPublic.model_validate(key).model_dump(), key=raw)


@router.get("/keys", responses=error_responses(400))
async def list_keys(
    session: SessionDep, user_id: Annotated[UserId | None, Query(description="Only this user's keys.")] = None
) -> KeyList:
    """List keys, newest first, optionally for one user."""
    keys = await repository.list_keys(session, user_id)
    return KeyList(data=[KeyPublic.model_validate(key) for key in keys])


@router.delete("/keys/{key_id}", responses=error_responses(404))
async def revoke_key(key_id: uuid.UUID, session: SessionDep) -> KeyPublic:
    """Revoke a key; every process stops accepting it at once."""
    return KeyPublic.model_validate(await management.revoke_key(session, key_id))


@router.patch("/users/{user_id}", responses=error_responses(400))
async def update_user(
    user_id: Annotated[UserId, Path(description="The app's user id (a JWT `sub` or a key's user).")],
    body: UserUpdate,
    session: SessionDep,
    catalog: CatalogDep,
) -> UserPublic:
    """Set a user's tier, upstream switch or limit overrides (created on first sight)."""
    changes = {name: value for name, value in body.model_dump(exclude_unset=True).items() if value is not None}
    unknown = set(changes.get("limit_overrides") or {}) - LIMIT_NAMES
    if unknown:
        raise InvalidRequest(
            f"Unknown limits {sorted(unknown)}; known: {sorted(LIMIT_NAMES)}.",
            param="limit_overrides",
        )
    for name, value in (changes.get("limit_overrides") or {}).items():
        if value is not None and value < LIMIT_FLOORS[name]:
            raise InvalidRequest(f"'{name}' is at least {LIMIT_FLOORS[name]:g}.", param=f"limit_overrides.{name}")
    user = await management.update_user(session, catalog, user_id, changes)
    return UserPublic.model_validate(user)
