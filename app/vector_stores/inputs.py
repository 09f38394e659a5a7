"""What requests name, read for the service: chunking strategies and file ids, each refused naming
where the request sent it (`chunking_strategy.static...`, `file_ids.2`, `files.0.file_id`)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import pydantic

from app.errors import InvalidRequest, invalid_request
from app.files.schemas import FILE
from app.knowledge.chunk import AutoChunkingStrategy, ChunkingStrategyParam, StaticChunkingStrategy, resolve_strategy
from app.threads.ids import parse_id
from app.vector_stores.errors import missing_file

STRATEGY = pydantic.TypeAdapter[Any](ChunkingStrategyParam)


def strategy_of(raw: object, param: str = "chunking_strategy") -> dict[str, Any]:
    """A request's `chunking_strategy` (a model, its JSON, or None) as the static strategy rows keep."""
    if isinstance(raw, AutoChunkingStrategy | StaticChunkingStrategy) or raw is None:
        return resolve_strategy(raw).model_dump()
    try:
        parsed: AutoChunkingStrategy | StaticChunkingStrategy = STRATEGY.validate_python(raw)
    except pydantic.ValidationError as error:
        raise named(error, param) from None
    return resolve_strategy(parsed).model_dump()


def named(error: pydantic.ValidationError, param: str) -> InvalidRequest:
    return invalid_request([{**item, "loc": (param, *item["loc"])} for item in error.errors()])


def file_uuids(values: Sequence[str], param: str) -> list[uuid.UUID]:
    """Our file ids as row ids; one that is not ours is the 404 of a file that does not exist, naming
    where the request sent it (`file_ids.2`)."""
    found = []
    for index, value in enumerate(values):
        parsed = parse_id(FILE, value)
        if parsed is None:
            raise missing_file(value, param.format(index=index))
        found.append(parsed)
    return found


def named_files(file_ids: Sequence[uuid.UUID], param: str) -> dict[uuid.UUID, str]:
    """Each file, once, with the name of the place the request first sent it."""
    names: dict[uuid.UUID, str] = {}
    for index, file_id in enumerate(file_ids):
        names.setdefault(file_id, param.format(index=index))
    return names
