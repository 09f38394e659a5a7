"""Request and response shapes of `/v1/me/openai-key`: the key goes in, never out."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

MIN_KEY_CHARS = 8
MAX_KEY_CHARS = 512


class OpenAIKeyStore(BaseModel):
    """Your own OpenAI key, checked with the upstream before it is stored."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    # SecretStr: masked in reprs and marked write-only (`format: password`) in the OpenAPI document.
    api_key: SecretStr = Field(description="The key itself, e.g. `sk-...`. Stored encrypted; never returned.")

    @field_validator("api_key")
    @classmethod
    def _looks_like_a_key(cls, value: SecretStr) -> SecretStr:
        key = value.get_secret_value()
        if not MIN_KEY_CHARS <= len(key) <= MAX_KEY_CHARS or not key.isascii() or not key.isprintable() or " " in key:
            # It goes into an Authorization header: printable ASCII, no spaces. The message never quotes it.
            raise ValueError(f"must be the key itself: {MIN_KEY_CHARS} to {MAX_KEY_CHARS} printable characters")
        return value


class OpenAIKeyPublic(BaseModel):
    """What the gateway shows of a stored key: its last four characters and when it was stored and checked."""

    last4: str = Field(description="The key's last four characters, to tell keys apart.")
    created_at: datetime
    validated_at: datetime = Field(description="When the upstream last accepted the key.")
