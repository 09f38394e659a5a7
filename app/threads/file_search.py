"""file_search in runs: the passages a round's prompt carries, and the citations its reply makes of them.

Before a run's first round (app/threads/runs.py), a run whose tools include `file_search` and
whose assistant or thread names vector stores searches them with the newest user message (the
query is embedded through the call pipeline and charged to the caller: app/vector_stores). The
model gets the ranked passages in a system message, each under a marker `【n†source】`, and is
asked to cite with them. As the reply streams (app/threads/rounds.py), `Citations` finds each
complete marker in the text so far and makes it a `file_citation` annotation (the marker, its
place in the message, the passage's file), sent in the delta that completed it and stored with
the message. A `file_search` run step records the query, the ranking options and the results
(their text only when a client asks with `include[]=` INCLUDE_CONTENT).

Message attachments with a `file_search` tool go into the thread's vector store, made for it
on first use (expiring 7 days after its last activity, as OpenAI's did; made again once expired).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.assistants.schemas import ToolResources
from app.auth.principal import Principal
from app.errors import ErrorCode, InvalidRequest, NotFound
from app.knowledge.search import SearchResult
from app.models import Thread, VectorStore
from app.threads.ids import public_id
from app.threads.schemas import Attachment
from app.vector_stores.errors import VectorStoreExpired, VectorStoreNotFound

VECTOR_STORE, FILE = "vs_", "file-"
INCLUDE_CONTENT = "step_details.tool_calls[*].file_search.results[*].content"
# OpenAI's default for the models that take file_search, and its bound.
DEFAULT_RESULTS = 20
# A message's start is the question: the whole of a long one would pass the embedding model's input.
MAX_QUERY_CHARS = 4000
# A marker as we write it (`【3†source】`), or as models that learnt OpenAI's write it (`【4:3†source】`).
MARKER = re.compile(r"【(?:\d+:)?(\d+)†[^】\n]{0,100}】")
LONGEST_MARKER = 120
# How long a run waits for its stores' files still being indexed (a file attached with the message).
PENDING_WAIT_SECONDS = 60.0
PENDING_POLL_SECONDS = 0.25
THREAD_STORE_DAYS = 7

SOURCES_HEADER = (
    "Passages found in the user's files for this conversation (file_search). Answer from them when they"
    " are relevant, and cite each passage you use by writing its marker, exactly as shown, right after"
    " what it supports, e.g. 【0†source】. Do not cite passages you did not use."
)


class Knowledge(Protocol):
    """What runs need of the vector stores (app/vector_stores/service.py)."""

    async def search(
        self,
        principal: Principal,
        vector_store_ids: Sequence[uuid.UUID],
        query: str,
        *,
        max_num_results: int = 10,
        score_threshold: float = 0.0,
        filters: object = None,
        rewrite: bool = False,
        request_id: str,
        shared: Sequence[uuid.UUID] = (),
    ) -> list[SearchResult]: ...

    async def create_store(
        self,
        principal: Principal,
        *,
        file_ids: Sequence[uuid.UUID],
        name: str | None = None,
        metadata: dict[str, str] | None = None,
        chunking_strategy: object = None,
        expires_after: dict[str, Any] | None = None,
    ) -> VectorStore: ...

    async def attach_files(
        self, principal: Principal, vector_store_id: uuid.UUID, file_ids: Sequence[uuid.UUID]
    ) -> None: ...

    async def pending_files(self, vector_store_ids: Sequence[uuid.UUID]) -> int: ...


def parse_prefixed(prefix: str, value: str) -> uuid.UUID | None:
    if not value.startswith(prefix) or len(value) != len(prefix) + 32:
        return None
    try:
        return uuid.UUID(hex=value[len(prefix) :])
    except ValueError:
        return None


def store_ids(*resources: dict[str, Any] | None) -> list[uuid.UUID]:
    """The vector stores `tool_resources` name (an assistant's, then a thread's), each once."""
    found: list[uuid.UUID] = []
    for resource in resources:
        for value in ((resource or {}).get("file_search") or {}).get("vector_store_ids") or ():
            parsed = parse_prefixed(VECTOR_STORE, str(value))
            if parsed is not None and parsed not in found:
                found.append(parsed)
    return found


async def checked_resources(
    session: AsyncSession, resources: ToolResources | None, owner: str | None
) -> dict[str, Any] | None:
    """`tool_resources` as stored, once each vector store named exists (and is `owner`'s, for a user's
    assistant or thread; a shared assistant may name any user's); None when none were sent."""
    if resources is None:
        return None
    named = resources.file_search.vector_store_ids if resources.file_search else []
    for index, value in enumerate(named):
        store_id = parse_prefixed(VECTOR_STORE, value)
        query = select(VectorStore.id).where(VectorStore.id == store_id)
        if owner is not None:
            query = query.where(VectorStore.user_id == owner)
        if store_id is None or await session.scalar(query) is None:
            raise InvalidRequest(
                f"No vector store found with id '{value}'.",
                param=f"tool_resources.file_search.vector_store_ids.{index}",
                code=ErrorCode.NOT_FOUND,
            )
    return {"file_search": {"vector_store_ids": list(named)}} if named else {}


def file_search_tool(tools: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    return next((tool for tool in tools if tool.get("type") == "file_search"), None)


async def attach(knowledge: Knowledge, principal: Principal, thread: Thread, attachments: Sequence[Attachment]) -> bool:
    """Put the files of `file_search` attachments into the thread's vector store (made on first use, and
    named in the thread's `tool_resources`); True when the thread's resources changed."""
    files: list[uuid.UUID] = []
    for index, attachment in enumerate(attachments):
        kinds = {str(tool.get("type")) for tool in attachment.tools}
        if kinds - {"file_search"}:
            other = sorted(kinds - {"file_search"})[0]
            raise InvalidRequest(
                f"Attachments take the 'file_search' tool only; this gateway runs no {other}.",
                param=f"attachments.{index}.tools",
                code=ErrorCode.UNSUPPORTED_TOOL,
            )
        file_id = parse_prefixed(FILE, attachment.file_id)
        if file_id is None:
            raise NotFound(f"No file found with id '{attachment.file_id}'.", param=f"attachments.{index}.file_id")
        if "file_search" in kinds and file_id not in files:
            files.append(file_id)
    if not files:
        return False
    existing = store_ids(thread.tool_resources)
    if existing:
        try:
            await knowledge.attach_files(principal, existing[0], files)
            return False
        except (VectorStoreNotFound, VectorStoreExpired):
            pass  # the thread's store expired (or was deleted): the thread gets a new one
    store = await knowledge.create_store(
        principal,
        file_ids=files,
        name=f"thread {public_id('thread_', thread.id)}",
        expires_after={"anchor": "last_active_at", "days": THREAD_STORE_DAYS},
    )
    thread.tool_resources = {
        **thread.tool_resources,
        "file_search": {"vector_store_ids": [VECTOR_STORE + store.id.hex]},
    }
    return True


async def wait_for_files(knowledge: Knowledge, stores: Sequence[uuid.UUID], deadline: float) -> None:
    """Until no file of the stores is being indexed, or the deadline (the run then searches what is ready)."""
    # Polled: another replica may be the one indexing them.
    while time.monotonic() < deadline and await knowledge.pending_files(stores):  # noqa: ASYNC110
        await asyncio.sleep(PENDING_POLL_SECONDS)


@dataclass(frozen=True, slots=True)
class Passage:
    """A result as the run's prompt and step keep it."""

    file_id: uuid.UUID
    filename: str
    text: str
    score: float

    @classmethod
    def of(cls, result: SearchResult) -> Passage:
        return cls(result.file_id, result.filename, result.text, result.score)


@dataclass(slots=True)
class Searched:
    """One file_search of a run: what was asked, how results were ranked, and what was found. Made by
    the first round (`recorded` once its step is written), read back from that step by later ones."""

    query: str
    ranking_options: dict[str, Any]
    results: list[Passage]
    call_id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))
    recorded: bool = False

    @classmethod
    def from_step(cls, details: dict[str, Any]) -> Searched | None:
        """The search a run's `tool_calls` step recorded (with the results' text), if it is one."""
        call = next((c for c in details.get("tool_calls") or () if c.get("type") == "file_search"), None)
        if call is None:
            return None
        search = call["file_search"]
        passages = [
            Passage(
                uuid.UUID(hex=result["file_id"].removeprefix(FILE)),
                result["file_name"],
                "".join(part.get("text", "") for part in result.get("content") or ()),
                result["score"],
            )
            for result in search.get("results") or ()
        ]
        return cls(search.get("query", ""), search.get("ranking_options", {}), passages, call["id"], recorded=True)

    def sources_message(self) -> dict[str, str]:
        """The system message that gives the model the passages, each under its marker."""
        if not self.results:
            return {"role": "system", "content": "file_search found no passage in the user's files for this question."}
        passages = [f"【{n}†source】 (file: {result.filename})\n{result.text}" for n, result in enumerate(self.results)]
        return {"role": "system", "content": "\n\n".join([SOURCES_HEADER, *passages])}

    def step_details(self) -> dict[str, Any]:
        results = [
            {
                "file_id": FILE + result.file_id.hex,
                "file_name": result.filename,
                "score": result.score,
                "content": [{"type": "text", "text": result.text}],
            }
            for result in self.results
        ]
        search = {"query": self.query, "ranking_options": self.ranking_options, "results": results}
        return {
            "type": "tool_calls",
            "tool_calls": [{"id": self.call_id, "type": "file_search", "file_search": search}],
        }


def without_content(details: dict[str, Any]) -> dict[str, Any]:
    """Step details as shown unless INCLUDE_CONTENT is asked for: the results without their text."""
    calls = details.get("tool_calls")
    if not isinstance(calls, list) or not any(call.get("type") == "file_search" for call in calls):
        return details
    shown = []
    for call in calls:
        if call.get("type") == "file_search":
            search = call["file_search"]
            results = [{k: v for k, v in result.items() if k != "content"} for result in search.get("results", [])]
            call = {**call, "file_search": {**search, "results": results}}
        shown.append(call)
    return {**details, "tool_calls": shown}


class Citations:
    """The `file_citation` annotations of a reply that cites a round's passages, found as it streams."""

    def __init__(self, searched: Searched) -> None:
        self.results = searched.results
        self.text = ""
        self.annotations: list[dict[str, Any]] = []
        self._scanned = 0  # markers end after this: the text before it holds no unfinished one

    def feed(self, piece: str) -> list[dict[str, Any]]:
        """The annotations the text completed by `piece` makes (each with its `index` among them all)."""
        start = max(self._scanned, len(self.text) - LONGEST_MARKER)
        self.text += piece
        made = []
        for match in MARKER.finditer(self.text, start):
            if match.start() < self._scanned:
                continue
            self._scanned = match.end()
            n = int(match.group(1))
            if n >= len(self.results):
                continue  # a marker the model made up
            annotation = {
                "type": "file_citation",
                "text": match.group(0),
                "start_index": match.start(),
                "end_index": match.end(),
                "file_citation": {"file_id": FILE + self.results[n].file_id.hex},
            }
            made.append({"index": len(self.annotations), **annotation})
            self.annotations.append(annotation)
        return made
