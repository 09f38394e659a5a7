"""The application factory: lifespan wiring, middleware, routers and error handlers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute

from app import migrations
from app.admin.dashboard import router as dashboard_router
from app.admin.refusals import start_refusal_recorder
from app.admin.reports import router as reports_router
from app.admin.router import router as admin_router
from app.auth.guard import FailedAuthGuard
from app.auth.service import Authenticator
from app.byok.router import router as byok_router
from app.byok.service import start_byok
from app.chat.router import router as chat_router
from app.chat.schemas import ChatCompletionRequest
from app.chat.service import ChatService
from app.config import Settings, get_settings
from app.db import Database, start_embedded_postgres
from app.errors import install_error_handlers
from app.health.router import router as health_router
from app.images.router import router as images_router
from app.images.runtime import start_images
from app.middleware import RequestContextMiddleware
from app.observability.router import router as observability_router
from app.observability.runtime import start_observability, stop_observability
from app.ratelimit.limiter import Limiter
from app.realtime.presets import load_voice_presets
from app.realtime.router import router as realtime_router
from app.realtime.service import RealtimeService
from app.registry import load_catalog
from app.threads.router import router as threads_router
from app.threads.service import ThreadService
from app.upstream.provider import Upstream
from app.usage.router import router as usage_router
from app.usage.writer import UsageWriter

log = logging.getLogger("app")


# Headers a browser app may read: our request id, limits, and how an answer was made.
EXPOSED_HEADERS = [
    "x-request-id",
    "retry-after",
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
    "x-gateway-simulated",
    "x-gateway-fallback",
    "x-upstream-request-id",
    "idempotent-replayed",
]


def operation_id(route: APIRoute) -> str:
    """`{tag}-{name}`: stable ids that make generated SDKs readable."""
    return f"{route.tags[0]}-{route.name}" if route.tags else route.name


async def _prune_periodically(limiter: Limiter, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await limiter.prune()
        except Exception as error:
            log.warning("rate-limit prune failed: %s", error)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    url = settings.database_url or start_embedded_postgres(settings.data_dir)
    catalog = load_catalog(settings.catalog_file)
    db = await Database.connect(url, settings.db_pool_size)
    upstream = Upstream(settings)
    limiter = Limiter(
        db.pool,
        catalog,
        fail_open_rates=settings.ratelimit_fail_open_rates,
        fail_open_budgets=settings.ratelimit_fail_open_budgets,
        timeout=settings.ratelimit_timeout,
    )
    usage = UsageWriter(
        db.pool,
        limiter,
        interval=settings.usage_flush_interval,
        batch_size=settings.usage_batch_size,
    )
    authenticator = Authenticator(settings, db.pool, url)
    state = app.state
    state.db, state.catalog, state.upstream, state.limiter = db, catalog, upstream, limiter
    state.usage, state.authenticator = usage, authenticator
    state.auth_guard = FailedAuthGuard(settings.auth_failures_per_minute)
    state.refusal_listeners = []  # see app.errors.RefusalListener
    state.metrics = start_observability(settings, state.refusal_listeners, usage)
    state.chat = ChatService(settings, catalog, limiter, upstream, usage)
    state.threads = ThreadService(settings, catalog, limiter, upstream, usage, db)
    presets = load_voice_presets(settings.assistants_file, catalog)
    state.realtime = RealtimeService(catalog, presets, limiter, upstream, usage)
    state.migration_head = migrations.head()
    state.byok = await start_byok(settings, db, upstream, authenticator)
    await authenticator.start()
    await usage.start()
    state.refusals = await start_refusal_recorder(db.pool, state.refusal_listeners, settings.usage_flush_interval)
    state.images = await start_images(settings, db, catalog, limiter, upstream, usage)
    await state.threads.start()
    pruner = asyncio.create_task(_prune_periodically(limiter, settings.ratelimit_prune_interval))
    log.info("gateway ready (%s mode)", "simulated" if settings.simulated else "upstream")
    try:
        yield
    finally:
        pruner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pruner
        await state.threads.stop()
        await state.images.stop()
        await state.refusals.stop()
        await usage.stop()
        await stop_observability(state.metrics)
        await authenticator.stop()
        await upstream.close()
        await db.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="OpenAI Gateway",
        version="0.1.0",
        description=(
            "An OpenAI-compatible gateway: chat completions, threads, images and realtime "
            "tokens, with per-user limits and usage records. Errors always use OpenAI's shape."
        ),
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
        # FastAPI's native OpenTelemetry looks up its providers on every request; off unless asked for.
        telemetry={"tracing": settings.otel_enabled, "metrics": settings.otel_enabled, "logs": settings.otel_enabled},
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(chat_router, prefix="/v1")  # first: routes are matched in order, this one is the hottest
    app.include_router(health_router)
    if settings.metrics_enabled:
        app.include_router(observability_router)  # /metrics, tag "operations"
    app.include_router(usage_router, prefix="/v1")
    app.include_router(images_router, prefix="/v1")
    app.include_router(threads_router, prefix="/v1")
    app.include_router(realtime_router, prefix="/v1")
    app.include_router(byok_router, prefix="/v1")
    app.include_router(admin_router, prefix="/admin")
    app.include_router(reports_router, prefix="/admin")
    app.include_router(dashboard_router, prefix="/admin")
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=EXPOSED_HEADERS,
        )
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes)
    app.openapi = lambda: openapi_document(app)  # type: ignore[method-assign]
    return app


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document with its 422 replaced by our 400: validation errors use our error shape."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    # Bodies that routes read themselves (for speed) are described here.
    for model in (ChatCompletionRequest,):
        body_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body_schema.pop("$defs", {}))
        components[model.__name__] = body_schema
    app.openapi_schema = schema
    return schema
