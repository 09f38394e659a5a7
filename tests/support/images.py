"""Helpers for the image tests: PNG checks, a catalog with a narrow model, S3 on loopback."""

from __future__ import annotations

import contextlib
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from app.config import DEFAULT_CATALOG

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NARROW_MODEL = """
[[model]]
id = "gpt-image-narrow"
kind = "image"
aliases = ["narrow-image"]
input_per_1m = 1.00
output_per_1m = 4.00
sizes = ["1024x1024"]
qualities = ["low", "medium"]
formats = ["png"]
max_n = 2
image_prices = { low = 0.002, medium = 0.004 }

"""


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """Every chunk of a PNG, each CRC checked; fails on anything that is not a well-formed PNG."""
    assert data[:8] == PNG_SIGNATURE, "not a PNG signature"
    chunks, offset = [], 8
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        body = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        offset += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    return chunks


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from IHDR, after checking the pixel data decompresses to exactly that size."""
    chunks = png_chunks(data)
    width, height, depth, colour = struct.unpack(">IIBB", chunks[0][1][:10])
    assert (depth, colour) == (8, 2), "8-bit RGB expected"
    pixels = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(pixels) == height * (1 + 3 * width)
    return width, height


def png_text(data: bytes) -> dict[str, str]:
    return dict(body.decode("latin-1").split("\x00", 1) for kind, body in png_chunks(data) if kind == b"tEXt")


def narrow_catalog(folder: Path) -> Path:
    """The default catalog plus a model that accepts little (one size, two qualities, png, n <= 2)."""
    text = DEFAULT_CATALOG.read_text()
    marker = text.index("# Tiers")
    path = folder / "catalog.toml"
    path.write_text(text[:marker] + NARROW_MODEL + text[marker:])
    return path


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """An S3-compatible server (moto) on a loopback port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def rgba_png(width: int, height: int, alpha: int = 0) -> bytes:
    """A PNG with an alpha channel (colour type 6), every pixel at `alpha`: an edit's mask."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = (b"\x00" + bytes((0, 0, 0, alpha)) * width) * height
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
