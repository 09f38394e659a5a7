"""An in-memory guard per client address in front of authentication.

Only failures are counted, so valid callers never touch it and a flood of bad keys
is refused before it reaches the database. It lives in process memory (slowapi's
`limits` storage): cheap, synchronous without I/O, and per process by design.
"""

from __future__ import annotations

from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter


class FailedAuthGuard:
    def __init__(self, failures_per_minute: int) -> None:
        self.limit = parse(f"{failures_per_minute}/minute")
        self.limiter = MovingWindowRateLimiter(MemoryStorage())
        self.retry_after = 60

    def blocked(self, client: str) -> bool:
        return not self.limiter.test(self.limit, client)

    def failed(self, client: str) -> None:
        self.limiter.hit(self.limit, client)
