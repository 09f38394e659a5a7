"""What a voice preset decides of a live session, checked against what a client sent or the upstream reports.

A client may change a realtime session while it runs (`session.update`, on the relay's WebSocket or
a WebRTC call's data channel). Its instructions stay the preset's: text a client sends is appended
where the preset allows appending (at most MAX_APPENDED_INSTRUCTIONS characters), else dropped; its
voice stays among the preset's allowed voices. The relay rewrites a client's event before it goes
upstream (app/realtime/session.py); a call's watcher sees the upstream's `session.updated` and sends
the corrections back (app/realtime/sideband.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.realtime.presets import VoicePreset

MAX_APPENDED_INSTRUCTIONS = 4000


@dataclass(frozen=True, slots=True)
class SessionRules:
    instructions: str  # the preset's, in the session's language (with what was appended at set-up)
    allow_append: bool
    voice: str
    voices: tuple[str, ...]

    @classmethod
    def of(cls, preset: VoicePreset | None, instructions: str, voice: str) -> SessionRules:
        """A preset's rules; a preset since removed from the file keeps its instructions and voice, no more."""
        if preset is None:
            return cls(instructions, False, voice, (voice,))
        return cls(instructions, preset.allow_instructions_append, preset.voice, tuple(preset.voices))

    def corrections(self, session: dict[str, Any]) -> dict[str, Any]:
        """The fields of `session` the preset decides that are not as it allows, as they must be (empty: none)."""
        fixes: dict[str, Any] = {}
        if "instructions" in session:
            asked = session["instructions"]
            wanted = self._instructions(asked)
            if wanted != asked:
                fixes["instructions"] = wanted
        audio = session.get("audio")
        output = audio.get("output") if isinstance(audio, dict) else None
        if isinstance(output, dict) and "voice" in output and output["voice"] not in self.voices:
            fixes["audio"] = {"output": {"voice": self.voice}}
        return fixes

    def _instructions(self, asked: object) -> str:
        base = self.instructions
        if asked == base:
            return base
        if not (self.allow_append and isinstance(asked, str) and asked):
            return base
        extra = asked.removeprefix(base + "\n\n")
        if len(extra) > MAX_APPENDED_INSTRUCTIONS:
            return base
        return f"{base}\n\n{extra}"
