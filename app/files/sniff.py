"""What an uploaded file is, told from its bytes as they stream in (never from the client's name or type).

Accepted (the types `file_search` reads): PDF, from its magic `%PDF-`; HTML, when the text opens
(after an optional UTF-8 BOM and whitespace) with `<!doctype html` or `<html`; otherwise UTF-8
text without NUL: `text/markdown` when the file is named `.md` or `.markdown`, else `text/plain`.
Anything else is refused at the first byte that shows it (a PNG at its first byte), naming the type
its signature says (`image/png`, `application/zip` for Office files, ...) or `application/octet-stream`.
"""

from __future__ import annotations

import codecs
from pathlib import PurePosixPath

from app.files.errors import UnsupportedFile

PDF = b"%PDF-"
HEAD_BYTES = 1024  # what is seen before a text file's type (HTML or not) is told
BOM = b"\xef\xbb\xbf"
WHITESPACE = b" \t\r\n\x0c"
HTML_OPENINGS = (b"<!doctype html", b"<html")
MARKDOWN_SUFFIXES = frozenset({".md", ".markdown"})
ACCEPTED = "UTF-8 text, Markdown, HTML or PDF"

# Signatures of what people upload by mistake, to name it in the refusal.
SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
    (b"PK\x03\x04", "application/zip"),  # also .docx, .xlsx, .pptx, .epub
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "application/x-ole-storage"),  # .doc, .xls, .ppt
    (b"\x1f\x8b", "application/gzip"),
    (b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
    (b"Rar!\x1a\x07", "application/vnd.rar"),
    (b"\x7fELF", "application/x-executable"),
    (b"SQLite format 3\x00", "application/vnd.sqlite3"),
    (b"ID3", "audio/mpeg"),
    (b"OggS", "audio/ogg"),
    (b"fLaC", "audio/flac"),
    (b"\xff\xfe", "text/plain in UTF-16 (convert it to UTF-8)"),
    (b"\xfe\xff", "text/plain in UTF-16 (convert it to UTF-8)"),
)
RIFF_KINDS = {b"WEBP": "image/webp", b"WAVE": "audio/wav", b"AVI ": "video/x-msvideo"}


def binary_type(head: bytes) -> str:
    """The type a file's first bytes say, for a refusal; `application/octet-stream` when none does."""
    for signature, name in SIGNATURES:
        if head.startswith(signature):
            return name
    if head.startswith(b"RIFF") and head[8:12] in RIFF_KINDS:
        return RIFF_KINDS[head[8:12]]
    if head[4:8] == b"ftyp":
        return "video/mp4"
    return "application/octet-stream"


def is_html(head: bytes) -> bool:
    text = head.removeprefix(BOM).lstrip(WHITESPACE).lower()
    for opening in HTML_OPENINGS:
        follows = text[len(opening) : len(opening) + 1]
        if text.startswith(opening) and (follows in (b">", b"/") or (follows and follows in WHITESPACE)):
            return True
    return False


class Sniffer:
    """Fed a file's bytes in order; `content_type` once `decided`, `finish` at the end. Raises
    `UnsupportedFile` as soon as the bytes show a type that is not accepted."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.head = b""
        self.size = 0
        self.kind: str | None = None  # "pdf" or "text" once the first bytes say which
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")

    @property
    def decided(self) -> bool:
        """Whether `content_type` is known (it holds unless a later byte refuses the file)."""
        return self.kind == "pdf" or (self.kind == "text" and len(self.head) >= HEAD_BYTES)

    @property
    def content_type(self) -> str:
        if self.kind == "pdf":
            return "application/pdf"
        if is_html(self.head):
            return "text/html"
        if PurePosixPath(self.filename.lower()).suffix in MARKDOWN_SUFFIXES:
            return "text/markdown"
        return "text/plain"

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if len(self.head) < HEAD_BYTES:
            self.head += chunk[: HEAD_BYTES - len(self.head)]
        if self.kind is None:
            if len(self.head) < len(PDF) and PDF.startswith(self.head):
                return  # too few bytes yet to tell a PDF
            self.kind = "pdf" if self.head.startswith(PDF) else "text"
            if self.kind == "text":  # the few bytes held back (all in the head), then this chunk
                self._check_text(self.head[: self.size - len(chunk)] + chunk)
        elif self.kind == "text":
            self._check_text(chunk)

    def finish(self) -> str:
        """The file's type, once every byte was fed."""
        if self.size == 0:
            raise UnsupportedFile(f"'{self.filename}' is empty; upload a file with content.")
        if self.kind is None:  # a few bytes, all a prefix of %PDF-: text
            self.kind = "text"
            self._check_text(self.head)
        if self.kind == "text":
            self._check_text(b"", final=True)
        return self.content_type

    def _check_text(self, data: bytes, *, final: bool = False) -> None:
        try:
            if b"\x00" in data:
                raise ValueError("NUL")
            self._decoder.decode(data, final)
        except ValueError:  # UnicodeDecodeError included
            raise UnsupportedFile(f"'{self.filename}' is {binary_type(self.head)}; files must be {ACCEPTED}.") from None
