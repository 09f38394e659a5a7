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
    """What a check reserved of each bucket, and the headers that tell the client where it stands.

    `reserved` is each bucket's cost when Postgres counted it, 0 when the database was down and
    this process checked the call by itself (`local`): its real usage is then charged to the
    quotas and budget in full once the database is back, but not to the rates, which the
    local check already applied (charging them afterwards would lock the caller out for as
    long as the outage lasted).
    """

    buckets: Sequence[Bucket] = ()
    headers: dict[str, str] = field(default_factory=dict)
    reserved: Sequence[float] = ()
    local: bool = False

    @classmethod
    def taken(cls, buckets: Sequence[Bucket], headers: dict[str, str]) -> Decision:
        return cls(buckets, headers, [bucket.cost for bucket in buckets])

    @classmethod
    def uncounted(cls, buckets: Sequence[Bucket]) -> Decision:
        return cls(buckets, {}, [0.0] * len(buckets), local=True)

    @property
    def counted(self) -> bool:
        return not self.local

    def as_counted(self) -> Decision:
        """A local decision whose check Postgres turned out to have counted (its answer was lost): each
        bucket reserved its cost."""
        return Decision.taken(self.buckets, self.headers) if self.local else self

    def corrections(self, used: Callable[[Bucket], float]) -> list[tuple[Bucket, float]]:
        """What to charge (or give back) per bucket, once the call's real use of each is known."""
        return [
            (bucket, used(bucket) - reserved)
            for bucket, reserved in zip(self.buckets, self.reserved, strict=True)
            if not (self.local and bucket.kind == "g")
        ]

    def joined(self, other: Decision) -> Decision:
        """Two checks of one call as one (e.g. a turn's request rate, then its tokens and budget)."""
        return Decision(
            [*self.buckets, *other.buckets],
            {**self.headers, **other.headers},
            [*self.reserved, *other.reserved],
            self.local or other.local,
        )
