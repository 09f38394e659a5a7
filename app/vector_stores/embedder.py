"""Embedding chunks and queries through the one call pipeline (app/calls.py), as a user's calls.

Each upstream request is one pipeline call: reserved against the owner's embedding limits and
budget before it is sent, answered by whoever the pipeline decides (the simulated provider in
simulated mode, or for a user switched to it), and recorded as one usage row under its own route,
`vector_stores.embeddings`, so usage reports show what knowledge cost. The model is the catalog's
knowledge model, asked for the 1536 dimensions the chunk table holds. A failed upstream is never
stood in for by the simulated provider: its vectors beside real ones would corrupt the index.

Chunks go in batches bounded by inputs and tokens (`batches`); the answer is asked for in base64
(a quarter of the bytes of JSON floats) and decoded here into float32 arrays: a file's vectors wait
in memory until all are in, 6 kB each that way rather than 49 kB as a list of Python floats.
"""

from __future__ import annotations

import array
import base64
import binascii
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TypeAlias

from app.auth.principal import Principal
from app.calls import Calls
from app.embeddings.service import embeddings_call
from app.errors import UpstreamError
from app.knowledge.chunk import Chunk
from app.models.knowledge import EMBEDDING_DIMENSIONS
from app.ratelimit.limiter import Limiter
from app.registry import Catalog, ModelSpec
from app.tokens import estimate_tokens

ROUTE = "vector_stores.embeddings"


def batches(chunks: Sequence[Chunk], max_inputs: int, max_tokens: int) -> Iterator[list[Chunk]]:
    """`chunks` in order, in runs of at most `max_inputs` and (but for a single larger chunk) `max_tokens`."""
    batch: list[Chunk] = []
    tokens = 0
    for chunk in chunks:
        if batch and (len(batch) >= max_inputs or tokens + chunk.tokens > max_tokens):
            yield batch
            batch, tokens = [], 0
        batch.append(chunk)
        tokens += chunk.tokens
    if batch:
        yield batch


Vector: TypeAlias = "array.array[float]"  # of float32 ("f"): one embedding


def decode_vectors(answer: dict[str, Any], inputs: int) -> list[Vector]:
    """The answer's vectors (one per input, checked by the caller), in input order, each of 1536 dimensions."""
    vectors: list[Vector] = [array.array("f") for _ in range(inputs)]
    for position, item in enumerate(answer["data"]):
        index = item.get("index", position) if isinstance(item, dict) else None
        raw = item.get("embedding") if isinstance(item, dict) else None
        if not isinstance(index, int) or not 0 <= index < inputs:
            raise UpstreamError("The upstream's answer has an embedding out of place.", billed=True)
        vectors[index] = _vector(raw)
    if any(len(vector) != EMBEDDING_DIMENSIONS for vector in vectors):
        raise UpstreamError(f"The upstream's embeddings are not of {EMBEDDING_DIMENSIONS} dimensions.", billed=True)
    return vectors


def _vector(raw: Any) -> Vector:
    """An embedding as the upstream sent it (base64 of little-endian float32, or a list of numbers); empty
    when it is neither."""
    if isinstance(raw, str):
        try:
            packed = array.array("f", base64.b64decode(raw, validate=True))
        except (binascii.Error, ValueError):
            return array.array("f")
        if sys.byteorder != "little":
            packed.byteswap()
        return packed
    if isinstance(raw, list) and all(isinstance(value, int | float) for value in raw):
        return array.array("f", raw)
    return array.array("f")


class Embedder:
    def __init__(self, catalog: Catalog, limiter: Limiter, calls: Calls) -> None:
        self.catalog = catalog
        self.limiter = limiter
        self.calls = calls

    @property
    def model(self) -> str:
        return self.catalog.knowledge_embedding_model

    @property
    def spec(self) -> ModelSpec:
        return self.catalog.by_name[self.model]

    async def embed(
        self, principal: Principal, texts: Sequence[str], *, request_id: str, detail: dict[str, Any] | None = None
    ) -> list[Vector]:
        """One pipeline call for `texts`; raises the pipeline's errors (a refusal by the owner's limits
        is `RateLimited`, an upstream failure after the client's retries `UpstreamError` or `Unavailable`)."""
        spec = self.spec
        payload: dict[str, Any] = {"model": spec.id, "input": list(texts), "encoding_format": "base64"}
        if spec.adjustable_dimensions:
            payload["dimensions"] = EMBEDDING_DIMENSIONS
        _, _, vectors = await embeddings_call(
            self.calls,
            self.limiter,
            principal,
            spec,
            payload,
            tokens=sum(estimate_tokens(text) for text in texts),
            length=EMBEDDING_DIMENSIONS,
            inputs=len(texts),
            route=ROUTE,
            request_id=request_id,
            read=lambda answer: decode_vectors(answer, len(texts)),
            detail=detail,
        )
        return vectors

    def batch_tokens(self, principal: Principal, configured: int) -> int:
        """How many tokens one call may carry: the setting, and no more than the owner's tokens per
        minute (a larger call could never pass that limit)."""
        per_minute = self.limiter.limit(principal, "embedding_tokens_per_minute")
        return max(1, min(configured, int(per_minute))) if per_minute is not None else configured
