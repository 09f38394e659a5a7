"""`GET /metrics`: Prometheus' text format, summed over every worker process.

It takes no gateway key (Prometheus scrapes it). Without METRICS_TOKEN it answers only
clients on this machine (a loopback address, after trusted proxies are resolved); with it,
any client that sends the token as bearer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from app.deps import RuntimeDep, client_address
from app.errors import ErrorCode, NotFound, PermissionDenied, Unauthenticated, error_responses

router = APIRouter(tags=["operations"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        **error_responses(401, 403, 404),
    },
)
async def get_metrics(request: Request, runtime: RuntimeDep) -> Response:
    """Prometheus metrics of the whole service (every worker); bearer METRICS_TOKEN when one is set."""
    metrics = runtime.metrics
    if metrics is None:
        raise NotFound("Metrics are disabled (METRICS_ENABLED=false).")
    token = runtime.settings.metrics_token
    if token is None:
        if not _is_loopback(client_address(request)):
            raise PermissionDenied("Metrics are served to this machine only; set METRICS_TOKEN to scrape elsewhere.")
    else:
        sent = request.headers.get("authorization", "")
        if not secrets.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            raise Unauthenticated("This endpoint needs the bearer METRICS_TOKEN.", code=ErrorCode.INVALID_METRICS_TOKEN)
    # In multiprocess mode this reads every worker's files: off the event loop.
    body = await asyncio.to_thread(metrics.render)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # "unknown", a unix socket path
        return False
