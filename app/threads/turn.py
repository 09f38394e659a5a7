"""One turn's state, from the thread's lock to its stored reply."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from app.calls import Call
from app.models import ThreadMessage
from app.threads.profiles import Profile

ROUTE = "threads.messages"


@dataclass(slots=True, kw_only=True)
class Turn:
    """A locked thread, the stored user message, and the upstream call that answers it."""

    thread_id: uuid.UUID
    profile: Profile
    lock: datetime
    user_message: ThreadMessage
    call: Call
    payload: dict[str, Any] = field(default_factory=dict)
