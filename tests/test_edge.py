"""The HTTP edge (app/server.py) on a real `python -m app serve`, spoken to over raw sockets.

Slow headers and slow bodies are cut with 408, oversized headers with 431, connections past
the per-process cap get 503 with `retry-after`, and meanwhile /healthz keeps answering.
Timing checks are only generous upper bounds on when a connection was closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import pytest_asyncio

from support.auth import ADMIN_KEY
from support.gateway import GatewayProcess, gateway_env, gateway_process
from support.waiting import wait_for

TIMEOUT = 1.0  # the edge gateway's header and body timeouts
GRACE = 5.0  # how much later than its timeout a connection may be closed
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def code(self) -> str:
        return str(json.loads(self.body)["error"]["code"])


def parse(raw: bytes) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split()[1]), headers, body)


async def connect(gateway: GatewayProcess) -> Connection:
    address = urlsplit(gateway.url)
    assert address.hostname is not None and address.port is not None
    return await asyncio.open_connection(address.hostname, address.port)


async def until_closed(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the gateway sends until it closes the connection (fails if it is still open after `seconds`)."""
    try:
        return await asyncio.wait_for(reader.read(), seconds)
    except ConnectionResetError:
        return b""  # reset without an answer: the caller's check on the answer fails
    except TimeoutError:
        raise AssertionError(f"the gateway left the connection open for {seconds:g} s") from None


def close_all(connections: list[Connection]) -> None:
    for _, writer in connections:
        writer.close()


async def keep_sending(writer: asyncio.StreamWriter, chunk: bytes, interval: float) -> None:
    """Dribble `chunk` every `interval` seconds until the gateway stops reading."""
    with contextlib.suppress(ConnectionError):
        while not writer.is_closing():
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(interval)


async def healthy(gateway: GatewayProcess) -> None:
    response = await gateway.client.get("/healthz")
    assert response.status_code == 200


@pytest_asyncio.fixture(scope="module")
async def edge(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GatewayProcess]:
    """A gateway process with 1 s header and body timeouts (and the default header cap, 16 KiB)."""
    env = gateway_env(database_url, None, HEADER_TIMEOUT_SECONDS=str(TIMEOUT), BODY_TIMEOUT_SECONDS=str(TIMEOUT))
    async with gateway_process(env, tmp_path_factory.mktemp("edge") / "gateway.log", log_level="info") as process:
        yield process


async def test_partial_headers_get_408_and_are_closed(edge: GatewayProcess) -> None:
    connections = [await connect(edge) for _ in range(20)]
    started = time.monotonic()
    for _, writer in connections:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: edge\r\nX-Slow: ")
    await healthy(edge)  # the slow ones hold nothing the others need
    answers = await asyncio.gather(*(until_closed(reader, TIMEOUT + GRACE) for reader, _ in connections))
    assert time.monotonic() - started < TIMEOUT + GRACE
    close_all(connections)
    for raw in answers:
        answer = parse(raw)
        assert answer.status == 408, raw
        assert answer.code() == "request_timeout"
        assert answer.headers["connection"] == "close"
    await healthy(edge)


async def test_headers_dribbled_slowly_are_cut_too(edge: GatewayProcess) -> None:
    reader, writer = await connect(edge)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n")
    sender = asyncio.create_task(keep_sending(writer, b"X-Slow: 1\r\n", TIMEOUT / 5))
    try:
        assert parse(await until_closed(reader, TIMEOUT + GRACE)).status == 408
    finally:
        writer.close()
        await sender


async def test_a_silent_connection_is_closed_without_an_answer(edge: GatewayProcess) -> None:
    reader, writer = await connect(edge)
    assert await until_closed(reader, TIMEOUT + GRACE) == b""
    writer.close()


async def test_partial_body_gets_408_and_is_closed(edge: GatewayProcess) -> None:
    key, _ = await edge.key("free")

    def head(path: str, token: str) -> bytes:
        return (
            f"POST {path} HTTP/1.1\r\nHost: edge\r\ncontent-type: application/json\r\n"
            f"authorization: Bearer {token}\r\ncontent-length: 100\r\n\r\n"
        ).encode()

    stalled, dribbling = await connect(edge), await connect(edge)
    stalled[1].write(head("/v1/chat/completions", key) + b'{"model": ')
    dribbling[1].write(head("/admin/keys", ADMIN_KEY))
    sender = asyncio.create_task(keep_sending(dribbling[1], b" ", TIMEOUT / 5))  # 5 bytes a second: not enough
    try:
        await healthy(edge)
        for reader, _ in (stalled, dribbling):
            answer = parse(await until_closed(reader, TIMEOUT + GRACE))
            assert answer.status == 408, answer
            assert answer.code() == "request_timeout"
        await healthy(edge)  # by now the routes waiting for those bodies have heard the clients are gone
        assert "ClientDisconnect" not in edge.log_text()  # a client that left is no server error
    finally:
        close_all([stalled, dribbling])
        await sender


async def test_oversized_headers_get_431_while_others_are_served(edge: GatewayProcess) -> None:
    token = "a" * 1_000_000
    request = f"GET /v1/models HTTP/1.1\r\nHost: edge\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    connections = [await connect(edge) for _ in range(4)]
    senders = [asyncio.create_task(keep_sending(writer, request, 0)) for _, writer in connections]
    try:
        started = time.monotonic()
        health = asyncio.gather(*(healthy(edge) for _ in range(10)))
        answers = await asyncio.gather(*(until_closed(reader, GRACE) for reader, _ in connections))
        await health
        assert time.monotonic() - started < GRACE
    finally:
        close_all(connections)
        await asyncio.gather(*senders)
    for raw in answers:
        answer = parse(raw)
        assert answer.status == 431, raw[:200]
        assert answer.code() == "headers_too_large"


async def test_headers_under_the_cap_pass_request_after_request(edge: GatewayProcess) -> None:
    """The longest token we accept (8192 characters) fits, and each request on a connection has the whole cap."""
    reader, writer = await connect(edge)
    request = f"GET /healthz HTTP/1.1\r\nHost: edge\r\nAuthorization: Bearer {'a' * 8192}\r\n\r\n".encode()
    try:
        for _ in range(3):
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), GRACE)
            answer = parse(head)
            assert answer.status == 200
            await reader.readexactly(int(answer.headers["content-length"]))
    finally:
        writer.close()


async def test_connections_past_the_cap_get_503_with_retry_after(database_url: str, tmp_path: Path) -> None:
    cap = 4
    env = gateway_env(database_url, None, MAX_CONNECTIONS=str(cap))
    async with gateway_process(env, tmp_path / "gateway.log") as gateway:
        held = [await connect(gateway) for _ in range(cap)]
        for _, writer in held:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n")  # open, headers unfinished
            await writer.drain()
        reader, writer = await connect(gateway)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n\r\n")
        answer = parse(await until_closed(reader, GRACE))
        writer.close()
        assert answer.status == 503, answer
        assert answer.headers["retry-after"] == "1"
        assert answer.code() == "service_unavailable"

        close_all(held)  # room again: a new connection is served

        async def served() -> bool:
            reader, writer = await connect(gateway)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n\r\n")
            raw = await until_closed(reader, GRACE)
            writer.close()
            return parse(raw).status == 200

        await wait_for(served, 10, what="a connection to be served once the held ones closed")


async def test_edge_refusals_are_logged_and_counted_in_metrics(edge: GatewayProcess) -> None:
    async def refusals() -> dict[str, float]:
        scrape = await edge.client.get("/metrics")
        counted = {}
        for line in scrape.text.splitlines():
            if line.startswith("gateway_edge_refusals_total{"):
                labels, _, value = line.partition("} ")
                counted[labels.split('code="')[1].rstrip('"')] = float(value)
        return counted

    before = await refusals()
    reader, writer = await connect(edge)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: edge\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
    assert parse(await until_closed(reader, GRACE)).status == 431
    writer.close()
    reader, writer = await connect(edge)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: edge\r\nX-Slow: ")
    assert parse(await until_closed(reader, TIMEOUT + GRACE)).status == 408
    writer.close()

    async def both_counted() -> bool:
        after = await refusals()
        return all(after.get(code, 0) >= before.get(code, 0) + 1 for code in ("headers_too_large", "request_timeout"))

    await wait_for(both_counted, 10, what="the refusals in /metrics (sampled each second)")
    assert "refused a request from 127.0.0.1: headers_too_large" in edge.log_text()
