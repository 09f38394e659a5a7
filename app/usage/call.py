"""One upstream call's bookkeeping, from its limit check to its usage row and response headers.

Chat completions and thread turns both answer through the chat backends; this is what
they share: who asked, which model, what the limits reserved, who answered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from app.auth.principal import Principal
from app.errors import GatewayError
from app.ratelimit.limiter import Decision
from app.registry import ModelSpec
from app.upstream.errors import upstream_failed
from app.upstream.simulated import chars_to_tokens
from app.usage.record import Status, UsageRecord, usage_fields

log = logging.getLogger("app.upstream")

T = TypeVar("T")


@dataclass(slots=True, kw_only=True)
class UpstreamCall:
    route: ClassVar[str]

    principal: Principal
    request_id: str
    spec: ModelSpec
    decision: Decision | None = None
    prompt_estimate: int = 0
    started: float = field(default_factory=time.perf_counter)
    status: Status = "ok"  # ok, simulated or fallback: who answered

    @property
    def simulated(self) -> bool:
        return self.status in ("simulated", "fallback")

    def record(self, **values: Any) -> UsageRecord:
        return UsageRecord.of(
            self.principal,
            request_id=self.request_id,
            route=self.route,
            model=self.spec.id,
            latency_ms=(time.perf_counter() - self.started) * 1000,
            decision=self.decision,
            **values,
        )

    def finished(self, usage: dict[str, Any] | None, completion_chars: int, **values: Any) -> UsageRecord:
        """The row of a call that got an answer: the upstream's `usage`, else our estimate, marked.

        Simulated answers cost nothing: no upstream was paid for them.
        """
        estimated = usage is None
        if estimated:
            prompt, completion, cached = self.prompt_estimate, chars_to_tokens(completion_chars), 0
        else:
            prompt, completion, cached = usage_fields(usage)
        return self.record(
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            tokens_estimated=estimated,
            cost_usd=0.0 if self.simulated else self.spec.token_cost(prompt, completion, cached),
            **values,
        )

    async def answer(
        self,
        backend_simulated: bool,
        attempt: Callable[[], Awaitable[T]],
        fallback: Callable[[], Awaitable[T]],
        *,
        may_fall_back: bool,
        record: Callable[[UsageRecord], None],
        stream: bool,
    ) -> T:
        """`attempt()`; when the upstream itself failed and falling back is allowed, `fallback()` instead.

        A failure that is not answered simulated leaves its usage row (status error) and is raised.
        """
        self.status = "simulated" if backend_simulated else "ok"
        try:
            return await attempt()
        except GatewayError as error:
            if not (may_fall_back and upstream_failed(error)):
                record(self.record(status="error", http_status=error.status_code, stream=stream, error_code=error.code))
                raise
            log.warning("upstream failed (%s), answering simulated: %s", self.route, error.message)
            self.status = "fallback"
            return await fallback()

    def headers(self, upstream_request_id: str | None) -> dict[str, str]:
        """The limits' headers, and whether a simulated provider answered."""
        headers = dict(self.decision.headers) if self.decision else {}
        if self.simulated:
            headers["x-gateway-simulated"] = "true"
        if self.status == "fallback":
            headers["x-gateway-fallback"] = "true"
        if upstream_request_id:
            headers["x-upstream-request-id"] = upstream_request_id
        return headers
