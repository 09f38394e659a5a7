"""A caller's limits as the limiter takes them: buckets, and what a check decided."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from app.errors import ErrorCode

Kind = Literal["g", "q", "b"]  # GCRA rate, calendar quota, calendar budget


@dataclass(frozen=True, slots=True)
class Bucket:
    """One limit of one caller, and what this call costs against it."""

    name: str  # requests, tokens, budget, images, ...: how headers and errors name it
    key: str
    kind: Kind
    limit: float
    period: float  # GCRA: seconds to refill fully; calendar: seconds until the window ends
    cost: float
    code: ErrorCode = ErrorCode.RATE_LIMIT_EXCEEDED


@dataclass(slots=True)
class Decision:
    """The buckets a check took, and the headers that tell the client where it stands. `local`: the
    database was away and this process checked the call by itself (app/ratelimit/local.py)."""

    buckets: Sequence[Bucket] = ()
    headers: dict[str, str] = field(default_factory=dict)
    local: bool = False

    @property
    def counted(self) -> bool:
        return not self.local

    def corrections(self, used: Callable[[Bucket], float], *, counted: bool) -> list[tuple[Bucket, float]]:
        """What to charge (or give back) per bucket once the call's real use of each is known, against what
        Postgres holds: each bucket's cost where it `counted` the check (it found the call pending, however
        the check was decided), nothing where it did not. A call checked locally is then charged in full to
        its quotas and budget, but not to its rates, which the local check applied (charging them afterwards
        would lock the caller out for as long as the outage lasted)."""
        return [
            (bucket, used(bucket) - (bucket.cost if counted else 0.0))
            for bucket in self.buckets
            if counted or not (self.local and bucket.kind == "g")
        ]

    def joined(self, other: Decision) -> Decision:
        """Two checks of one call as one (e.g. a turn's request rate, then its tokens and budget)."""
        return Decision([*self.buckets, *other.buckets], {**self.headers, **other.headers}, self.local or other.local)
