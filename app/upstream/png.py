"""Real, valid PNGs drawn without an image library, for the simulated provider."""

from __future__ import annotations

import hashlib
import struct
import zlib

DEFAULT_SIZE = (1024, 1024)


def dimensions(size: object) -> tuple[int, int]:
    """`"1536x1024"` -> (1536, 1024); `auto` or anything unparsable -> 1024x1024."""
    if isinstance(size, str) and "x" in size:
        width, _, height = size.partition("x")
        if width.isdigit() and height.isdigit() and 0 < int(width) <= 4096 and 0 < int(height) <= 4096:
            return int(width), int(height)
    return DEFAULT_SIZE


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def simulated_png(prompt: str, width: int, height: int, index: int = 0) -> bytes:
    """A vertical two-colour gradient chosen by the prompt: an RGB PNG of the requested size."""
    digest = hashlib.sha256(f"{index}:{prompt}".encode()).digest()
    top, bottom = digest[0:3], digest[3:6]
    rows = []
    for y in range(height):
        t = y / max(height - 1, 1)
        pixel = bytes(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
        rows.append(b"\x00" + pixel * width)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    comment = f"simulated by openai-gateway; prompt sha256 {hashlib.sha256(prompt.encode()).hexdigest()}"
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"tEXt", b"Software\x00openai-gateway (simulated)"),
            _png_chunk(b"tEXt", b"Comment\x00" + comment.encode()),
            _png_chunk(b"IDAT", zlib.compress(b"".join(rows), 6)),
            _png_chunk(b"IEND", b""),
        )
    )
