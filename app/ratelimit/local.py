"""The limits a process keeps by itself while Postgres cannot be reached.

Rates (GCRA) and counted quotas are checked in memory against the tier's limit divided by
RATELIMIT_LOCAL_DIVISOR, the number of processes expected to share the load: together the
processes stay near the real limit without talking to each other. Budgets are money and
are not guessed at here: the limiter fails them closed (or open, if so configured). What
calls used while the database was away is charged to the calendar quotas and budgets once
it returns; rates are not charged again afterwards (the local limit already applied).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from app.ratelimit.buckets import Bucket

MAX_ENTRIES = 100_000


class LocalLimiter:
    def __init__(self, divisor: float) -> None:
        self.divisor = divisor
        self._values: dict[str, tuple[float, float]] = {}  # key -> (value, expires at, monotonic)

    def take(self, buckets: Sequence[Bucket]) -> Bucket | None:
        """Reserve every rate and quota bucket or none; the first bucket that refuses, else None."""
        now = time.monotonic()
        updates: list[tuple[str, float, float]] = []
        for bucket in buckets:
            if bucket.kind == "b":
                continue
            limit = bucket.limit / self.divisor
            value, expires = self._values.get(bucket.key, (0.0, 0.0))
            if bucket.kind == "g":
                # GCRA, as in Postgres: value is the theoretical arrival time.
                start = max(value, now)
                new = start + bucket.cost * (bucket.period / limit) if limit > 0 else float("inf")
                if new - now > bucket.period + 1e-6:
                    return bucket
                updates.append((bucket.key, new, new))
            else:
                used = value if expires > now else 0.0
                if used + bucket.cost > limit + 1e-9:
                    return bucket
                updates.append((bucket.key, used + bucket.cost, max(expires, now + bucket.period)))
        if len(self._values) > MAX_ENTRIES:
            self._values = {key: entry for key, entry in self._values.items() if entry[1] > now}
        for key, value, expires in updates:
            self._values[key] = (value, expires)
        return None
