"""Credentials the test gateways accept: the admin key, the JWT secret, bearer headers, JWTs made at call time."""

from __future__ import annotations

import time
from typing import Any

import jwt

ADMIN_KEY = "test-admin-key-0123456789"
JWT_SECRET = "test-jwt-secret-0123456789abcdef"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_jwt(sub: str, *, expires_in: int = 300, secret: str = JWT_SECRET, **claims: Any) -> str:
    """An HS256 JWT that expires `expires_in` seconds from now: build it inside the test, never at collection."""
    return jwt.encode({"sub": sub, "exp": int(time.time()) + expires_in, **claims}, secret, algorithm="HS256")
