"""Encrypting users' OpenAI keys at rest: AES-GCM under the operator's `BYOK_ENCRYPTION_KEYS`.

Each value gets a random 96-bit nonce, and the user id is bound in as associated data,
so a ciphertext copied onto another user's row does not decrypt. The first configured
key encrypts; every configured key decrypts, found by the `key_id` stored beside the
ciphertext (a fingerprint of the key, which reveals nothing about it). Rotation is
therefore: prepend a new key, restart, run `python -m app rotate-byok`, drop the old key.

`cryptography` is imported only when BYOK is configured: a gateway without it never
pays for the library's resident memory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

# The key format belongs to the setting (app.config parses BYOK_ENCRYPTION_KEYS); re-exported
# here, where the keys are used.
from app.config import NEW_KEY_HINT as NEW_KEY_HINT
from app.config import decode_key as decode_key

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12


class UnreadableKey(Exception):
    """A stored value this process cannot decrypt: its key is not configured, or it was tampered with."""


def key_id_of(key: bytes) -> str:
    """Which key encrypted a row: 16 hex digits of a domain-separated hash of the key."""
    return hashlib.sha256(b"openai-gateway byok key id\x00" + key).hexdigest()[:16]


def _associated_data(user_id: str) -> bytes:
    return b"user_openai_key\x00" + user_id.encode()


class KeyCipher:
    """The configured keys, by id; `primary_id` encrypts. Empty: BYOK is disabled."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        self._keys: dict[str, AESGCM] = {}
        self.primary_id: str | None = None
        if not keys:
            return
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        for key in keys:
            self._keys.setdefault(key_id_of(key), AESGCM(key))
        self.primary_id = key_id_of(keys[0])

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> KeyCipher:
        return cls([decode_key(text) for text in texts])

    def __repr__(self) -> str:
        return f"KeyCipher(key_ids={list(self._keys)})"

    @property
    def enabled(self) -> bool:
        return self.primary_id is not None

    @property
    def key_ids(self) -> list[str]:
        return list(self._keys)

    def encrypt(self, user_id: str, plaintext: str) -> tuple[str, bytes]:
        """`(key_id, nonce || ciphertext || tag)` under the primary key."""
        if self.primary_id is None:
            raise UnreadableKey("no encryption key is configured")
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._keys[self.primary_id].encrypt(nonce, plaintext.encode(), _associated_data(user_id))
        return self.primary_id, nonce + sealed

    def decrypt(self, user_id: str, key_id: str, ciphertext: bytes) -> str:
        cipher = self._keys.get(key_id)
        if cipher is None:
            raise UnreadableKey(f"encrypted under key {key_id}, which is not configured")
        from cryptography.exceptions import InvalidTag

        try:
            plain = cipher.decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], _associated_data(user_id))
        except InvalidTag as error:
            raise UnreadableKey(f"the value under key {key_id} does not authenticate") from error
        return plain.decode()

    def reencrypt(self, user_id: str, key_id: str, ciphertext: bytes) -> tuple[str, bytes]:
        """The same secret under the primary key (rotation)."""
        return self.encrypt(user_id, self.decrypt(user_id, key_id, ciphertext))
