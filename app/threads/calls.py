"""One turn's state from the lock to its usage row, and what plain and streamed turns share."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from app.auth.principal import Principal
from app.models import ThreadMessage
from app.ratelimit.limiter import Decision
from app.registry import ModelSpec
from app.threads.profiles import Profile
from app.usage.record import Status, UsageRecord

ROUTE = "threads.messages"


@dataclass(slots=True)
class Turn:
    """One turn's state, from the lock to the usage row."""

    principal: Principal
    request_id: str
    thread_id: uuid.UUID
    profile: Profile
    spec: ModelSpec
    lock: datetime
    user_message: ThreadMessage
    started: float
    payload: dict[str, Any] = field(default_factory=dict)
    decision: Decision | None = None
    prompt_estimate: int = 0
    status: Status = "ok"  # ok, simulated or fallback: who answered

    @property
    def simulated(self) -> bool:
        return self.status in ("simulated", "fallback")

    def record(self, **values: Any) -> UsageRecord:
        return UsageRecord(
            request_id=self.request_id,
            user_id=self.principal.user_id,
            api_key_id=self.principal.api_key_id,
            route=ROUTE,
            model=self.spec.id,
            latency_ms=(time.perf_counter() - self.started) * 1000,
            decision=self.decision,
            thread_id=self.thread_id,
            **values,
        )

    def headers(self, upstream_request_id: str | None) -> dict[str, str]:
        headers = dict(self.decision.headers) if self.decision else {}
        if self.simulated:
            headers["x-gateway-simulated"] = "true"
        if self.status == "fallback":
            headers["x-gateway-fallback"] = "true"
        if upstream_request_id:
            headers["x-upstream-request-id"] = upstream_request_id
        return headers
