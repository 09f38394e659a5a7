"""Embeddings: checked against the model and the tier, reserved, called, recorded once.

The reservation is the inputs' tokens (estimated from characters, or counted when the
client sends token ids) priced at the model's input price; the upstream's `usage` settles
it. The answer goes back as the upstream sent it (floats, or base64 when asked for). A failed
upstream is never answered by the simulated provider (FALLBACK_TO_SIMULATED is for text): a
client would store its vectors beside real ones. The simulated provider answers only when the
operator or the user chose it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from starlette.responses import Response

from app.auth.principal import Principal
from app.calls import Call, Calls, Spent
from app.embeddings.schemas import MAX_REQUEST_TOKENS, EmbeddingRequest
from app.errors import InvalidRequest, UpstreamError
from app.ratelimit.limiter import Limiter
from app.registry import Catalog, ModelSpec
from app.tokens import embedding_tokens
from app.upstream.provider import UpstreamReply

ROUTE = "embeddings"
T = TypeVar("T")


class EmbeddingService:
    def __init__(self, catalog: Catalog, limiter: Limiter, calls: Calls) -> None:
        self.catalog = catalog
        self.limiter = limiter
        self.calls = calls

    async def create(self, principal: Principal, body: EmbeddingRequest, request_id: str) -> Response:
        spec = self.catalog.resolve(body.model, principal.tier, "embedding")
        length = _length(spec, body.dimensions)
        items = body.items()
        tokens = _tokens(spec, items)
        payload: dict[str, Any] = body.model_dump(exclude_none=True)
        payload["model"] = spec.id
        reply, call, _ = await embeddings_call(
            self.calls,
            self.limiter,
            principal,
            spec,
            payload,
            tokens=tokens,
            length=length,
            inputs=len(items),
            route=ROUTE,
            request_id=request_id,
            read=lambda answer: None,
        )
        return Response(reply.body, media_type="application/json", headers=call.headers(reply.request_id))


async def embeddings_call(
    calls: Calls,
    limiter: Limiter,
    principal: Principal,
    spec: ModelSpec,
    payload: dict[str, Any],
    *,
    tokens: int,
    length: int,
    inputs: int,
    route: str,
    request_id: str,
    read: Callable[[dict[str, Any]], T],
    detail: dict[str, Any] | None = None,
) -> tuple[UpstreamReply, Call, T]:
    """One embeddings call through the pipeline, for the route and for vector stores: `tokens` reserved at
    the model's input price against the embedding limits, never stood in for (simulated vectors beside
    real ones would corrupt an index), recorded once with the upstream's usage. `read` takes what the
    caller needs from the answer (checked to hold one embedding per input); what it raises fails the call."""
    cost = spec.token_cost(tokens, 0)
    call = await calls.open(
        principal,
        route=route,
        spec=spec,
        request_id=request_id,
        buckets=limiter.embedding_buckets(principal, tokens, cost),
        reserved=Spent(tokens, 0, cost_usd=cost, estimated=True),
        fallback="never",
        detail=detail,
    )
    reply = await calls.invoke(call, lambda provider: provider.embeddings(payload, length))
    try:
        answer = _answer(reply.body, inputs)
        result = read(answer)
        spent = call.token_spend(answer.get("usage"), strict=True)
    except UpstreamError as failure:
        call.fail(failure)
        raise
    call.finish(spent, upstream_request_id=reply.request_id, upstream=reply.upstream)
    return reply, call, result


def _length(spec: ModelSpec, dimensions: int | None) -> int:
    """The vector length the answer will have; a `dimensions` the model cannot give is a 400."""
    default = spec.dimensions or 1536
    if dimensions is None:
        return default
    if not spec.adjustable_dimensions:
        raise InvalidRequest(f"The model '{spec.id}' does not take 'dimensions'.", param="dimensions")
    if dimensions > default:
        raise InvalidRequest(f"'dimensions' is {dimensions}; '{spec.id}' gives at most {default}.", param="dimensions")
    return dimensions


def _tokens(spec: ModelSpec, items: list[str | list[int]]) -> int:
    """The inputs' tokens: counted for token ids, estimated for text; each input and the whole bounded."""
    total = 0
    for index, item in enumerate(items):
        count = embedding_tokens(item)
        if count > spec.max_input_tokens:
            raise InvalidRequest(
                f"Input {index} has about {count} tokens; '{spec.id}' takes at most {spec.max_input_tokens}.",
                param="input",
            )
        total += count
    if total > MAX_REQUEST_TOKENS:
        raise InvalidRequest(
            f"The inputs have about {total} tokens; one request takes at most {MAX_REQUEST_TOKENS}.", param="input"
        )
    return total


def _answer(body: bytes, inputs: int) -> dict[str, Any]:
    """The upstream's answer, if it is one: a JSON object with one embedding per input."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        raise UpstreamError("The upstream's answer could not be read (not a JSON object).", billed=True)
    data = answer.get("data")
    if not isinstance(data, list) or len(data) != inputs:
        raise UpstreamError(
            f"The upstream's answer does not hold one embedding for each of {inputs} inputs.", billed=True
        )
    return answer
