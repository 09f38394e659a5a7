"""How many streams a user holds open, capped per tier (`max_concurrent_streams` in the catalog).

Every stream we serve counts: chat completions with `stream: true`, streamed thread turns and
image batch event streams. A stream is admitted where its request is (`Calls.open` for the
two that call the upstream, `BatchService.stream` for batch progress), before any limit is
taken or any upstream call is made, so a refused stream costs nothing and leaves no usage
row. Its slot is given back once, however the stream ends: the SSE response releases it when
it closes (app/sse.py), and a call that ends before a response took its slot releases it.

The count is per process, in memory: with `serve --workers N` behind one address, a user
may hold up to N times the cap. That is the point of it: it bounds what one user can make
one process hold (connections, tasks, wake-ups), without a database round trip per stream.
"""

from __future__ import annotations

from collections.abc import Callable

from app.auth.principal import Principal
from app.errors import ErrorCode, RateLimited

LIMIT = "max_concurrent_streams"
# A stream usually lasts seconds to minutes; the client should close one before trying again.
RETRY_AFTER_SECONDS = 5


class StreamSlot:
    """One admitted stream; `release` gives it back and is safe to call more than once."""

    __slots__ = ("_slots", "held", "user_id")

    def __init__(self, slots: StreamSlots, user_id: str) -> None:
        self._slots = slots
        self.user_id = user_id
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._slots._leave(self.user_id)


class StreamSlots:
    """Open streams per user in this process."""

    def __init__(self, limit: Callable[[Principal, str], float | None]) -> None:
        self._limit = limit  # the limiter's: an admin override wins over the tier
        self._open: dict[str, int] = {}

    def admit(self, principal: Principal) -> StreamSlot:
        """A slot for one more stream, or 429 `too_many_streams` when the user holds their tier's cap."""
        user_id = principal.user_id
        held = self._open.get(user_id, 0)
        cap = self._limit(principal, LIMIT)
        if cap is not None and held >= cap:
            raise RateLimited(
                f"You have {held} streams open; your tier allows {cap:g} at once. Close one and try again.",
                code=ErrorCode.TOO_MANY_STREAMS,
                headers={"retry-after": str(RETRY_AFTER_SECONDS)},
            )
        self._open[user_id] = held + 1
        return StreamSlot(self, user_id)

    def held_by(self, user_id: str) -> int:
        return self._open.get(user_id, 0)

    def _leave(self, user_id: str) -> None:
        left = self._open.get(user_id, 0) - 1
        if left > 0:
            self._open[user_id] = left
        else:
            self._open.pop(user_id, None)
