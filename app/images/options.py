"""What an image model accepts and what a request costs, both from the model registry.

Everything here runs before any upstream call: a request the registry does not allow is
a 400 naming the parameter, and the price of a request is the number the budget check
reserves (settled later against the upstream's reported usage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.errors import ErrorCode, InvalidRequest
from app.registry import Catalog, ModelSpec, StyleSpec

TRANSPARENT_FORMATS = ("png", "webp")
COMPRESSIBLE_FORMATS = ("jpeg", "webp")
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# Prices in the registry are per image at this many pixels; other sizes cost in proportion.
BASE_PIXELS = 1024 * 1024
# The most input tokens one uploaded image of an edit may bill (high input fidelity): an edit's
# reservation adds this many per image, at the model's input price.
INPUT_IMAGE_TOKENS = 6_000
MAX_PARTIAL_IMAGES = 3
STYLE_OPTIONS = ("size", "quality", "output_format", "background")


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
    style: str | None = None  # a preset's name (app/catalog.toml `[style.NAME]`)
    style_prompt: str | None = None  # the text it adds to the prompt
    stream: bool = False
    partial_images: int | None = None  # with `stream`: partial images the upstream sends before the image
    input_fidelity: str | None = None  # edits: how closely the upstream keeps the input images' features

    def prompt_for(self, prompt: str) -> str:
        """What the upstream is asked for: the request's prompt, then its style's text."""
        return prompt if self.style_prompt is None else f"{prompt}\n\n{self.style_prompt}"

    def upstream_params(self, prompt: str) -> dict[str, Any]:
        """The upstream's request fields (GPT image models answer base64 only)."""
        params: dict[str, Any] = {"model": self.spec.id, "prompt": self.prompt_for(prompt), "n": self.n}
        for name in (
            "size",
            "quality",
            "output_format",
            "background",
            "output_compression",
            "moderation",
            "input_fidelity",
            "user",
        ):
            value = getattr(self, name)
            if value is not None:
                params[name] = value
        if self.stream:
            params["stream"] = True
            if self.partial_images is not None:
                params["partial_images"] = self.partial_images
        return params

    def stored(self) -> dict[str, Any]:
        """The options as a batch keeps them (JSON)."""
        return {
            name: getattr(self, name)
            for name in (
                "n",
                "size",
                "quality",
                "output_format",
                "background",
                "output_compression",
                "moderation",
                "style",
            )
            if getattr(self, name) is not None
        }

    def unit_price(self, size: str | None = None, quality: str | None = None) -> float:
        """USD for one image at this quality and size, by the registry; `auto` (the upstream picks) at the
        dearest quality, as `auto` size is at the largest size: what is reserved must cover what is billed."""
        prices = self.spec.image_prices
        quality = quality or self.quality or "auto"
        worst = max(prices.values(), default=0.0)
        base = worst if quality == "auto" else prices.get(quality, worst)
        return base * _size_factor(self.spec, size or self.size or "auto")

    def estimate(self, count: int = 1) -> float:
        """What `count` requests with these options cost before generation."""
        return round(self.unit_price() * self.n * count, 8)

    def edit_estimate(self, images: int) -> float:
        """An edit's worst case: its images, and every uploaded image billed as input at its bound."""
        return round(self.estimate() + images * INPUT_IMAGE_TOKENS * self.spec.input_per_1m / 1_000_000, 8)


def _edges(size: str) -> tuple[int, int] | None:
    width, _, height = size.partition("x")
    if not (width.isdigit() and height.isdigit() and len(width) <= 6 and len(height) <= 6):
        return None
    return int(width), int(height)


def _pixels(size: str) -> int | None:
    edges = _edges(size)
    return edges[0] * edges[1] if edges is not None else None


def _size_factor(spec: ModelSpec, size: str) -> float:
    pixels = _pixels(size)
    if pixels is None:  # `auto`: the upstream picks, so the estimate assumes the largest it may pick
        known = [p for p in (_pixels(s) for s in spec.sizes) if p is not None]
        pixels = max(known, default=BASE_PIXELS)
    return pixels / BASE_PIXELS


def _check_size(size: str | None, spec: ModelSpec) -> None:
    """A listed size, or (models with `size_bounds`) any WIDTHxHEIGHT within the bounds."""
    if size is None or not spec.sizes or size in spec.sizes:
        return
    bounds = spec.size_bounds
    if bounds is None:
        _one_of("size", size, spec.sizes, spec)
        return
    edges = _edges(size)
    if edges is None or not bounds.allows(*edges):
        raise InvalidRequest(
            f"Invalid value for 'size': '{size}' is not supported by model '{spec.id}'; it takes "
            f"{', '.join(spec.sizes)}, or WIDTHxHEIGHT with both edges multiples of {bounds.multiple}, "
            f"the long edge at most {bounds.max_edge} and at most {bounds.max_ratio:g}x the short one, "
            f"and {bounds.min_pixels} to {bounds.max_pixels} pixels.",
            param="size",
            code=ErrorCode.UNSUPPORTED_VALUE,
        )


def _accepts(spec: ModelSpec, name: str, value: str) -> bool:
    """Whether the model takes this value of an option (a style's default is skipped where it does not)."""
    if name == "size":
        try:
            _check_size(value, spec)
        except InvalidRequest:
            return False
        return True
    allowed = {"quality": spec.qualities, "output_format": spec.formats, "background": spec.backgrounds}[name]
    return not allowed or value in allowed


def with_style(catalog: Catalog, spec: ModelSpec, values: dict[str, Any]) -> tuple[dict[str, Any], StyleSpec | None]:
    """The request's values with its style's defaults filled in where it left them out."""
    name = values.get("style")
    if name is None:
        return values, None
    style = catalog.style(name)
    filled = dict(values)
    for option in STYLE_OPTIONS:
        default = getattr(style, option)
        if filled.get(option) is None and default is not None and _accepts(spec, option, default):
            filled[option] = default
    return filled, style


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
    values, style = with_style(catalog, spec, values)
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
    _check_size(values.get("size"), spec)
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
    stream = bool(values.get("stream"))
    partial_images = values.get("partial_images")
    if partial_images is not None and not stream:
        raise InvalidRequest(
            "Invalid value for 'partial_images': partial images are streamed; send it with stream: true.",
            param="partial_images",
        )
    if partial_images is not None and not 0 <= partial_images <= MAX_PARTIAL_IMAGES:
        raise InvalidRequest(
            f"Invalid value for 'partial_images': {partial_images}; it is 0 to {MAX_PARTIAL_IMAGES}.",
            param="partial_images",
        )
    if stream and n != 1:
        raise InvalidRequest(
            "Invalid value for 'n': a streamed request makes one image; leave out n or send 1.",
            param="n",
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
        style=values.get("style"),
        style_prompt=style.prompt if style is not None else None,
        stream=stream,
        partial_images=partial_images,
        input_fidelity=values.get("input_fidelity"),
    )
