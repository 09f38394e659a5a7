"""Opaque pagination cursors: the sort key of the last item of a page, base64url of JSON.

Keyset cursors stay correct while rows are added: a page starts strictly after the
last item the client saw, so nothing is skipped or repeated.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import datetime

import orjson

from app.errors import InvalidRequest
from app.models import Thread, ThreadMessage
from app.validation import BIGINT_MAX, utc_instant

# Ours are well under 100 characters; a longer one is not ours and is not decoded.
MAX_CURSOR_LENGTH = 200


def _encode(parts: list[object]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(parts)).decode().rstrip("=")


def _decode(cursor: str) -> list[object]:
    try:
        parts = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, orjson.JSONDecodeError) as error:
        raise _invalid() from error
    if not isinstance(parts, list):
        raise _invalid()
    return parts


def _invalid() -> InvalidRequest:
    return InvalidRequest("Invalid 'cursor': pass back the next_cursor of a previous page.", param="cursor")


def thread_cursor(thread: Thread) -> str:
    return _encode(["t", thread.created_at.isoformat(), str(thread.id)])


def parse_thread_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    parts = _decode(cursor)
    try:
        kind, created_at, thread_id = parts
        if kind != "t":
            raise ValueError(kind)
        # Our instants are UTC: another offset could put it outside the years Postgres is sent.
        return utc_instant(str(created_at)), uuid.UUID(str(thread_id))
    except (TypeError, ValueError) as error:
        raise _invalid() from error


def message_cursor(message: ThreadMessage) -> str:
    return _encode(["m", message.seq])


def parse_message_cursor(cursor: str) -> int:
    parts = _decode(cursor)
    if len(parts) != 2 or parts[0] != "m" or not isinstance(parts[1], int) or isinstance(parts[1], bool):
        raise _invalid()
    if not 0 <= parts[1] <= BIGINT_MAX:  # `seq` is a bigint: beyond it the driver, not we, would refuse
        raise _invalid()
    return parts[1]
