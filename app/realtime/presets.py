"""Voice presets: what a client may ask for when it wants a realtime secret.

They live in the assistants file beside the assistant profiles, as `[voice_preset.NAME]`
tables, and are validated at start-up (their models and tiers by app/configcheck.py): a
client picks a preset by role and language and may only choose what the preset leaves open.
A preset may give some tiers a model of their own (`tier_models`), so one role can serve a
tier that may not use its main model.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# OpenAI's realtime voices as of late 2026.
Voice = Literal["alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar"]
MIN_TTL, MAX_TTL = 10, 7200


class VoicePreset(BaseModel):
    """One role's realtime session, with instructions per language."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: str
    # The model of every tier that `tier_models` leaves out.
    model: str = "default-realtime"
    # Tier name -> the model its users get instead of `model`, e.g. a cheaper one for the free tier.
    tier_models: dict[str, str] = {}
    instructions: dict[str, str] = Field(min_length=1, description="language code -> instructions")
    voice: Voice = "marin"
    allowed_voices: list[Voice] = []
    ttl_seconds: int = Field(600, ge=MIN_TTL, le=MAX_TTL)
    min_ttl_seconds: int = Field(60, ge=MIN_TTL, le=MAX_TTL)
    max_ttl_seconds: int = Field(1800, ge=MIN_TTL, le=MAX_TTL)
    allow_instructions_append: bool = False
    # The tiers whose users may use this preset; None: every tier. Each must be allowed its model.
    tiers: list[str] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> VoicePreset:
        if not self.min_ttl_seconds <= self.ttl_seconds <= self.max_ttl_seconds:
            raise ValueError("ttl_seconds must lie within min_ttl_seconds..max_ttl_seconds")
        if self.allowed_voices and self.voice not in self.allowed_voices:
            raise ValueError(f"voice {self.voice!r} is not among allowed_voices")
        return self

    @property
    def voices(self) -> list[str]:
        return list(self.allowed_voices or [self.voice])

    def allows(self, tier: str) -> bool:
        return self.tiers is None or tier in self.tiers

    def model_for(self, tier: str) -> str:
        """The model (id or alias) that `tier`'s users get: its `tier_models` entry, else `model`."""
        return self.tier_models.get(tier, self.model)


class VoicePresets(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    presets: dict[str, VoicePreset] = Field(default_factory=dict, alias="voice_preset")

    def find(self, role: str) -> VoicePreset | None:
        return next((preset for preset in self.presets.values() if preset.role == role), None)


def load_voice_presets(path: Path) -> VoicePresets:
    """Parse the `[voice_preset.*]` tables; a bad file stops start-up (models and tiers: app/configcheck.py)."""
    try:
        with path.open("rb") as handle:
            return VoicePresets.model_validate(tomllib.load(handle))
    except (OSError, tomllib.TOMLDecodeError, ValidationError) as error:
        raise SystemExit(f"invalid ASSISTANTS_FILE {path}: {error}") from error
