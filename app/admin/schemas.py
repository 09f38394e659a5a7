"""Admin request and response bodies."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from app.validation import TIER_MAX, Text, UserId

# The largest override: far beyond any real rate or budget, and still plain arithmetic for the
# limit functions (float8) however it is combined with a period or a cost.
MAX_LIMIT = 1e15
# A limit's value: a finite number from 0 (JSON has no NaN or Infinity, but Python's parser reads them).
LimitValue = Annotated[float, Field(ge=0, le=MAX_LIMIT, allow_inf_nan=False)]


class KeyCreate(BaseModel):
    user_id: UserId
    tier: Text | None = Field(
        None, max_length=TIER_MAX, description="Sets the user's tier too; unchanged when left out."
    )
    name: Text | None = Field(None, max_length=200)


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

    tier: Text | None = Field(None, max_length=TIER_MAX)
    use_upstream: bool | None = Field(None, description="False sends the user's calls to the simulated provider.")
    limit_overrides: dict[Text, LimitValue | None] | None = Field(
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
