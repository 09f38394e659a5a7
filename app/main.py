"""The application factory: routers, middleware and error handlers; the runtime is built in `lifespan`."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute

from app.admin.dashboard import router as dashboard_router
from app.admin.reports import router as reports_router
from app.admin.router import router as admin_router
from app.assistants.router import admin_router as shared_assistants_router
from app.assistants.router import router as assistants_router
from app.byok.router import router as byok_router
from app.chat.router import router as chat_router
from app.chat.schemas import ChatCompletionRequest
from app.config import Settings, get_settings
from app.deps import runtime_of
from app.embeddings.router import router as embeddings_router
from app.errors import GatewayError, error_renderer, install_error_handlers
from app.events import Refusal
from app.files.router import router as files_router
from app.files.service import HARD_FILE_BYTES, MULTIPART_SLACK
from app.health.router import router as health_router
from app.images.router import router as images_router
from app.middleware import RequestContextMiddleware
from app.observability.router import router as observability_router
from app.observability.routes import route_of
from app.realtime.example import router as realtime_example_router
from app.realtime.router import router as realtime_router
from app.responses.router import router as responses_router
from app.runtime import Runtime
from app.threads.router import router as threads_router
from app.usage.router import router as usage_router
from app.vector_stores.admin import router as vector_stores_admin_router
from app.vector_stores.files import router as vector_store_files_router
from app.vector_stores.router import router as vector_stores_router

GC_FIRST_GENERATION = 20_000  # allocations between collections of the youngest generation (Python's default: 700)

# Headers a browser app may read: our request id, limits, and how an answer was made.
EXPOSED_HEADERS = [
    "x-request-id",
    "location",  # a WebRTC call set up: /v1/realtime/calls/{id}
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
    "x-gateway-max-completion-tokens",
    "x-upstream-request-id",
    "idempotent-replayed",
]


def operation_id(route: APIRoute) -> str:
    """`{tag}-{name}`: stable ids that make generated SDKs readable."""
    return f"{route.tags[0]}-{route.name}" if route.tags else route.name


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The runtime lives as long as the app serves; it is the one thing attached to `app.state`."""
    runtime = await Runtime.start(app.state.settings)
    app.state.runtime = runtime
    # What start-up built (the framework, schemas, SDK types: ~1M objects) lives as long as the
    # process: freezing it keeps the cyclic collector from walking it again and again, and a larger
    # first generation runs the collector less often. Measured: -15% CPU per chat request (README).
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_FIRST_GENERATION, 20, 20)
    try:
        yield
    finally:
        await runtime.stop()


def publish_refusal(request: Request, error: GatewayError) -> None:
    principal = getattr(request.state, "principal", None)
    refusal = Refusal(principal.user_id if principal else None, route_of(request.scope), str(error.code))
    runtime_of(request).events.refusals.publish(refusal)


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
    render_error = error_renderer(publish_refusal)
    install_error_handlers(app, render_error)
    app.include_router(chat_router, prefix="/v1")  # first: routes are matched in order, this one is the hottest
    app.include_router(health_router)
    if settings.metrics_enabled:
        app.include_router(observability_router)  # /metrics, tag "operations"
    app.include_router(usage_router, prefix="/v1")
    app.include_router(embeddings_router, prefix="/v1")
    app.include_router(responses_router, prefix="/v1")
    app.include_router(images_router, prefix="/v1")
    app.include_router(assistants_router, prefix="/v1")
    app.include_router(threads_router, prefix="/v1")
    app.include_router(files_router, prefix="/v1")
    app.include_router(vector_stores_router, prefix="/v1")
    app.include_router(vector_store_files_router, prefix="/v1")
    app.include_router(realtime_router, prefix="/v1")
    app.include_router(byok_router, prefix="/v1")
    if settings.environment == "development":
        app.include_router(realtime_example_router)  # GET /dev/realtime, the WebRTC call example page
    app.include_router(admin_router, prefix="/admin")
    app.include_router(shared_assistants_router, prefix="/admin")
    app.include_router(reports_router, prefix="/admin")
    app.include_router(dashboard_router, prefix="/admin")
    app.include_router(vector_stores_admin_router, prefix="/admin")
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.max_body_bytes,
        body_limits={
            ("POST", "/v1/images/edits"): settings.image_edit_max_bytes,
            # Uploads stream to storage; the tiers' caps refuse sooner (app/files/service.py).
            ("POST", "/v1/files"): HARD_FILE_BYTES + MULTIPART_SLACK,
        },
        log_prompts=settings.log_prompts,
        render_error=render_error,
    )
    if settings.cors_origins:  # outermost: every response carries the CORS headers, early ones too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=EXPOSED_HEADERS,
        )
    # FastAPI's documented way to customise the schema is replacing this method on the instance.
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
