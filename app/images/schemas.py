"""Image request and response shapes: OpenAI's for generation, ours for history, estimates and batches."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.errors import ErrorBody
from app.models.images import BatchStatus, ItemStatus
from app.validation import Text

# Longer than any model name or option value of the registry (and than their columns, 100 and 20):
# a longer one is refused as such instead of being quoted back in an "unsupported" message.
MODEL_MAX = 100
OPTION_MAX = 20
STYLE_FIELD = "A style preset of `GET /v1/models` (`styles`): adds its text to the prompt and fills options left out."


class ImageOptionsIn(BaseModel):
    """Options every image request shares; what each model accepts is in `GET /v1/models`."""

    model_config = ConfigDict(extra="forbid")

    model: Text = Field("default-image", min_length=1, max_length=MODEL_MAX, examples=["default-image"])
    n: int | None = Field(None, description="Images per prompt, 1 to the model's max_n.")
    size: Text | None = Field(None, max_length=OPTION_MAX, examples=["1024x1024"])
    quality: Text | None = Field(None, max_length=OPTION_MAX, examples=["medium"])
    output_format: Text | None = Field(None, max_length=OPTION_MAX, examples=["png"])
    background: Text | None = Field(None, max_length=OPTION_MAX, examples=["auto"])
    output_compression: int | None = Field(None, ge=0, le=100)
    style: Text | None = Field(None, max_length=50, description=STYLE_FIELD, examples=["portrait"])


class ImageGenerateRequest(ImageOptionsIn):
    """OpenAI's image generation request; `model` may be an alias from the registry."""

    prompt: Text = Field(min_length=1, max_length=32000)
    moderation: Literal["low", "auto"] | None = None
    response_format: Literal["url", "b64_json"] | None = Field(
        None, description="`url` (default): our signed URL. `b64_json`: the image inline as well."
    )
    user: Text | None = Field(None, max_length=200)
    stream: bool | None = Field(
        None,
        description="Stream `image_generation.partial_image` events, then `image_generation.completed` "
        "(server-sent events; one image per request).",
    )
    partial_images: int | None = Field(None, description="With `stream`: partial images to send first, 0 to 3.")


class ImageEditRequest(ImageGenerateRequest):
    """OpenAI's image edit fields (multipart, beside the `image` / `image[]` files and an optional `mask`)."""

    input_fidelity: Literal["low", "high"] | None = Field(
        None, description="How closely to keep the input images' features (models that take it; not gpt-image-2)."
    )


class ImageEditForm(BaseModel):
    """The multipart body of `POST /v1/images/edits`, as the OpenAI SDKs send it (for the document)."""

    image: list[bytes] = Field(description="The image(s) to edit: PNG, JPEG or WebP (several as `image[]`).")
    mask: bytes | None = Field(
        None, description="A PNG with an alpha channel, the first image's size: its transparent areas are edited."
    )
    prompt: str
    model: str | None = "default-image"
    n: int | None = None
    size: str | None = None
    quality: str | None = None
    output_format: str | None = None
    background: str | None = None
    output_compression: int | None = None
    moderation: Literal["low", "auto"] | None = None
    style: str | None = Field(None, description=STYLE_FIELD)
    response_format: Literal["url", "b64_json"] | None = None
    user: str | None = None
    stream: bool | None = Field(None, description="Stream `image_edit.partial_image`, then `image_edit.completed`.")
    partial_images: int | None = None
    input_fidelity: Literal["low", "high"] | None = None


class ImageRegenerateRequest(BaseModel):
    """Changes to the original image's prompt and options; anything left out stays as it was."""

    model_config = ConfigDict(extra="forbid")

    prompt: Text | None = Field(None, min_length=1, max_length=32000)
    model: Text | None = Field(None, min_length=1, max_length=MODEL_MAX)
    n: int | None = None
    size: Text | None = Field(None, max_length=OPTION_MAX)
    quality: Text | None = Field(None, max_length=OPTION_MAX)
    output_format: Text | None = Field(None, max_length=OPTION_MAX)
    background: Text | None = Field(None, max_length=OPTION_MAX)
    output_compression: int | None = Field(None, ge=0, le=100)
    moderation: Literal["low", "auto"] | None = None
    response_format: Literal["url", "b64_json"] | None = None
    user: Text | None = Field(None, max_length=200)
    style: Text | None = Field(None, max_length=50, description=STYLE_FIELD)


class ImageEstimateRequest(ImageOptionsIn):
    """The options of a generation request (the prompt does not change the price)."""

    prompt: Text | None = Field(None, max_length=32000)
    count: int = Field(1, ge=1, le=1000, description="How many such requests, e.g. a batch's prompts.")


class ImageEstimate(BaseModel):
    """The registry's price for a request, the number the budget check reserves."""

    object: Literal["image.estimate"] = "image.estimate"
    model: str
    n: int
    count: int
    size: str
    quality: str
    style: str | None = None
    unit_price_usd: float
    estimated_cost_usd: float
    currency: Literal["usd"] = "usd"


class ImageData(BaseModel):
    """One generated image: our signed URL, and the bytes inline when `b64_json` was asked for."""

    id: uuid.UUID
    url: str
    url_expires_at: int
    b64_json: str | None = None
    revised_prompt: str | None = None


class ImageUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class ImagesResponse(BaseModel):
    """OpenAI's image response, with `url` pointing at this gateway."""

    created: int
    data: list[ImageData]
    background: str | None = None
    output_format: str | None = None
    quality: str | None = None
    size: str | None = None
    usage: ImageUsage | None = None


class ImagePublic(BaseModel):
    """A stored image of the caller."""

    id: uuid.UUID
    object: Literal["image"] = "image"
    created_at: datetime
    model: str
    prompt: str
    revised_prompt: str | None
    size: str
    quality: str
    output_format: str
    background: str | None
    style: str | None
    edited: bool = Field(description="Made by `POST /v1/images/edits` from uploaded images.")
    content_type: str
    bytes: int
    cost_usd: float
    simulated: bool
    batch_id: uuid.UUID | None
    regenerated_from: uuid.UUID | None
    url: str
    url_expires_at: int


class ImageList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ImagePublic]
    has_more: bool
    next_cursor: str | None = Field(None, description="Pass as `after` for the next page.")


class ImageDeleted(BaseModel):
    id: uuid.UUID
    object: Literal["image.deleted"] = "image.deleted"
    deleted: bool = True


class BatchItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Text = Field(min_length=1, max_length=32000)
    custom_id: Text | None = Field(None, max_length=200, description="Yours, echoed back (e.g. a student id).")


class ImageBatchCreate(ImageOptionsIn):
    """Prompts to generate in the background with shared options."""

    items: list[BatchItemIn] = Field(min_length=1)


class BatchImage(BaseModel):
    id: uuid.UUID
    url: str
    url_expires_at: int


class BatchItemPublic(BaseModel):
    index: int
    custom_id: str | None
    prompt: str
    status: ItemStatus
    attempts: int
    images: list[BatchImage]
    cost_usd: float | None
    error: ErrorBody | None
    next_attempt_at: datetime | None = Field(None, description="When a waiting item is tried next.")
    finished_at: datetime | None


class BatchCounts(BaseModel):
    total: int
    pending: int
    running: int
    completed: int
    failed: int
    cancelled: int


class ImageBatchPublic(BaseModel):
    """A batch and each item's state; `status` is `completed` once no item is left to run."""

    id: uuid.UUID
    object: Literal["image.batch"] = "image.batch"
    status: BatchStatus
    model: str
    size: str | None
    quality: str | None
    output_format: str | None
    background: str | None
    n: int
    created_at: datetime
    finished_at: datetime | None
    estimated_cost_usd: float
    counts: BatchCounts
    items: list[BatchItemPublic]
