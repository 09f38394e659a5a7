"""The one call pipeline every upstream call goes through: reserve -> who answers -> call -> record -> headers.

1. **Reserve**: `Calls.open` admits a stream against the user's open-stream cap (in memory,
   app/streams.py), then takes the caller's limits for the call (one statement,
   `Limiter.take`) before any upstream byte; a refusal is a 429 and nothing else happens.
2. **Who answers**: `FallbackPolicy` decides, from the operator's mode, the user's
   switch and their own key, which provider answers, and whether an upstream failure may
   be answered by the simulated provider instead (the setting, or a profile's rule).
3. **Call**: `Calls.invoke` runs one `Provider` method (the retry policy lives in the
   clients: the same for every call).
4. **Record**: a `Call` leaves exactly one usage row however it ends (answered, failed,
   fell back, cancelled, a stream abandoned), and that row settles the reservation.
   The call owns what it holds upstream (a leased per-user client, an open stream) and
   lets go of it when it is recorded.
5. **Headers**: `Call.headers` gives the limits' headers and says who answered.

A route's part is to build its request, name its limits and turn the answer (and its
usage) into a response.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from app.auth.principal import Principal
from app.errors import ErrorCode, GatewayError, InvalidRequest, Unavailable, UpstreamError
from app.ratelimit.buckets import Bucket, Decision
from app.ratelimit.limiter import Limiter
from app.registry import ModelSpec
from app.streams import StreamSlot, StreamSlots
from app.tokens import chars_to_tokens
from app.upstream.errors import upstream_failed
from app.upstream.hub import Answerer, Lease, Upstream
from app.upstream.provider import EventStream, Provider
from app.usage.ledger import MalformedUsage, PendingRow, clamp_usage, new_call_id
from app.usage.record import Status, UsageRecord
from app.usage.writer import UsageWriter

log = logging.getLogger("app.calls")

T = TypeVar("T")

# default: follow FALLBACK_TO_SIMULATED; simulated: always fall back; never: never (e.g. moderation).
FallbackRule = Literal["default", "simulated", "never"]

OWN_KEY_REJECTED = (
    "The upstream rejected your stored OpenAI key. Store a new one with PUT /v1/me/openai-key, "
    "or delete it (DELETE /v1/me/openai-key) to use the gateway's key."
)


@dataclass(frozen=True, slots=True)
class FallbackPolicy:
    """Who answers a call, and whether a failed upstream may be stood in for."""

    simulated_mode: bool  # no OPENAI_API_KEY: the operator's "upstream" is the simulated provider
    fallback_to_simulated: bool  # FALLBACK_TO_SIMULATED

    def answerer(self, principal: Principal) -> Answerer:
        """The user's switch first (simulated replies), then their own key, else the operator's."""
        if not principal.use_upstream:
            return "simulated"
        if principal.has_own_key:
            return "own_key"
        return "simulated" if self.simulated_mode else "operator"

    def may_fall_back(self, rule: FallbackRule) -> bool:
        return self.fallback_to_simulated if rule == "default" else rule == "simulated"


@dataclass(slots=True)
class Spent:
    """What one call used (or may use at worst: its reservation), as its usage row records it."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    images: int = 0
    cost_usd: float = 0.0
    estimated: bool = False
    flags: list[str] = field(default_factory=list)  # what had to be fixed in the upstream's report


class Call:
    """One upstream call, from its reservation to its usage row."""

    def __init__(
        self,
        *,
        pending: PendingRow,
        principal: Principal,
        spec: ModelSpec | None,
        decision: Decision,
        lease: Lease,
        may_fall_back: bool,
        usage: UsageWriter,
        reserved: Spent,
        detail: dict[str, Any] | None = None,
        slot: StreamSlot | None = None,
    ) -> None:
        self.call_id = pending.call_id
        self.created_at = pending.created_at
        route, model, request_id, thread_id = pending.route, pending.model, pending.request_id, pending.thread_id
        self.principal = principal
        self.route = route
        self.model = model
        self.spec = spec  # the catalog's entry, which prices tokens (None: not priced by tokens)
        self.request_id = request_id
        self.decision = decision
        self.lease = lease
        self.may_fall_back = may_fall_back
        self.reserved = reserved
        self.thread_id = thread_id
        self.detail = detail
        self.started = time.perf_counter()
        self.fell_back = False
        self.stream: EventStream | None = None
        self.row: UsageRecord | None = None
        self.ended = False  # recorded, or given back
        self._usage = usage
        self._slot = slot  # a stream's open-stream slot, until its response takes it

    @property
    def provider(self) -> Provider:
        return self.lease.provider

    @property
    def simulated(self) -> bool:
        return self.lease.answerer == "simulated"

    @property
    def answered_status(self) -> Status:
        """Who answered, as a usage row's status says it."""
        if self.fell_back:
            return "fallback"
        return "simulated" if self.simulated else "ok"

    def token_spend(self, usage: object, completion_chars: int = 0, *, strict: bool = False) -> Spent:
        """A token-priced answer: the upstream's `usage` (checked and clamped, app/usage/ledger.py), else our
        estimate from the prompt and the text received (marked estimated). A `usage` that is not numbers
        is a malformed answer: with `strict` a 502 (charged the reservation), else estimated and flagged
        (a stream whose text already went out)."""
        flags: list[str] = []
        if isinstance(usage, dict):
            try:
                prompt, completion, cached, flags = clamp_usage(usage)
            except MalformedUsage as error:
                if strict:
                    raise UpstreamError(f"The upstream's answer is malformed: {error}.", billed=True) from error
                usage, flags = None, ["malformed"]
        elif usage is not None:
            if strict:
                raise UpstreamError("The upstream's answer is malformed: usage is not an object.", billed=True)
            usage, flags = None, ["malformed"]
        if usage is None:
            prompt, completion, cached = self.reserved.prompt_tokens, chars_to_tokens(completion_chars), 0
        cost = self.spec.token_cost(prompt, completion, cached) if self.spec is not None else 0.0
        return Spent(prompt, completion, cached, cost_usd=cost, estimated=usage is None, flags=flags)

    def headers(self, upstream_request_id: str | None = None) -> dict[str, str]:
        """The limits' headers, and whether a simulated provider answered."""
        headers = dict(self.decision.headers)
        if self.simulated:
            headers["x-gateway-simulated"] = "true"
        if self.fell_back:
            headers["x-gateway-fallback"] = "true"
        if upstream_request_id:
            headers["x-upstream-request-id"] = upstream_request_id
        return headers

    def finish(
        self,
        spent: Spent | None = None,
        *,
        status: Status | None = None,
        http_status: int = 200,
        stream: bool = False,
        ttft_ms: float | None = None,
        upstream_request_id: str | None = None,
        error_code: str | None = None,
        detail: dict[str, Any] | None = None,
        upstream: str | None = None,
    ) -> None:
        """Record the call's one row and let go of what it holds; once ended, a call ignores later ends.

        Simulated answers cost nothing: no upstream was paid for them.
        """
        if self.ended:
            return
        self.ended = True
        spent = spent or Spent()
        merged = {**(self.detail or {}), **(detail or {})}
        if self.lease.answerer == "own_key":
            merged["key"] = "user"
        if spent.flags:
            merged["usage_flags"] = spent.flags
        self.row = UsageRecord(
            call_id=self.call_id,
            created_at=self.created_at,
            request_id=self.request_id,
            user_id=self.principal.user_id,
            api_key_id=self.principal.api_key_id,
            route=self.route,
            model=self.model,
            status=status or self.answered_status,
            http_status=http_status,
            stream=stream,
            prompt_tokens=spent.prompt_tokens,
            completion_tokens=spent.completion_tokens,
            cached_tokens=spent.cached_tokens,
            tokens_estimated=spent.estimated,
            images=spent.images,
            cost_usd=0.0 if self.simulated else spent.cost_usd,
            latency_ms=(time.perf_counter() - self.started) * 1000,
            ttft_ms=ttft_ms,
            upstream_request_id=upstream_request_id,
            error_code=error_code,
            thread_id=self.thread_id,
            detail=merged or None,
            upstream=None if self.simulated else upstream or (self.stream.upstream if self.stream else None),
            decision=self.decision,
        )
        self._release()
        self._leave_slot()
        self._usage.record(self.row)

    def give_back(self) -> None:
        """End a call that never reached the upstream (refused on the way): no row, its reservation returned."""
        if not self.ended:
            self.ended = True
            self._release()
            self._leave_slot()
            self._usage.give_back(self.call_id, self.decision)

    def hand_over(self) -> None:
        """End the call here without a row: its reservation stays pending, to be settled later from its
        call id and decision, possibly by another process (a WebRTC call's watcher, app/realtime/sideband.py)."""
        if not self.ended:
            self.ended = True
            self._release()
            self._leave_slot()

    def fail(self, error: GatewayError, *, stream: bool = False, spent: Spent | None = None) -> None:
        """Record a failure. One that came after the upstream took the request (`billed`: a body cut
        off, an answer that cannot be read) is charged what the call reserved: the upstream may bill it."""
        if spent is None and getattr(error, "billed", False):
            spent = self.reserved
        self.finish(spent, status="error", http_status=error.status_code, stream=stream, error_code=error.code)

    def attach(self, stream: EventStream) -> None:
        """An open upstream stream this call holds until it is recorded."""
        self.stream = stream

    def take_slot(self) -> StreamSlot | None:
        """The call's open-stream slot, handed to the SSE response that releases it when the stream ends
        (later than the call, which ends when the upstream's part is over)."""
        slot, self._slot = self._slot, None
        return slot

    def _leave_slot(self) -> None:
        if self._slot is not None:
            self._slot.release()

    def _release(self) -> None:
        if self.stream is not None:
            self.stream.close()
        release, self.lease.release = self.lease.release, _released
        release()


def _released() -> None:
    return None


class Calls:
    """The pipeline's shared parts: the limiter, the providers, the usage writer and the policy."""

    def __init__(
        self,
        *,
        limiter: Limiter,
        upstream: Upstream,
        usage: UsageWriter,
        policy: FallbackPolicy,
        streams: StreamSlots,
    ) -> None:
        self.limiter = limiter
        self.streams = streams
        self.upstream = upstream
        self.usage = usage
        self.policy = policy

    async def open(
        self,
        principal: Principal,
        *,
        route: str,
        spec: ModelSpec | None,
        request_id: str,
        buckets: Sequence[Bucket],
        reserved: Spent | None = None,
        prior: Decision | None = None,
        model: str | None = None,
        fallback: FallbackRule = "default",
        stream: bool = False,
        thread_id: uuid.UUID | None = None,
        detail: dict[str, Any] | None = None,
        slot: StreamSlot | None = None,
    ) -> Call:
        """Admit a stream, reserve the call's limits and lease who answers it. Validate the request first:
        an opened call must end with `invoke` (which records a failure), `finish`, or `give_back`. `prior`
        is what an earlier check of the same call reserved (a turn takes its request rate before any
        write); `slot` is a stream's slot admitted earlier, for the same reason. Either way the call owns
        the slot from here, and releases it when it ends unless its response took it (`take_slot`)."""
        if stream and slot is None:
            slot = self.streams.admit(principal)
        try:
            if self.usage.full:
                raise Unavailable(
                    "The gateway is shedding load: its usage records are backed up; retry shortly.",
                    code=ErrorCode.SERVICE_UNAVAILABLE,
                    headers={"retry-after": "5"},
                )
            reserved = reserved or Spent()
            pending = PendingRow(
                call_id=new_call_id(),
                created_at=datetime.now(UTC),
                request_id=request_id,
                user_id=principal.user_id,
                api_key_id=principal.api_key_id,
                route=route,
                model=model or (spec.id if spec is not None else route),
                stream=stream,
                prompt_tokens=reserved.prompt_tokens,
                completion_tokens=reserved.completion_tokens,
                images=reserved.images,
                cost_usd=reserved.cost_usd,
                thread_id=thread_id,
            )
            try:
                decision = await self.limiter.take(buckets, pending)
            except GatewayError as refusal:
                if refusal.__cause__ is not None:  # refused for want of the database: the check may have counted
                    self.usage.give_back(pending.call_id, Decision(buckets), uncertain=True)
                raise
            except BaseException:  # cancelled while the check was out: it may still commit
                self.usage.give_back(pending.call_id, Decision(buckets), uncertain=True)
                raise
            if prior is not None:
                decision = prior.joined(decision)
            try:
                lease = await self.upstream.lease(self.policy.answerer(principal), principal.user_id)
            except BaseException:
                self.usage.give_back(pending.call_id, decision)
                raise
            return Call(
                pending=pending,
                principal=principal,
                spec=spec,
                decision=decision,
                lease=lease,
                may_fall_back=self.policy.may_fall_back(fallback),
                usage=self.usage,
                reserved=reserved,
                detail=detail,
                slot=slot,
            )
        except BaseException:  # refused, or the lease failed: the stream never opened
            if slot is not None:
                slot.release()
            raise

    async def invoke(self, call: Call, operation: Callable[[Provider], Awaitable[T]], *, stream: bool = False) -> T:
        """`operation(provider)`; when the upstream itself failed and the call may fall back, the same
        operation on the simulated provider. A failure not answered so is recorded and raised; so is a
        cancellation (the client went away): the call leaves its row either way."""
        try:
            try:
                return await operation(call.provider)
            except GatewayError as error:
                if call.lease.answerer == "own_key" and error.code == "upstream_auth_error":
                    raise InvalidRequest(OWN_KEY_REJECTED, code=ErrorCode.OPENAI_KEY_REJECTED) from error
                # A failure after the upstream took the request (`billed`) is not stood in for: it may be
                # billed, so the call is charged its reservation (`Call.fail`), never recorded as free.
                billed = getattr(error, "billed", False)
                if not (call.may_fall_back and not call.simulated and upstream_failed(error)) or billed:
                    raise
                log.warning("upstream failed (%s), answering simulated: %s", call.route, error.message)
            call._release()
            call.lease, call.fell_back = Lease(self.upstream.simulated, "simulated"), True
            return await operation(call.provider)
        except GatewayError as error:
            call.fail(error, stream=stream)
            raise
        except BaseException:  # the client went away: the upstream may have taken the request
            call.finish(call.reserved, status="cancelled", http_status=499, stream=stream)
            raise
