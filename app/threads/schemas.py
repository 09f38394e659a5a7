"""Threads, messages, runs and run steps as the Assistants API (v2) shapes them.

Requests are checked as strictly as OpenAI checks them, before anything is written or
called. Responses carry OpenAI's fields; the gateway's own (a message's expanded shortcut,
model, cost and simulated flag; a run's cost) sit beside them, where the SDK keeps
unknown fields as extras.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from app.assistants.schemas import (
    MAX_INSTRUCTIONS,
    MAX_TOKENS,
    Page,
    ReasoningEffort,
    ResponseFormat,
    Tool,
    ToolResources,
)
from app.models.threads import MessageStatus, RunStatus, StepStatus
from app.validation import Metadata, Text, check_json

# The context is rendered into the prompt and measured as JSON (orjson stops at 255 levels, with
# a 500): a real app's facts about its user nest a few levels, so deeper is refused as a 400.
CONTEXT_MAX_DEPTH = 16
# OpenAI's bounds: messages per created thread, characters per message, tool outputs per submission.
MAX_THREAD_MESSAGES = 32
MAX_MESSAGE_CHARS = 256_000
MAX_TOOL_OUTPUTS = 128
MAX_MESSAGE_PARTS = 32


def _check_context(value: dict[str, Any]) -> dict[str, Any]:
    return check_json(value, CONTEXT_MAX_DEPTH)


Context = Annotated[dict[str, Any], AfterValidator(_check_context)]


# --- requests -----------------------------------------------------------------------------


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Text = Field(min_length=1, max_length=MAX_MESSAGE_CHARS, description="https:// or a data: URL.")
    detail: Literal["auto", "low", "high"] = "auto"


PART_KINDS = ("text", "image_url", "image_file")


class ContentPart(BaseModel):
    """A part of a message: `text`, or `image_url` (forwarded to vision models as the Chat Completions
    API's part); `image_file` (an uploaded file's image) is refused until the gateway keeps files.

    One model rather than a union of three, so an error names the field as the client wrote it
    (`content.0.text`), not a union member."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "image_url", "image_file"]
    text: Text | None = Field(None, max_length=MAX_MESSAGE_CHARS)
    image_url: ImageUrl | None = None
    image_file: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> ContentPart:
        given = [kind for kind in PART_KINDS if getattr(self, kind) is not None]
        if given != [self.type]:
            raise ValueError(f"a '{self.type}' part takes the field '{self.type}', and no other of {PART_KINDS}")
        return self


class Attachment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file_id: Text = Field(max_length=100)
    tools: list[dict[str, Any]] = Field(default_factory=list, max_length=8)


class MessageCreate(BaseModel):
    """A message a client adds: text, or content parts (text and `image_url`)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: Text | list[ContentPart] = Field(
        description="Text (1 to 256,000 characters), or 1 to 32 parts; `chat_type` and `goal_id` in `metadata`"
        " steer the assistant's prompt.",
        union_mode="left_to_right",
    )
    attachments: list[Attachment] | None = Field(None, max_length=10)
    metadata: Metadata | None = None

    @field_validator("content")
    @classmethod
    def _content_size(cls, content: str | list[Any]) -> str | list[Any]:
        # Measured here, not in the union's members, so a bad size names `content` itself.
        if isinstance(content, str) and not 1 <= len(content) <= MAX_MESSAGE_CHARS:
            raise ValueError(f"text must be 1 to {MAX_MESSAGE_CHARS} characters")
        if isinstance(content, list) and not 1 <= len(content) <= MAX_MESSAGE_PARTS:
            raise ValueError(f"send 1 to {MAX_MESSAGE_PARTS} content parts")
        return content


class MessageUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metadata: Metadata | None = None


class ThreadCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: list[MessageCreate] = Field(default_factory=list, max_length=MAX_THREAD_MESSAGES)
    metadata: Metadata | None = None
    tool_resources: ToolResources | None = None


class ThreadUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metadata: Metadata | None = None
    tool_resources: ToolResources | None = None


class ThreadLookup(BaseModel):
    """Get-or-create: the caller's latest thread of an assistant (and chat type), or a new one."""

    model_config = ConfigDict(extra="forbid")

    chat_type: Text | None = Field(None, min_length=1, max_length=100)
    metadata: Metadata | None = Field(None, description="For a thread this makes; an existing one keeps its own.")


class TruncationStrategy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["auto", "last_messages"]
    last_messages: int | None = Field(None, ge=1, le=200)


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Text = Field(min_length=1, max_length=64)


class FunctionChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | FunctionChoice


class RunOptions(BaseModel):
    """What a run takes, whichever way it is started."""

    model_config = ConfigDict(extra="forbid")

    assistant_id: Text = Field(min_length=1, max_length=120)
    model: Text | None = Field(None, min_length=1, max_length=100, description="Overrides the assistant's.")
    instructions: Text | None = Field(None, max_length=MAX_INSTRUCTIONS, description="Replace the assistant's.")
    tools: list[Tool] | None = Field(None, max_length=128, description="Replace the assistant's.")
    metadata: Metadata | None = None
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    max_prompt_tokens: int | None = Field(None, ge=256, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=16, le=MAX_TOKENS)
    truncation_strategy: TruncationStrategy | None = Field(
        None, description="`auto`: the assistant's history window; `last_messages`: that many."
    )
    response_format: ResponseFormat | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: ReasoningEffort | None = None
    stream: bool | None = None
    context: Context | None = Field(
        None, description="The gateway's: facts about the user from the app, rendered into the prompt (size-capped)."
    )


class RunCreate(RunOptions):
    additional_instructions: Text | None = Field(
        None, max_length=MAX_INSTRUCTIONS, description="Appended to the instructions for this run only."
    )
    additional_messages: list[MessageCreate] | None = Field(None, max_length=MAX_THREAD_MESSAGES)


class ThreadAndRunCreate(RunOptions):
    thread: ThreadCreate | None = None


class RunUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metadata: Metadata | None = None


class ToolOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tool_call_id: Text = Field(min_length=1, max_length=100)
    output: Text = Field("", max_length=MAX_MESSAGE_CHARS)


class ToolOutputsSubmit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tool_outputs: list[ToolOutput] = Field(min_length=1, max_length=MAX_TOOL_OUTPUTS)
    stream: bool | None = None


# --- responses ----------------------------------------------------------------------------


class ThreadObject(BaseModel):
    id: str
    object: Literal["thread"] = "thread"
    created_at: int = Field(description="Unix seconds.")
    metadata: dict[str, str]
    tool_resources: dict[str, Any]
    assistant_id: str | None = Field(description="The gateway's: the assistant of its latest run, or made for.")
    chat_type: str | None = None
    updated_at: int = Field(description="The gateway's: the last activity; idle threads go after the retention age.")


class ThreadList(Page):
    data: list[ThreadObject]


class ThreadLookupResult(ThreadObject):
    created: bool = Field(description="Whether this call made the thread.")


class ThreadDeleted(BaseModel):
    id: str
    object: Literal["thread.deleted"] = "thread.deleted"
    deleted: Literal[True] = True


class TextValue(BaseModel):
    value: str
    annotations: list[dict[str, Any]] = []


class TextContent(BaseModel):
    type: Literal["text"] = "text"
    text: TextValue


class ImageUrlContent(BaseModel):
    type: Literal["image_url"] = "image_url"
    image_url: ImageUrl


MessageContent = Annotated[TextContent | ImageUrlContent, Field(discriminator="type")]


class IncompleteDetails(BaseModel):
    reason: str


class TokenUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class MessageObject(BaseModel):
    id: str
    object: Literal["thread.message"] = "thread.message"
    created_at: int
    thread_id: str
    status: MessageStatus
    incomplete_details: IncompleteDetails | None
    completed_at: int | None
    incomplete_at: int | None
    role: Literal["user", "assistant"]
    content: list[MessageContent]
    assistant_id: str | None
    run_id: str | None
    attachments: list[dict[str, Any]]
    metadata: dict[str, str]
    expanded_content: str | None = Field(
        None, description="The gateway's: the prompt a `/shortcut` message expanded to (what the model was sent)."
    )
    model: str | None = Field(None, description="The gateway's: the model that wrote a reply.")
    simulated: bool = Field(False, description="The gateway's: a reply written by the simulated provider.")
    usage: TokenUsage | None = Field(None, description="The gateway's: the tokens of the call that wrote a reply.")
    cost_usd: float | None = Field(None, description="The gateway's: what that call cost.")


class MessageList(Page):
    data: list[MessageObject]


class MessageDeleted(BaseModel):
    id: str
    object: Literal["thread.message.deleted"] = "thread.message.deleted"
    deleted: Literal[True] = True


class LastError(BaseModel):
    code: Literal["server_error", "rate_limit_exceeded", "invalid_prompt"]
    message: str


class RunObject(BaseModel):
    id: str
    object: Literal["thread.run"] = "thread.run"
    created_at: int
    thread_id: str
    assistant_id: str
    status: RunStatus
    required_action: dict[str, Any] | None
    last_error: LastError | None
    expires_at: int | None
    started_at: int | None
    cancelled_at: int | None
    failed_at: int | None
    completed_at: int | None
    incomplete_details: IncompleteDetails | None
    model: str
    instructions: str = Field(description="What the caller set; a shared assistant's own stay the operator's.")
    tools: list[dict[str, Any]]
    metadata: dict[str, str]
    usage: TokenUsage | None
    temperature: float | None
    top_p: float | None
    max_prompt_tokens: int | None
    max_completion_tokens: int | None
    truncation_strategy: dict[str, Any]
    response_format: Any
    tool_choice: Any
    parallel_tool_calls: bool
    reasoning_effort: str | None
    cost_usd: float = Field(description="The gateway's: what the run's upstream calls cost so far.")
    simulated: bool = Field(description="The gateway's: answered by the simulated provider.")


class RunList(Page):
    data: list[RunObject]


class StepObject(BaseModel):
    id: str
    object: Literal["thread.run.step"] = "thread.run.step"
    created_at: int
    run_id: str
    assistant_id: str
    thread_id: str
    type: Literal["message_creation", "tool_calls"]
    status: StepStatus
    cancelled_at: int | None
    completed_at: int | None
    expired_at: int | None
    failed_at: int | None
    last_error: LastError | None
    step_details: dict[str, Any]
    usage: TokenUsage | None
    metadata: dict[str, str] = {}


class StepList(Page):
    data: list[StepObject]
