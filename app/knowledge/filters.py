"""OpenAI's attribute filters, validated, and compiled to SQL on `vector_store_file.attributes`.

A comparison is `{"type": eq|ne|gt|gte|lt|lte|in|nin, "key": ..., "value": ...}`; a compound is
`{"type": "and"|"or", "filters": [...]}`, nested as deep as `MAX_DEPTH`. Values are strings,
numbers and booleans (lists of strings and numbers for `in` and `nin`). What they mean here:

- `eq` / `in`: the attribute is present and equal (numbers compare as numbers: 1 equals 1.0);
- `ne` / `nin`: the attribute is absent or different;
- `gt`, `gte`, `lt`, `lte`: the attribute is present, of the value's type (number or string),
  and ordered so (numbers numerically, strings as the database collates them); a boolean
  cannot be ordered and is refused.

The SQL takes keys and values as parameters (jsonb), never as text spliced into the statement.
A filter that is not one of these raises `InvalidFilters`: a 400 naming `filters`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from app.errors import InvalidRequest

MAX_DEPTH = 5
MAX_COMPARISONS = 50
MAX_LIST_VALUES = 100

Scalar = StrictStr | StrictInt | StrictFloat | StrictBool
ListItem = StrictStr | StrictInt | StrictFloat
ORDERINGS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


class InvalidFilters(InvalidRequest):
    """A search's `filters` that are not OpenAI's attribute filters."""

    def __init__(self, message: str) -> None:
        super().__init__(message, param="filters")


class ComparisonFilter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["eq", "ne", "gt", "gte", "lt", "lte", "in", "nin"]
    key: str = Field(min_length=1, max_length=64)
    value: Scalar | list[ListItem]


class CompoundFilter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["and", "or"]
    filters: list[Filter] = Field(min_length=1)


Filter = Annotated[ComparisonFilter | CompoundFilter, Field(discriminator="type")]
CompoundFilter.model_rebuild()
FILTER = TypeAdapter[ComparisonFilter | CompoundFilter](Filter)


def parse_filters(raw: object) -> ComparisonFilter | CompoundFilter | None:
    """A request's `filters` (JSON as decoded), validated; None for none. Raises `InvalidFilters`."""
    if raw is None:
        return None
    try:
        parsed = FILTER.validate_python(raw)
    except PydanticValidationError as error:
        first = error.errors()[0]
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"])
        raise InvalidFilters(f"Invalid 'filters{where}': {first['msg']}.") from None
    check_filters(parsed)
    return parsed


def check_filters(root: ComparisonFilter | CompoundFilter) -> None:
    """What the schema cannot say: values that fit their comparison, and bounded size and depth."""
    comparisons = 0
    pending: list[tuple[ComparisonFilter | CompoundFilter, int]] = [(root, 1)]
    while pending:
        node, depth = pending.pop()
        if depth > MAX_DEPTH:
            raise InvalidFilters(f"Filters may nest at most {MAX_DEPTH} levels deep.")
        if isinstance(node, CompoundFilter):
            pending.extend((child, depth + 1) for child in node.filters)
            continue
        comparisons += 1
        _check_comparison(node)
    if comparisons > MAX_COMPARISONS:
        raise InvalidFilters(f"Filters may hold at most {MAX_COMPARISONS} comparisons.")


def _check_comparison(node: ComparisonFilter) -> None:
    if node.type in ("in", "nin"):
        if not isinstance(node.value, list) or not node.value:
            raise InvalidFilters(f"The value of an '{node.type}' filter on '{node.key}' must be a non-empty list.")
        if len(node.value) > MAX_LIST_VALUES:
            raise InvalidFilters(f"An '{node.type}' filter holds at most {MAX_LIST_VALUES} values.")
    elif isinstance(node.value, list):
        raise InvalidFilters(
            f"The value of an '{node.type}' filter on '{node.key}' must be a string, number or boolean."
        )
    elif node.type in ORDERINGS and isinstance(node.value, bool):
        raise InvalidFilters(f"A '{node.type}' filter on '{node.key}' compares numbers or strings, not booleans.")


def filter_sql(node: ComparisonFilter | CompoundFilter, params: list[object], column: str) -> str:
    """A boolean SQL expression of `node` on the jsonb `column`; its keys and values are appended to
    `params` and referred to by position ($n), after those already there."""
    if isinstance(node, CompoundFilter):
        joiner = " AND " if node.type == "and" else " OR "
        return "(" + joiner.join(filter_sql(child, params, column) for child in node.filters) + ")"
    params.append(node.key)
    attribute = f"({column} -> ${len(params)}::text)"
    params.append(orjson.dumps(node.value).decode())
    value = f"${len(params)}::jsonb"
    if node.type == "eq":
        return f"({attribute} = {value})"
    if node.type == "ne":
        return f"({attribute} IS DISTINCT FROM {value})"
    if node.type == "in":
        return f"coalesce({value} @> {attribute}, false)"
    if node.type == "nin":
        return f"NOT coalesce({value} @> {attribute}, false)"
    # jsonb orders values of different types by type (a string is below every number): compare like with like.
    params.append("number" if isinstance(node.value, int | float) else "string")
    return f"(jsonb_typeof({attribute}) = ${len(params)}::text AND {attribute} {ORDERINGS[node.type]} {value})"
