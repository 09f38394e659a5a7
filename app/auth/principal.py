"""The caller every route sees, however it authenticated."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    tier: str
    use_upstream: bool = True
    limit_overrides: dict[str, Any] = field(default_factory=dict)
    api_key_id: uuid.UUID | None = None
    via: Literal["key", "jwt"] = "key"
    # A key of their own is stored (app/byok): their upstream calls use it, not the operator's.
    has_own_key: bool = False
