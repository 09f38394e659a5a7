"""The text of an uploaded file: plain text, Markdown, HTML and PDF.

`extract_text` is CPU work (a PDF may take seconds): async code calls `extract_text_async`,
which runs it in a thread. A file that cannot be read raises `UnreadableFile`, whose
`last_error` is what the vector store file records when it fails (`invalid_file` for bytes
that are not what they claim, or hold no text; `unsupported_file` for a type we do not parse).
The text comes back with `\\n` line ends, without NUL characters (Postgres text cannot hold
them) and with runs of blank lines collapsed, so chunks stay dense.
"""

from __future__ import annotations

import asyncio
import codecs
import io
import logging
import re
from html.parser import HTMLParser
from typing import Literal

log = logging.getLogger("app.knowledge.parse")

TEXT_TYPES = frozenset({"text/plain", "text/markdown", "text/x-markdown"})
HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
PDF_TYPE = "application/pdf"
SUPPORTED_TYPES = TEXT_TYPES | HTML_TYPES | {PDF_TYPE}

ErrorCode = Literal["invalid_file", "unsupported_file"]

# Elements whose text is never shown to a reader.
HIDDEN_ELEMENTS = frozenset({"script", "style", "noscript", "template", "svg", "math"})
# Elements set apart by a blank line (paragraphs, to the chunker), and those that start a new line.
PARAGRAPH_ELEMENT_NAMES = """
address article aside blockquote caption details dialog div dl fieldset figcaption figure footer form
h1 h2 h3 h4 h5 h6 header hr main nav ol p pre section summary table title ul
"""
PARAGRAPH_ELEMENTS = frozenset(PARAGRAPH_ELEMENT_NAMES.split())
LINE_ELEMENTS = frozenset({"br", "dd", "dt", "li", "tr"})
CELL_ELEMENTS = frozenset({"td", "th"})
SPACES = re.compile(r"[ \t\f\v\u00a0]+")
BLANK_LINES = re.compile(r"\n{3,}")


class UnreadableFile(Exception):
    """A file whose text cannot be had; `last_error` is the vector store file's failure."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message

    @property
    def last_error(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def media_type(content_type: str) -> str:
    """`text/HTML; charset=utf-8` -> `text/html`."""
    return content_type.split(";", 1)[0].strip().lower()


def charset_of(content_type: str) -> str | None:
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip():
            return value.strip().strip('"').lower()
    return None


def extract_text(data: bytes, content_type: str) -> str:
    """The readable text of `data` as `content_type` says it is; raises `UnreadableFile`."""
    kind = media_type(content_type)
    if kind in TEXT_TYPES:
        text = decode(data, charset_of(content_type))
    elif kind in HTML_TYPES:
        text = html_text(decode(data, charset_of(content_type)))
    elif kind == PDF_TYPE:
        text = pdf_text(data)
    else:
        raise UnreadableFile("unsupported_file", f"Files of type '{kind}' cannot be searched.")
    text = tidy(text)
    if not text:
        raise UnreadableFile("invalid_file", "The file contains no text to search.")
    return text


async def extract_text_async(data: bytes, content_type: str) -> str:
    """`extract_text` in a worker thread: the event loop keeps serving while a PDF is read."""
    return await asyncio.to_thread(extract_text, data, content_type)


def decode(data: bytes, charset: str | None) -> str:
    """Text from bytes: the declared charset, else UTF-8 (a BOM says UTF-16 or UTF-8), else Windows-1252,
    which maps every byte: a legacy text file still reads, at worst with a few odd characters."""
    if charset:
        try:
            return data.decode(charset, errors="replace")
        except LookupError:
            log.info("unknown charset %r: reading as UTF-8", charset)
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16", errors="replace")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def tidy(text: str) -> str:
    """`\\n` line ends, no NULs, no trailing spaces, at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    lines = [SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


class _HtmlText(HTMLParser):
    """Text as a browser would show it, roughly: hidden elements dropped, paragraphs apart, lines and list items
    on lines of their own."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0  # depth inside hidden elements
        self.preformatted = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in HIDDEN_ELEMENTS:
            self.hidden += 1
        elif not self.hidden:
            if tag == "pre":
                self.preformatted += 1
            self._edge(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if not self.hidden and tag not in HIDDEN_ELEMENTS:
            self._edge(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in HIDDEN_ELEMENTS:
            self.hidden = max(0, self.hidden - 1)
        elif not self.hidden:
            if tag == "pre":
                self.preformatted = max(0, self.preformatted - 1)
            if tag in PARAGRAPH_ELEMENTS:
                self.parts.append("\n\n")

    def _edge(self, tag: str) -> None:
        if tag in PARAGRAPH_ELEMENTS:
            self.parts.append("\n\n")
        elif tag in LINE_ELEMENTS:
            self.parts.append("\n")
        elif tag in CELL_ELEMENTS:
            self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if self.hidden:
            return
        # Outside <pre>, a newline in the source is only a space to a reader.
        self.parts.append(data if self.preformatted else re.sub(r"\s+", " ", data))


def html_text(markup: str) -> str:
    parser = _HtmlText()
    parser.feed(markup)
    parser.close()
    return "".join(parser.parts)


def pdf_text(data: bytes) -> str:
    """Every page's text, in order, pages apart by a blank line. A PDF encrypted with a password
    (not just an owner's one, which an empty password opens) or too broken to read is `invalid_file`."""
    import pypdf  # imported here: only the indexer reads PDFs
    from pypdf.errors import PyPdfError

    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise UnreadableFile("invalid_file", "The PDF is protected by a password.")
        pages = [page.extract_text() or "" for page in reader.pages]
    except UnreadableFile:
        raise
    except PyPdfError as error:
        raise UnreadableFile("invalid_file", f"The PDF cannot be read: {error}") from error
    except Exception as error:  # a malformed file can fail anywhere inside the parser
        log.info("unreadable PDF: %r", error)
        raise UnreadableFile("invalid_file", "The PDF cannot be read: the file is damaged.") from error
    return "\n\n".join(pages)
