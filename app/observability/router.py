"""`GET /metrics`: Prometheus' text format, summed over every worker process.

It takes no gateway key (Prometheus scrapes it), so keep it off the public network, or
set METRICS_TOKEN and give the scraper that bearer token.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from app.errors import NotFound, Unauthenticated, error_responses

if TYPE_CHECKING:
    from app.observability.metrics import Metrics

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
async def get_metrics(request: Request) -> Response:
    """Prometheus metrics of the whole service (every worker); bearer METRICS_TOKEN when one is set."""
    state = request.app.state
    metrics: Metrics | None = getattr(state, "metrics", None)
    if metrics is None:
        raise NotFound("Metrics are disabled (METRICS_ENABLED=false).")
    token = state.settings.metrics_token
    if token is not None:
        sent = request.headers.get("authorization", "")
        if not secrets.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            raise Unauthenticated("This endpoint needs the bearer METRICS_TOKEN.", code="invalid_metrics_token")
    # In multiprocess mode this reads every worker's files: off the event loop.
    body = await asyncio.to_thread(metrics.render)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
