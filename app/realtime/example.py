"""`GET /dev/realtime`: a browser page that makes a WebRTC voice call through the gateway.

Development only (`create_app` mounts it when `ENVIRONMENT=development`): it shows the whole
flow of README's "Voice calls (WebRTC)" with nothing but the browser's own APIs, offline too
(simulated mode answers the call itself). The page asks for a gateway key and keeps it in a
variable of the page, nowhere else.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

HEADERS = {"cache-control": "no-cache", "referrer-policy": "no-referrer", "x-content-type-options": "nosniff"}

router = APIRouter(include_in_schema=False)


@cache
def _page() -> str:
    """Read once, on the first request: production never mounts the route, so never reads the file."""
    return (files("app.realtime") / "example.html").read_text(encoding="utf-8")


@router.get("/dev/realtime")
async def realtime_example() -> HTMLResponse:
    """The WebRTC voice call example page."""
    return HTMLResponse(_page(), headers=HEADERS)
