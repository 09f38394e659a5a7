"""A small typed hub for what one part of the process tells the others.

Three things cross domain lines: a caller refused by their own limits (counted by the
metrics, kept for the refusals report), a usage row recorded (metrics, the access line's
model) and a principal or key changed (caches of principals and of per-user upstream
clients). Each is a `Topic`; a component subscribes when it is built, in the runtime's one
ordered place, and publishes without knowing who listens.

Listeners run on the response path: they must not block, and one that raises is logged
and skipped, never failing the request that published.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from app.usage.record import UsageRecord

log = logging.getLogger("app.events")

T = TypeVar("T")


class Topic(Generic[T]):
    """Listeners of one kind of event, called in the order they subscribed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._listeners: list[Callable[[T], None]] = []

    def subscribe(self, listener: Callable[[T], None]) -> None:
        self._listeners.append(listener)

    def publish(self, event: T) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("listener of %s failed", self.name)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A call refused by one of the caller's own limits (never reached the upstream)."""

    user_id: str | None
    route: str
    code: str


@dataclass(frozen=True, slots=True)
class PrincipalChanged:
    """What a cache must forget: a key (`key:<hash>`), a user (`user:<id>`), or everything (`all`)."""

    what: str

    @property
    def kind(self) -> str:
        return self.what.partition(":")[0]

    @property
    def value(self) -> str:
        return self.what.partition(":")[2]


@dataclass(frozen=True, slots=True)
class UpstreamHealth:
    """An operator's upstream failed a call (connect failure, 5xx, 429), maybe into a cool-down, or
    answered again after failing."""

    upstream: str
    failed: bool
    cooling: bool


@dataclass(slots=True)
class EventHub:
    refusals: Topic[Refusal] = field(default_factory=lambda: Topic("refusals"))
    usage: Topic[UsageRecord] = field(default_factory=lambda: Topic("usage"))
    principals: Topic[PrincipalChanged] = field(default_factory=lambda: Topic("principals"))
    # An image batch made progress (an item ended, the batch was cancelled): its event streams wake.
    batches: Topic[uuid.UUID] = field(default_factory=lambda: Topic("batches"))
    upstreams: Topic[UpstreamHealth] = field(default_factory=lambda: Topic("upstreams"))
