"""The client-secret request and response, in OpenAI's shape plus the preset choice."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"] = "created_at"
    seconds: int = Field(description="Within the preset's bounds (OpenAI allows 10..7200).")


class ClientSecretCreate(BaseModel):
    """OpenAI's request body, where the server's preset decides the session.

    `role` and `language` pick the preset (with the official SDK, pass them in
    `extra_body`). In `session` a client may set only what the preset leaves open:
    `audio.output.voice` from its allowed voices, and `instructions` to append when the
    preset allows it. `type` and `model` are accepted when they agree with the preset.
    """

    model_config = ConfigDict(extra="forbid")

    role: str = Field(examples=["student"])
    language: str = Field("en", examples=["en", "es"])
    expires_after: ExpiresAfter | None = None
    session: dict[str, Any] | None = None


class ClientSecret(BaseModel):
    """OpenAI's answer: the secret the client connects with, its expiry and the session."""

    value: str
    expires_at: int
    session: dict[str, Any]
