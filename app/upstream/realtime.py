"""Minting realtime client secrets: through the SDK, or simulated offline."""

from __future__ import annotations

import secrets
import time
from typing import Any, Protocol

import openai

from app.upstream.retry import RetryPolicy


class RealtimeSecrets(Protocol):
    simulated: bool

    async def create(self, body: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """OpenAI's `{value, expires_at, session}` and the upstream request id."""
        ...


class OpenAIRealtimeSecrets:
    simulated = False

    def __init__(self, sdk: openai.AsyncOpenAI, retry: RetryPolicy) -> None:
        self.sdk = sdk
        self.retry = retry

    async def create(self, body: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        response = await self.retry.run(
            lambda _: self.sdk.realtime.client_secrets.create(
                expires_after=body["expires_after"], session=body["session"]
            )
        )
        return response.to_dict(), response._request_id


class SimulatedRealtimeSecrets:
    """A secret of the right shape that no realtime server accepts: `ek_sim_...`."""

    simulated = True

    async def create(self, body: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        session = {**body["session"], "id": "sess_sim_" + secrets.token_hex(8), "object": "realtime.session"}
        expires_at = int(time.time()) + int(body["expires_after"]["seconds"])
        return {"value": "ek_sim_" + secrets.token_hex(16), "expires_at": expires_at, "session": session}, None
