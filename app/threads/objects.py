"""Rows as the Assistants API shows them: ids with their prefixes, instants in Unix seconds."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from app.models import RunStep, Thread, ThreadMessage, ThreadRun
from app.threads.file_search import without_content
from app.threads.ids import MESSAGE, RUN, STEP, THREAD, public_id
from app.threads.schemas import (
    IncompleteDetails,
    LastError,
    MessageObject,
    RunObject,
    StepObject,
    TextContent,
    TextValue,
    ThreadObject,
    TokenUsage,
)


def epoch(instant: datetime | None) -> int | None:
    return int(instant.timestamp()) if instant is not None else None


def usage(prompt: int | None, completion: int | None) -> TokenUsage | None:
    if prompt is None or completion is None:
        return None
    return TokenUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def thread_object(thread: Thread) -> ThreadObject:
    return ThreadObject(
        id=public_id(THREAD, thread.id),
        created_at=int(thread.created_at.timestamp()),
        metadata=thread.meta,
        tool_resources=thread.tool_resources,
        assistant_id=thread.assistant_id,
        chat_type=thread.chat_type,
        updated_at=int(thread.updated_at.timestamp()),
    )


def content_parts(message: ThreadMessage) -> list[Any]:
    """The message's parts as the API returns them: text parts' `text` is `{value, annotations}`."""
    if message.parts is None:
        return [TextContent(text=TextValue(value=message.content))]
    return [
        TextContent(text=TextValue(value=part["text"], annotations=part.get("annotations", [])))
        if part["type"] == "text"
        else part
        for part in message.parts
    ]


def message_object(message: ThreadMessage) -> MessageObject:
    reason = message.incomplete_reason
    ended = epoch(message.completed_at)
    return MessageObject.model_validate(
        {
            "id": public_id(MESSAGE, message.id),
            "created_at": int(message.created_at.timestamp()),
            "thread_id": public_id(THREAD, message.thread_id),
            "status": message.status,
            "incomplete_details": IncompleteDetails(reason=reason) if reason else None,
            "completed_at": ended if message.status == "completed" else None,
            "incomplete_at": ended if message.status == "incomplete" else None,
            "role": message.role,
            "content": content_parts(message),
            "assistant_id": message.assistant_id,
            "run_id": public_id(RUN, message.run_id) if message.run_id else None,
            "attachments": message.attachments,
            "metadata": message.meta,
            "expanded_content": message.prompt,
            "model": message.model,
            "simulated": message.simulated,
            "usage": usage(message.prompt_tokens, message.completion_tokens),
            "cost_usd": float(message.cost_usd) if message.cost_usd is not None else None,
        }
    )


def run_object(run: ThreadRun) -> RunObject:
    params = run.params
    return RunObject(
        id=public_id(RUN, run.id),
        created_at=int(run.created_at.timestamp()),
        thread_id=public_id(THREAD, run.thread_id),
        assistant_id=run.assistant_id,
        status=run.status,
        required_action=run.required_action,
        last_error=LastError.model_validate(run.last_error) if run.last_error else None,
        expires_at=epoch(run.expires_at),
        started_at=epoch(run.started_at),
        cancelled_at=epoch(run.cancelled_at),
        failed_at=epoch(run.failed_at),
        completed_at=epoch(run.completed_at),
        incomplete_details=IncompleteDetails(reason=run.incomplete_reason) if run.incomplete_reason else None,
        model=run.model,
        instructions=run.instructions or "",
        tools=run.tools,
        metadata=run.meta,
        usage=usage(run.prompt_tokens, run.completion_tokens) if run.status in ENDED_WITH_USAGE else None,
        temperature=params.get("temperature"),
        top_p=params.get("top_p"),
        max_prompt_tokens=params.get("max_prompt_tokens"),
        max_completion_tokens=params.get("max_completion_tokens"),
        truncation_strategy=params.get("truncation_strategy") or {"type": "auto", "last_messages": None},
        response_format=params.get("response_format") or "auto",
        tool_choice=params.get("tool_choice") or "auto",
        parallel_tool_calls=params.get("parallel_tool_calls", True),
        reasoning_effort=params.get("reasoning_effort"),
        cost_usd=float(run.cost_usd or 0),
        simulated=run.simulated,
    )


# OpenAI reports a run's usage once it is not running any more (null while queued or in progress).
ENDED_WITH_USAGE = ("requires_action", "cancelled", "failed", "completed", "incomplete", "expired")


def step_object(step: RunStep, *, include_content: bool = False) -> StepObject:
    """A run step; a file_search's results carry their text only when asked (`include[]`)."""
    ended = epoch(step.ended_at)
    return StepObject(
        id=public_id(STEP, step.id),
        created_at=int(step.created_at.timestamp()),
        run_id=public_id(RUN, step.run_id),
        assistant_id=step.assistant_id,
        thread_id=public_id(THREAD, step.thread_id),
        type="tool_calls" if step.type == "tool_calls" else "message_creation",
        status=step.status,
        cancelled_at=ended if step.status == "cancelled" else None,
        completed_at=ended if step.status == "completed" else None,
        expired_at=ended if step.status == "expired" else None,
        failed_at=ended if step.status == "failed" else None,
        last_error=LastError.model_validate(step.last_error) if step.last_error else None,
        step_details=step.step_details if include_content else without_content(step.step_details),
        usage=usage(step.prompt_tokens, step.completion_tokens),
    )
