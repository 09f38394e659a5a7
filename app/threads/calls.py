"""One turn's state from the lock to its usage row, and what plain and streamed turns share."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

from app.models import ThreadMessage
from app.threads.profiles import Profile
from app.usage.call import UpstreamCall
from app.usage.record import UsageRecord

ROUTE = "threads.messages"


@dataclass(slots=True, kw_only=True)
class Turn(UpstreamCall):
    """One turn's state, from the lock to the usage row."""

    route: ClassVar[str] = ROUTE

    thread_id: uuid.UUID
    profile: Profile
    lock: datetime
    user_message: ThreadMessage
    payload: dict[str, Any] = field(default_factory=dict)

    def record(self, **values: Any) -> UsageRecord:
        # Not super(): dataclasses with slots=True are new classes, which breaks its zero-argument form.
        return UpstreamCall.record(self, thread_id=self.thread_id, **values)
