"""The embeddings request, as OpenAI's API takes it (the SDK's `client.embeddings.create`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.tokens import embedding_inputs
from app.validation import Text

# What one request may carry, as OpenAI's API bounds it.
MAX_INPUTS = 2048
MAX_REQUEST_TOKENS = 300_000
TOKEN_MAX = 2**31 - 1

NonEmptyText = Annotated[Text, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=TOKEN_MAX)]], Field(min_length=1)]


class EmbeddingRequest(BaseModel):
    """Strict: a number where text belongs (or `"3"` where a number does) is a 400, never converted."""

    model_config = ConfigDict(extra="forbid", strict=True)

    input: (
        NonEmptyText
        | Annotated[list[NonEmptyText], Field(min_length=1, max_length=MAX_INPUTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_INPUTS)]
    ) = Field(description="A text, a list of texts, a list of token ids, or a list of those (at most 2048 inputs).")
    model: Text = Field(min_length=1, max_length=100, description="An embedding model's id or alias.")
    dimensions: int | None = Field(None, ge=1, description="A shorter vector, for models that allow it.")
    encoding_format: Literal["float", "base64"] | None = None
    user: Text | None = Field(None, max_length=256)

    def items(self) -> list[str | list[int]]:
        return embedding_inputs(self.input)
