"""Storing, showing and deleting a user's own OpenAI key; reading it back for their upstream clients.

A key is checked with the upstream before it is stored, sealed with AES-GCM (crypto.py)
and never returned or logged. Every change is broadcast with the auth NOTIFY `user:<id>`,
so each process drops the user's cached principal (`has_own_key`) and their upstream
client at once; this process drops them before the commit as well, so the caller's next
request already sees the change.

Simulated mode (no OPENAI_API_KEY) does not switch BYOK off: the key is checked against,
and then used with, OPENAI_BASE_URL. A gateway without a key of its own can thus serve
users who bring theirs, while everyone else gets simulated answers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.auth import repository as auth_repository
from app.auth.principal import Principal
from app.auth.service import Authenticator
from app.byok import repository
from app.byok.crypto import KeyCipher, UnreadableKey
from app.byok.schemas import OpenAIKeyPublic
from app.byok.vault import KeyVault
from app.config import Settings
from app.db import Database
from app.errors import ErrorCode, InvalidRequest, NotFound, PermissionDenied, RateLimited
from app.upstream.hub import Upstream

log = logging.getLogger("app.byok")

# Each check is an upstream call made for the user: a brake on using the gateway to test keys.
CHECKS_PER_MINUTE = 10
ROTATION_BATCH = 500


def _public(row: object) -> OpenAIKeyPublic:
    return OpenAIKeyPublic.model_validate(row, from_attributes=True)


class BYOKService:
    def __init__(self, vault: KeyVault, upstream: Upstream, authenticator: Authenticator, database: Database) -> None:
        self.cipher = vault.cipher
        self.database = database
        self.upstream = upstream
        self.authenticator = authenticator
        self.checks = parse(f"{CHECKS_PER_MINUTE}/minute")
        self.check_limiter = MovingWindowRateLimiter(MemoryStorage())

    async def store(self, principal: Principal, api_key: str) -> OpenAIKeyPublic:
        """Check the key with the upstream, then store it sealed (its own transaction, opened after the
        check); replaces any key stored before."""
        if not self.cipher.enabled:
            raise PermissionDenied(
                "Storing your own OpenAI key is not enabled on this gateway.", code=ErrorCode.BYOK_DISABLED
            )
        if not self.check_limiter.hit(self.checks, principal.user_id):
            raise RateLimited(
                f"At most {CHECKS_PER_MINUTE} key checks a minute; try again shortly.",
                code=ErrorCode.TOO_MANY_KEY_CHECKS,
                headers={"retry-after": "60"},
            )
        verdict = await self.upstream.check_key(api_key)  # unreachable: 502/504, nothing stored
        if verdict != "valid":
            reason = "rejected" if verdict == "rejected" else "refused access to the model list for"
            raise InvalidRequest(
                f"The upstream {reason} this key; nothing was stored.",
                param="api_key",
                code=ErrorCode.INVALID_OPENAI_KEY,
            )
        key_id, ciphertext = self.cipher.encrypt(principal.user_id, api_key)
        async with self.database.sessionmaker.begin() as session:
            row = await repository.put(
                session,
                user_id=principal.user_id,
                key_id=key_id,
                ciphertext=ciphertext,
                last4=api_key[-4:],
                validated_at=datetime.now(UTC),
            )
            public = _public(row)
            await self._changed(session, principal.user_id)
        log.info("stored an own OpenAI key", extra={"user_id": principal.user_id})
        return public

    async def show(self, session: AsyncSession, principal: Principal) -> OpenAIKeyPublic:
        row = await repository.get(session, principal.user_id)
        if row is None:
            raise NotFound(
                "You have not stored an OpenAI key; your calls use the gateway's.", code=ErrorCode.OPENAI_KEY_NOT_FOUND
            )
        return _public(row)

    async def delete(self, session: AsyncSession, principal: Principal) -> None:
        if not await repository.remove(session, principal.user_id):
            raise NotFound(
                "You have not stored an OpenAI key; your calls use the gateway's.", code=ErrorCode.OPENAI_KEY_NOT_FOUND
            )
        await self._changed(session, principal.user_id)
        log.info("deleted an own OpenAI key", extra={"user_id": principal.user_id})

    async def _changed(self, session: AsyncSession, user_id: str) -> None:
        await auth_repository.notify_changed(session, f"user:{user_id}")  # every process, at commit
        self.authenticator.forget(f"user:{user_id}")  # this one, now


@dataclass
class Rotation:
    key_id: str
    resealed: int = 0
    unreadable: list[str] = field(default_factory=list)


async def rotate(settings: Settings, sessionmaker: async_sessionmaker[AsyncSession]) -> Rotation:
    """Re-seal every stored key that is not under the first of BYOK_ENCRYPTION_KEYS, in batches.

    Run it after every process has restarted with the new key first in the list, so none
    keeps sealing under the old one. Rows under keys no longer configured are reported,
    not touched.
    """
    cipher = KeyCipher.from_texts([key.get_secret_value() for key in settings.byok_encryption_keys])
    if cipher.primary_id is None:
        raise ValueError("BYOK_ENCRYPTION_KEYS is empty: there is no key to rotate to")
    result = Rotation(cipher.primary_id)
    damaged: list[str] = []  # under a configured key, yet not authentic: left as they are
    while True:
        async with sessionmaker() as session, session.begin():
            rows = await repository.lock_rows_to_rotate(
                session,
                primary_id=cipher.primary_id,
                readable_ids=cipher.key_ids,
                skip_users=damaged,
                limit=ROTATION_BATCH,
            )
            for row in rows:
                try:
                    key_id, ciphertext = cipher.reencrypt(row.user_id, row.key_id, row.ciphertext)
                except UnreadableKey:
                    damaged.append(row.user_id)
                    continue
                await repository.reseal(session, row.user_id, key_id=key_id, ciphertext=ciphertext)
                result.resealed += 1
        if len(rows) < ROTATION_BATCH:
            break
    async with sessionmaker() as session:
        result.unreadable = sorted([*damaged, *await repository.users_not_under(session, cipher.key_ids)])
    return result
