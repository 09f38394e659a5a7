"""What one upstream call leaves behind: its usage row, and the reservation it settles."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from app.errors import ErrorCode
from app.ratelimit.buckets import Bucket, Decision

Status = Literal["ok", "error", "cancelled", "simulated", "fallback"]

# The columns the writer settles, with the array type asyncpg sends for each.
COLUMNS = (
    ("call_id", "uuid[]"),
    ("created_at", "timestamptz[]"),
    ("request_id", "text[]"),
    ("user_id", "text[]"),
    ("api_key_id", "uuid[]"),
    ("route", "text[]"),
    ("model", "text[]"),
    ("status", "text[]"),
    ("http_status", "int[]"),
    ("stream", "bool[]"),
    ("prompt_tokens", "int[]"),
    ("completion_tokens", "int[]"),
    ("cached_tokens", "int[]"),
    ("tokens_estimated", "bool[]"),
    ("images", "int[]"),
    ("cost_usd", "float8[]"),
    ("latency_ms", "float8[]"),
    ("ttft_ms", "float8[]"),
    ("upstream_request_id", "text[]"),
    ("error_code", "text[]"),
    ("thread_id", "uuid[]"),
    ("detail", "jsonb[]"),
    ("upstream", "text[]"),
)


@dataclass(slots=True)
class UsageRecord:
    call_id: uuid.UUID
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
    upstream: str | None = None  # the operator's upstream (or "default" for a user's own key) that answered
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # The limits this call reserved, settled against its real usage when written.
    decision: Decision | None = None

    def used(self, bucket: Bucket) -> float:
        """How much of a bucket this call really used."""
        if bucket.name == "tokens":
            return float(self.prompt_tokens + self.completion_tokens)
        if bucket.name == "budget":
            return self.cost_usd
        if bucket.name == "images":
            return float(self.images)
        if bucket.name == "realtime_seconds":  # a realtime session's own row says how long it lasted
            return float((self.detail or {}).get("seconds", 0.0))
        return 1.0

    def corrections(self, counted: bool) -> list[tuple[Bucket, float]]:
        """Real usage minus what Postgres holds reserved for the call (see `Decision.corrections`)."""
        return self.decision.corrections(self.used, counted=counted) if self.decision is not None else []

    def to_json(self) -> dict[str, Any]:
        """The row and its reservation as JSON, for the spool."""
        values = {name: getattr(self, name) for name, _ in COLUMNS}
        values["call_id"] = str(self.call_id)
        values["api_key_id"] = str(self.api_key_id) if self.api_key_id else None
        values["thread_id"] = str(self.thread_id) if self.thread_id else None
        values["created_at"] = self.created_at.isoformat()
        values["decision"] = decision_json(self.decision)
        return values

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> UsageRecord:
        fields = dict(values)
        fields["call_id"] = uuid.UUID(fields["call_id"])
        fields["api_key_id"] = uuid.UUID(fields["api_key_id"]) if fields.get("api_key_id") else None
        fields["thread_id"] = uuid.UUID(fields["thread_id"]) if fields.get("thread_id") else None
        fields["created_at"] = datetime.fromisoformat(fields["created_at"])
        fields["decision"] = decision_from_json(fields.get("decision"))
        return cls(**fields)


def decision_json(decision: Decision | None) -> dict[str, Any] | None:
    if decision is None:
        return None
    return {
        "buckets": [asdict(bucket) for bucket in decision.buckets],
        "local": decision.local,
    }


def decision_from_json(values: dict[str, Any] | None) -> Decision | None:
    if values is None:
        return None
    buckets = [Bucket(**{**bucket, "code": ErrorCode(bucket["code"])}) for bucket in values["buckets"]]
    return Decision(buckets, {}, bool(values["local"]))
