"""The usage ledger: one row per call, written pending when its limits are taken, settled exactly once.

How a call's row survives anything (the gateway killed at any instant, a commit whose
answer never came, the database away):

1. **Pending.** The statement that takes a call's limits also writes the call into
   `usage_pending`, with what it reserved (tokens, images, cost) and this process as
   `owner` (app/ratelimit/sql.py). Nothing reaches the upstream before that commit. (It does not
   wait for the WAL flush, app/db.py: a database crash can lose it, with the reservation it made,
   and the call is then charged in full when it settles, 2.)
2. **Settled once.** The usage writer inserts the call's row into `usage_event`, whose
   `call_id` is unique, and removes it from `usage_pending`, in one statement that returns
   the ids it settled; only those calls' reservations are corrected. A replayed flush (an
   ambiguous commit, a spool read twice) settles nothing again. A call's reservation is corrected
   against what Postgres holds: its worst case if the call was pending, nothing if it was not
   (checked by the process alone while the database was away, or its check's commit lost).
3. **Interrupted.** A pending call whose owner stopped beating (app/instances.py) is
   settled by any live replica as `interrupted`, at what it reserved: the reservation
   stands as the charge. (If its process was only slow to beat, its real row replaces it.)
4. **Spooled.** Rows the writer cannot write (the database away) go to a local spool file,
   fsynced, and are written from it when the database returns, at start-up included
   (app/usage/spool.py).

Usage the upstream reports is checked first (`clamp_usage`): negative, non-integer and
absurd values are clamped and flagged on the row (`detail.usage_flags`).
"""

from __future__ import annotations

import math
import random
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# The most tokens one call may report: more than any model's context. Beyond it, a report is absurd.
MAX_REPORTED_TOKENS = 10_000_000


def new_call_id() -> uuid.UUID:
    """A UUIDv7: time-ordered (ledger pages and partitions stay local), unique without coordination."""
    millis = time.time_ns() // 1_000_000
    rand_a, rand_b = random.getrandbits(12), random.getrandbits(62)
    return uuid.UUID(int=(millis << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b)


@dataclass(frozen=True, slots=True)
class PendingRow:
    """A call's row as its limit check writes it: who, what, and what it reserved."""

    call_id: uuid.UUID
    created_at: datetime
    request_id: str
    user_id: str
    api_key_id: uuid.UUID | None
    route: str
    model: str
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    images: int
    cost_usd: float
    thread_id: uuid.UUID | None


# (name, the array type asyncpg sends, the column's type when it differs)
PENDING_COLUMNS = (
    ("call_id", "uuid[]"),
    ("created_at", "timestamptz[]"),
    ("request_id", "text[]"),
    ("user_id", "text[]"),
    ("api_key_id", "uuid[]"),
    ("route", "text[]"),
    ("model", "text[]"),
    ("stream", "bool[]"),
    ("prompt_tokens", "int[]"),
    ("completion_tokens", "int[]"),
    ("images", "int[]"),
    ("cost_usd", "float8[]"),
    ("thread_id", "uuid[]"),
)


def pending_arrays(rows: list[tuple[int, PendingRow]]) -> list[list[Any]]:
    """Column arrays of pending rows, each row tagged with its check's number (the first array)."""
    arrays: list[list[Any]] = [[number for number, _ in rows]]
    for name, _ in PENDING_COLUMNS:
        arrays.append([getattr(row, name) for _, row in rows])
    return arrays


class MalformedUsage(ValueError):
    """A `usage` the upstream sent that is not numbers at all (text, objects): its answer is malformed."""


def clamp_usage(usage: dict[str, Any]) -> tuple[int, int, int, list[str]]:
    """(prompt, completion, cached) tokens of an OpenAI `usage` object, each a sane integer, and flags
    saying what had to be fixed: `not_integer` (a fraction, rounded up), `negative`, `absurd`,
    `cached_over_prompt`. A field that is not a number at all raises MalformedUsage."""
    flags: list[str] = []

    def field(value: object) -> int:
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MalformedUsage(f"usage holds {value!r} where a token count belongs")
        if isinstance(value, float):
            if value != value or value in (float("inf"), float("-inf")):
                raise MalformedUsage(f"usage holds {value!r} where a token count belongs")
            if not value.is_integer():
                flags.append("not_integer")
            value = math.ceil(value)
        if value < 0:
            flags.append("negative")
            return 0
        if value > MAX_REPORTED_TOKENS:
            flags.append("absurd")
            return MAX_REPORTED_TOKENS
        return value

    details = usage.get("prompt_tokens_details")
    cached_value = details.get("cached_tokens") if isinstance(details, dict) else None
    prompt = field(usage.get("prompt_tokens"))
    completion = field(usage.get("completion_tokens"))
    cached = field(cached_value)
    if cached > prompt:
        flags.append("cached_over_prompt")
        cached = prompt
    return prompt, completion, cached, sorted(set(flags))
