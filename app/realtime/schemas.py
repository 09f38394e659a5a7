"""The client-secret request and response, in OpenAI's shape plus the preset choice."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.validation import Text


class ExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"] = "created_at"
    seconds: int = Field(description="Within the preset's bounds (OpenAI allows 10..7200).")


class SessionOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    voice: Text | None = Field(None, max_length=50, description="One of the role's allowed voices.")


class SessionAudio(BaseModel):
    model_config = ConfigDict(extra="forbid")

    output: SessionOutput | None = None


class SessionChoices(BaseModel):
    """What a client may say of the session: each field typed, so a list where a name belongs is a
    400 naming it. Any other field is refused by the service as the server's to set (`extra` is kept
    for that, not forwarded)."""

    model_config = ConfigDict(extra="allow")

    type: Text | None = Field(None, max_length=50, description="`realtime`, when sent.")
    model: Text | None = Field(None, max_length=100, description="The role's model (or an alias of it), when sent.")
    instructions: Text | None = Field(None, description="Appended to the role's, when the role allows it.")
    audio: SessionAudio | None = None


class ClientSecretCreate(BaseModel):
    """OpenAI's request body, where the server's preset decides the session.

    `role` and `language` pick the preset (with the official SDK, pass them in
    `extra_body`). In `session` a client may set only what the preset leaves open:
    `audio.output.voice` from its allowed voices, and `instructions` to append when the
    preset allows it. `type` and `model` are accepted when they agree with the preset.
    """

    model_config = ConfigDict(extra="forbid")

    role: Text = Field(max_length=100, examples=["student"])
    language: Text = Field("en", max_length=35, examples=["en", "es"])
    expires_after: ExpiresAfter | None = None
    session: SessionChoices | None = None


class ClientSecret(BaseModel):
    """OpenAI's answer: the secret the client connects with, its expiry and the session."""

    value: str
    expires_at: int
    session: dict[str, Any]


class CallAttach(BaseModel):
    """A call the client set up directly with a secret minted here: that secret, which it spends."""

    model_config = ConfigDict(extra="forbid")

    client_secret: Text = Field(max_length=500, description="The `value` of the secret the call was set up with.")


class RealtimeCallObject(BaseModel):
    """A WebRTC call the gateway watches: its preset, its caps and how it went."""

    id: str = Field(description="Ours (`rtc_...`), as the set-up's `Location` names it.")
    object: Literal["realtime.call"] = "realtime.call"
    status: Literal["connecting", "active", "ended"]
    source: Literal["gateway", "attached"] = Field(description="Set up through the gateway, or attached to it.")
    role: str
    language: str
    model: str
    created_at: int = Field(description="Unix seconds.")
    expires_at: int | None = Field(description="When the tier's session length ends it (Unix seconds).")
    ended_at: int | None
    ended_reason: str | None = Field(
        description="ended (the client or upstream ended it), hung_up_by_owner, session_seconds_exceeded, "
        "session_cost_exceeded, sideband_unavailable, setup_failed, setup_cancelled or setup_interrupted."
    )
    seconds: float = Field(description="How long it has lasted.")
    responses: int = Field(description="Responses metered.")
    cost_usd: str = Field(description="Their cost, exactly (a decimal string).")
    max_cost_usd: str = Field(description="The cost at which it is hung up.")
