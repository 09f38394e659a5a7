"""Assistants: a user's own (`/v1/assistants`) and the shared ones every user sees.

Shared assistants have no owner. Those of ASSISTANTS_FILE (one per `[profile.NAME]`, id
`asst_NAME`) are written at start-up by every process (`sync_file`) and changed only by
editing the file; an operator makes and edits others at run time through
`/admin/assistants`. Users read shared assistants and never change them (403).

Nothing here calls the upstream: a model is checked against the catalog, and tools the
gateway cannot run yet (`code_interpreter`, `file_search`) are refused by name.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.assistants import repository
from app.assistants.repository import Order
from app.assistants.schemas import (
    EXTENSIONS,
    AdminAssistantPublic,
    AssistantCreate,
    AssistantFields,
    AssistantPublic,
    AssistantUpdate,
    SharedAssistantCreate,
    SharedAssistantUpdate,
    ToolResources,
    UnsupportedTool,
)
from app.auth.principal import Principal
from app.config import Settings
from app.configcheck import usable_problems
from app.errors import Conflict, ErrorCode, InvalidRequest, PermissionDenied
from app.models import Assistant
from app.registry import Catalog
from app.threads.context import host_allowed
from app.threads.file_search import checked_resources
from app.threads.profiles import Profile, Profiles

log = logging.getLogger("app.assistants")

# Assistants one user may own: enough for an app's per-character assistants, bounded for storage.
MAX_ASSISTANTS_PER_USER = 1_000
ID_PREFIX = "asst_"
# The Assistants API's own fields, as columns of `assistant` (its metadata is the `meta` attribute).
API_FIELDS = (
    "name",
    "description",
    "instructions",
    "tools",
    "tool_resources",
    "temperature",
    "top_p",
    "response_format",
    "reasoning_effort",
)
# What a left-out or null field reads as.
EMPTY: dict[str, Any] = {"tools": [], "tool_resources": {}, "response_format": "auto"}


def new_id() -> str:
    return ID_PREFIX + secrets.token_hex(12)


def public(assistant: Assistant) -> AssistantPublic:
    """What a user sees: a shared assistant's instructions are the operator's prompt, and stay theirs."""
    fields = _public_fields(assistant)
    if assistant.user_id is None:
        fields["instructions"] = None
    return AssistantPublic(**fields)


def admin_public(assistant: Assistant) -> AdminAssistantPublic:
    extensions = {
        name: assistant.gateway[name] for name in AdminAssistantPublic.model_fields if name in assistant.gateway
    }
    return AdminAssistantPublic(**{**_public_fields(assistant), **extensions, "source": assistant.source})


def _public_fields(assistant: Assistant) -> dict[str, Any]:
    extensions = {name: assistant.gateway[name] for name in AssistantPublic.model_fields if name in assistant.gateway}
    return {
        "id": assistant.id,
        "created_at": int(assistant.created_at.timestamp()),
        "model": assistant.model,
        "metadata": assistant.meta,
        **{name: getattr(assistant, name) for name in API_FIELDS},
        "shared": assistant.user_id is None,
        **extensions,
    }


def file_row(profile: Profile) -> dict[str, Any]:
    """The shared assistant a `[profile.NAME]` of ASSISTANTS_FILE stands for."""
    extensions = profile.model_dump(include=set(EXTENSIONS), exclude_none=True, exclude_defaults=True)
    extensions["history_messages"] = profile.history_messages
    return {
        "id": ID_PREFIX + profile.name,
        "user_id": None,
        "source": "file",
        "model": profile.model,
        "name": profile.display_name or profile.name,
        "description": None,
        "instructions": profile.instructions,
        "tools": [],
        "tool_resources": {},
        "temperature": profile.temperature,
        "top_p": None,
        "response_format": "auto",
        "reasoning_effort": None,
        "gateway": extensions,
    }


class AssistantService:
    def __init__(self, settings: Settings, catalog: Catalog, profiles: Profiles) -> None:
        self.settings = settings
        self.catalog = catalog
        self.profiles = profiles

    async def sync_file(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        """Write ASSISTANTS_FILE's profiles as shared assistants (every process, at start-up)."""
        async with sessionmaker.begin() as session:
            rows = [file_row(profile) for profile in self.profiles.profiles.values()]
            taken = await repository.sync_file_assistants(session, rows)
        for assistant_id in taken:
            log.warning(
                "ASSISTANTS_FILE's %s is not served: an assistant made through /admin has that id", assistant_id
            )

    # A user's own.

    async def create(self, session: AsyncSession, principal: Principal, body: AssistantCreate) -> Assistant:
        self.catalog.resolve(body.model, principal.tier, "chat")
        _refuse_unsupported(body)
        await checked_resources(session, body.tool_resources, principal.user_id)
        if await repository.count_owned(session, principal.user_id) >= MAX_ASSISTANTS_PER_USER:
            raise Conflict(f"You have {MAX_ASSISTANTS_PER_USER} assistants, the most one user may have.")
        assistant = Assistant(id=new_id(), user_id=principal.user_id, source="api", model=body.model)
        _apply(assistant, body)
        session.add(assistant)
        await session.flush()
        return assistant

    async def update(
        self, session: AsyncSession, principal: Principal, assistant: Assistant, body: AssistantUpdate
    ) -> Assistant:
        if assistant.user_id is None:
            raise _read_only(assistant)
        if body.model is not None:
            self.catalog.resolve(body.model, principal.tier, "chat")
            assistant.model = body.model
        _refuse_unsupported(body)
        await checked_resources(session, body.tool_resources, principal.user_id)
        _apply(assistant, body)
        await session.flush()
        return assistant

    async def delete(self, session: AsyncSession, assistant: Assistant) -> None:
        if assistant.user_id is None:
            raise _read_only(assistant)
        await session.delete(assistant)

    async def page(
        self,
        session: AsyncSession,
        user_id: str | None,
        *,
        limit: int,
        order: Order,
        after: str | None,
        before: str | None,
    ) -> tuple[Sequence[Assistant], bool]:
        """A page of what `user_id` sees (None: the shared ones); `after`/`before` are ids on that list."""

        async def cursor(assistant_id: str | None, param: str) -> Assistant | None:
            if assistant_id is None:
                return None
            row = await (
                repository.get_visible(session, assistant_id, user_id)
                if user_id is not None
                else repository.get_shared(session, assistant_id)
            )
            if row is None:
                raise InvalidRequest(f"No assistant '{assistant_id}' to page from.", param=param)
            return row

        return await repository.page(
            session,
            user_id,
            limit=limit,
            order=order,
            after=await cursor(after, "after"),
            before=await cursor(before, "before"),
        )

    # Shared (the operator's).

    async def create_shared(self, session: AsyncSession, body: SharedAssistantCreate) -> Assistant:
        await self._check_shared(session, body, None)
        assistant_id = ID_PREFIX + body.slug if body.slug is not None else new_id()
        if await session.get(Assistant, assistant_id) is not None:
            raise Conflict(f"An assistant with id '{assistant_id}' exists already.", param="slug")
        assistant = Assistant(id=assistant_id, user_id=None, source="admin", model=body.model)
        _apply(assistant, body)
        session.add(assistant)
        await session.flush()
        return assistant

    async def update_shared(
        self, session: AsyncSession, assistant: Assistant, body: SharedAssistantUpdate
    ) -> Assistant:
        if assistant.source == "file":
            raise _read_only(assistant)
        if body.model is not None:
            assistant.model = body.model
        _apply(assistant, body)
        await self._check_shared(session, _as_create(assistant), assistant.id)
        await session.flush()
        return assistant

    async def delete_shared(self, session: AsyncSession, assistant: Assistant) -> None:
        if assistant.source == "file":
            raise _read_only(assistant)
        await session.delete(assistant)

    async def _check_shared(self, session: AsyncSession, body: SharedAssistantCreate, itself: str | None) -> None:
        """What start-up checks of a profile, for a shared assistant made at run time."""
        _refuse_unsupported(body)
        await checked_resources(session, body.tool_resources, None)  # any user's store: the operator's choice
        problems = usable_problems(self.catalog, "assistant", body.model, "chat", body.tiers)
        if problems:
            raise InvalidRequest("; ".join(problems), param="tiers" if body.tiers else "model")
        if body.context_url is not None and not host_allowed(body.context_url, self.settings.context_allowed_hosts):
            raise InvalidRequest(
                f"context_url {body.context_url} is not on a host of CONTEXT_ALLOWED_HOSTS.", param="context_url"
            )
        owners = await repository.chat_type_owners(session)
        taken = sorted(t for t in body.chat_types or () if owners.get(t, itself) != itself)
        if taken:
            raise Conflict(
                f"chat_type {taken[0]!r} belongs to assistant '{owners[taken[0]]}' already.", param="chat_types"
            )


def _apply(assistant: Assistant, body: AssistantFields) -> None:
    """The fields a request set (null: back to empty); the extensions set are kept in `gateway`.
    What a new assistant leaves out takes its column's default."""
    fields = body.model_dump(exclude_unset=True, by_alias=True)
    for name in API_FIELDS:
        if name in fields:
            setattr(assistant, name, fields[name] if fields[name] is not None else EMPTY.get(name))
    if "metadata" in fields:
        assistant.meta = fields["metadata"] or {}
    gateway = dict(assistant.gateway or {})
    for name in EXTENSIONS:
        if name in fields:
            if fields[name] is None:
                gateway.pop(name, None)
            else:
                gateway[name] = fields[name]
    assistant.gateway = gateway


def _as_create(assistant: Assistant) -> SharedAssistantCreate:
    """A stored shared assistant, read back as the request that would make it (to check it whole)."""
    return SharedAssistantCreate.model_validate(
        {"model": assistant.model, "tools": assistant.tools, "tool_resources": assistant.tool_resources}
        | {name: value for name, value in assistant.gateway.items() if name in SharedAssistantCreate.model_fields}
    )


def _refuse_unsupported(body: AssistantFields) -> None:
    refuse_unsupported_tools(body.tools or (), body.tool_resources)


def refuse_unsupported_tools(tools: Sequence[object], resources: ToolResources | None = None) -> None:
    """400 naming a tool (or tool resource) the gateway cannot run: `code_interpreter`, and vector stores
    made inline (`tool_resources.file_search.vector_stores`: make them with POST /v1/vector_stores)."""
    for index, tool in enumerate(tools):
        if isinstance(tool, UnsupportedTool):
            raise InvalidRequest(
                f"The '{tool.type}' tool is not supported by this gateway; use 'function' tools.",
                param=f"tools.{index}.type",
                code=ErrorCode.UNSUPPORTED_TOOL,
            )
    if resources is not None and resources.code_interpreter and resources.code_interpreter.file_ids:
        raise InvalidRequest(
            "tool_resources.code_interpreter names files; this gateway runs no code_interpreter.",
            param="tool_resources.code_interpreter",
            code=ErrorCode.UNSUPPORTED_TOOL,
        )
    if resources is not None and resources.file_search and resources.file_search.vector_stores:
        raise InvalidRequest(
            "Make the vector store with POST /v1/vector_stores, then name it in"
            " tool_resources.file_search.vector_store_ids.",
            param="tool_resources.file_search.vector_stores",
            code=ErrorCode.UNSUPPORTED_TOOL,
        )


def _read_only(assistant: Assistant) -> PermissionDenied:
    where = "ASSISTANTS_FILE" if assistant.source == "file" else "the operator"
    return PermissionDenied(
        f"Assistant '{assistant.id}' is shared and read-only here (it is kept by {where}).",
        code=ErrorCode.ASSISTANT_READ_ONLY,
    )
