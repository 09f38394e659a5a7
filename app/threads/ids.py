"""Object ids as the Assistants API writes them: a prefix and the row's uuid in hex (`thread_9f0c...`).

Rows keep a uuid (16 bytes, the index stays small); only the wire sees the prefix. An id
that is not ours (wrong prefix, not hex) reads as no id at all: a 404, like an unknown one.
"""

from __future__ import annotations

import uuid

THREAD, MESSAGE, RUN, STEP = "thread_", "msg_", "run_", "step_"
# Ours are prefix + 32 hex digits; paths and cursors longer than this are not ours.
MAX_ID_LENGTH = 64


def public_id(prefix: str, value: uuid.UUID) -> str:
    return prefix + value.hex


def parse_id(prefix: str, value: str | None) -> uuid.UUID | None:
    """The uuid of one of our ids, or None when it is not one."""
    if value is None or not value.startswith(prefix) or len(value) != len(prefix) + 32:
        return None
    try:
        return uuid.UUID(hex=value[len(prefix) :])
    except ValueError:
        return None
