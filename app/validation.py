"""What a request may carry toward the database: text, ids, JSON values and instants it can store.

Postgres refuses NUL (U+0000) in `text` and `jsonb`, and no UTF-8 encoder can write a lone
surrogate (U+D800..U+DFFF), which Python's JSON parser lets through from `"\\ud800"`. Either one
reaching a statement was a 500, sometimes after the work was done (an image generated and
charged, then not stored). So every string a request schema carries is a `Text` (or one of the
bounded ids below), every free-form JSON value is walked by `check_json`, and cursors' instants
go through `utc_instant`: all refused with a 400 naming the field, before any statement runs
and before any upstream call.

Errors are pydantic's (`PydanticCustomError`), so a schema's field fails like any other
validation error: our 400, `param` naming the field (app/errors.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BeforeValidator, Field, StringConstraints
from pydantic_core import PydanticCustomError

# Column widths these ids are stored in (app/models): a longer one is refused here, not by Postgres.
USER_ID_MAX = 200
PROFILE_MAX = 100
TIER_MAX = 50
# Nesting and integers a JSON value from a client may have: deep enough for any real context,
# shallow enough that no encoder or prompt renderer recurses far; integers as Postgres and
# orjson take them (64 bits).
JSON_MAX_DEPTH = 16
INT_MIN, INT_MAX = -(2**63), 2**64 - 1
BIGINT_MAX = 2**63 - 1


def encoding_problem(value: str) -> str | None:
    """Why `value` cannot be encoded as UTF-8 (a lone surrogate), or None when it can."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "must be valid Unicode text: no lone surrogates (\\ud800 to \\udfff)"
    return None


def text_problem(value: str) -> str | None:
    """Why `value` cannot be stored as text, or None when it can."""
    if "\x00" in value:
        return "must not contain NUL characters (\\u0000)"
    return encoding_problem(value)


def _text(value: Any) -> Any:
    # Before pydantic's own str validation: its length check cannot measure a lone surrogate
    # and would answer with a confusing message. Anything not a str is left to that validation.
    if isinstance(value, str):
        problem = text_problem(value)
        if problem is not None:
            raise PydanticCustomError("invalid_text", problem)
    return value


# Text a request may carry: any str but one the database cannot store.
Text = Annotated[str, BeforeValidator(_text)]


# Ids as their columns store them (app/models), for bodies, paths and queries alike (query and path
# parameters take no `Field(...)`, so the bounds travel in the type).
UserId = Annotated[str, BeforeValidator(_text), StringConstraints(min_length=1, max_length=USER_ID_MAX)]
ProfileName = Annotated[str, BeforeValidator(_text), StringConstraints(min_length=1, max_length=PROFILE_MAX)]


MAX_METADATA_PAIRS = 16


def _check_metadata(value: dict[str, str]) -> dict[str, str]:
    if len(value) > MAX_METADATA_PAIRS:
        raise ValueError(f"at most {MAX_METADATA_PAIRS} pairs")
    for key, item in value.items():
        if not 1 <= len(key) <= 64:
            raise ValueError("keys are 1 to 64 characters")
        if len(item) > 512:
            raise ValueError(f"the value of {key!r} is longer than 512 characters")
    return value


# The API's `metadata` on every object that has one.
Metadata = Annotated[
    dict[Text, Text],
    AfterValidator(_check_metadata),
    Field(description="Up to 16 string pairs the app keeps with the object (keys 64, values 512 characters)."),
]


def json_problem(
    value: Any, max_depth: int = JSON_MAX_DEPTH, text: Callable[[str], str | None] = text_problem
) -> tuple[str, str] | None:
    """The first part of a parsed JSON value nothing downstream can take: (path, reason), or None.

    Strings (keys too) must pass `text` (storable text by default), numbers be finite and within
    64 bits, and the nesting at most `max_depth` deep (orjson, the prompt renderer and Postgres
    all stop somewhere).
    """
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            problem = text(item)
            if problem is not None:
                return path, problem
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int):
            if not INT_MIN <= item <= INT_MAX:
                return path, "integers must fit in 64 bits"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return path, "numbers must be finite (no NaN or Infinity)"
        elif isinstance(item, dict | list):
            if depth >= max_depth:
                return path, f"nests deeper than {max_depth} levels"
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                label = str(key)
                problem = text(key) if isinstance(key, str) else None
                if problem is not None:
                    return path, f"a key {problem}"
                stack.append((child, f"{path}.{label}" if path else label, depth + 1))
        else:
            return path, f"unexpected {type(item).__name__}"
    return None


J = TypeVar("J")


def check_json(value: J, max_depth: int = JSON_MAX_DEPTH) -> J:
    """An `AfterValidator` for free-form JSON fields (a turn's `context`): see `json_problem`."""
    found = json_problem(value, max_depth)
    if found is not None:
        path, problem = found
        # The field is the error's location; the part inside it is named in the message.
        where = f"at '{path}': " if path else ""
        raise PydanticCustomError("invalid_json_value", "{where}{problem}", {"where": where, "problem": problem})
    return value


def utc_instant(text: str) -> datetime:
    """An instant from a cursor we wrote (ISO 8601 in UTC): ValueError for anything else.

    Python parses years 1 to 9999 at any offset up to a day, but an instant such as year 1 at
    +14:00 lies before year 1 in UTC and cannot be encoded for Postgres (OverflowError deep in
    the driver). Our cursors always carry UTC, so any other offset is not ours.
    """
    when = datetime.fromisoformat(text)
    if when.utcoffset() != timedelta(0):
        raise ValueError(f"not a UTC instant: {text!r}")
    return when.astimezone(UTC)
