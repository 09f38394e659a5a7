"""What an image model accepts and what a request costs, both from the model registry.

Everything here runs before any upstream call: a request the registry does not allow is
a 400 naming the parameter, and the price of a request is the number the budget check
reserves (settled later against the upstream's reported usage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.errors import ErrorCode, InvalidRequest
from app.registry import Catalog, ModelSpec

TRANSPARENT_FORMATS = ("png", "webp")
COMPRESSIBLE_FORMATS = ("jpeg", "webp")
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# Prices in the registry are per image at this many pixels; larger sizes cost in proportion.
BASE_PIXELS = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ImageOptions:
    """A request's validated options; None means "not sent, the upstream's default"."""

    spec: ModelSpec
    n: int = 1
    size: str | None = None
    quality: str | None = None
    output_format: str | None = None
    background: str | None = None
    output_compression: int | None = None
    moderation: str | None = None
    user: str | None = None

    def upstream_params(self, prompt: str) -> dict[str, Any]:
        """The SDK's `images.generate` keyword arguments (GPT image models answer base64 only)."""
        params: dict[str, Any] = {"model": self.spec.id, "prompt": prompt, "n": self.n}
        for name in ("size", "quality", "output_format", "background", "output_compression", "moderation", "user"):
            value = getattr(self, name)
            if value is not None:
                params[name] = value
        return params

    def stored(self) -> dict[str, Any]:
        """The options as a batch keeps them (JSON)."""
        return {
            name: getattr(self, name)
            for name in ("n", "size", "quality", "output_format", "background", "output_compression", "moderation")
            if getattr(self, name) is not None
        }

    def unit_price(self, size: str | None = None, quality: str | None = None) -> float:
        """USD for one image at this quality and size, by the registry."""
        prices = self.spec.image_prices
        quality = quality or self.quality or "auto"
        base = prices.get(quality, max(prices.values(), default=0.0))
        return base * _size_factor(self.spec, size or self.size or "auto")

    def estimate(self, count: int = 1) -> float:
        """What `count` requests with these options cost before generation."""
        return round(self.unit_price() * self.n * count, 8)


def _pixels(size: str) -> int | None:
    width, _, height = size.partition("x")
    return int(width) * int(height) if width.isdigit() and height.isdigit() else None


def _size_factor(spec: ModelSpec, size: str) -> float:
    pixels = _pixels(size)
    if pixels is None:  # `auto`: the upstream picks, so the estimate assumes the largest it may pick
        known = [p for p in (_pixels(s) for s in spec.sizes) if p is not None]
        pixels = max(known, default=BASE_PIXELS)
    return max(pixels / BASE_PIXELS, 1.0)


def _one_of(name: str, value: str | None, allowed: list[str] | tuple[str, ...], spec: ModelSpec) -> None:
    if value is not None and allowed and value not in allowed:
        choices = ", ".join(f"'{choice}'" for choice in allowed)
        raise InvalidRequest(
            f"Invalid value for '{name}': '{value}' is not supported by model '{spec.id}'; supported: {choices}.",
            param=name,
            code=ErrorCode.UNSUPPORTED_VALUE,
        )


def resolve_options(catalog: Catalog, tier: str, values: dict[str, Any]) -> ImageOptions:
    """The options of a request, checked against what its model accepts (400 naming the parameter)."""
    spec = catalog.resolve(values.get("model"), tier, "image")
    n = values.get("n")
    n = 1 if n is None else n
    if not 1 <= n <= spec.max_n:
        raise InvalidRequest(
            f"Invalid value for 'n': {n}; model '{spec.id}' makes 1 to {spec.max_n} images per request.",
            param="n",
            code=ErrorCode.UNSUPPORTED_VALUE,
        )
    output_format = values.get("output_format")
    background = values.get("background")
    compression = values.get("output_compression")
    _one_of("size", values.get("size"), spec.sizes, spec)
    _one_of("quality", values.get("quality"), spec.qualities, spec)
    _one_of("output_format", output_format, spec.formats, spec)
    _one_of("background", background, spec.backgrounds, spec)
    if background == "transparent" and output_format is not None and output_format not in TRANSPARENT_FORMATS:
        raise InvalidRequest(
            f"Invalid value for 'background': 'transparent' needs output_format png or webp, not '{output_format}'.",
            param="background",
            code=ErrorCode.UNSUPPORTED_VALUE,
        )
    if compression is not None and output_format not in COMPRESSIBLE_FORMATS:
        raise InvalidRequest(
            "Invalid value for 'output_compression': it applies to output_format jpeg or webp only.",
            param="output_compression",
            code=ErrorCode.UNSUPPORTED_VALUE,
        )
    return ImageOptions(
        spec=spec,
        n=n,
        size=values.get("size"),
        quality=values.get("quality"),
        output_format=output_format,
        background=background,
        output_compression=compression,
        moderation=values.get("moderation"),
        user=values.get("user"),
    )
