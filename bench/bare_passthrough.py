"""The benchmark's baseline: the thinnest FastAPI pass-through to an OpenAI-compatible upstream.

No auth, no database, no limits, no usage: the request body goes up as received and the
upstream's bytes come back (whole, or relayed chunk by chunk for `"stream": true`).
Served like the gateway: uvicorn, uvloop, httptools, one worker, no access log.

Usage: python bench/bare_passthrough.py --port PORT --upstream http://127.0.0.1:UPSTREAM/v1
"""

from __future__ import annotations

import argparse
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import uvicorn
from fastapi import FastAPI, Request
from starlette.responses import Response, StreamingResponse

STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
UPSTREAM_HEADERS = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}


def create_app(upstream: str) -> FastAPI:
    """The app, with one aiohttp session for its lifetime."""
    base = upstream.rstrip("/")
    session: aiohttp.ClientSession | None = None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        nonlocal session
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(sock_connect=5, sock_read=120),
            skip_auto_headers=("User-Agent",),
        )
        yield
        await session.close()

    app = FastAPI(lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Process is up."""
        return {"status": "ok"}

    async def forward(request: Request, url: str) -> Response:
        """Forward the body; answer the upstream's bytes, streamed when the body asks for it."""
        assert session is not None
        body = await request.body()
        if not STREAM_RE.search(body):
            async with session.post(url, data=body, headers=UPSTREAM_HEADERS) as upstream_response:
                payload = await upstream_response.read()
                return Response(payload, status_code=upstream_response.status, media_type="application/json")
        upstream_response = await session.post(url, data=body, headers=UPSTREAM_HEADERS)

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream_response.content.iter_any():
                    yield chunk
            finally:
                upstream_response.close()

        return StreamingResponse(relay(), status_code=upstream_response.status, media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await forward(request, base + "/chat/completions")

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        return await forward(request, base + "/responses")

    return app


def main() -> None:
    """Parse arguments and serve."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9000/v1")
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.upstream),
        host=args.host,
        port=args.port,
        workers=1,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
