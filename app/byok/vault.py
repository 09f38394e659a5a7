"""Users' OpenAI keys at rest: sealed with the configured keys, read back for their upstream clients."""

from __future__ import annotations

import logging

import asyncpg

from app.byok import repository
from app.byok.crypto import KeyCipher, UnreadableKey
from app.config import Settings
from app.db import DB_ERRORS
from app.errors import ErrorCode, Unavailable

log = logging.getLogger("app.byok")


class KeyVault:
    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self.cipher = KeyCipher.from_texts([key.get_secret_value() for key in settings.byok_encryption_keys])
        self.pool = pool

    async def load(self, user_id: str) -> str | None:
        """The user's key in clear, for their upstream client (a cache miss): one query, one decryption."""
        try:
            row = await repository.sealed_key(self.pool, user_id)
        except DB_ERRORS as error:
            log.error("could not read a user's own key, database unreachable: %s", error)
            raise Unavailable(
                "Your OpenAI key cannot be read right now; try again shortly.",
                code=ErrorCode.OPENAI_KEY_UNAVAILABLE,
                headers={"retry-after": "5"},
            ) from error
        if row is None:
            return None
        try:
            return self.cipher.decrypt(user_id, row["key_id"], row["ciphertext"])
        except UnreadableKey as error:
            log.error("a user's own key cannot be decrypted: %s", error, extra={"user_id": user_id})
            raise Unavailable(
                "Your stored OpenAI key cannot be read by this gateway (its encryption key is not configured). "
                "Store it again, or delete it to use the gateway's key.",
                code=ErrorCode.OPENAI_KEY_UNREADABLE,
            ) from error

    async def check_readable(self) -> None:
        """At start-up: say how many stored keys this process cannot decrypt."""
        try:
            unreadable = await repository.count_unreadable(self.pool, self.cipher.key_ids)
        except DB_ERRORS as error:
            log.warning("could not check the stored OpenAI keys: %s", error)
            return
        if unreadable:
            log.warning(
                "%d stored OpenAI keys are sealed under keys not in BYOK_ENCRYPTION_KEYS; those users get 503s",
                unreadable,
            )
