"""A `multipart/form-data` body read as it arrives: small fields whole, the file as chunks, nothing spooled.

Starlette's form parser writes every file to a temporary file before a route sees it; an upload
here goes to storage as it is received instead, so its caps stop it at the byte that passes them.
Each malformed body is a 400: not multipart, too many parts, a field too long, a part without a
name, or a body that ends before its closing boundary.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from app.errors import InvalidRequest

if TYPE_CHECKING:  # a typing-only name of python-multipart
    from python_multipart.multipart import MultipartCallbacks

MAX_PARTS = 8  # a file and a few fields; OpenAI's upload has four
MAX_FIELD_BYTES = 1024  # a field's value (`purpose`, `expires_after[seconds]`)
MAX_HEADER_BYTES = 4096  # one header line of a part (a Content-Disposition with a long file name)


@dataclass(slots=True)
class Field:
    name: str
    value: str


@dataclass(slots=True)
class FileStart:
    name: str
    filename: str


@dataclass(slots=True)
class FileChunk:
    data: bytes


@dataclass(slots=True)
class FileEnd:
    name: str


Event = Field | FileStart | FileChunk | FileEnd


def decode(raw: bytes) -> str:
    """A header parameter or field as text: UTF-8 as browsers and SDKs send it, else Latin-1."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")


@dataclass
class _Parts:
    """python-multipart's callbacks, turned into events for the reader to hand out after each write."""

    events: list[Event] = field(default_factory=list)
    parts: int = 0
    ended: bool = False
    _header_name: bytes = b""
    _header_value: bytes = b""
    _disposition: bytes = b""
    _name: str = ""
    _is_file: bool = False
    _value: bytearray = field(default_factory=bytearray)

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise InvalidRequest(f"The multipart body has more than {MAX_PARTS} parts.")
        self._disposition, self._value = b"", bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if not options.get(b"name"):
            raise InvalidRequest("A part of the multipart body has no name (its Content-Disposition `name`).")
        self._name = decode(options[b"name"])
        self._is_file = b"filename" in options
        if self._is_file:
            self.events.append(FileStart(self._name, decode(options[b"filename"])))

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            last = self.events[-1] if self.events else None
            if isinstance(last, FileChunk):  # one event per write, however the parser cut it
                last.data += data[start:end]
            else:
                self.events.append(FileChunk(data[start:end]))
            return
        self._value += data[start:end]
        if len(self._value) > MAX_FIELD_BYTES:
            raise InvalidRequest(f"Invalid value for '{self._name}': longer than {MAX_FIELD_BYTES} bytes.")

    def on_part_end(self) -> None:
        self.events.append(FileEnd(self._name) if self._is_file else Field(self._name, decode(bytes(self._value))))

    def on_end(self) -> None:
        self.ended = True


async def form_events(request: Request, usage: str) -> AsyncGenerator[Event, None]:
    """The body's parts in order as events; `usage` says what the route takes, for a body that is not multipart."""
    kind, options = parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise InvalidRequest(f"{request.method} {request.url.path} takes multipart/form-data: {usage}.")
    parts = _Parts()
    try:
        parser = MultipartParser(boundary, parts.callbacks(), max_header_size=MAX_HEADER_BYTES)
        async for chunk in request.stream():
            parser.write(chunk)
            events, parts.events = parts.events, []
            for event in events:
                yield event
    except FormParserError as error:
        raise InvalidRequest(f"The multipart body could not be read: {error}.") from error
    for event in parts.events:
        yield event
    if not parts.ended:
        raise InvalidRequest("The multipart body ended before its closing boundary.")
