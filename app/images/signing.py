"""Signed, expiring image URLs: the signature is the credential, so an `<img src>` just works.

`signature = base64url(HMAC-SHA256(secret, "<image id>.<expires epoch s>"))`. The
secret is IMAGE_URL_SECRET, or else a random one kept in Postgres (made by the first
process to start), so every replica and every restart signs and verifies alike.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from dataclasses import dataclass

import asyncpg

from app.errors import ErrorCode, PermissionDenied
from app.keyring import shared_secret


async def load_secret(pool: asyncpg.Pool, configured: str | None) -> bytes:
    return configured.encode() if configured is not None else await shared_secret(pool, "image_url")


@dataclass(frozen=True, slots=True)
class UrlSigner:
    secret: bytes
    ttl: int

    def _signature(self, image_id: uuid.UUID, expires: int) -> str:
        digest = hmac.new(self.secret, f"{image_id}.{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def sign(self, base_url: str, image_id: uuid.UUID, now: float | None = None) -> tuple[str, int]:
        """The URL and its expiry (epoch seconds). Expiry is rounded up to the minute so URLs
        signed within the same minute are equal and browsers can cache them."""
        now = time.time() if now is None else now
        expires = (int(now + self.ttl) // 60 + 1) * 60
        url = f"{base_url}/images/{image_id}/content?expires={expires}&signature={self._signature(image_id, expires)}"
        return url, expires

    def verify(self, image_id: uuid.UUID, expires: int, signature: str) -> None:
        """Raise 403 unless the signature is ours and not expired (checked in that order)."""
        expected = self._signature(image_id, expires)
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise PermissionDenied("The image URL's signature is invalid.", code=ErrorCode.INVALID_SIGNATURE)
        if expires < time.time():
            raise PermissionDenied(
                "The image URL has expired; fetch the image again for a fresh one.", code=ErrorCode.URL_EXPIRED
            )


@dataclass(frozen=True, slots=True)
class Links:
    """Signs content URLs under the base the client reached us at (or IMAGE_PUBLIC_BASE_URL)."""

    signer: UrlSigner
    base_url: str  # up to and including the API prefix: https://host/v1

    def sign(self, image_id: uuid.UUID) -> tuple[str, int]:
        return self.signer.sign(self.base_url, image_id)
