"""Assistant request and response bodies, as the Assistants API (v2) shapes them.

What the gateway adds is flat on the object, where the SDK keeps unknown fields as extras:
`shared`, and the extensions a thread's runs use (`shortcuts`, `history_messages`,
`history_tokens`, `chat_types`, `fallback`). Users may set the first three on their own
assistants; everything else is an operator's (`/admin/assistants`, ASSISTANTS_FILE).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from app.threads.profiles import MAX_HISTORY_MESSAGES, SHORTCUT, Fallback, http_url
from app.validation import Metadata, Text, check_json

FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 128
MAX_INSTRUCTIONS = 256_000
# Where a JSON schema may nest (a function's parameters, a response format's schema).
SCHEMA_MAX_DEPTH = 32
# Slugs of shared assistants: `asst_<slug>`, as ASSISTANTS_FILE's `[profile.<slug>]` are.
SLUG = r"^[a-z0-9][a-z0-9_-]{0,99}$"


def _check_schema(value: dict[str, Any]) -> dict[str, Any]:
    return check_json(value, SCHEMA_MAX_DEPTH)


JsonSchema = Annotated[dict[str, Any], AfterValidator(_check_schema)]


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Text = Field(description="a-z, A-Z, 0-9, underscores and dashes, at most 64 characters.")
    description: Text | None = Field(None, max_length=4_000)
    parameters: JsonSchema | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not FUNCTION_NAME.match(value):
            raise ValueError("must be 1 to 64 of a-z, A-Z, 0-9, underscores and dashes")
        return value


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class RankingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ranker: Literal["auto", "default_2024_08_21"] = "auto"
    score_threshold: float = Field(0.0, ge=0.0, le=1.0)


class FileSearchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_num_results: int | None = Field(None, ge=1, le=50)
    ranking_options: RankingOptions | None = None


class FileSearchTool(BaseModel):
    """Search the assistant's and the thread's vector stores before answering (app/threads/file_search.py)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["file_search"]
    file_search: FileSearchOptions | None = None


class UnsupportedTool(BaseModel):
    """`code_interpreter`: named so the refusal can say which (app/assistants/service.py)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["code_interpreter"]


Tool = Annotated[FunctionTool | FileSearchTool | UnsupportedTool, Field(discriminator="type")]


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Text = Field(min_length=1, max_length=64)
    description: Text | None = Field(None, max_length=4_000)
    schema_: JsonSchema | None = Field(None, alias="schema")
    strict: bool | None = None


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object"]


class JsonSchemaResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Literal["auto"] | Annotated[TextFormat | JsonSchemaResponseFormat, Field(discriminator="type")]


class ToolResourceFiles(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file_ids: list[Text] = Field(default_factory=list, max_length=20)


class ToolResourceVectorStores(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vector_store_ids: list[Text] = Field(default_factory=list, max_length=1)
    # Vector stores to make with the assistant or thread: refused, make them with POST /v1/vector_stores.
    vector_stores: list[dict[str, Any]] | None = Field(None, max_length=1)


class ToolResources(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code_interpreter: ToolResourceFiles | None = None
    file_search: ToolResourceVectorStores | None = None


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
# Bounds of the gateway's numbers: finite, and within what a column or a prompt can take.
MAX_TOKENS = 1_000_000
MAX_SECONDS = 86_400.0
Shortcuts = dict[Text, Annotated[Text, Field(min_length=1, max_length=20_000)]]


def _check_shortcuts(value: dict[str, str] | None) -> dict[str, str] | None:
    for command in value or {}:
        if not SHORTCUT.match(command):
            raise ValueError(f"shortcut {command!r} must look like /name (lower case, digits, - or _)")
    return value


class AssistantFields(BaseModel):
    """What a user may set, on create and modify alike (modify: what is left out stays)."""

    model_config = ConfigDict(extra="forbid")

    name: Text | None = Field(None, max_length=256)
    description: Text | None = Field(None, max_length=512)
    instructions: Text | None = Field(None, max_length=MAX_INSTRUCTIONS)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_resources: ToolResources | None = None
    metadata: Metadata | None = None
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    response_format: ResponseFormat | None = None
    reasoning_effort: ReasoningEffort | None = None
    # The gateway's: a user's own assistant may carry these (ignored by OpenAI's SDK types).
    shortcuts: Annotated[Shortcuts | None, AfterValidator(_check_shortcuts)] = Field(
        None, description="`/command` -> the prompt it expands to in a user message ({{args}}: what follows it)."
    )
    history_messages: int | None = Field(
        None, ge=0, le=MAX_HISTORY_MESSAGES, description="How many of the thread's last messages a run sends."
    )
    history_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS, description="Older messages are left out past this many tokens."
    )


class AssistantCreate(AssistantFields):
    model: Text = Field(min_length=1, max_length=100, description="A chat model id or alias of the catalog.")


class AssistantUpdate(AssistantFields):
    model: Text | None = Field(None, min_length=1, max_length=100)


class SharedFields(BaseModel):
    """What only an operator sets, on a shared assistant (`/admin/assistants`)."""

    model_config = ConfigDict(extra="forbid")

    chat_types: list[Annotated[Text, Field(min_length=1, max_length=100)]] | None = Field(
        None, description="The app's chat types this assistant answers (each belongs to one shared assistant)."
    )
    fallback: Fallback | None = Field(
        None, description="default: follow FALLBACK_TO_SIMULATED; simulated: always fall back; never."
    )
    context_url: Text | None = Field(None, max_length=2_000)
    context_ttl_seconds: float | None = Field(None, ge=0, le=MAX_SECONDS, allow_inf_nan=False)
    context_timeout_seconds: float | None = Field(None, gt=0, le=30, allow_inf_nan=False)
    tiers: list[Annotated[Text, Field(min_length=1, max_length=50)]] | None = Field(None, min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="Cap on each reply, within the tier's cap.")

    @field_validator("context_url")
    @classmethod
    def _context_url(cls, value: str | None) -> str | None:
        return http_url(value)


class SharedAssistantCreate(AssistantCreate, SharedFields):
    slug: Annotated[Text, Field(pattern=SLUG)] | None = Field(
        None, description="Gives the assistant the id `asst_<slug>`; a random id when left out."
    )


class SharedAssistantUpdate(AssistantUpdate, SharedFields):
    pass


# The gateway's extensions, as stored in `assistant.gateway` (only those set).
EXTENSIONS = ("shortcuts", "history_messages", "history_tokens", *SharedFields.model_fields)


class AssistantPublic(BaseModel):
    """An assistant as the Assistants API returns it, with the gateway's fields beside."""

    id: str
    object: Literal["assistant"] = "assistant"
    created_at: int = Field(description="Unix seconds.")
    name: str | None
    description: str | None
    model: str
    instructions: str | None
    tools: list[dict[str, Any]]
    tool_resources: dict[str, Any]
    metadata: dict[str, str]
    temperature: float | None
    top_p: float | None
    response_format: Any = Field(description='"auto" or a {"type": ...} object.')
    reasoning_effort: str | None
    shared: bool = Field(description="A shared assistant every user sees and none may change (the operator's).")
    shortcuts: dict[str, str] = {}
    history_messages: int | None = None
    history_tokens: int | None = None
    chat_types: list[str] = []
    fallback: Fallback = "default"


class AdminAssistantPublic(AssistantPublic):
    """What an operator sees of a shared assistant: its source and every extension."""

    source: Literal["api", "admin", "file"]
    context_url: str | None = None
    context_ttl_seconds: float | None = None
    context_timeout_seconds: float | None = None
    tiers: list[str] | None = None
    max_tokens: int | None = None


class Page(BaseModel):
    """The Assistants API's list envelope: a page, its first and last ids (cursors), and whether more follow."""

    object: Literal["list"] = "list"
    first_id: str | None
    last_id: str | None
    has_more: bool

    @classmethod
    def of(cls, data: Sequence[Any], has_more: bool) -> Self:
        """The page of `data` (a subclass's items, each with an `id`)."""
        first, last = (data[0].id, data[-1].id) if data else (None, None)
        return cls.model_validate({"data": data, "first_id": first, "last_id": last, "has_more": has_more})


class AssistantList(Page):
    data: list[AssistantPublic]


class AdminAssistantList(Page):
    data: list[AdminAssistantPublic]


class AssistantDeleted(BaseModel):
    id: str
    object: Literal["assistant.deleted"] = "assistant.deleted"
    deleted: Literal[True] = True
