"""`/healthz`, `/readyz` and `/v1/models`."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path
from pydantic import BaseModel, Field

from app.deps import CatalogDep, PrincipalDep, RuntimeDep
from app.errors import ErrorCode, ModelNotFound, Unavailable, error_responses
from app.knowledge.db import RetrievalMode
from app.registry import Catalog, ModelKind, ModelSpec, SizeBounds
from app.validation import Text

router = APIRouter()


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ok"]
    database: Literal["ok"]
    migrations: str
    simulated: bool
    upstreams: dict[str, str] = Field(
        description="Each operator upstream: `ok`, `failing (N in a row)` or `cooling (N s left)`; a cooled-down"
        " upstream does not make the gateway unready while another deployment can answer."
    )
    vector_search: RetrievalMode = Field(
        description="How vector stores are searched: `hybrid` (pgvector fused with full-text search), or"
        " `full_text` alone where the database has no pgvector."
    )


class ModelPrices(BaseModel):
    input_per_1m: float
    cached_input_per_1m: float | None
    output_per_1m: float
    per_image: dict[str, float]


class ModelInfo(BaseModel):
    """A model the caller's tier may use, in OpenAI's list shape plus the registry's facts."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "openai"
    kind: ModelKind
    aliases: list[str]
    prices: ModelPrices
    sizes: list[str]
    qualities: list[str]
    formats: list[str]
    backgrounds: list[str]
    max_images: int = Field(description="The most images one request may ask for (image models).")
    size_bounds: SizeBounds | None = Field(
        None, description="Image models that also take any WIDTHxHEIGHT within these bounds (gpt-image-2)."
    )
    dimensions: int | None = Field(None, description="The vector's length (embedding models).")


class StyleInfo(BaseModel):
    """A style preset for the image routes' `style`: text added to the prompt, options for those left out."""

    id: str
    object: Literal["image.style"] = "image.style"
    description: str
    prompt: str = Field(description="Added after the request's prompt.")
    size: str | None
    quality: str | None
    output_format: str | None
    background: str | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]
    styles: list[StyleInfo] = Field(description="Style presets of the image routes (`style`).")


@router.get("/healthz", tags=["health"])
async def healthz() -> Health:
    """Process is up."""
    return Health(status="ok")


@router.get("/readyz", tags=["health"], responses=error_responses(503))
async def readyz(runtime: RuntimeDep) -> Readiness:
    """Database reachable and migrations at head; 503 otherwise."""
    try:
        current = await runtime.db.pool.fetchval("SELECT version_num FROM alembic_version", timeout=2)
    except Exception as error:
        raise Unavailable(
            f"Database unreachable: {type(error).__name__}.", code=ErrorCode.DATABASE_UNAVAILABLE
        ) from error
    if current != runtime.migration_head:
        raise Unavailable(
            f"Database schema is at {current}, expected {runtime.migration_head}: run `python -m app migrate`.",
            code=ErrorCode.MIGRATIONS_PENDING,
        )
    return Readiness(
        status="ok",
        database="ok",
        migrations=current,
        simulated=runtime.settings.simulated,
        upstreams=runtime.upstream.health(),
        vector_search=runtime.vector_stores.mode,
    )


@router.get("/v1/models", tags=["models"], responses=error_responses(401, 403))
async def list_models(principal: PrincipalDep, catalog: CatalogDep) -> ModelList:
    """The models the caller's tier may use, with aliases and prices, and the image style presets."""
    return ModelList(data=[model_info(spec) for spec in catalog.models_for(principal.tier)], styles=styles(catalog))


@router.get("/v1/models/{model}", tags=["models"], responses=error_responses(400, 401, 403, 404))
async def get_model(
    model: Annotated[Text, Path(max_length=100, description="A model id or alias.")],
    principal: PrincipalDep,
    catalog: CatalogDep,
) -> ModelInfo:
    """One model the caller's tier may use, by id or alias; any other is a 404."""
    spec = catalog.by_name.get(model)
    if spec is None or not catalog.may_use(principal.tier, spec):
        raise ModelNotFound(model)
    return model_info(spec)


def styles(catalog: Catalog) -> list[StyleInfo]:
    return [StyleInfo(id=name, **style.model_dump()) for name, style in catalog.styles.items()]


def model_info(spec: ModelSpec) -> ModelInfo:
    return ModelInfo(
        id=spec.id,
        kind=spec.kind,
        aliases=spec.aliases,
        prices=ModelPrices(
            input_per_1m=spec.input_per_1m,
            cached_input_per_1m=spec.cached_input_per_1m,
            output_per_1m=spec.output_per_1m,
            per_image=spec.image_prices,
        ),
        sizes=spec.sizes,
        qualities=spec.qualities,
        formats=spec.formats,
        backgrounds=spec.backgrounds,
        max_images=spec.max_n,
        size_bounds=spec.size_bounds,
        dimensions=spec.dimensions,
    )
