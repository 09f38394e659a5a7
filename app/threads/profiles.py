"""Assistant profiles: the `[profile.NAME]` tables of the assistants file, validated at start-up.

The file is shared (realtime voice presets live beside the profiles), so only the
top-level `profile` table is read here and every other key is left alone. A bad
profile stops start-up with the reason, the way a bad catalog does.
"""

from __future__ import annotations

import re
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.errors import ErrorCode, InvalidRequest

PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
PLACEHOLDER_NAME = re.compile(r"^(user_id|profile|chat_type|goal_id|date|args|context(\.[A-Za-z0-9_-]+)*)$")
PROFILE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,99}$")
SHORTCUT = re.compile(r"^/[a-z0-9][a-z0-9_-]{0,40}$")
# The most history a run reads, whatever a profile asks: it bounds the read and the prompt.
MAX_HISTORY_MESSAGES = 200

Fallback = Literal["default", "simulated", "never"]


def http_url(value: str | None) -> str | None:
    """A context URL: http or https, or none."""
    if value is not None and not value.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return value


def placeholders(template: str) -> list[str]:
    return PLACEHOLDER.findall(template)


def _check_template(template: str, *, shortcut: bool) -> str:
    """Instructions may use the context; shortcuts use {{args}} instead.

    A shortcut is expanded when the user message is stored, before the context is
    fetched; the context is in the system prompt, where a shortcut can refer to it.
    """
    allowed = "user_id, profile, chat_type, goal_id, date, " + ("args" if shortcut else "context, context.KEY")
    for name in placeholders(template):
        is_context = name == "context" or name.startswith("context.")
        if not PLACEHOLDER_NAME.match(name) or (is_context if shortcut else name == "args"):
            raise ValueError(f"unknown placeholder {{{{{name}}}}}; use {allowed}")
    return template


class Profile(BaseModel):
    """How one assistant answers: model, instructions, window, shortcuts, context and fallback."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str  # the table's key
    display_name: str | None = None
    model: str = "default-chat"
    # A template: {{user_id}}, {{chat_type}}, {{goal_id}}, {{date}}, {{context}}, {{context.KEY}}.
    instructions: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    history_messages: int = Field(20, ge=0, le=MAX_HISTORY_MESSAGES)
    history_tokens: int | None = Field(None, ge=1, le=1_000_000)
    # `/ptm` -> a full prompt; {{args}} is what the user typed after the command.
    shortcuts: dict[str, str] = {}
    chat_types: list[str] = []
    # default: follow FALLBACK_TO_SIMULATED; simulated: always fall back; never: never.
    fallback: Fallback = "default"
    context_url: str | None = None
    context_ttl_seconds: float | None = Field(None, ge=0, le=86_400, allow_inf_nan=False)
    context_timeout_seconds: float | None = Field(None, gt=0, le=30, allow_inf_nan=False)
    # The tiers whose users may use this profile; None: every tier. Each must be allowed the model.
    tiers: list[str] | None = Field(None, min_length=1)

    @field_validator("instructions")
    @classmethod
    def _instructions_template(cls, value: str) -> str:
        return _check_template(value, shortcut=False)

    @field_validator("shortcuts")
    @classmethod
    def _shortcuts(cls, value: dict[str, str]) -> dict[str, str]:
        for command, template in value.items():
            if not SHORTCUT.match(command):
                raise ValueError(f"shortcut {command!r} must look like /name (lower case, digits, - or _)")
            if not template.strip():
                raise ValueError(f"shortcut {command} expands to nothing")
            _check_template(template, shortcut=True)
        return value

    @field_validator("context_url")
    @classmethod
    def _context_url(cls, value: str | None) -> str | None:
        return http_url(value)

    def allows(self, tier: str) -> bool:
        return self.tiers is None or tier in self.tiers

    @property
    def uses_context_inline(self) -> bool:
        """True when the instructions place the context themselves."""
        return any(name == "context" or name.startswith("context.") for name in placeholders(self.instructions))


class Profiles(BaseModel):
    """Every profile the operator configured, and the chat types that select them."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    profiles: dict[str, Profile] = Field(alias="profile", min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _names_from_keys(cls, data: object) -> object:
        """Each profile is named by its table's key (`[profile.coach]` is `coach`)."""
        if not isinstance(data, dict):
            return data
        tables = data.get("profile")
        if not isinstance(tables, dict):
            return data
        for name in tables:
            if not PROFILE_NAME.match(name):
                raise ValueError(f"profile name {name!r} must be lower case letters, digits, - or _")
        named = {name: {**table, "name": name} if isinstance(table, dict) else table for name, table in tables.items()}
        return {**data, "profile": named}

    @model_validator(mode="after")
    def _chat_types_are_unique(self) -> Profiles:
        owners: dict[str, str] = {}
        for name, profile in self.profiles.items():
            for chat_type in profile.chat_types:
                if chat_type in owners:
                    raise ValueError(
                        f"chat_type {chat_type!r} is claimed by profiles {owners[chat_type]!r} and {name!r}"
                    )
                owners[chat_type] = name
        return self

    @cached_property
    def by_chat_type(self) -> dict[str, Profile]:
        return {chat_type: profile for profile in self.profiles.values() for chat_type in profile.chat_types}

    @cached_property
    def max_history(self) -> int:
        """How many recent messages a run reads: enough for the widest window."""
        return max(profile.history_messages for profile in self.profiles.values())

    def get(self, name: str, *, param: str = "profile") -> Profile:
        profile = self.profiles.get(name)
        if profile is None:
            raise InvalidRequest(
                f"Unknown profile '{name}'; known: {', '.join(sorted(self.profiles))}.",
                param=param,
                code=ErrorCode.UNKNOWN_PROFILE,
            )
        return profile

    def for_chat_type(self, chat_type: str) -> Profile:
        profile = self.by_chat_type.get(chat_type)
        if profile is None:
            raise InvalidRequest(
                f"Unknown chat_type '{chat_type}'; known: {', '.join(sorted(self.by_chat_type))}.",
                param="chat_type",
                code=ErrorCode.UNKNOWN_CHAT_TYPE,
            )
        return profile

    def choose(self, profile: str | None, chat_type: str | None) -> Profile:
        """The profile a new thread names directly or through its chat type."""
        if profile is None and chat_type is None:
            raise InvalidRequest("Name a 'profile' (or a 'chat_type' that maps to one).", param="profile")
        chosen = self.get(profile) if profile is not None else None
        by_type = self.for_chat_type(chat_type) if chat_type is not None else None
        if chosen is not None and by_type is not None and chosen.name != by_type.name:
            raise InvalidRequest(
                f"chat_type '{chat_type}' belongs to profile '{by_type.name}', not '{chosen.name}'.",
                param="chat_type",
            )
        result = chosen or by_type
        assert result is not None
        return result


def load_profiles(path: Path) -> Profiles:
    """Parse and validate the `[profile.*]` tables; a broken file stops start-up with the reason.

    What the profiles name elsewhere (models, tiers, context hosts) is checked by app/configcheck.py."""
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
        return Profiles.model_validate({"profile": data.get("profile", {})})
    except (OSError, tomllib.TOMLDecodeError, ValidationError) as error:
        raise SystemExit(f"invalid ASSISTANTS_FILE {path}: {error}") from error
