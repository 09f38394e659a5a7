"""The model registry and tiers, loaded from the catalog TOML file at start-up.

Model names, prices and limits live in configuration, never in code paths: models
retire often, and an operator must be able to swap one without a release.
"""

from __future__ import annotations

import re
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.errors import ErrorCode, InvalidRequest, PermissionDenied
from app.models.knowledge import EMBEDDING_DIMENSIONS

ModelKind = Literal["chat", "image", "realtime", "embedding"]
# The upstream the settings' OPENAI_BASE_URL and OPENAI_API_KEY name; users' own keys go there only.
DEFAULT_UPSTREAM = "default"
STYLE_NAME = re.compile(r"[a-z0-9_-]{1,50}")


class SizeBounds(BaseModel):
    """Image models that take any `WIDTHxHEIGHT` within bounds (gpt-image-2), besides their listed sizes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    multiple: int = Field(16, ge=1)  # both edges a multiple of this
    max_edge: int = Field(3840, ge=1)
    max_ratio: float = Field(3.0, ge=1)  # the long edge at most this many times the short one
    min_pixels: int = Field(655_360, ge=1)
    max_pixels: int = Field(8_294_400, ge=1)

    def allows(self, width: int, height: int) -> bool:
        long, short = max(width, height), min(width, height)
        return (
            short > 0
            and width % self.multiple == 0
            and height % self.multiple == 0
            and long <= self.max_edge
            and long <= short * self.max_ratio
            and self.min_pixels <= width * height <= self.max_pixels
        )


class StyleSpec(BaseModel):
    """A style preset (`[style.NAME]`): text added to the prompt, and options for what a request leaves out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    prompt: str = Field(min_length=1, max_length=4000)
    size: str | None = None
    quality: str | None = None
    output_format: str | None = None
    background: str | None = None


class UpstreamSpec(BaseModel):
    """An OpenAI-compatible server besides `default`: where it is, the variable holding its key, and
    how to address it (`azure`: Azure OpenAI's deployment URLs, `api-key` header and api-version)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")
    base_url: str = Field(pattern=r"^https?://[^\s]+$")
    api_key_env: str = Field(pattern=r"^[A-Z_][A-Z0-9_]*$")
    api: Literal["openai", "azure"] = "openai"
    api_version: str | None = None
    headers: dict[str, str] = {}
    connect_timeout_seconds: float | None = Field(None, gt=0)
    read_timeout_seconds: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _azure_has_a_version(self) -> UpstreamSpec:
        if self.api == "azure" and not self.api_version:
            raise ValueError(f"upstream {self.name!r}: api = 'azure' needs api_version")
        if self.name == DEFAULT_UPSTREAM:
            raise ValueError("'default' is OPENAI_BASE_URL's upstream: give this one another name")
        return self


class Deployment(BaseModel):
    """Where a model is served: an upstream, the upstream's own name for it (Azure: the deployment),
    its priority (lower first; by default its place in the list) and its weight among equals."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    upstream: str
    model: str | None = None
    priority: int | None = Field(None, ge=0)
    weight: float = Field(1.0, gt=0)


class Failover(BaseModel):
    """An upstream that fails `failures` calls in a row (connect failures, 5xx, 429) is skipped for
    `cooldown_seconds` while another deployment can answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    failures: int = Field(3, ge=1)
    cooldown_seconds: float = Field(30.0, gt=0)


class ModelSpec(BaseModel):
    """One upstream model, its aliases and prices."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    kind: ModelKind
    aliases: list[str] = []
    input_per_1m: float = Field(0.0, ge=0)
    cached_input_per_1m: float | None = Field(None, ge=0)
    output_per_1m: float = Field(0.0, ge=0)
    # Realtime models: audio tokens in and out, and cached audio input, per 1M (None: text's price).
    audio_input_per_1m: float | None = Field(None, ge=0)
    audio_output_per_1m: float | None = Field(None, ge=0)
    cached_audio_input_per_1m: float | None = Field(None, ge=0)
    # The most a call may write (chat): what a call that names no cap is reserved for, and capped at.
    max_output_tokens: int = Field(16_384, ge=1)
    sizes: list[str] = []
    qualities: list[str] = []
    formats: list[str] = []
    backgrounds: list[str] = []
    max_n: int = Field(1, ge=1, le=10)
    image_prices: dict[str, float] = {}
    # Image models that take any size within bounds, besides `sizes` (None: only those).
    size_bounds: SizeBounds | None = None
    # Embedding models: the vector's length, the most `dimensions` may ask for (None: not adjustable
    # below it), and the most tokens one input may have.
    dimensions: int | None = Field(None, ge=1)
    adjustable_dimensions: bool = False
    max_input_tokens: int = Field(8_192, ge=1)
    # Where it is served, in order: upstream names, or tables with an upstream-side name, a priority
    # and a weight. Left out: the `default` upstream only.
    upstreams: list[Deployment] = [Deployment(upstream=DEFAULT_UPSTREAM)]

    @field_validator("upstreams", mode="before")
    @classmethod
    def _names_are_deployments(cls, value: object) -> object:
        if isinstance(value, list):
            return [{"upstream": item} if isinstance(item, str) else item for item in value]
        return value

    @cached_property
    def deployments(self) -> list[tuple[int, Deployment]]:
        """(priority, deployment) pairs, lowest priority first (stable among equals)."""
        ranked = [(d.priority if d.priority is not None else place, d) for place, d in enumerate(self.upstreams)]
        return sorted(ranked, key=lambda pair: pair[0])

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
    # How long one realtime session (a WebRTC call or a /v1/realtime relay) may stay open; how many a
    # user may hold open at once, and their minutes a day (each session reserves its longest length).
    realtime_session_seconds: int | None = Field(None, ge=1)
    realtime_concurrent_sessions: int | None = Field(None, ge=0)
    realtime_minutes_per_day: int | None = Field(None, ge=0)
    embedding_requests_per_minute: int | None = Field(None, ge=0)
    embedding_tokens_per_minute: int | None = Field(None, ge=0)
    monthly_budget_usd: float | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_messages: int | None = Field(None, ge=1)
    max_prompt_chars: int | None = Field(None, ge=1)
    # Streams (chat, thread turns, batch events) one user may hold open at once, per process.
    max_concurrent_streams: int | None = Field(None, ge=0)
    # Uploaded files (/v1/files): one file's bytes, the bytes and the number of files a user keeps.
    # Left out: no cap of the tier's, only the gateway's own (app/files/caps.py).
    file_bytes_max: int | None = Field(None, ge=0)
    storage_bytes_max: int | None = Field(None, ge=0)
    files_max: int | None = Field(None, ge=0)
    # Vector stores a user keeps (their chunks live in Postgres).
    vector_stores_max: int | None = Field(None, ge=0)


class KnowledgeSpec(BaseModel):
    """`[knowledge]`: the embedding model every vector store's chunks are embedded with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    embedding_model: str = "text-embedding-3-small"


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
    upstreams: list[UpstreamSpec] = Field([], alias="upstream")
    failover: Failover = Failover()
    styles: dict[str, StyleSpec] = Field({}, alias="style")
    knowledge: KnowledgeSpec = KnowledgeSpec()

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
        self._check_deployments()
        for style_name in self.styles:
            if not STYLE_NAME.fullmatch(style_name):
                raise ValueError(f"style name {style_name!r} must be 1 to 50 of a-z, 0-9, '_' and '-'")
        self._check_knowledge()
        return self

    def _check_knowledge(self) -> None:
        """The knowledge model exists, embeds, and gives the vectors the chunk table holds."""
        name = self.knowledge.embedding_model
        where = f"knowledge.embedding_model {name!r}"
        spec = next((spec for spec in self.models if name in (spec.id, *spec.aliases)), None)
        if spec is None:
            raise ValueError(f"{where} is not a model of the catalog")
        if spec.kind != "embedding":
            raise ValueError(f"{where} is of kind {spec.kind!r}, not 'embedding'")
        dimensions = spec.dimensions
        if dimensions != EMBEDDING_DIMENSIONS and not (
            spec.adjustable_dimensions and dimensions is not None and dimensions >= EMBEDDING_DIMENSIONS
        ):
            given = f"gives {dimensions} dimensions" if dimensions is not None else "does not say its dimensions"
            raise ValueError(
                f"{where} {given}; stored chunks hold {EMBEDDING_DIMENSIONS}: choose a model of that many,"
                " or one with adjustable_dimensions and more"
            )

    def _check_deployments(self) -> None:
        upstreams = [upstream.name for upstream in self.upstreams]
        if len(set(upstreams)) != len(upstreams):
            raise ValueError(f"an upstream name is used twice: {upstreams}")
        known = {DEFAULT_UPSTREAM, *upstreams}
        azure = {upstream.name for upstream in self.upstreams if upstream.api == "azure"}
        for spec in self.models:
            names = [deployment.upstream for deployment in spec.upstreams]
            if not names or len(set(names)) != len(names):
                raise ValueError(f"model {spec.id!r}: list each of its upstreams once")
            unknown = [name for name in names if name not in known]
            if unknown:
                raise ValueError(f"model {spec.id!r} names unknown upstreams {unknown}")
            if spec.kind == "realtime" and azure & set(names):
                raise ValueError(f"model {spec.id!r}: realtime models are served by OpenAI-style upstreams only")

    @cached_property
    def by_name(self) -> dict[str, ModelSpec]:
        return {name: spec for spec in self.models for name in (spec.id, *spec.aliases)}

    @cached_property
    def knowledge_embedding_model(self) -> str:
        """The id (not an alias) of the model vector stores embed with, asked for EMBEDDING_DIMENSIONS."""
        return self.by_name[self.knowledge.embedding_model].id

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

    def style(self, name: str) -> StyleSpec:
        """The style preset of that name, or a 400 naming `style`."""
        spec = self.styles.get(name)
        if spec is None:
            known = ", ".join(f"'{known}'" for known in self.styles) or "none"
            raise InvalidRequest(
                f"The style '{name}' does not exist; styles: {known}.", param="style", code=ErrorCode.UNKNOWN_STYLE
            )
        return spec

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
