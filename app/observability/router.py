"""`GET /metrics`: Prometheus' text format, summed over every worker process.

It takes no gateway key (Prometheus scrapes it), so keep it off the public network, or
set METRICS_TOKEN and give the scraper that bearer token.
"""

from __future__ import annotations

import asyncio
import secrets

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from app.deps import RuntimeDep
from app.errors import ErrorCode, NotFound, Unauthenticated, error_responses

router = APIRouter(tags=["operations"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        **error_responses(401, 404),
    },
)
async def get_metrics(request: Request, runtime: RuntimeDep) -> Response:
    """Prometheus metrics of the whole service (every worker); bearer METRICS_TOKEN when one is set."""
    metrics = runtime.metrics
    if metrics is None:
        raise NotFound("Metrics are disabled (METRICS_ENABLED=false).")
    token = runtime.settings.metrics_token
    if token is not None:
        sent = request.headers.get("authorization", "")
        if not secrets.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            raise Unauthenticated("This endpoint needs the bearer METRICS_TOKEN.", code=ErrorCode.INVALID_METRICS_TOKEN)
    # In multiprocess mode this reads every worker's files: off the event loop.
    body = await asyncio.to_thread(metrics.render)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
