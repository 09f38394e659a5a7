"""What an upstream can do, one method per API, and what each method returns.

Three providers implement it: `RemoteProvider` (any OpenAI-compatible server, with the
operator's key or a user's own), `SimulatedProvider` (offline, deterministic) and nothing
else: the call pipeline (app/calls.py) picks one per call. A new upstream-backed route
adds one method here and to both providers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from app.sse import Event


@dataclass(slots=True)
class UpstreamReply:
    """A complete 2xx answer, its bytes as they came."""

    body: bytes
    request_id: str | None
    attempts: int = 1
    upstream: str | None = None  # the upstream that answered (None: the simulated provider)


class EventStream(Protocol):
    """An open 2xx event stream; `close()` drops the connection (an abandoned stream stops upstream work)."""

    @property
    def request_id(self) -> str | None: ...
    @property
    def attempts(self) -> int: ...
    @property
    def upstream(self) -> str | None: ...
    def events(self) -> AsyncIterator[Event]: ...
    def close(self) -> None: ...


@dataclass(slots=True)
class GeneratedImage:
    data: bytes
    revised_prompt: str | None = None


@dataclass(frozen=True, slots=True)
class ImageUpload:
    """A file of an image edit, spooled to disk (never held whole in memory): `image` or `mask`."""

    field: str
    path: Path
    filename: str
    content_type: str
    size: int
    sha256: str


@dataclass(slots=True)
class Generation:
    """One image generation call's images and what the upstream said about them."""

    images: list[GeneratedImage]
    output_format: str
    size: str | None = None
    quality: str | None = None
    background: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    request_id: str | None = None
    upstream: str | None = None


@dataclass(slots=True)
class Moderation:
    """Per input, the categories it was flagged under (None: not flagged)."""

    flagged: list[list[str] | None]
    model: str
    request_id: str | None = None
    upstream: str | None = None


@dataclass(slots=True)
class RealtimeSecret:
    """OpenAI's `{value, expires_at, session}`."""

    body: dict[str, Any]
    request_id: str | None = None
    upstream: str | None = None


@dataclass(frozen=True, slots=True)
class RealtimeCallAnswer:
    """A WebRTC call the upstream set up: its SDP answer and its id there (from `Location`)."""

    sdp: str
    call_id: str
    request_id: str | None = None
    upstream: str | None = None


class Provider(Protocol):
    simulated: bool

    # The provider held to one upstream (where a stored response lives); only the operator's failover
    # provider has more than one (app/upstream/failover.py), the others are their one upstream.
    def on(self, upstream: str | None) -> Provider: ...

    async def chat(self, payload: dict[str, Any]) -> UpstreamReply: ...
    async def chat_stream(self, payload: dict[str, Any]) -> EventStream: ...
    async def images(self, params: dict[str, Any]) -> Generation: ...
    # Streamed generations (`stream: true`): `image_generation.partial_image` events, then `...completed`.
    async def images_stream(self, params: dict[str, Any]) -> EventStream: ...
    # Edits (`/images/edits`, multipart): the same fields, and the uploaded images and mask.
    async def image_edit(self, params: dict[str, Any], uploads: list[ImageUpload]) -> Generation: ...
    async def image_edit_stream(self, params: dict[str, Any], uploads: list[ImageUpload]) -> EventStream: ...
    async def moderate(self, texts: list[str], model: str) -> Moderation: ...
    # `length`: the vector length the model answers with (the payload's `dimensions`, else the model's).
    async def embeddings(self, payload: dict[str, Any], length: int) -> UpstreamReply: ...
    async def realtime_secret(self, body: dict[str, Any]) -> RealtimeSecret: ...
    # WebRTC calls (OpenAI's unified interface): set one up from the caller's SDP offer and a session;
    # end one. `session["model"]` is the catalog's id (the failover provider names it per upstream).
    async def realtime_call(self, sdp: str, session: dict[str, Any]) -> RealtimeCallAnswer: ...
    async def realtime_hangup(self, call_id: str) -> None: ...
    # The Responses API: create (plain or streamed), and the calls on a response or its inputs
    # (`path` under the API root, e.g. "/responses/{id}/input_items").
    async def responses(self, payload: dict[str, Any]) -> UpstreamReply: ...
    async def responses_stream(self, payload: dict[str, Any]) -> EventStream: ...
    # A background response's events again, those after `starting_after` (a sequence number).
    async def responses_resume(self, response_id: str, starting_after: int) -> EventStream: ...
    async def responses_call(
        self, method: str, path: str, params: dict[str, str] | None = None, payload: dict[str, Any] | None = None
    ) -> UpstreamReply: ...
