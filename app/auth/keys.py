"""Gateway API keys: random, shown once, kept only as a hash."""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "gw_"
VISIBLE_CHARS = 10


def new_key() -> str:
    """A fresh key: 256 bits of randomness behind a recognisable prefix."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """SHA-256 suffices: keys are random and long, so there is nothing to brute-force."""
    return hashlib.sha256(key.encode()).hexdigest()


def visible_prefix(key: str) -> str:
    """What listings show so an operator can tell keys apart."""
    return key[:VISIBLE_CHARS]


def looks_like_key(token: str) -> bool:
    return token.startswith(KEY_PREFIX)
