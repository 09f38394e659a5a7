"""Building the messages a run sends upstream: instructions, context, history window, the run's own tail.

Pure functions, no I/O: what goes upstream is decided here and nowhere else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from app.errors import InvalidRequest
from app.threads.profiles import PLACEHOLDER, Profile, placeholders
from app.tokens import estimate_tokens

CONTEXT_HEADING = "Context about the user, from the app:"


@dataclass(frozen=True, slots=True)
class PromptValues:
    """What templates may use."""

    user_id: str
    profile: str
    chat_type: str | None = None
    goal_id: str | None = None
    context: dict[str, Any] = field(default_factory=dict)
    date: str = field(default_factory=lambda: datetime.now(UTC).date().isoformat())


@dataclass(frozen=True, slots=True)
class HistoryItem:
    """A stored message as the window sees it: the text that was (or would be) sent upstream, and its
    content parts when it has more than text (sent as Chat Completions parts)."""

    role: str
    text: str
    parts: list[dict[str, Any]] | None = None

    def message(self) -> dict[str, Any]:
        if self.parts is None:
            return {"role": self.role, "content": self.text}
        return {"role": self.role, "content": self.parts}


def _text(value: object) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def format_context(context: dict[str, Any]) -> str:
    """`key: value` lines, sorted so the same context always reads the same."""
    return "\n".join(f"{key}: {_text(context[key])}" for key in sorted(context))


def _context_value(context: dict[str, Any], path: list[str]) -> object:
    value: object = context
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def render(template: str, values: PromptValues, args: str = "") -> str:
    """Fill `{{name}}` placeholders; a value the app did not send renders as nothing."""

    def fill(match: re.Match[str]) -> str:
        name: str = match.group(1)
        if name == "context":
            return format_context(values.context)
        if name.startswith("context."):
            return _text(_context_value(values.context, name.split(".")[1:]))
        if name == "args":
            return args
        return _text(getattr(values, name, None))

    return PLACEHOLDER.sub(fill, template)


def expand_shortcut(profile: Profile, content: str, values: PromptValues) -> str | None:
    """The full prompt a `/command args` message stands for, or None when it is not a shortcut.

    What follows the command fills `{{args}}`, or is appended when the template has no slot.
    """
    if not content.startswith("/"):
        return None
    command, _, rest = content.strip().partition(" ")
    template = profile.shortcuts.get(command.lower())
    if template is None:
        return None
    args = rest.strip()
    expanded = render(template, values, args)
    if args and "args" not in placeholders(template):
        expanded = f"{expanded}\n\n{args}"
    return expanded


def system_messages(instructions: str, values: PromptValues, *, context_inline: bool) -> list[dict[str, str]]:
    """The instructions, then the context when the instructions do not place it themselves."""
    messages = [{"role": "system", "content": instructions}] if instructions else []
    if values.context and not context_inline:
        messages.append({"role": "system", "content": f"{CONTEXT_HEADING}\n{format_context(values.context)}"})
    return messages


def window(
    history: list[HistoryItem], *, count: int, tokens: int | None, chars_left: float | None
) -> list[HistoryItem]:
    """The newest `count` messages (at least the newest one) within `tokens` and `chars_left`.

    `history` is newest first; the result is oldest first, as it is sent.
    """
    kept: list[HistoryItem] = []
    used_tokens = used_chars = 0
    for item in history[: max(count, 1)]:
        used_tokens += estimate_tokens(item.text)
        used_chars += len(item.text)
        if kept and tokens is not None and used_tokens > tokens:
            break
        if kept and chars_left is not None and used_chars > chars_left:
            break
        kept.append(item)
    kept.reverse()
    return kept


def build_messages(
    head: list[dict[str, str]],
    history: list[HistoryItem],
    tail: list[dict[str, Any]],
    *,
    count: int,
    tokens: int | None,
    max_prompt_chars: float | None,
    max_messages: float | None,
) -> list[dict[str, Any]]:
    """Instructions + context + the history window + the run's own tail (tool calls and their outputs).

    The window shrinks to fit the tier's caps (a long thread is never the user's fault), down to
    the newest message; a prompt that does not fit even so is refused.
    """
    fixed = sum(len(message["content"]) for message in head) + sum(len(str(item.get("content") or "")) for item in tail)
    if history:
        fixed += len(history[0].text)
    if max_prompt_chars is not None and fixed > max_prompt_chars:
        raise InvalidRequest(
            f"The thread's newest message with the instructions and context has {fixed} characters;"
            f" your tier allows at most {max_prompt_chars:g}.",
            param="content",
        )
    chars_left = (
        None if max_prompt_chars is None else max_prompt_chars - fixed + (len(history[0].text) if history else 0)
    )
    if max_messages is not None:
        count = min(count, int(max_messages) - len(head) - len(tail))
    kept = window(history, count=count, tokens=tokens, chars_left=chars_left)
    return [*head, *(item.message() for item in kept), *tail]
