"""OpenAI's static chunking strategy: chunks of at most `max_chunk_size_tokens`, each starting
`chunk_overlap_tokens` before the previous one ended.

The rules are OpenAI's: `max_chunk_size_tokens` from 100 to 4096 (default 800),
`chunk_overlap_tokens` from 0 to half of it (default 400); `{"type": "auto"}` is static 800/400.
Tokens are estimated as `app.tokens` does (about four characters each): no tokenizer is at hand
offline, so a chunk holds at most 4 x max characters. Chunks are cut between words, never inside
one (a "word" longer than a whole chunk, such as a long URL or a base64 blob, is the exception:
it is cut into chunk-sized pieces). Within the last quarter of its room a chunk ends at a sentence
or a line's end when there is one (at a paragraph's end, within the last half), and the overlap
starts at a sentence's start when that keeps at least half of it, so passages read whole.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.tokens import estimate_tokens

MIN_CHUNK_TOKENS = 100
MAX_CHUNK_TOKENS = 4096
DEFAULT_MAX_CHUNK_TOKENS = 800
DEFAULT_CHUNK_OVERLAP_TOKENS = 400
CHARS_PER_TOKEN = 4  # what app.tokens.estimate_tokens counts
WORD = re.compile(r"\S+")
SENTENCE_END = re.compile(r"[.!?\u2026][\"'\u201d\u2019)\]]*$")
# How strong a cut after a word is: none, a sentence's or a line's end, a paragraph's end.
NONE, SENTENCE, PARAGRAPH = 0, 1, 2


class StaticChunking(BaseModel):
    """`chunking_strategy.static`: both fields are required, as OpenAI requires them."""

    model_config = ConfigDict(extra="forbid")

    max_chunk_size_tokens: int = Field(ge=MIN_CHUNK_TOKENS, le=MAX_CHUNK_TOKENS, strict=True)
    chunk_overlap_tokens: int = Field(ge=0, strict=True)

    @model_validator(mode="after")
    def overlap_at_most_half(self) -> StaticChunking:
        if self.chunk_overlap_tokens * 2 > self.max_chunk_size_tokens:
            raise ValueError("chunk_overlap_tokens must not exceed half of max_chunk_size_tokens")
        return self


class AutoChunkingStrategy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["auto"]


class StaticChunkingStrategy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["static"]
    static: StaticChunking


# A request's `chunking_strategy` (vector store, file, file batch): `auto` or `static`.
ChunkingStrategyParam = Annotated[AutoChunkingStrategy | StaticChunkingStrategy, Field(discriminator="type")]

DEFAULT_STRATEGY = StaticChunkingStrategy(
    type="static",
    static=StaticChunking(
        max_chunk_size_tokens=DEFAULT_MAX_CHUNK_TOKENS, chunk_overlap_tokens=DEFAULT_CHUNK_OVERLAP_TOKENS
    ),
)


def resolve_strategy(strategy: AutoChunkingStrategy | StaticChunkingStrategy | None) -> StaticChunkingStrategy:
    """What a request's strategy means: none or `auto` is static 800/400, as OpenAI reports it back."""
    return strategy if isinstance(strategy, StaticChunkingStrategy) else DEFAULT_STRATEGY


@dataclass(frozen=True, slots=True)
class Chunk:
    text: str
    tokens: int


def chunk_text(
    text: str,
    max_tokens: int = DEFAULT_MAX_CHUNK_TOKENS,
    overlap_tokens: int = DEFAULT_CHUNK_OVERLAP_TOKENS,
) -> list[Chunk]:
    """`text` in chunks of at most `max_tokens` estimated tokens, each overlapping the one before by
    at most `overlap_tokens`; a chunk is a verbatim slice of `text`, from a word's start to a word's end."""
    if not MIN_CHUNK_TOKENS <= max_tokens <= MAX_CHUNK_TOKENS or not 0 <= overlap_tokens * 2 <= max_tokens:
        raise ValueError(f"no static chunking of {max_tokens} tokens with {overlap_tokens} overlapping")
    max_chars, overlap_chars = max_tokens * CHARS_PER_TOKEN, overlap_tokens * CHARS_PER_TOKEN
    starts, ends = _words(text, max_chars)
    if not starts:
        return []
    cuts = [
        _cut_after(text, ends[at], starts[at + 1] if at + 1 < len(starts) else len(text)) for at in range(len(starts))
    ]
    chunks: list[Chunk] = []
    first, last_end = 0, 0  # the chunk's first word; the previous chunk's end (exclusive word index)
    while True:
        end = _chunk_end(starts, ends, cuts, first, max_chars, floor=last_end + 1)
        piece = text[starts[first] : ends[end - 1]]
        chunks.append(Chunk(piece, estimate_tokens(piece)))
        if end == len(starts):
            return chunks
        first, last_end = max(_overlap_start(starts, ends, cuts, first, end, overlap_chars), first + 1), end


def chunk_with(text: str, strategy: StaticChunkingStrategy) -> list[Chunk]:
    return chunk_text(text, strategy.static.max_chunk_size_tokens, strategy.static.chunk_overlap_tokens)


def _words(text: str, max_chars: int) -> tuple[list[int], list[int]]:
    """Where each word starts and ends; a word longer than `max_chars` becomes pieces of that length."""
    starts: list[int] = []
    ends: list[int] = []
    for match in WORD.finditer(text):
        start, end = match.span()
        while end - start > max_chars:
            starts.append(start)
            ends.append(start + max_chars)
            start += max_chars
        starts.append(start)
        ends.append(end)
    return starts, ends


def _cut_after(text: str, word_end: int, next_start: int) -> int:
    gap = text[word_end:next_start]
    if "\n\n" in gap or next_start == len(text):
        return PARAGRAPH
    if "\n" in gap or SENTENCE_END.search(text, max(0, word_end - 4), word_end):
        return SENTENCE
    return NONE


def _chunk_end(starts: list[int], ends: list[int], cuts: list[int], first: int, max_chars: int, floor: int) -> int:
    """The exclusive index of the last word of the chunk from word `first`: as many words as fit,
    pulled back to a paragraph's or a sentence's end near the limit, never to `floor` or before."""
    fits = bisect.bisect_right(ends, starts[first] + max_chars)  # words [first, fits) fit
    fits = max(fits, first + 1)
    if fits == len(starts):
        return fits
    for strength, share in ((PARAGRAPH, 0.5), (SENTENCE, 0.75)):
        least = starts[first] + max_chars * share
        for at in range(fits - 1, max(first, floor - 1) - 1, -1):
            if ends[at] < least:
                break
            if cuts[at] >= strength:
                return at + 1
    return fits


def _overlap_start(
    starts: list[int], ends: list[int], cuts: list[int], first: int, end: int, overlap_chars: int
) -> int:
    """The first word of the next chunk: the earliest whose span to the chunk's end fits in the
    overlap, moved on to a sentence's start if that keeps at least half of the overlap."""
    if overlap_chars == 0:
        return end
    stop = ends[end - 1]
    start = max(bisect.bisect_left(starts, stop - overlap_chars), first)
    for at in range(start, end):
        if stop - starts[at] < overlap_chars / 2:
            break
        if at > 0 and cuts[at - 1] >= SENTENCE:
            return at
    return start
