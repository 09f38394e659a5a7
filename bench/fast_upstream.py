"""The fastest fake OpenAI upstream we can serve on one core, for gateway benchmarks.

Usage: python bench/fast_upstream.py --port PORT [--stream-chunks N] [--chunk-delay-ms D]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

MAX_HEAD = 64 * 1024
CREATED = 1_700_000_000
MODEL = "gpt-4o-mini"
CHAT_PATH = b"/v1/chat/completions"
RESPONSES_PATH = b"/v1/responses"
HEALTH_PATH = b"/health"

STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
USAGE_RE = re.compile(rb'"include_usage"\s*:\s*true')
CONNECTION_CLOSE_RE = re.compile(rb"\r\nconnection:[ \t]*close")
CONNECTION_KEEP_ALIVE_RE = re.compile(rb"\r\nconnection:[ \t]*keep-alive")
CHUNKED_RE = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked")


def _dumps(value: Any) -> bytes:
    """Compact JSON bytes."""
    return json.dumps(value, separators=(",", ":")).encode()


def _http_response(status: str, body: bytes, content_type: bytes, keep_alive: bool) -> bytes:
    """A complete HTTP/1.1 response with a content-length body."""
    connection = b"keep-alive" if keep_alive else b"close"
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\n"
        b"content-type: " + content_type + b"\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n"
        b"x-request-id: req_bench\r\n"
        b"connection: " + connection + b"\r\n\r\n" + body
    )


def _stream_head(keep_alive: bool) -> bytes:
    """The status line and headers of a chunked SSE response."""
    connection = b"keep-alive" if keep_alive else b"close"
    return (
        b"HTTP/1.1 200 OK\r\n"
        b"content-type: text/event-stream\r\n"
        b"cache-control: no-cache\r\n"
        b"transfer-encoding: chunked\r\n"
        b"x-request-id: req_bench\r\n"
        b"connection: " + connection + b"\r\n\r\n"
    )


def _chunk(data: bytes) -> bytes:
    """One HTTP chunk of the given data."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _usage(completion_tokens: int) -> dict[str, Any]:
    """A chat usage object."""
    return {
        "prompt_tokens": 11,
        "completion_tokens": completion_tokens,
        "total_tokens": 11 + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def _completion_body() -> bytes:
    """The fixed non-streaming chat.completion."""
    return _dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": CREATED,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "Hello from the fast upstream.",
                        "refusal": None,
                    },
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": _usage(7),
            "system_fingerprint": "fp_bench",
        }
    )


def _stream_events(content_chunks: int, include_usage: bool) -> list[bytes]:
    """The SSE events of a chat stream, each framed as one HTTP chunk, then [DONE] and the end."""
    base = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "system_fingerprint": "fp_bench",
    }
    extra = {"usage": None} if include_usage else {}

    def event(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _chunk(b"data: " + _dumps({**base, "choices": [choice], **extra}) + b"\n\n")

    events = [event({"role": "assistant", "content": ""})]
    events += [event({"content": f" token{i}"}) for i in range(content_chunks)]
    events.append(event({}, "stop"))
    if include_usage:
        usage_event = {**base, "choices": [], "usage": _usage(content_chunks)}
        events.append(_chunk(b"data: " + _dumps(usage_event) + b"\n\n"))
    # [DONE] and the terminating zero-length chunk always travel together.
    events.append(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    return events


def _response_object(output_tokens: int, status: str = "completed") -> dict[str, Any]:
    """The Responses API's response object, as the last event or the plain answer carries it."""
    done = status == "completed"
    message = {
        "type": "message",
        "id": "msg_bench",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "Hello from the fast upstream.", "annotations": []}],
    }
    usage = {
        "input_tokens": 11,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 11 + output_tokens,
    }
    return {
        "id": "resp_bench",
        "object": "response",
        "created_at": CREATED,
        "status": status,
        "model": MODEL,
        "output": [message] if done else [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": usage if done else None,
    }


def _response_events(content_chunks: int) -> list[bytes]:
    """The named events of a streamed response, each one HTTP chunk, the last with the end of the body."""

    def event(number: int, body: dict[str, Any]) -> bytes:
        name = body["type"].encode()
        return _chunk(b"event: " + name + b"\ndata: " + _dumps({**body, "sequence_number": number}) + b"\n\n")

    where = {"item_id": "msg_bench", "output_index": 0, "content_index": 0}
    bodies: list[dict[str, Any]] = [{"type": "response.created", "response": _response_object(0, "in_progress")}]
    bodies += [
        {"type": "response.output_text.delta", **where, "delta": f" token{i}", "logprobs": []}
        for i in range(content_chunks)
    ]
    bodies.append({"type": "response.completed", "response": _response_object(content_chunks)})
    events = [event(number, body) for number, body in enumerate(bodies)]
    events[-1] += b"0\r\n\r\n"  # no [DONE]: the terminal event and the end of the body travel together
    return events


@dataclass(frozen=True)
class Responses:
    """Every response pre-encoded, indexed by keep-alive where it matters."""

    completion: tuple[bytes, bytes]
    health: tuple[bytes, bytes]
    not_found: tuple[bytes, bytes]
    stream_head: tuple[bytes, bytes]
    stream_events: tuple[list[bytes], list[bytes]]
    response: tuple[bytes, bytes]
    response_events: list[bytes]
    bad_request: bytes
    not_implemented: bytes
    head_too_large: bytes
    chunk_delay: float

    @classmethod
    def build(cls, content_chunks: int, chunk_delay_ms: float) -> Responses:
        """Encode all responses once, at start-up."""
        json_type = b"application/json"
        completion = _completion_body()
        health = b'{"status":"ok"}'
        not_found = _dumps(
            {
                "error": {
                    "message": "Not found",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            }
        )

        def both(status: str, body: bytes) -> tuple[bytes, bytes]:
            return (
                _http_response(status, body, json_type, keep_alive=False),
                _http_response(status, body, json_type, keep_alive=True),
            )

        return cls(
            completion=both("200 OK", completion),
            health=both("200 OK", health),
            not_found=both("404 Not Found", not_found),
            stream_head=(_stream_head(False), _stream_head(True)),
            stream_events=(
                _stream_events(content_chunks, include_usage=False),
                _stream_events(content_chunks, include_usage=True),
            ),
            response=both("200 OK", _dumps(_response_object(7))),
            response_events=_response_events(content_chunks),
            bad_request=_http_response("400 Bad Request", b"{}", json_type, keep_alive=False),
            not_implemented=_http_response("501 Not Implemented", b"{}", json_type, keep_alive=False),
            head_too_large=_http_response("431 Request Header Fields Too Large", b"{}", json_type, keep_alive=False),
            chunk_delay=chunk_delay_ms / 1000.0,
        )


class UpstreamProtocol(asyncio.Protocol):
    """One client connection: a minimal HTTP/1.1 keep-alive server."""

    __slots__ = ("_buffer", "_busy", "_loop", "_pending", "_responses", "_timer", "_transport")

    def __init__(self, responses: Responses) -> None:
        """Start with an empty buffer and no response in flight."""
        self._responses = responses
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._busy = False
        self._pending: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Remember the transport."""
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop any delayed stream writes."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None

    def data_received(self, data: bytes) -> None:
        """Buffer bytes and answer every complete request, unless a stream is in flight."""
        self._buffer += data
        if not self._busy:
            self._process()

    def _process(self) -> None:
        """Parse and answer complete requests from the buffer."""
        buffer = self._buffer
        while self._transport is not None and not self._busy:
            head_end = buffer.find(b"\r\n\r\n")
            if head_end < 0:
                if len(buffer) > MAX_HEAD:
                    self._fail(self._responses.head_too_large)
                return
            line_end = buffer.find(b"\r\n")
            request_line = bytes(buffer[:line_end])
            # The header block keeps its leading CRLF so every header is found as b"\r\nname:".
            headers = bytes(buffer[line_end:head_end]).lower()
            if CHUNKED_RE.search(headers):
                self._fail(self._responses.not_implemented)
                return
            length = _content_length(headers)
            if length is None:
                self._fail(self._responses.bad_request)
                return
            body_start = head_end + 4
            if len(buffer) < body_start + length:
                return
            body = bytes(buffer[body_start : body_start + length])
            del buffer[: body_start + length]
            if not self._answer(request_line, headers, body):
                return

    def _answer(self, request_line: bytes, headers: bytes, body: bytes) -> bool:
        """Write the response for one request; False if the connection is closing."""
        parts = request_line.split(b" ")
        if len(parts) != 3:
            self._fail(self._responses.bad_request)
            return False
        method, target, version = parts
        if version == b"HTTP/1.1":
            keep_alive = CONNECTION_CLOSE_RE.search(headers) is None
        else:
            keep_alive = CONNECTION_KEEP_ALIVE_RE.search(headers) is not None
        path = target.split(b"?", 1)[0]
        responses = self._responses
        transport = self._transport
        assert transport is not None
        if path == CHAT_PATH and method == b"POST":
            if STREAM_RE.search(body):
                include_usage = USAGE_RE.search(body) is not None
                self._start_stream(keep_alive, responses.stream_events[include_usage])
                return keep_alive
            transport.write(responses.completion[keep_alive])
        elif path == RESPONSES_PATH and method == b"POST":
            if STREAM_RE.search(body):
                self._start_stream(keep_alive, responses.response_events)
                return keep_alive
            transport.write(responses.response[keep_alive])
        elif path == HEALTH_PATH and method == b"GET":
            transport.write(responses.health[keep_alive])
        else:
            transport.write(responses.not_found[keep_alive])
        if not keep_alive:
            transport.close()
        return keep_alive

    def _start_stream(self, keep_alive: bool, events: list[bytes]) -> None:
        """Send a stream's events, all at once or one per chunk delay."""
        responses = self._responses
        transport = self._transport
        assert transport is not None
        head = responses.stream_head[keep_alive]
        if not responses.chunk_delay:
            transport.write(head + b"".join(events))
            if not keep_alive:
                transport.close()
            return
        self._busy = True
        transport.write(head + events[0])
        self._pending = list(reversed(events[1:]))
        self._schedule(keep_alive)

    def _schedule(self, keep_alive: bool) -> None:
        """Write the next stream event after the chunk delay."""
        self._timer = self._loop.call_later(self._responses.chunk_delay, self._send_next, keep_alive)

    def _send_next(self, keep_alive: bool) -> None:
        """Write one pending stream event; after the last, serve any buffered request."""
        self._timer = None
        transport = self._transport
        if transport is None:
            return
        transport.write(self._pending.pop())
        if self._pending:
            self._schedule(keep_alive)
            return
        self._busy = False
        if not keep_alive:
            transport.close()
            return
        self._process()

    def _fail(self, response: bytes) -> None:
        """Answer an unusable request and close the connection."""
        if self._transport is not None:
            self._transport.write(response)
            self._transport.close()


def _content_length(headers: bytes) -> int | None:
    """The content-length value (0 if absent), or None if it is malformed."""
    start = headers.find(b"\r\ncontent-length:")
    if start < 0:
        return 0
    start += len(b"\r\ncontent-length:")
    end = headers.find(b"\r\n", start)
    try:
        length = int(headers[start:] if end < 0 else headers[start:end])
    except ValueError:
        return None
    return length if length >= 0 else None


async def serve(host: str, port: int, responses: Responses) -> None:
    """Listen and serve until cancelled."""
    loop = asyncio.get_running_loop()
    factory = functools.partial(UpstreamProtocol, responses)
    server = await loop.create_server(factory, host, port, reuse_address=True, backlog=2048)
    address = server.sockets[0].getsockname()
    # The benchmark harness waits for this line before it starts sending load.
    print(f"fast_upstream listening on http://{address[0]}:{address[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    """Parse arguments and run the server, on uvloop when it is installed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stream-chunks", type=int, default=8)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    responses = Responses.build(args.stream_chunks, args.chunk_delay_ms)
    coroutine = serve(args.host, args.port, responses)
    try:
        import uvloop
    except ImportError:
        runner: Callable[[Any], None] = asyncio.run
    else:
        runner = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(coroutine)


if __name__ == "__main__":
    main()
