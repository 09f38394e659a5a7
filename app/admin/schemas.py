"""Admin request and response bodies."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class KeyCreate(BaseModel):
    user_id: str = Field(min_length=1, max_length=200)
    tier: str | None = Field(None, description="Sets the user's tier too; unchanged when left out.")
    name: str | None = Field(None, max_length=200)


class KeyPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    user_id: str
    name: str | None
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


class KeyCreated(KeyPublic):
    key: str = Field(description="The key itself: shown this once, stored only as a hash.")


class KeyList(BaseModel):
    data: list[KeyPublic]


class UserUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tier: str | None = None
    use_upstream: bool | None = Field(None, description="False sends the user's calls to the simulated provider.")
    limit_overrides: dict[str, float | None] | None = Field(
        None, description="Tier limits to override for this user, by name; null removes a limit."
    )


class UserPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    tier: str
    use_upstream: bool
    limit_overrides: dict[str, Any]
    created_at: datetime
    updated_at: datetime
