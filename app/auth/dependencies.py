"""FastAPI dependencies: the current principal and the admin guard."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.auth.guard import FailedAuthGuard
from app.auth.principal import Principal
from app.auth.service import Authenticator
from app.errors import PermissionDenied, RateLimited, Unauthenticated

# auto_error=False: a missing header is our 401 in our shape, not FastAPI's 403.
bearer = HTTPBearer(auto_error=False, description="A gateway API key (gw_...) or a JWT.")


def _token(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or not credentials.credentials:
        raise Unauthenticated("Missing bearer token: send 'Authorization: Bearer <key>'.", code="missing_api_key")
    return credentials.credentials


async def current_principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Principal:
    return await principal_for(request, _token(credentials))


def bearer_token(request: Request) -> str:
    """The bearer token of a request, read without FastAPI's dependency machinery (hot routes)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("Missing bearer token: send 'Authorization: Bearer <key>'.", code="missing_api_key")
    return token.strip()


async def principal_for(request: Request, token: str) -> Principal:
    """The caller behind a token: from the cache, or looked up behind the failed-auth guard."""
    authenticator: Authenticator = request.app.state.authenticator
    principal = authenticator.cached(token)
    if principal is not None:
        request.state.principal = principal
        return principal
    guard: FailedAuthGuard = request.app.state.auth_guard
    client = request.client.host if request.client else "unknown"
    if guard.blocked(client):
        raise RateLimited(
            "Too many failed authentication attempts from this address.",
            code="too_many_auth_failures",
            headers={"retry-after": str(guard.retry_after)},
        )
    try:
        principal = await authenticator.authenticate(token)
    except Unauthenticated:
        guard.failed(client)
        raise
    request.state.principal = principal
    return principal


async def require_admin(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    token = _token(credentials)
    expected = request.app.state.settings.admin_api_key
    if expected is None:
        raise PermissionDenied("The admin API is disabled: set ADMIN_API_KEY to enable it.")
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise Unauthenticated("Invalid admin key.")


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
AdminGuard = Depends(require_admin)
