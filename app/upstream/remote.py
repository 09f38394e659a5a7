"""A real OpenAI-compatible upstream, called with one key: the operator's or a user's own.

Chat, embeddings and the Responses API go over the lean aiohttp client (app/upstream/http.py); images, moderation and
realtime secrets and calls through the `openai` SDK with `max_retries=0` (retried by our policy,
like the pass-through). Image answers are read raw: megabytes of base64 are decoded off
the event loop instead of being parsed into the SDK's models and dumped again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import IO, Any, cast

import aiohttp
import orjson
from openai import AsyncAzureOpenAI, AsyncOpenAI, DefaultAsyncHttpxClient

from app.config import Settings
from app.errors import UpstreamError
from app.sse import CHAT_COMPLETIONS, IMAGES, RESPONSES
from app.upstream.http import UpstreamHTTP, UpstreamStream
from app.upstream.provider import (
    GeneratedImage,
    Generation,
    ImageUpload,
    Moderation,
    RealtimeCallAnswer,
    RealtimeSecret,
    UpstreamReply,
)
from app.upstream.retry import RetryPolicy
from app.upstream.targets import Target

# How long the upstream may take to answer a WebRTC call's offer, beyond connecting.
CALL_SETUP_SECONDS = 20.0


class RemoteProvider:
    simulated = False

    def __init__(
        self,
        settings: Settings,
        target: Target,
        *,
        retries: int | None = None,
        sdk_transport: DefaultAsyncHttpxClient | None = None,
    ) -> None:
        self.target = target
        self.http = UpstreamHTTP(settings, target, retries)
        self.retry = RetryPolicy(settings, retries)
        self.sdk = sdk_client(target, sdk_transport)
        # The SDK reads OPENAI_ORG_ID / OPENAI_PROJECT_ID from the environment: the operator's, never a user's.
        self.sdk.organization = None
        self.sdk.project = None
        self._owns_transport = sdk_transport is None

    def on(self, upstream: str | None) -> RemoteProvider:
        return self

    async def close(self) -> None:
        await self.http.close()
        if self._owns_transport:
            await self.sdk.close()

    async def chat(self, payload: dict[str, Any]) -> UpstreamReply:
        return await self.http.request("POST", "/chat/completions", orjson.dumps(payload), model=payload["model"])

    async def chat_stream(self, payload: dict[str, Any]) -> UpstreamStream:
        body = orjson.dumps(payload)
        return await self.http.open_stream("/chat/completions", body, CHAT_COMPLETIONS, model=payload["model"])

    async def embeddings(self, payload: dict[str, Any], length: int) -> UpstreamReply:
        return await self.http.request("POST", "/embeddings", orjson.dumps(payload), model=payload["model"])

    async def responses(self, payload: dict[str, Any]) -> UpstreamReply:
        return await self.http.post("/responses", orjson.dumps(payload))

    async def responses_stream(self, payload: dict[str, Any]) -> UpstreamStream:
        return await self.http.open_stream("/responses", orjson.dumps(payload), RESPONSES)

    async def responses_resume(self, response_id: str, starting_after: int) -> UpstreamStream:
        params = {"stream": "true", "starting_after": str(starting_after)}
        return await self.http.open_stream(f"/responses/{response_id}", None, RESPONSES, method="GET", params=params)

    async def responses_call(
        self, method: str, path: str, params: dict[str, str] | None = None, payload: dict[str, Any] | None = None
    ) -> UpstreamReply:
        return await self.http.request(method, path, orjson.dumps(payload) if payload is not None else None, params)

    async def images(self, params: dict[str, Any]) -> Generation:
        """Retried until the upstream answers; a body that breaks off after that is billed, not retried."""

        async def attempt(_: int) -> tuple[bytes, str | None]:
            async with self.sdk.images.with_streaming_response.generate(**params) as response:
                try:
                    return await response.read(), response.request_id
                except Exception as error:
                    raise UpstreamError("The upstream's image answer broke off.", billed=True) from error

        body, request_id = await self.retry.run(attempt)
        return await asyncio.to_thread(parse_generation, body, request_id, self.target.name)

    async def images_stream(self, params: dict[str, Any]) -> UpstreamStream:
        body = orjson.dumps(params)
        return await self.http.open_stream("/images/generations", body, IMAGES, model=params["model"])

    async def image_edit(self, params: dict[str, Any], uploads: list[ImageUpload]) -> Generation:
        """Multipart, the files read from disk as they are sent; retried like the other plain calls."""
        async with edit_form(params, uploads) as form:
            reply = await self.http.request("POST", "/images/edits", form, model=params["model"])
        return await asyncio.to_thread(parse_generation, reply.body, reply.request_id, self.target.name)

    async def image_edit_stream(self, params: dict[str, Any], uploads: list[ImageUpload]) -> UpstreamStream:
        async with edit_form(params, uploads) as form:
            return await self.http.open_stream("/images/edits", form, IMAGES, model=params["model"])

    async def moderate(self, texts: list[str], model: str) -> Moderation:
        result = await self.retry.run(lambda _: self.sdk.moderations.with_raw_response.create(input=texts, model=model))
        body = orjson.loads(result.http_response.content)
        flagged: list[list[str] | None] = []
        for item in body.get("results") or []:
            categories = [name for name, hit in (item.get("categories") or {}).items() if hit]
            flagged.append((categories or ["unspecified"]) if item.get("flagged") else None)
        if len(flagged) != len(texts):
            raise UpstreamError("The upstream moderation answer did not cover every input.")
        return Moderation(flagged, str(body.get("model") or model), result.request_id, self.target.name)

    async def realtime_secret(self, body: dict[str, Any]) -> RealtimeSecret:
        response = await self.retry.run(
            lambda _: self.sdk.realtime.client_secrets.create(
                expires_after=body["expires_after"], session=body["session"]
            )
        )
        return RealtimeSecret(response.to_dict(), response._request_id, self.target.name)

    async def realtime_call(self, sdp: str, session: dict[str, Any]) -> RealtimeCallAnswer:
        """The SDK's multipart `sdp` + `session`; the call's id is the last part of the answer's `Location`."""
        raw = await self.retry.run(
            lambda _: self.sdk.realtime.calls.with_raw_response.create(
                sdp=sdp, session=cast(Any, session), timeout=self.target.connect_timeout + CALL_SETUP_SECONDS
            )
        )
        answer = raw.http_response
        call_id = answer.headers.get("location", "").rstrip("/").rsplit("/", 1)[-1]
        if not answer.content.startswith(b"v=0") or not call_id.startswith("rtc_"):
            # The upstream may have set the call up: `billed` keeps it from being tried elsewhere.
            raise UpstreamError("The upstream's call answer has no SDP or no call id (Location).", billed=True)
        return RealtimeCallAnswer(answer.content.decode(), call_id, raw.request_id, self.target.name)

    async def realtime_hangup(self, call_id: str) -> None:
        await self.retry.run(lambda _: self.sdk.realtime.calls.hangup(call_id))


@contextlib.asynccontextmanager
async def edit_form(
    params: dict[str, Any], uploads: list[ImageUpload]
) -> AsyncIterator[Callable[[], aiohttp.FormData]]:
    """A maker of the edit's multipart form, one per attempt: the fields as strings, the images as
    `image` (one) or `image[]` (several, as the SDK names them) and the mask; each file is opened for its
    attempt and read in chunks while sent (aiohttp, off the event loop). Every file it opened is closed
    at the end."""
    opened: list[IO[bytes]] = []
    images = [upload for upload in uploads if upload.field == "image"]

    def make() -> aiohttp.FormData:
        form = aiohttp.FormData()
        for name, value in params.items():
            form.add_field(name, ("true" if value else "false") if isinstance(value, bool) else str(value))
        for upload in uploads:
            handle = upload.path.open("rb")
            opened.append(handle)
            name = upload.field if upload.field == "mask" or len(images) == 1 else "image[]"
            form.add_field(name, handle, filename=upload.filename, content_type=upload.content_type)
        return form

    try:
        yield make
    finally:
        for handle in opened:
            handle.close()


def sdk_client(target: Target, transport: DefaultAsyncHttpxClient | None) -> AsyncOpenAI:
    """The SDK's client for the colder routes (images, moderation, realtime secrets) on this upstream."""
    if target.api == "azure":
        return AsyncAzureOpenAI(
            api_key=target.api_key,
            azure_endpoint=target.base_url,
            api_version=target.api_version,
            default_headers=dict(target.headers),
            timeout=target.read_timeout,
            max_retries=0,
            http_client=transport,
        )
    return AsyncOpenAI(
        api_key=target.api_key,
        base_url=target.base_url,
        default_headers=dict(target.headers),
        timeout=target.read_timeout,
        max_retries=0,
        http_client=transport,
    )


def parse_generation(body: bytes, request_id: str | None, upstream: str | None = None) -> Generation:
    """Decode an images answer (CPU work: run it in a thread)."""
    try:
        parsed = orjson.loads(body)
        images = [
            GeneratedImage(base64.b64decode(item["b64_json"], validate=True), item.get("revised_prompt"))
            for item in parsed["data"]
        ]
    except (orjson.JSONDecodeError, KeyError, TypeError, binascii.Error) as error:
        raise UpstreamError(
            "The upstream's image answer could not be read (no base64 image data).", billed=True
        ) from error
    if not images:
        raise UpstreamError("The upstream answered without any image.", billed=True)
    usage = parsed.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    return Generation(
        images=images,
        output_format=_text(parsed.get("output_format")) or "png",
        size=_text(parsed.get("size")),
        quality=_text(parsed.get("quality")),
        background=_text(parsed.get("background")),
        input_tokens=usage.get("input_tokens"),
        output_tokens=usage.get("output_tokens"),
        request_id=request_id,
        upstream=upstream,
    )


def _text(value: object) -> str | None:
    """An option the upstream reports back: a string, or nothing (anything else is not one it set)."""
    return value if isinstance(value, str) else None
