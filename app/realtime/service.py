"""Minting a realtime secret: the preset decides the session, the client picks within it.

A minted secret is kept (its hash, the user and the session's preset): a call the client then sets up
with it can be attached, to be metered and capped (app/realtime/calls.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from app.auth.principal import Principal
from app.calls import Calls
from app.errors import ErrorCode, InvalidRequest, PermissionDenied
from app.ratelimit.limiter import Limiter
from app.realtime.presets import VoicePreset, VoicePresets
from app.realtime.rules import MAX_APPENDED_INSTRUCTIONS
from app.realtime.schemas import ClientSecretCreate, SessionAudio, SessionChoices
from app.realtime.store import CallStore
from app.registry import Catalog, ModelSpec

ROUTE = "realtime.client_secrets"


class RealtimeService:
    def __init__(
        self, catalog: Catalog, presets: VoicePresets, limiter: Limiter, calls: Calls, store: CallStore
    ) -> None:
        self.catalog = catalog
        self.presets = presets
        self.limiter = limiter
        self.calls = calls
        self.store = store

    async def create_secret(
        self, principal: Principal, body: ClientSecretCreate, request_id: str
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """The upstream's `{value, expires_at, session}` and the response headers."""
        preset, instructions, spec = self.choose(principal, body.role, body.language)
        ttl = body.expires_after.seconds if body.expires_after else preset.ttl_seconds
        if not preset.min_ttl_seconds <= ttl <= preset.max_ttl_seconds:
            raise InvalidRequest(
                f"expires_after.seconds must be {preset.min_ttl_seconds}..{preset.max_ttl_seconds} for this role.",
                param="expires_after.seconds",
            )
        session = self.session_for(preset, spec, instructions, body.session or SessionChoices())
        request = {"expires_after": {"anchor": "created_at", "seconds": ttl}, "session": session}
        call = await self.calls.open(
            principal,
            route=ROUTE,
            spec=spec,
            request_id=request_id,
            buckets=self.limiter.rate(principal, "requests", "realtime_requests_per_minute", 60.0, 1),
        )
        secret = await self.calls.invoke(call, lambda provider: provider.realtime_secret(request))
        minted = {"role": preset.role, "language": body.language, "expires_at": secret.body.get("expires_at")}
        call.finish(upstream_request_id=secret.request_id, detail=minted, upstream=secret.upstream)
        value, expires_at = secret.body.get("value"), secret.body.get("expires_at")
        if isinstance(value, str) and isinstance(expires_at, int):
            kept = {
                "user_id": principal.user_id,
                "answerer": call.lease.answerer,
                "upstream": secret.upstream,
                "model": spec.id,
                "role": preset.role,
                "language": body.language,
                "instructions": instructions,
                "voice": session["audio"]["output"]["voice"],
                "expires_at": datetime.fromtimestamp(expires_at, UTC),
            }
            await self.store.save_secret(value, kept)
        return secret.body, call.headers()

    def choose(self, principal: Principal, role: str, language: str) -> tuple[VoicePreset, str, ModelSpec]:
        """The caller's preset, its instructions in `language` and its model for the caller's tier; a
        400 naming `role` or `language` when there is none, a 403 when the caller's tier may not use it."""
        preset = self.presets.find(role)
        if preset is None:
            roles = ", ".join(sorted(p.role for p in self.presets.presets.values()))
            raise InvalidRequest(f"Unknown role '{role}'; known: {roles}.", param="role")
        instructions = preset.instructions.get(language)
        if instructions is None:
            languages = ", ".join(sorted(preset.instructions))
            raise InvalidRequest(f"Role '{role}' has no '{language}'; known: {languages}.", param="language")
        if not preset.allows(principal.tier):
            raise PermissionDenied(
                f"Role '{role}' is not available on your tier '{principal.tier}'.",
                param="role",
                code=ErrorCode.PRESET_NOT_ALLOWED,
            )
        spec = self.catalog.resolve(preset.model_for(principal.tier), principal.tier, "realtime")
        return preset, instructions, spec

    def session_for(
        self, preset: VoicePreset, spec: ModelSpec, instructions: str, asked: SessionChoices
    ) -> dict[str, Any]:
        """The session sent upstream (for a secret or a call); anything the client may not choose is a 400
        naming it.

        `model_fields_set` tells a field sent as null (refused where a value is needed) from one
        left out (the preset's choice).
        """
        sent = asked.model_fields_set
        unknown = set(asked.model_extra or {})
        if unknown:
            field = sorted(unknown)[0]
            raise InvalidRequest(f"session.{field} is set by the server for this role.", param=f"session.{field}")
        if "type" in sent and asked.type != "realtime":
            raise InvalidRequest("Only realtime sessions can be created here.", param="session.type")
        if "model" in sent and (asked.model is None or self.catalog.by_name.get(asked.model) != spec):
            raise InvalidRequest(f"This role uses the model '{spec.id}'.", param="session.model")
        if "instructions" in sent:
            extra = asked.instructions
            if not preset.allow_instructions_append:
                raise InvalidRequest("This role's instructions cannot be changed.", param="session.instructions")
            if extra is None or len(extra) > MAX_APPENDED_INSTRUCTIONS:
                raise InvalidRequest(
                    f"session.instructions must be text of at most {MAX_APPENDED_INSTRUCTIONS} characters.",
                    param="session.instructions",
                )
            instructions = f"{instructions}\n\n{extra}"
        voice = self._voice(preset, asked.audio)
        return {
            "type": "realtime",
            "model": spec.id,
            "instructions": instructions,
            "audio": {"output": {"voice": voice}},
        }

    @staticmethod
    def _voice(preset: VoicePreset, audio: SessionAudio | None) -> str:
        if audio is None:
            return preset.voice
        if audio.output is None:
            raise InvalidRequest("Only session.audio.output.voice may be chosen.", param="session.audio")
        voice = audio.output.voice if "voice" in audio.output.model_fields_set else preset.voice
        if voice not in preset.voices:
            raise InvalidRequest(
                f"Voice '{voice}' is not allowed for this role; allowed: {', '.join(preset.voices)}.",
                param="session.audio.output.voice",
            )
        return str(voice)
