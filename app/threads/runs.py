"""Runs: an assistant answering a thread through the one call pipeline, in the background or streamed.

Starting a run (`runs.create`, create-and-run) or continuing one (`submit_tool_outputs`) does,
before the request answers, in this order:
1. check the request (assistant, model, tools, context) and take the caller's request rate;
2. plan the round: read the history window and the user's context, build the prompt and
   reserve its worst case (app/calls.py); a refusal has written nothing;
3. write: the new thread or messages and the `queued` run in one transaction (a thread's second
   active run violates `uq_thread_run_active`: 409, and the reservation is given back), or the
   tool outputs, on the condition that the run still waits for them.
The round then runs (app/threads/rounds.py): as the response's event stream with `stream: true`,
else in a background task of this process, so the request answers the queued run at once and
the run goes on without its client. `openai-poll-after-ms` tells the SDK's `create_and_poll`
how soon to look again.

Cancelling marks the run `cancelling` and tells the process running it (Postgres NOTIFY on
`run_cancel`, heard by every replica), which stops the upstream read and stores the partial
reply. A run whose process died is ended by `sweep`, every RUN_SWEEP_INTERVAL, once that
process's lease has run out; a run waiting for tool outputs past RUN_ACTION_TIMEOUT expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sse_starlette import ServerSentEvent
from starlette.responses import Response

from app.assistants import repository as assistant_rows
from app.assistants.service import ID_PREFIX, refuse_unsupported_tools
from app.auth.principal import Principal
from app.calls import Calls, Spent
from app.config import Settings
from app.db import DB_ERRORS
from app.errors import (
    AssistantNotFound,
    Conflict,
    ErrorCode,
    InvalidRequest,
    PermissionDenied,
    RunNotFound,
    ThreadNotFound,
)
from app.instances import Instance
from app.models import Assistant, Thread, ThreadMessage, ThreadRun
from app.ratelimit.buckets import Decision
from app.ratelimit.limiter import Limiter
from app.registry import Catalog, ModelSpec
from app.sse import EventSource, Stopping, server_event
from app.streams import StreamSlot
from app.threads import file_search, repository
from app.threads.context import ContextSource, check_sent_context
from app.threads.ids import THREAD, public_id
from app.threads.objects import run_object, thread_object
from app.threads.profiles import MAX_HISTORY_MESSAGES, Profile, Profiles
from app.threads.prompt import HistoryItem, PromptValues, build_messages, expand_shortcut, render, system_messages
from app.threads.rounds import Plan, Round, RunEvent, RunSignal
from app.threads.schemas import (
    MessageCreate,
    RunCreate,
    RunOptions,
    ThreadAndRunCreate,
    ToolOutputsSubmit,
)
from app.tokens import estimate_input_tokens, estimate_tokens

log = logging.getLogger("app.threads.runs")

ROUTE = "threads.runs"
CANCEL_CHANNEL = "run_cancel"
# How soon the SDK's pollers (`create_and_poll`) look again.
POLL_AFTER_MS = "200"
ACTIVE_RUN_INDEX = "uq_thread_run_active"


@dataclass(frozen=True, slots=True)
class Answerer:
    """Who answers a run: the assistant, the profile its prompt is built from, and the model."""

    assistant: Assistant
    profile: Profile
    spec: ModelSpec
    templated: bool  # a shared assistant's instructions are templates; a user's own are sent as written


def new_message(thread_id: uuid.UUID, body: MessageCreate) -> ThreadMessage:
    """A message a client adds, as stored: its text, and its parts when it has more than one text."""
    if isinstance(body.content, str):
        content, parts = body.content, None
    else:
        for index, part in enumerate(body.content):
            if part.type == "image_file":
                raise InvalidRequest(
                    "image_file content refers to an uploaded file; this gateway keeps no files yet: use image_url.",
                    param=f"content.{index}.type",
                )
        parts = [part.model_dump(mode="json", exclude_none=True) for part in body.content]
        content = "\n".join(part["text"] for part in parts if part["type"] == "text")
        if len(parts) == 1 and parts[0]["type"] == "text":
            parts = None
    attachments = [attachment.model_dump(mode="json") for attachment in body.attachments or ()]
    return ThreadMessage(
        id=uuid.uuid4(),
        thread_id=thread_id,
        role=body.role,
        content=content,
        parts=parts,
        meta=body.metadata or {},
        attachments=attachments,
    )


def _history_item(message: ThreadMessage) -> HistoryItem:
    sent = message.prompt or message.content
    if message.parts is None:
        return HistoryItem(message.role, sent)
    parts = [{"type": "text", "text": part["text"]} if part["type"] == "text" else part for part in message.parts]
    return HistoryItem(message.role, sent, parts)


class RunEngine:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        profiles: Profiles,
        limiter: Limiter,
        calls: Calls,
        sessions: async_sessionmaker[AsyncSession],
        autocommit: async_sessionmaker[AsyncSession],
        context: ContextSource,
        stopping: Stopping,
        instance: Instance,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.profiles = profiles
        self.limiter = limiter
        self.calls = calls
        self.sessions = sessions
        # Reads and single statements: no BEGIN and ROLLBACK around them (two round trips each).
        self.autocommit = autocommit
        self.context = context
        self.stopping = stopping
        self.instance = instance
        self.signals: dict[uuid.UUID, RunSignal] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        # The vector stores (app/vector_stores), for file_search and attachments; set by the runtime.
        self.knowledge: file_search.Knowledge | None = None

    async def attach(self, principal: Principal, thread: Thread, messages: Sequence[MessageCreate]) -> bool:
        """The messages' `file_search` attachments into the thread's vector store; True when the thread's
        tool_resources changed (its store was made)."""
        attachments = [attachment for message in messages for attachment in message.attachments or ()]
        if not attachments:
            return False
        if self.knowledge is None:
            raise InvalidRequest("This gateway keeps no files: attachments cannot be used.", param="attachments")
        return await file_search.attach(self.knowledge, principal, thread, attachments)

    # --- who answers ----------------------------------------------------------------------

    def profile_of(self, assistant: Assistant) -> Profile:
        """The profile a run's prompt is built from: ASSISTANTS_FILE's own for its assistants, else the
        assistant's fields and gateway extensions."""
        if assistant.source == "file":
            profile = self.profiles.profiles.get(assistant.id.removeprefix(ID_PREFIX))
            if profile is not None:
                return profile
        extensions = {name: value for name, value in assistant.gateway.items() if name in Profile.model_fields}
        return Profile.model_construct(
            name=assistant.id,
            model=assistant.model,
            instructions=assistant.instructions or "",
            temperature=assistant.temperature,
            **extensions,
        )

    async def answerer(
        self,
        session: AsyncSession,
        principal: Principal,
        assistant_id: str,
        model: str | None,
        thread_id: uuid.UUID | None,
        chat_type: str | None,
    ) -> Answerer:
        """The run's assistant (a chat type of the thread's newest user message steers a shared one to the
        shared assistant that answers it), its profile and model; 404, 403 or 400 otherwise."""
        assistant = await assistant_rows.get_visible(session, assistant_id, principal.user_id)
        if assistant is None:
            raise AssistantNotFound(assistant_id)
        if chat_type is None and thread_id is not None and assistant.user_id is None:
            chat_type = await repository.latest_chat_type(session, thread_id)
        if chat_type is not None and assistant.user_id is None:
            owner = (await assistant_rows.chat_type_owners(session)).get(chat_type)
            if owner is not None and owner != assistant.id:
                steered = await assistant_rows.get_shared(session, owner)
                assistant = steered or assistant
        profile = self.profile_of(assistant)
        if not profile.allows(principal.tier):
            raise PermissionDenied(
                f"Assistant '{assistant.id}' is not available on your tier '{principal.tier}'.",
                param="assistant_id",
                code=ErrorCode.PROFILE_NOT_ALLOWED,
            )
        name = model or assistant.model
        try:
            spec = self.catalog.resolve(name, principal.tier, "chat")
        except InvalidRequest as error:
            raise InvalidRequest(
                f"Assistant '{assistant.id}' answers with model '{name}', which your tier cannot use.",
                param="model" if model else "assistant_id",
                code=ErrorCode.MODEL_NOT_FOUND,
            ) from error
        return Answerer(assistant, profile, spec, templated=assistant.user_id is None)

    # --- starting a run ---------------------------------------------------------------------

    def _new_run(self, principal: Principal, thread_id: uuid.UUID, who: Answerer, body: RunOptions) -> ThreadRun:
        tools = body.tools if body.tools is not None else None
        if tools is not None:
            refuse_unsupported_tools(tools)
        params = body.model_dump(
            include={
                "temperature",
                "top_p",
                "max_prompt_tokens",
                "max_completion_tokens",
                "truncation_strategy",
                "response_format",
                "tool_choice",
                "parallel_tool_calls",
                "reasoning_effort",
            },
            exclude_none=True,
            by_alias=True,
            mode="json",
        )
        return ThreadRun(
            id=uuid.uuid4(),
            thread_id=thread_id,
            user_id=principal.user_id,
            assistant_id=who.assistant.id,
            status="queued",
            model=body.model or who.assistant.model,
            instructions=body.instructions,
            additional_instructions=getattr(body, "additional_instructions", None),
            tools=[tool.model_dump(mode="json", exclude_none=True, by_alias=True) for tool in tools]
            if tools is not None
            else who.assistant.tools,
            params=params,
            meta=body.metadata or {},
            context=check_sent_context(body.context, self.settings.thread_context_max_bytes),
            rounds=[],
            owner=self.instance.id,
            prompt_tokens=0,
            completion_tokens=0,
            cost_usd=0,
            simulated=False,
            created_at=datetime.now(UTC),
        )

    async def create(self, principal: Principal, thread_id: uuid.UUID, body: RunCreate, request_id: str) -> Response:
        added = [new_message(thread_id, message) for message in body.additional_messages or ()]
        chat_type = next((m.meta.get("chat_type") for m in reversed(added) if m.role == "user"), None)
        async with self.autocommit() as session:
            thread = await self.thread(session, principal, thread_id)
            who = await self.answerer(session, principal, body.assistant_id, body.model, thread_id, chat_type)
        run = self._new_run(principal, thread_id, who, body)
        made_store = await self.attach(principal, thread, body.additional_messages or ())

        async def write(session: AsyncSession) -> None:
            await repository.add_messages(session, added)
            session.add(run)
            await session.flush()
            await repository.touch_thread(session, thread_id, run.assistant_id)
            if made_store:
                await repository.set_tool_resources(session, thread_id, thread.tool_resources)

        return await self._start(
            principal,
            who,
            run,
            request_id,
            bool(body.stream),
            added,
            write,
            thread=None,
            resources=thread.tool_resources,
        )

    async def create_with_thread(self, principal: Principal, body: ThreadAndRunCreate, request_id: str) -> Response:
        thread_body = body.thread
        thread = Thread(
            id=uuid.uuid4(),
            user_id=principal.user_id,
            meta=(thread_body.metadata if thread_body else None) or {},
            tool_resources={},
        )
        if thread_body is not None and thread_body.tool_resources is not None:
            refuse_unsupported_tools([], thread_body.tool_resources)
        added = [new_message(thread.id, message) for message in (thread_body.messages if thread_body else [])]
        chat_type = next((m.meta.get("chat_type") for m in reversed(added) if m.role == "user"), None)
        async with self.autocommit() as session:
            who = await self.answerer(session, principal, body.assistant_id, body.model, None, chat_type)
            resources = thread_body.tool_resources if thread_body else None
            thread.tool_resources = await file_search.checked_resources(session, resources, principal.user_id) or {}
        thread.assistant_id = who.assistant.id
        run = self._new_run(principal, thread.id, who, body)
        await self.attach(principal, thread, thread_body.messages if thread_body else ())

        async def write(session: AsyncSession) -> None:
            await repository.add_thread(session, thread, added)
            session.add(run)
            await session.flush()

        return await self._start(
            principal,
            who,
            run,
            request_id,
            bool(body.stream),
            added,
            write,
            thread=thread,
            resources=thread.tool_resources,
        )

    async def _start(
        self,
        principal: Principal,
        who: Answerer,
        run: ThreadRun,
        request_id: str,
        stream: bool,
        added: list[ThreadMessage],
        write: Any,
        *,
        thread: Thread | None,
        resources: dict[str, Any],
    ) -> Response:
        plan = await self._admit(principal, who, run, request_id, stream=stream, added=added, resources=resources)
        try:
            await self._write(run.thread_id, write)
        except BaseException:
            plan.call.give_back()
            raise
        prelude: list[RunEvent] = []
        if thread is not None:
            prelude.append(("thread.created", thread_object(thread)))
        created = run_object(run)
        prelude += [("thread.run.created", created), ("thread.run.queued", created)]
        plan.prelude, plan.thread = prelude, thread
        return self._launch(plan)

    async def _write(self, thread_id: uuid.UUID, write: Any) -> None:
        """The run's writes in one transaction; a thread with an active run is a 409, once its stale run
        (a dead process's) has been swept."""
        for attempt in range(2):
            try:
                async with self.sessions.begin() as session:
                    await write(session)
                return
            except IntegrityError as error:
                if ACTIVE_RUN_INDEX not in str(error.orig):
                    raise ThreadNotFound(public_id(THREAD, thread_id)) from error  # deleted meanwhile
                if attempt == 0 and await self.sweep(thread_id):
                    continue
                async with self.autocommit() as session:
                    active = await repository.active_run(session, thread_id)
                raise Conflict(
                    f"Thread {public_id(THREAD, thread_id)} already has an active run"
                    f"{' run_' + active.hex if active else ''}.",
                    code=ErrorCode.THREAD_BUSY,
                    headers={"retry-after": "1"},
                ) from error

    # --- tool outputs -------------------------------------------------------------------------

    async def submit(
        self, principal: Principal, thread_id: uuid.UUID, run_id: uuid.UUID, body: ToolOutputsSubmit, request_id: str
    ) -> Response:
        async with self.autocommit() as session:
            await self.thread(session, principal, thread_id)
            run = await repository.get_run(session, thread_id, run_id)
            if run is None:
                raise RunNotFound(public_id("run_", run_id))
            if run.status != "requires_action" or run.required_action is None:
                raise InvalidRequest(
                    f'Runs in status "{run.status}" do not accept tool outputs.',
                    param="run_id",
                    code=ErrorCode.RUN_NOT_ACTIVE,
                )
            asked = [call["id"] for call in run.required_action["submit_tool_outputs"]["tool_calls"]]
            given = {output.tool_call_id: output.output for output in body.tool_outputs}
            if set(given) != set(asked) or len(given) != len(body.tool_outputs):
                missing = sorted(set(asked) - set(given))
                raise InvalidRequest(
                    f"Submit one output for each tool call of the run: {', '.join(asked)}"
                    + (f" (missing {', '.join(missing)})." if missing else "."),
                    param="tool_outputs",
                )
            who = await self.answerer(session, principal, run.assistant_id, run.model, None, None)
        outputs = [{"role": "tool", "tool_call_id": call_id, "content": given[call_id]} for call_id in asked]
        waiting_rounds = run.rounds
        run.rounds = [*waiting_rounds, *outputs]
        run.status, run.required_action, run.expires_at, run.owner = "queued", None, None, self.instance.id

        plan = await self._admit(principal, who, run, request_id, stream=bool(body.stream), added=[])
        try:
            async with self.sessions.begin() as session:
                # Taking the run first (it waits for outputs) serializes two submissions: the second finds it
                # taken and rolls back, its outputs never stored.
                taken = await repository.set_run(
                    session,
                    run.id,
                    ThreadRun.status == "requires_action",
                    status="queued",
                    required_action=None,
                    expires_at=None,
                    owner=self.instance.id,
                    rounds=run.rounds,
                )
                if not taken:
                    raise InvalidRequest(
                        "The run no longer waits for tool outputs: they were submitted already, or it was"
                        " cancelled or expired.",
                        param="run_id",
                        code=ErrorCode.RUN_NOT_ACTIVE,
                    )
                await repository.record_outputs(session, run, given)
        except BaseException:
            plan.call.give_back()
            raise
        plan.prelude = [("thread.run.queued", run_object(run))]
        return self._launch(plan)

    # --- the round's plan -------------------------------------------------------------------

    async def _admit(
        self,
        principal: Principal,
        who: Answerer,
        run: ThreadRun,
        request_id: str,
        *,
        stream: bool,
        added: Sequence[ThreadMessage],
        resources: dict[str, Any] | None = None,
    ) -> Plan:
        """A stream's slot (before any limit is taken), the request rate, then the round's plan; what a
        refusal took is given back. `resources`: the thread's tool_resources, for a first round."""
        slot = self.calls.streams.admit(principal) if stream else None
        try:
            rate = await self.limiter.take(self.limiter.chat_rate(principal))
            searched = await self._search(principal, who, run, request_id, added, resources)
            return await self._plan(
                principal, who, run, request_id, stream=stream, added=added, prior=rate, slot=slot, searched=searched
            )
        except BaseException:
            if slot is not None:
                slot.release()
            raise

    async def _plan(
        self,
        principal: Principal,
        who: Answerer,
        run: ThreadRun,
        request_id: str,
        *,
        stream: bool,
        added: Sequence[ThreadMessage],
        prior: Decision,
        slot: StreamSlot | None,
        searched: file_search.Searched | None = None,
    ) -> Plan:
        """The round's prompt and its call, reserved: the assistant's instructions (and the run's), the
        context, the passages file_search found, the history window and the run's tail so far."""
        profile, params = who.profile, run.params
        truncation = params.get("truncation_strategy") or {}
        count = truncation.get("last_messages") or profile.history_messages
        count = min(max(count, 1), MAX_HISTORY_MESSAGES)
        async with self.autocommit() as session:
            stored = await repository.history(session, run.thread_id, limit=count, run_id=run.id)
            cached, age = await repository.cached_context(session, principal.user_id, profile.name)
        newest_first = [*reversed(added), *stored][:count]
        newest_user = next((message for message in newest_first if message.role == "user"), None)
        meta = newest_user.meta if newest_user is not None else {}
        values = PromptValues(principal.user_id, profile.name, meta.get("chat_type"), meta.get("goal_id"))
        expanded = await self._expand(profile, newest_first, values)
        context = await self.context.for_run(principal.user_id, profile, cached, age, run.context)
        values = replace(values, context=context)
        template = run.instructions if run.instructions is not None else profile.instructions
        instructions = render(template, values) if who.templated and run.instructions is None else template
        if run.additional_instructions:
            instructions = (
                f"{instructions}\n\n{run.additional_instructions}" if instructions else run.additional_instructions
            )
        head = system_messages(instructions, values, context_inline=profile.uses_context_inline and who.templated)
        if searched is not None:
            head.append(searched.sources_message())
        tokens = profile.history_tokens
        if params.get("max_prompt_tokens"):
            room = params["max_prompt_tokens"] - sum(estimate_tokens(item["content"]) for item in head)
            tokens = room if tokens is None else min(tokens, room)
        messages = build_messages(
            head,
            [_history_item(message) for message in newest_first],
            run.rounds,
            count=count,
            tokens=tokens,
            max_prompt_chars=self.limiter.limit(principal, "max_prompt_chars"),
            max_messages=self.limiter.limit(principal, "max_messages"),
        )
        payload = self._payload(who, run, messages)
        left = params.get("max_completion_tokens")
        if left is not None:
            left = max(left - run.completion_tokens, 1)
        cap = payload["max_completion_tokens"] = self.limiter.completion_cap(
            principal, who.spec, profile.max_tokens, left
        )
        estimate = estimate_input_tokens(payload)
        if params.get("max_prompt_tokens") and estimate > params["max_prompt_tokens"]:
            raise InvalidRequest(
                f"The run's prompt needs about {estimate} tokens; max_prompt_tokens is {params['max_prompt_tokens']}.",
                param="max_prompt_tokens",
            )
        cost = who.spec.token_cost(estimate, cap)
        call = await self.calls.open(
            principal,
            route=ROUTE,
            spec=who.spec,
            request_id=request_id,
            buckets=self.limiter.token_buckets(principal, estimate + cap, cost),
            reserved=Spent(estimate, cap, cost_usd=cost, estimated=True),
            prior=prior,
            fallback=profile.fallback,
            stream=stream,
            thread_id=run.thread_id,
            detail={"run_id": "run_" + run.id.hex, "assistant_id": run.assistant_id},
            slot=slot,
        )
        run.simulated = run.simulated or call.simulated  # known now when the user or the gateway is simulated
        for message in added:
            message.prompt = expanded.pop(message.id, message.prompt)
        if expanded:
            try:
                async with self.sessions.begin() as session:
                    await repository.save_prompts(session, expanded)
            except BaseException:
                call.give_back()
                raise
        return Plan(run=run, call=call, payload=payload, stream=stream, searched=searched)

    async def _search(
        self,
        principal: Principal,
        who: Answerer,
        run: ThreadRun,
        request_id: str,
        added: Sequence[ThreadMessage],
        resources: dict[str, Any] | None,
    ) -> file_search.Searched | None:
        """A first round's file_search: the assistant's and the thread's stores, searched with the newest
        user message once the files being indexed are ready (or the wait is over)."""
        tool = file_search.file_search_tool(run.tools)
        if tool is None or self.knowledge is None:
            return None
        if run.rounds:  # a later round (tool outputs): the passages the first one found, from its step
            async with self.autocommit() as session:
                details = await repository.file_search_details(session, run.id)
            return file_search.Searched.from_step(details) if details is not None else None
        if resources is None:
            return None
        stores = file_search.store_ids(who.assistant.tool_resources, resources)
        if not stores:
            return None
        # A shared assistant's stores are the operator's choice, whoever made them; a user's own are theirs.
        shared = file_search.store_ids(who.assistant.tool_resources) if who.assistant.user_id is None else []
        newest = next((m for m in reversed(added) if m.role == "user"), None)
        if newest is None:
            async with self.autocommit() as session:
                newest = await repository.latest_user_message(session, run.thread_id)
        if newest is None:
            return None
        # Files just attached to the thread may still be indexing; the assistant's stores are what they are.
        attached = file_search.store_ids(resources)
        if attached:
            deadline = time.monotonic() + file_search.PENDING_WAIT_SECONDS
            await file_search.wait_for_files(self.knowledge, attached, deadline)
        options = tool.get("file_search") or {}
        ranking = {"ranker": "default_2024_08_21", "score_threshold": 0.0, **(options.get("ranking_options") or {})}
        if ranking["ranker"] == "auto":
            ranking["ranker"] = "default_2024_08_21"
        query = (newest.prompt or newest.content)[: file_search.MAX_QUERY_CHARS]
        results = await self.knowledge.search(
            principal,
            stores,
            query,
            max_num_results=options.get("max_num_results") or file_search.DEFAULT_RESULTS,
            score_threshold=ranking["score_threshold"],
            request_id=request_id,
            shared=shared,
        )
        passages = [file_search.Passage.of(result) for result in results]
        return file_search.Searched(query=query, ranking_options=ranking, results=passages)

    async def _expand(
        self, profile: Profile, messages: Sequence[ThreadMessage], values: PromptValues
    ) -> dict[uuid.UUID, str]:
        """`/shortcut` user messages not expanded yet: their expansions, by message id (also set on them)."""
        expanded: dict[uuid.UUID, str] = {}
        for message in messages:
            if message.role == "user" and message.prompt is None and message.content.startswith("/"):
                prompt = expand_shortcut(profile, message.content, values)
                if prompt is not None:
                    message.prompt = expanded[message.id] = prompt
        return expanded

    @staticmethod
    def _payload(who: Answerer, run: ThreadRun, messages: list[dict[str, Any]]) -> dict[str, Any]:
        params, assistant = run.params, who.assistant
        payload: dict[str, Any] = {
            "model": who.spec.id,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        temperature = params.get("temperature", assistant.temperature)
        if temperature is None:
            temperature = who.profile.temperature
        if temperature is not None:
            payload["temperature"] = temperature
        top_p = params.get("top_p", assistant.top_p)
        if top_p is not None:
            payload["top_p"] = top_p
        response_format = params.get("response_format", assistant.response_format)
        if response_format not in (None, "auto"):
            payload["response_format"] = response_format
        effort = params.get("reasoning_effort", assistant.reasoning_effort)
        if effort is not None:
            payload["reasoning_effort"] = effort
        functions = [tool for tool in run.tools if tool.get("type") == "function"]
        if functions:
            payload["tools"] = functions
            if params.get("tool_choice") is not None:
                payload["tool_choice"] = params["tool_choice"]
            if params.get("parallel_tool_calls") is not None:
                payload["parallel_tool_calls"] = params["parallel_tool_calls"]
        return payload

    # --- running it -------------------------------------------------------------------------

    def _launch(self, plan: Plan) -> Response:
        signal = RunSignal(self.stopping)
        self.signals[plan.run.id] = signal
        relay = Round(
            plan,
            self.calls,
            self.sessions,
            self.autocommit,
            signal,
            deadline=time.monotonic() + self.settings.run_timeout,
            action_timeout=self.settings.run_action_timeout,
        )
        headers = plan.call.headers()
        if plan.stream:

            async def finish() -> None:
                self.signals.pop(plan.run.id, None)
                await relay.settle()

            return EventSource(
                _wire(relay.events()),
                heartbeat=self.settings.stream_heartbeat_seconds,
                headers=headers,
                on_close=finish,
                slot=plan.call.take_slot(),
            )
        task = asyncio.create_task(self._drain(relay), name=f"run {plan.run.id}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return Response(
            run_object(plan.run).model_dump_json().encode(),
            media_type="application/json",
            headers={**headers, "openai-poll-after-ms": POLL_AFTER_MS},
        )

    async def _drain(self, relay: Round) -> None:
        try:
            async for _ in relay.events():
                pass
        except Exception:
            log.exception("run %s failed in the gateway", relay.run.id)
        finally:
            self.signals.pop(relay.run.id, None)
            await relay.settle()

    # --- cancelling, sweeping, stopping -----------------------------------------------------

    async def cancel(self, principal: Principal, thread_id: uuid.UUID, run_id: uuid.UUID) -> ThreadRun:
        async with self.sessions.begin() as session:
            await self.thread(session, principal, thread_id)
            run = await repository.get_run(session, thread_id, run_id, for_update=True)
            if run is None:
                raise RunNotFound(public_id("run_", run_id))
            if run.status in ("queued", "in_progress"):
                run.status = "cancelling"
                await session.execute(
                    text("SELECT pg_notify(:channel, :run)"), {"channel": CANCEL_CHANNEL, "run": str(run.id)}
                )
            elif run.status == "requires_action":
                run.status, run.required_action, run.cancelled_at = "cancelled", None, datetime.now(UTC)
                run.owner = None
                await repository.end_steps(session, run.id, "cancelled")
            elif run.status != "cancelling":
                raise InvalidRequest(
                    f"Cannot cancel run with status '{run.status}'.", param="run_id", code=ErrorCode.RUN_NOT_ACTIVE
                )
            await session.flush()
        self.heard_cancel(str(run.id))  # this process's own, at once (NOTIFY also reaches it)
        return run

    def heard_cancel(self, payload: str) -> None:
        with contextlib.suppress(ValueError):
            signal = self.signals.get(uuid.UUID(payload))
            if signal is not None:
                signal.cancel()

    def resync(self) -> None:
        """After the LISTEN connection was down: cancel the runs here that were cancelled meanwhile."""
        if self.signals:
            task = asyncio.get_running_loop().create_task(self._recheck(list(self.signals)))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _recheck(self, run_ids: list[uuid.UUID]) -> None:
        try:
            async with self.autocommit() as session:
                for run_id in await repository.cancelling(session, run_ids):
                    self.heard_cancel(str(run_id))
        except (SQLAlchemyError, *DB_ERRORS) as error:
            log.warning("could not recheck cancelled runs: %s", error)

    async def sweep(self, thread_id: uuid.UUID | None = None) -> int:
        """End the runs no process will finish (dead process, expired tool wait); how many."""
        async with self.sessions.begin() as session:
            ended = await repository.sweep_runs(session, lease=self.instance.lease_seconds, thread_id=thread_id)
        if ended:
            log.info("ended %d run(s) whose process died or whose tool outputs never came", ended)
        return ended

    async def stop(self) -> None:
        """Shutdown: the runs still going here end (their signal fires with the server's), and are stored."""
        for signal in list(self.signals.values()):
            signal.stop()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=20.0)

    @staticmethod
    async def thread(session: AsyncSession, principal: Principal, thread_id: uuid.UUID) -> Thread:
        """The caller's thread; another user's is a 404, like one that does not exist."""
        thread = await repository.get_thread(session, thread_id, principal.user_id)
        if thread is None:
            raise ThreadNotFound(public_id(THREAD, thread_id))
        return thread


async def _wire(events: AsyncIterator[RunEvent]) -> AsyncIterator[ServerSentEvent]:
    """A round's events as server-sent events, then `done` with `[DONE]`, as OpenAI ends a run stream."""
    async for name, data in events:
        yield server_event(name, data)
    yield ServerSentEvent(data="[DONE]", event="done", sep="\n")
