"""What one upstream call leaves behind."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from app.ratelimit.buckets import Bucket, Decision

Status = Literal["ok", "error", "cancelled", "simulated", "fallback"]

COLUMNS = (
    "created_at",
    "request_id",
    "user_id",
    "api_key_id",
    "route",
    "model",
    "status",
    "http_status",
    "stream",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "tokens_estimated",
    "images",
    "cost_usd",
    "latency_ms",
    "ttft_ms",
    "upstream_request_id",
    "error_code",
    "thread_id",
    "detail",
)


def usage_fields(usage: dict[str, Any] | None) -> tuple[int, int, int]:
    """(prompt, completion, cached) tokens of an OpenAI `usage` object."""
    if not usage:
        return 0, 0, 0
    details = usage.get("prompt_tokens_details") or {}
    return (
        int(usage.get("prompt_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
        int(details.get("cached_tokens") or 0),
    )


@dataclass(slots=True)
class UsageRecord:
    request_id: str
    user_id: str
    api_key_id: uuid.UUID | None
    route: str
    model: str
    status: Status
    http_status: int
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    tokens_estimated: bool = False
    images: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    upstream_request_id: str | None = None
    error_code: str | None = None
    thread_id: uuid.UUID | None = None
    detail: dict[str, Any] | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # The limits this call reserved, settled against its real usage when written.
    decision: Decision | None = None

    def row(self) -> tuple[object, ...]:
        values = [getattr(self, name) for name in COLUMNS]
        values[-1] = orjson.dumps(self.detail).decode() if self.detail is not None else None  # jsonb as text
        return tuple(values)

    def used(self, bucket: Bucket) -> float:
        """How much of a bucket this call really used."""
        if bucket.name == "tokens":
            return float(self.prompt_tokens + self.completion_tokens)
        if bucket.name == "budget":
            return self.cost_usd
        if bucket.name == "images":
            return float(self.images)
        return 1.0

    def corrections(self) -> list[tuple[Bucket, float]]:
        """Real usage minus what was reserved (nothing was, if the limits were not counted)."""
        if self.decision is None:
            return []
        return [(b, self.used(b) - r) for b, r in zip(self.decision.buckets, self.decision.reserved, strict=True)]
