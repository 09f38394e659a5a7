"""The Responses API's create request, as the SDK's `client.responses.create` sends it.

The fields the gateway acts on are typed (strictly: `"stream": 0` is a 400, not False); the
rest pass through to the upstream as they came, after the same check as every free-form
JSON value (no NUL, no lone surrogates, bounded nesting: app/validation.py).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from app.validation import Metadata, Text, check_json

RESPONSE_ID_MAX = 100


def _json(value: Any) -> Any:
    return check_json(value)


FreeJson = Annotated[Any, AfterValidator(_json)]


class ResponseCreate(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Text = Field(min_length=1, max_length=100, description="A chat model's id or alias.")
    input: Text | list[FreeJson] | None = Field(None, description="A text, or a list of input items.")
    instructions: Text | None = Field(None, max_length=256_000)
    max_output_tokens: StrictInt | None = Field(
        None, ge=16, description="Within the tier's cap; set to it if left out."
    )
    stream: StrictBool | None = None
    background: StrictBool | None = Field(None, description="Not supported yet: a 400.")
    previous_response_id: Text | None = Field(None, max_length=RESPONSE_ID_MAX, description="One of your responses.")
    conversation: FreeJson | None = Field(None, description="Not supported yet: a 400.")
    metadata: Metadata | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    store: StrictBool | None = None
    tools: list[FreeJson] | None = Field(None, max_length=128)

    @model_validator(mode="after")
    def _extras(self) -> ResponseCreate:
        """What passes through untyped is checked like any JSON value a request carries."""
        for value in (self.model_extra or {}).values():
            check_json(value)
        return self


class InputTokensRequest(BaseModel):
    """`POST /v1/responses/input_tokens`: what a create request would send as input, counted."""

    model_config = ConfigDict(extra="allow")

    model: Text = Field(min_length=1, max_length=100)
    input: Text | list[FreeJson] | None = None
    instructions: Text | None = Field(None, max_length=256_000)
    previous_response_id: Text | None = Field(None, max_length=RESPONSE_ID_MAX)
    tools: list[FreeJson] | None = Field(None, max_length=128)

    @model_validator(mode="after")
    def _extras(self) -> InputTokensRequest:
        for value in (self.model_extra or {}).values():
            check_json(value)
        return self
