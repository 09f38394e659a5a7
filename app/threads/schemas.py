"""Thread request and response bodies, and the data of the streamed turn events."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from app.models import Thread, ThreadMessage
from app.validation import PROFILE_MAX, Metadata, Text, check_json

# The context is rendered into the prompt and measured as JSON (orjson stops at 255 levels, with
# a 500): a real app's facts about its user nest a few levels, so deeper is refused as a 400.
CONTEXT_MAX_DEPTH = 16


def _check_context(value: dict[str, Any]) -> dict[str, Any]:
    return check_json(value, CONTEXT_MAX_DEPTH)


Context = Annotated[dict[str, Any], AfterValidator(_check_context)]


class ThreadCreate(BaseModel):
    """A new thread: name its profile, or a `chat_type` that maps to one."""

    model_config = ConfigDict(extra="forbid")

    profile: Text | None = Field(None, max_length=PROFILE_MAX, examples=["coach"])
    chat_type: Text | None = Field(None, max_length=100, examples=["general"])
    title: Text | None = Field(None, max_length=200)
    metadata: Metadata = {}


class ThreadUpdate(BaseModel):
    """Fields left out stay as they are; `metadata` is replaced whole."""

    model_config = ConfigDict(extra="forbid")

    title: Text | None = Field(None, max_length=200)
    metadata: Metadata | None = None


class ThreadPublic(BaseModel):
    id: uuid.UUID
    object: Literal["thread"] = "thread"
    profile: str
    title: str | None
    metadata: dict[str, str]
    created_at: datetime
    updated_at: datetime = Field(description="The last turn or edit; idle threads are deleted after the retention age.")

    @classmethod
    def of(cls, thread: Thread) -> ThreadPublic:
        return cls(
            id=thread.id,
            profile=thread.profile,
            title=thread.title,
            metadata=thread.meta,
            created_at=thread.created_at,
            updated_at=thread.updated_at,
        )


class ThreadList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ThreadPublic]
    has_more: bool
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class ThreadDeleted(BaseModel):
    id: uuid.UUID
    object: Literal["thread.deleted"] = "thread.deleted"
    deleted: Literal[True] = True


class MessageUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class MessagePublic(BaseModel):
    """A user message or an assistant reply."""

    id: uuid.UUID
    object: Literal["thread.message"] = "thread.message"
    thread_id: uuid.UUID
    role: Literal["user", "assistant"]
    content: str
    status: Literal["in_progress", "completed", "incomplete"] = Field(
        description="`incomplete`: the reply was cut short (client gone, upstream failure, time limit)."
    )
    incomplete_reason: str | None = None
    chat_type: str | None = None
    goal_id: str | None = None
    model: str | None = None
    simulated: bool = False
    usage: MessageUsage | None = None
    cost_usd: float | None = None
    created_at: datetime

    @classmethod
    def of(cls, message: ThreadMessage) -> MessagePublic:
        usage = None
        if message.prompt_tokens is not None and message.completion_tokens is not None:
            usage = MessageUsage(
                prompt_tokens=message.prompt_tokens,
                completion_tokens=message.completion_tokens,
                total_tokens=message.prompt_tokens + message.completion_tokens,
            )
        return cls(
            id=message.id,
            thread_id=message.thread_id,
            role=message.role,
            content=message.content,
            status=message.status,
            incomplete_reason=message.incomplete_reason,
            chat_type=message.chat_type,
            goal_id=message.goal_id,
            model=message.model,
            simulated=message.simulated,
            usage=usage,
            cost_usd=float(message.cost_usd) if message.cost_usd is not None else None,
            created_at=message.created_at,
        )


class MessageList(BaseModel):
    object: Literal["list"] = "list"
    data: list[MessagePublic]
    has_more: bool
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class MessageCreate(BaseModel):
    """One turn: the user's message, with what the app knows about the user."""

    model_config = ConfigDict(extra="forbid")

    content: Text = Field(
        min_length=1,
        max_length=100_000,
        description="The user's message; a profile shortcut such as `/progress` expands to its full prompt.",
    )
    chat_type: Text | None = Field(
        None, max_length=100, description="Answer this turn with the profile this chat type maps to."
    )
    goal_id: Text | None = Field(None, max_length=200)
    context: Context | None = Field(
        None,
        description=(
            "Facts about the user from the app's own data; size-capped (THREAD_CONTEXT_MAX_BYTES),"
            f" nested at most {CONTEXT_MAX_DEPTH} levels deep."
        ),
    )
    stream: bool = Field(
        False,
        description=(
            "Answer with server-sent events: `message.created` (the user message, then the reply),"
            " `message.delta`, `message.completed` or `error`, then `done`."
        ),
    )


class TurnResult(BaseModel):
    """A turn's answer: the stored reply and what it cost."""

    object: Literal["thread.turn"] = "thread.turn"
    thread_id: uuid.UUID
    message: MessagePublic
    user_message: MessagePublic
    tokens_used: int
    model_used: str
    cost_estimate: float = Field(description="USD; 0 for simulated and fallback replies.")
    simulated: bool


class MessageDelta(BaseModel):
    """The data of a `message.delta` event: the next piece of the reply's text."""

    id: uuid.UUID
    thread_id: uuid.UUID
    content: str


class TurnDone(BaseModel):
    """The data of the last event, `done`."""

    status: Literal["completed", "incomplete"]
    message_id: uuid.UUID
