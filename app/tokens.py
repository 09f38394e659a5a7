"""Token estimates, where the model's own tokenizer is not at hand.

About four characters a token: what limits reserve before a call, what a call's row says
when the upstream reported no usage (marked `tokens_estimated`), and what the simulated
provider reports.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def chars_to_tokens(chars: int) -> int:
    return max(1, (chars + 3) // 4) if chars else 0


def estimate_tokens(text: str) -> int:
    return chars_to_tokens(len(text))


def content_chars(content: object) -> int:
    """Characters of a message's content: a string, or a list of parts with `text`."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(str(part.get("text", ""))) for part in content if isinstance(part, dict))
    return 0


def prompt_chars(messages: Iterable[dict[str, Any]]) -> int:
    return sum(content_chars(message.get("content")) for message in messages)


def estimate_prompt_tokens(messages: Iterable[dict[str, Any]]) -> int:
    return chars_to_tokens(prompt_chars(messages))
