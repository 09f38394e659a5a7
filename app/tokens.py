"""Token estimates, where the model's own tokenizer is not at hand.

About four characters a token: what limits reserve before a call, what a call's row says
when the upstream reported no usage (marked `tokens_estimated`), and what the simulated
provider reports.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

# What one image in a prompt may cost at most, in input tokens: OpenAI bills low detail at a
# fixed 85; high and auto by tiles or patches, up to about 1,445 tokens (tiles) or 1,536 patches
# times the model's multiplier (patches). Without the image's size at hand we reserve the bound.
IMAGE_INPUT_TOKENS_LOW = 85
IMAGE_INPUT_TOKENS_MAX = 2_500
# The chat format's own tokens: a few per message and a few to prime the reply.
TOKENS_PER_MESSAGE = 4
TOKENS_PER_REPLY = 3
# Request fields the upstream bills as input besides the messages.
BILLED_FIELDS = ("tools", "functions", "response_format", "tool_choice", "function_call", "prediction")


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


def _part_cost(part: object) -> tuple[int, int]:
    """(characters, image tokens) of one content part."""
    if not isinstance(part, dict):
        return len(orjson.dumps(part)), 0
    kind = part.get("type")
    if kind == "text" or (kind is None and "text" in part):
        return len(str(part.get("text", ""))), 0
    if kind == "image_url":
        image = part.get("image_url")
        detail = image.get("detail") if isinstance(image, dict) else None
        return 0, IMAGE_INPUT_TOKENS_LOW if detail == "low" else IMAGE_INPUT_TOKENS_MAX
    return len(orjson.dumps(part)), 0  # audio, files, anything new: its size as sent bounds its tokens


def billed_input(payload: dict[str, Any]) -> tuple[int, int]:
    """What a chat request sends the upstream that it bills as input: (characters, image tokens).

    Every message's text, its name, tool calls and tool results, every content part (images by
    their bound), and the request's tools, functions and schemas as the JSON they travel in.
    """
    chars = images = 0
    messages = payload.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                part_chars, part_images = _part_cost(part)
                chars += part_chars
                images += part_images
        elif content is not None:
            chars += len(content) if isinstance(content, str) else len(orjson.dumps(content))
        for name in ("name", "tool_calls", "function_call", "tool_call_id"):
            value = message.get(name)
            if value is not None:
                chars += len(value) if isinstance(value, str) else len(orjson.dumps(value))
    for name in BILLED_FIELDS:
        value = payload.get(name)
        if value is not None:
            chars += len(value) if isinstance(value, str) else len(orjson.dumps(value))
    return chars, images


def estimate_input_tokens(payload: dict[str, Any]) -> int:
    """The input tokens a chat request may be billed for, at worst (see `billed_input`)."""
    chars, images = billed_input(payload)
    messages = payload.get("messages")
    count = len(messages) if isinstance(messages, list) else 0
    return chars_to_tokens(chars) + images + TOKENS_PER_MESSAGE * count + TOKENS_PER_REPLY


def embedding_inputs(value: object) -> list[str | list[int]]:
    """An embeddings request's `input` as a list of inputs: a single text, or a single list of
    token ids, is one input; a list of texts or of token lists is several."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        return []
    tokens = [item for item in value if isinstance(item, int)]
    if tokens:
        return [tokens]
    return [item for item in value if isinstance(item, str | list)]


def embedding_tokens(item: str | list[int]) -> int:
    """One embedding input's tokens: counted for token ids, estimated for text."""
    return len(item) if isinstance(item, list) else estimate_tokens(item)
