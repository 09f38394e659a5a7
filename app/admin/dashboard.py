"""`GET /admin/dashboard`: the usage dashboard, one static page that reads the admin report API.

The page holds no data, so loading it needs no key: it asks for the admin key,
keeps it in the tab's sessionStorage only, and calls `/admin/reports/*` with it.
Its script and styles are files beside it, so a strict Content-Security-Policy
(same origin only, no inline code) guards the key from injected script.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from starlette.responses import Response

from app.errors import NotFound

STATIC = files("app.admin") / "static"
ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",
}

router = APIRouter(prefix="/dashboard", include_in_schema=False)


@cache
def _read(name: str) -> bytes:
    return (STATIC / name).read_bytes()


@router.get("")
async def dashboard() -> Response:
    """The usage dashboard page."""
    return Response(_read("dashboard.html"), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


@router.get("/{name}")
async def dashboard_asset(name: str) -> Response:
    """The dashboard's script and styles."""
    if name not in ASSETS:
        raise NotFound(f"No dashboard file {name!r}.")
    return Response(_read(name), media_type=ASSETS[name], headers=SECURITY_HEADERS)
