"""Vector store requests and objects, as OpenAI's API shapes them (the SDK's `client.vector_stores`).

Requests are strict where OpenAI's are: unknown fields, a number where text belongs or `"3"` where
a number does are a 400 naming the field. A vector store file's id is its file's (`file-...`).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from app.assistants.schemas import Page
from app.knowledge.chunk import ChunkingStrategyParam
from app.knowledge.search import MAX_RESULTS
from app.threads.ids import MAX_ID_LENGTH
from app.validation import Metadata, Text

VS, VSFB = "vs_", "vsfb_"
Status = Literal["in_progress", "completed", "cancelled", "failed"]
StoreStatus = Literal["expired", "in_progress", "completed"]
# OpenAI's bounds: files named at a store's creation, files of one batch, attributes of a file.
MAX_STORE_FILES = 500
MAX_BATCH_FILES = 2000
MAX_ATTRIBUTES = 16
MAX_QUERY_CHARS = 4096
MAX_QUERIES = 16

ObjectIdText = Annotated[Text, Field(min_length=1, max_length=MAX_ID_LENGTH)]
AttributeValue = StrictStr | StrictBool | StrictInt | StrictFloat


def _check_attributes(value: dict[str, Any]) -> dict[str, Any]:
    if len(value) > MAX_ATTRIBUTES:
        raise ValueError(f"at most {MAX_ATTRIBUTES} attributes")
    for key, item in value.items():
        if not 1 <= len(key) <= 64:
            raise ValueError("keys are 1 to 64 characters")
        if isinstance(item, str) and len(item) > 512:
            raise ValueError(f"the value of {key!r} is longer than 512 characters")
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"the value of {key!r} must be a finite number")
    return value


Attributes = Annotated[
    dict[Text, AttributeValue],
    AfterValidator(_check_attributes),
    Field(description="Up to 16 pairs to filter searches on: strings (512 characters), numbers or booleans."),
]


class StoreExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    anchor: Literal["last_active_at"]
    days: int = Field(ge=1, le=365, strict=True)


class VectorStoreCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file_ids: list[ObjectIdText] = Field([], max_length=MAX_STORE_FILES)
    name: Text | None = Field(None, max_length=256)
    description: Text | None = Field(None, max_length=512, description="Accepted; not kept.")
    expires_after: StoreExpiresAfter | None = None
    chunking_strategy: ChunkingStrategyParam | None = Field(
        None, description="For `file_ids`; `auto` (static, 800 tokens, 400 overlapping) when left out."
    )
    metadata: Metadata | None = None


class VectorStoreUpdate(BaseModel):
    """Only the fields sent change; `null` clears `expires_after` (and `name`)."""

    model_config = ConfigDict(extra="forbid")

    name: Text | None = Field(None, max_length=256)
    expires_after: StoreExpiresAfter | None = None
    metadata: Metadata | None = None


class FileAttach(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file_id: ObjectIdText
    attributes: Attributes | None = None
    chunking_strategy: ChunkingStrategyParam | None = None


class FileAttributesUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    attributes: Attributes | None


class BatchCreate(BaseModel):
    """`file_ids` (with `attributes` and `chunking_strategy` for all) or `files` (each its own), not both."""

    model_config = ConfigDict(extra="forbid")

    file_ids: list[ObjectIdText] | None = Field(None, min_length=1, max_length=MAX_BATCH_FILES)
    files: list[FileAttach] | None = Field(None, min_length=1, max_length=MAX_BATCH_FILES)
    attributes: Attributes | None = None
    chunking_strategy: ChunkingStrategyParam | None = None


class SearchRankingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ranker: Literal["none", "auto", "default-2024-11-15"] | None = None
    score_threshold: float = Field(0.0, ge=0.0, le=1.0)


QueryText = Annotated[Text, Field(min_length=1, max_length=MAX_QUERY_CHARS)]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: QueryText | Annotated[list[QueryText], Field(min_length=1, max_length=MAX_QUERIES)]
    max_num_results: int = Field(10, ge=1, le=MAX_RESULTS, strict=True)
    filters: dict[str, Any] | None = Field(None, description="OpenAI's comparison or compound attribute filter.")
    ranking_options: SearchRankingOptions | None = None
    rewrite_query: StrictBool = False

    def queries(self) -> list[str]:
        return [self.query] if isinstance(self.query, str) else list(self.query)


# --- objects ------------------------------------------------------------------------------


class FileCounts(BaseModel):
    in_progress: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    total: int = 0


class VectorStoreObject(BaseModel):
    id: str
    object: Literal["vector_store"] = "vector_store"
    created_at: int
    name: str
    usage_bytes: int
    file_counts: FileCounts
    status: StoreStatus
    expires_after: StoreExpiresAfter | None
    expires_at: int | None
    last_active_at: int | None
    metadata: dict[str, str]


class FileLastError(BaseModel):
    code: Literal["server_error", "unsupported_file", "invalid_file", "rate_limit_exceeded"]
    message: str


class StaticChunkingObject(BaseModel):
    max_chunk_size_tokens: int
    chunk_overlap_tokens: int


class ChunkingStrategyObject(BaseModel):
    type: Literal["static"] = "static"
    static: StaticChunkingObject


class VectorStoreFileObject(BaseModel):
    id: str
    object: Literal["vector_store.file"] = "vector_store.file"
    created_at: int
    usage_bytes: int
    vector_store_id: str
    status: Status
    last_error: FileLastError | None
    chunking_strategy: ChunkingStrategyObject
    attributes: dict[str, str | bool | int | float]


class BatchObject(BaseModel):
    id: str
    object: Literal["vector_store.files_batch"] = "vector_store.files_batch"
    created_at: int
    vector_store_id: str
    status: Status
    file_counts: FileCounts


class VectorStoreDeleted(BaseModel):
    id: str
    object: Literal["vector_store.deleted"] = "vector_store.deleted"
    deleted: Literal[True] = True


class VectorStoreFileDeleted(BaseModel):
    id: str
    object: Literal["vector_store.file.deleted"] = "vector_store.file.deleted"
    deleted: Literal[True] = True


class VectorStoreList(Page):
    data: list[VectorStoreObject]


class VectorStoreFileList(Page):
    data: list[VectorStoreFileObject]


class ContentText(BaseModel):
    type: Literal["text"] = "text"
    text: str


class FileContentPage(BaseModel):
    """The file's text as its chunks hold it, in order (`client.vector_stores.files.content`)."""

    object: Literal["vector_store.file_content.page"] = "vector_store.file_content.page"
    data: list[ContentText]
    has_more: Literal[False] = False
    next_page: None = None


class SearchResultObject(BaseModel):
    file_id: str
    filename: str
    score: float
    attributes: dict[str, str | bool | int | float]
    content: list[ContentText]


class SearchResultsPage(BaseModel):
    object: Literal["vector_store.search_results.page"] = "vector_store.search_results.page"
    search_query: list[str] = Field(description="What was searched for: the query, or as `rewrite_query` made it.")
    data: list[SearchResultObject]
    has_more: Literal[False] = False
    next_page: None = None


class Reindexed(BaseModel):
    """What `reindex` set going: a store's files, back to `in_progress`, embedded with `embedding_model`."""

    object: Literal["vector_store.reindex"] = "vector_store.reindex"
    vector_store_id: str
    files: int
    embedding_model: str


class KnowledgeForgotten(BaseModel):
    object: Literal["user.knowledge.deleted"] = "user.knowledge.deleted"
    user_id: str
    vector_stores: int
    files: int
