"""The model registry and tiers, loaded from the catalog TOML file at start-up.

Model names, prices and limits live in configuration, never in code paths: models
retire often, and an operator must be able to swap one without a release.
"""

from __future__ import annotations

import tomllib
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.errors import ErrorCode, InvalidRequest, PermissionDenied

ModelKind = Literal["chat", "image", "realtime", "embedding"]


class ModelSpec(BaseModel):
    """One upstream model, its aliases and prices."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    kind: ModelKind
    aliases: list[str] = []
    input_per_1m: float = Field(0.0, ge=0)
    cached_input_per_1m: float | None = Field(None, ge=0)
    output_per_1m: float = Field(0.0, ge=0)
    # The most a call may write (chat): what a call that names no cap is reserved for, and capped at.
    max_output_tokens: int = Field(16_384, ge=1)
    sizes: list[str] = []
    qualities: list[str] = []
    formats: list[str] = []
    backgrounds: list[str] = []
    max_n: int = Field(1, ge=1, le=10)
    image_prices: dict[str, float] = {}
    # Embedding models: the vector's length, the most `dimensions` may ask for (None: not adjustable
    # below it), and the most tokens one input may have.
    dimensions: int | None = Field(None, ge=1)
    adjustable_dimensions: bool = False
    max_input_tokens: int = Field(8_192, ge=1)

    def token_cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        """USD for one call's tokens; cached prompt tokens at their own price when set."""
        cached_price = self.cached_input_per_1m if self.cached_input_per_1m is not None else self.input_per_1m
        uncached = max(prompt_tokens - cached_tokens, 0)
        return (
            uncached * self.input_per_1m + cached_tokens * cached_price + completion_tokens * self.output_per_1m
        ) / 1_000_000


class TierSpec(BaseModel):
    """What a tier may call and how much; a limit left out is no limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[str] = ["*"]
    chat_requests_per_minute: int | None = Field(None, ge=0)
    chat_tokens_per_minute: int | None = Field(None, ge=0)
    image_requests_per_minute: int | None = Field(None, ge=0)
    batch_images_per_hour: int | None = Field(None, ge=0)
    images_per_day: int | None = Field(None, ge=0)
    realtime_requests_per_minute: int | None = Field(None, ge=0)
    embedding_requests_per_minute: int | None = Field(None, ge=0)
    embedding_tokens_per_minute: int | None = Field(None, ge=0)
    monthly_budget_usd: float | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_messages: int | None = Field(None, ge=1)
    max_prompt_chars: int | None = Field(None, ge=1)
    # Streams (chat, thread turns, batch events) one user may hold open at once, per process.
    max_concurrent_streams: int | None = Field(None, ge=0)


class UnknownTier(PermissionDenied):
    """A caller placed in a tier the catalog does not have (renamed or removed): refused, not guessed at."""

    code = ErrorCode.UNKNOWN_TIER

    def __init__(self, tier: str) -> None:
        super().__init__(f"Your account is in tier '{tier}', which this gateway does not know; ask the operator.")


class Catalog(BaseModel):
    """Every model and tier the operator configured."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    models: list[ModelSpec] = Field(alias="model")
    tiers: dict[str, TierSpec] = Field(alias="tier")

    @model_validator(mode="after")
    def _names_are_unique_and_known(self) -> Catalog:
        seen: set[str] = set()
        for spec in self.models:
            for name in (spec.id, *spec.aliases):
                if name in seen:
                    raise ValueError(f"model name {name!r} is used twice")
                seen.add(name)
        for tier_name, tier in self.tiers.items():
            unknown = [name for name in tier.models if name != "*" and name not in seen]
            if unknown:
                raise ValueError(f"tier {tier_name!r} names unknown models {unknown}")
        if not self.tiers:
            raise ValueError("at least one tier is required")
        return self

    @cached_property
    def by_name(self) -> dict[str, ModelSpec]:
        return {name: spec for spec in self.models for name in (spec.id, *spec.aliases)}

    @cached_property
    def allowed_ids(self) -> dict[str, frozenset[str] | None]:
        """Per tier, the model ids it may call; None when it may call all."""
        allowed: dict[str, frozenset[str] | None] = {}
        for tier_name, tier in self.tiers.items():
            if "*" in tier.models:
                allowed[tier_name] = None
            else:
                allowed[tier_name] = frozenset(self.by_name[name].id for name in tier.models)
        return allowed

    def tier(self, name: str) -> TierSpec:
        """The tier of that name; a name the catalog does not know is refused, never read as another tier."""
        spec = self.tiers.get(name)
        if spec is None:
            raise UnknownTier(name)
        return spec

    def may_use(self, tier: str, spec: ModelSpec) -> bool:
        """Whether `tier` may call `spec`; an unknown tier may call nothing."""
        if tier not in self.tiers:
            return False
        allowed = self.allowed_ids[tier]
        return allowed is None or spec.id in allowed

    def models_for(self, tier: str) -> list[ModelSpec]:
        return [spec for spec in self.models if self.may_use(tier, spec)]

    def resolve(self, name: object, tier: str, kind: ModelKind) -> ModelSpec:
        """The model a request names, or a 400 naming `model` the SDK shows as-is."""
        spec = self.by_name.get(name) if isinstance(name, str) else None
        if spec is None or spec.kind != kind or not self.may_use(tier, spec):
            raise InvalidRequest(
                f"The model '{name}' does not exist or you do not have access to it.",
                param="model",
                code=ErrorCode.MODEL_NOT_FOUND,
            )
        return spec


def load_catalog(path: Path) -> Catalog:
    """Parse and validate the catalog; a broken file stops start-up with the reason."""
    try:
        with path.open("rb") as handle:
            return Catalog.model_validate(tomllib.load(handle))
    except (OSError, tomllib.TOMLDecodeError, ValidationError) as error:
        raise SystemExit(f"invalid CATALOG_FILE {path}: {error}") from error
