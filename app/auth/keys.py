"""Gateway API keys: random, shown once, kept only as a hash, and signed.

A key is `gw_<43 random characters>.<MAC>`: the MAC (HMAC-SHA256 under the deployment's
`api_key` secret, app/keyring.py, first 16 bytes) lets a process tell a key it issued from
junk without asking the database, so junk costs nothing and never needs a guard, and a
lookup that does happen is one of a key we issued. Keys made before keys were signed have
no MAC; those are looked up as before, behind the failed-auth guard (app/auth/service.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import Enum

KEY_PREFIX = "gw_"
VISIBLE_CHARS = 10
MAC_BYTES = 16


class KeyForm(Enum):
    SIGNED = "signed"  # ours: its MAC checks out
    UNSIGNED = "unsigned"  # the form of keys made before keys were signed
    FORGED = "forged"  # a MAC that does not check out, or no key at all


def hash_key(key: str) -> str:
    """SHA-256 suffices: keys are random and long, so there is nothing to brute-force."""
    return hashlib.sha256(key.encode()).hexdigest()


def visible_prefix(key: str) -> str:
    """What listings show so an operator can tell keys apart."""
    return key[:VISIBLE_CHARS]


def looks_like_key(token: str) -> bool:
    return token.startswith(KEY_PREFIX)


@dataclass(frozen=True, slots=True)
class KeySigner:
    secret: bytes

    def _mac(self, body: str) -> str:
        digest = hmac.new(self.secret, body.encode(), hashlib.sha256).digest()[:MAC_BYTES]
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def new_key(self) -> str:
        """A fresh key: 256 bits of randomness behind a recognisable prefix, and its MAC."""
        body = KEY_PREFIX + secrets.token_urlsafe(32)
        return f"{body}.{self._mac(body)}"

    def form(self, token: str) -> KeyForm:
        body, dot, mac = token.rpartition(".")
        if not dot:
            return KeyForm.UNSIGNED
        if hmac.compare_digest(mac.encode(), self._mac(body).encode()):
            return KeyForm.SIGNED
        return KeyForm.FORGED
