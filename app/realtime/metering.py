"""A realtime response's usage, as the upstream's `response.done` reports it, its exact price, and its row.

`response.usage` is `{input_tokens, output_tokens, input_token_details: {text_tokens, audio_tokens,
image_tokens, cached_tokens, cached_tokens_details: {text_tokens, audio_tokens, image_tokens}},
output_token_details: {text_tokens, audio_tokens}}`. Text, audio and cached input each have their
price (app/catalog.toml); image input tokens are priced as text. A count that is missing or not a
non-negative integer is read as 0 and flagged; totals without details are priced as text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from app.auth.principal import Principal
from app.calls import Call, Spent
from app.ratelimit.buckets import Decision
from app.ratelimit.limiter import Limiter
from app.registry import ModelSpec
from app.upstream.hub import Lease
from app.usage.ledger import PendingRow, new_call_id
from app.usage.writer import UsageWriter

MILLION = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class RealtimeUsage:
    text_in: int = 0
    audio_in: int = 0
    image_in: int = 0
    cached_text_in: int = 0
    cached_audio_in: int = 0
    cached_image_in: int = 0
    text_out: int = 0
    audio_out: int = 0
    flags: tuple[str, ...] = field(default=())

    @property
    def input_tokens(self) -> int:
        return self.text_in + self.audio_in + self.image_in

    @property
    def output_tokens(self) -> int:
        return self.text_out + self.audio_out

    @property
    def cached_tokens(self) -> int:
        return self.cached_text_in + self.cached_audio_in + self.cached_image_in

    def cost(self, spec: ModelSpec) -> Decimal:
        """USD, exactly: each kind of token at its price per 1M (a price left out: text's)."""
        text_in = _price(spec.input_per_1m)
        cached_text = _price(spec.cached_input_per_1m, text_in)
        audio_in = _price(spec.audio_input_per_1m, text_in)
        cached_audio = _price(spec.cached_audio_input_per_1m, audio_in)
        text_out = _price(spec.output_per_1m)
        audio_out = _price(spec.audio_output_per_1m, text_out)
        total = (
            max(self.text_in + self.image_in - self.cached_text_in - self.cached_image_in, 0) * text_in
            + (self.cached_text_in + self.cached_image_in) * cached_text
            + max(self.audio_in - self.cached_audio_in, 0) * audio_in
            + self.cached_audio_in * cached_audio
            + self.text_out * text_out
            + self.audio_out * audio_out
        )
        return total / MILLION

    def detail(self) -> dict[str, int]:
        """The split a usage row's columns do not have."""
        return {
            "text_input_tokens": self.text_in,
            "audio_input_tokens": self.audio_in,
            "image_input_tokens": self.image_in,
            "cached_text_tokens": self.cached_text_in,
            "cached_audio_tokens": self.cached_audio_in,
            "text_output_tokens": self.text_out,
            "audio_output_tokens": self.audio_out,
        }


def _price(value: float | None, default: Decimal = Decimal(0)) -> Decimal:
    # str(): a float price as written in the catalog (0.4, not 0.40000000000000002220...).
    return default if value is None else Decimal(str(value))


def read_usage(usage: object) -> RealtimeUsage:
    """The usage of one `response.done`; see the module's docstring for what is tolerated."""
    flags: list[str] = []

    def count(source: object, name: str) -> int:
        value = source.get(name, 0) if isinstance(source, dict) else 0
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            flags.append(f"bad_{name}")
            return 0
        return value

    if not isinstance(usage, dict):
        return RealtimeUsage(flags=("missing_usage",))
    inputs: Any = usage.get("input_token_details")
    outputs: Any = usage.get("output_token_details")
    cached: Any = inputs.get("cached_tokens_details") if isinstance(inputs, dict) else None
    if isinstance(inputs, dict):
        text_in, audio_in, image_in = (
            count(inputs, "text_tokens"),
            count(inputs, "audio_tokens"),
            count(inputs, "image_tokens"),
        )
        if isinstance(cached, dict):
            cached_text, cached_audio = count(cached, "text_tokens"), count(cached, "audio_tokens")
            cached_image = count(cached, "image_tokens")
        else:
            cached_text, cached_audio, cached_image = count(inputs, "cached_tokens"), 0, 0
    else:
        text_in, audio_in, image_in = count(usage, "input_tokens"), 0, 0
        cached_text, cached_audio, cached_image = 0, 0, 0
    if isinstance(outputs, dict):
        text_out, audio_out = count(outputs, "text_tokens"), count(outputs, "audio_tokens")
    else:
        text_out, audio_out = count(usage, "output_tokens"), 0
    return RealtimeUsage(
        text_in=text_in,
        audio_in=audio_in,
        image_in=image_in,
        cached_text_in=min(cached_text, text_in),
        cached_audio_in=min(cached_audio, audio_in),
        cached_image_in=min(cached_image, image_in),
        text_out=text_out,
        audio_out=audio_out,
        flags=tuple(flags),
    )


SESSION_ROUTE = "realtime.session"  # one row per response, of a relayed session or a WebRTC call


@dataclass(frozen=True, slots=True)
class ResponseMeter:
    """Each `response.done` of one realtime session as its own usage row (route `realtime.session`).

    A row is recorded after the fact through a `Call` whose budget reservation is nought, so the writer
    charges its whole cost to the caller's budget when it settles: the upstream answered already, and
    the session's own reservation (its cost cap, taken when it opened) kept the budget honest meanwhile.
    """

    usage: UsageWriter
    limiter: Limiter
    principal: Principal
    spec: ModelSpec
    lease: Lease  # the session's: who answers (a simulated response costs nothing), released with it
    request_id: str

    def cost(self, response: dict[str, Any]) -> Decimal:
        """The response's exact cost (a simulated one costs nothing: no upstream was paid)."""
        return Decimal(0) if self.lease.answerer == "simulated" else read_usage(response.get("usage")).cost(self.spec)

    def record(self, response: dict[str, Any], upstream: str | None, detail: dict[str, Any]) -> Decimal:
        """The response's row; its exact cost."""
        usage = read_usage(response.get("usage"))
        cost = self.cost(response)
        principal = self.principal
        row = PendingRow(
            call_id=new_call_id(),
            created_at=datetime.now(UTC),
            request_id=self.request_id,
            user_id=principal.user_id,
            api_key_id=principal.api_key_id,
            route=SESSION_ROUTE,
            model=self.spec.id,
            stream=True,
            prompt_tokens=0,
            completion_tokens=0,
            images=0,
            cost_usd=0.0,
            thread_id=None,
        )
        call = Call(
            pending=row,
            principal=principal,
            spec=self.spec,
            decision=Decision(self.limiter.budget(principal, 0.0)),
            lease=Lease(self.lease.provider, self.lease.answerer),  # not the session's release
            may_fall_back=False,
            usage=self.usage,
            reserved=Spent(),
        )
        spent = Spent(usage.input_tokens, usage.output_tokens, usage.cached_tokens, cost_usd=float(cost))
        spent.flags = list(usage.flags)
        call.finish(
            spent,
            stream=True,
            upstream=upstream,
            detail={
                **detail,
                "response_id": response.get("id"),
                "response_status": response.get("status"),
                **usage.detail(),
                "cost_usd": str(cost),
            },
        )
        return cost
